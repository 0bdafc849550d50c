"""Render meshes as NMR-style RGBA views with pytorch3d (CPU-friendly, batched).

Camera conventions follow the NMR/SoftRas ShapeNet renders: a perspective
camera with a 30 degree field of view, looking at the origin from
(azimuth, elevation, distance), placed with pytorch3d's
`look_at_view_transform` (y is up; azimuth 0 looks from +z). Meshes are
normalised like ShapeNetCore v2 models (bounding box centred at the origin,
diagonal 1), so at distance 2.732 they fill a good part of the frame.

Shading is deliberately simple (flat Lambertian from a light fixed relative to
the camera, plus ambient, per-vertex colours averaged per face): the renders
exist to give the image models colour and shading cues, while the alpha
channel is the hard silhouette that every mask in the datasets derives from.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pytorch3d.renderer import (
    FoVPerspectiveCameras,
    MeshRasterizer,
    RasterizationSettings,
    look_at_view_transform,
)
from pytorch3d.structures import Meshes

#: NMR/SoftRas perspective field of view (degrees)
NMR_FOV = 30.0
#: light direction in camera coordinates (pytorch3d: +x left, +y up, +z forward):
#: from behind the camera, slightly above and to the left
LIGHT_DIR_CAMERA = (0.35, 0.55, -1.0)
AMBIENT = 0.45
DIFFUSE = 0.55
#: chunk limits: face x view count (the naive CPU rasteriser's work per pixel) and
#: output pixels (pytorch3d's fragments take ~40 bytes per pixel)
CHUNK_FACE_VIEWS = 400_000
CHUNK_PIXELS = 2_000_000
BIN_SIZE = 0  # the CPU build of pytorch3d only has the naive rasteriser

MeshLike = Sequence  # (verts (Nv,3), faces (Nf,3), colors (3,) or (Nv,3))


def normalize_vertices(verts: np.ndarray) -> np.ndarray:
    """Centre the bounding box at the origin and scale its diagonal to 1.

    This is the ShapeNetCore v2 normalisation; it makes renders of every
    source comparable in scale under the NMR camera distance.
    """
    v = np.asarray(verts, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"vertices must be a non-empty (Nv, 3) array, got shape {v.shape}")
    lo, hi = v.min(0), v.max(0)
    diag = float(np.linalg.norm(hi - lo))
    if not np.isfinite(diag) or diag <= 0:
        raise ValueError(f"degenerate mesh: bounding box diagonal is {diag}")
    return ((v - (lo + hi) / 2) / diag).astype(np.float32)


def cluster_vertices(verts: np.ndarray, faces: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices on a grid of `cell` size and drop the faces that collapse.

    pytorch3d's CPU rasteriser tests every face against every pixel, so a
    dense ShapeNet mesh renders slowly; at a cell well below one pixel the
    silhouette is unchanged while the face count drops sharply. The mesh
    falls back to the input when clustering would leave no faces.
    """
    v = np.asarray(verts, dtype=np.float64)
    q = np.floor((v - v.min(0)) / cell).astype(np.int64)
    _, inverse, counts = np.unique(q, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    merged = np.zeros((len(counts), 3))
    np.add.at(merged, inverse, v)
    merged /= counts[:, None]
    f = inverse[np.asarray(faces, dtype=np.int64)]
    keep = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
    if not keep.any():
        return np.asarray(verts, dtype=np.float32), np.asarray(faces, dtype=np.int64)
    f = np.unique(np.sort(f[keep], 1), axis=0)  # drop duplicated faces (orientation is irrelevant)
    return merged.astype(np.float32), f


def view_transforms(cameras: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch3d world-to-view (R, T) for (..., 3) azimuth/elevation/distance rows."""
    cams = torch.tensor(np.asarray(cameras, dtype=np.float32)).reshape(-1, 3)
    return look_at_view_transform(dist=cams[:, 2], elev=cams[:, 1], azim=cams[:, 0])


def _face_colors(verts: np.ndarray, faces: np.ndarray, colors) -> np.ndarray:
    """(Nf,3) float32 face colours from a per-object (3,) or per-vertex (Nv,3) colour."""
    c = np.asarray(colors, dtype=np.float32)
    if c.shape == (3,):
        return np.broadcast_to(c, (len(faces), 3)).astype(np.float32)
    if c.shape == (len(verts), 3):
        return c[faces].mean(1).astype(np.float32)
    raise ValueError(
        f"colors must be (3,) per object or (Nv={len(verts)}, 3) per vertex, got {c.shape}"
    )


def _check_mesh(i: int, verts, faces) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(verts, dtype=np.float32)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"mesh {i}: vertices must be (Nv, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"mesh {i}: faces must be a non-empty (Nf, 3) array, got {f.shape}")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"mesh {i}: face indices must lie in [0, {len(v)}), got [{f.min()}, {f.max()}]")
    return v, f


def _render_chunk(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    cams: np.ndarray,
    image_size: int,
    cull_backfaces: bool,
) -> np.ndarray:
    """Rasterise len(items) meshes x V views in one pytorch3d batch."""
    n, v_count = len(items), cams.shape[1]
    verts_list, faces_list, col_list = [], [], []
    for (v, f, fc) in items:
        tv, tf, tc = torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(fc)
        for _ in range(v_count):  # object-major order, matching cams.reshape(-1, 3)
            verts_list.append(tv)
            faces_list.append(tf)
            col_list.append(tc)
    meshes = Meshes(verts=verts_list, faces=faces_list)
    R, T = view_transforms(cams)
    cameras = FoVPerspectiveCameras(R=R, T=T, fov=NMR_FOV, znear=0.1, zfar=100.0)
    settings = RasterizationSettings(
        image_size=image_size, blur_radius=0.0, faces_per_pixel=1, bin_size=BIN_SIZE,
        cull_backfaces=cull_backfaces, perspective_correct=True,
    )
    frags = MeshRasterizer(cameras=cameras, raster_settings=settings)(meshes)
    p2f = frags.pix_to_face[..., 0]  # (B,H,W) packed face index, -1 = background
    hit = p2f >= 0
    idx = p2f.clamp(min=0)
    normals = meshes.faces_normals_packed()[idx]  # world frame
    # light direction to world: d_cam = d_world @ R  =>  d_world = R @ d_cam
    light = torch.tensor(LIGHT_DIR_CAMERA, dtype=torch.float32)
    light = light / light.norm()
    light_w = torch.einsum("bij,j->bi", R, light)
    lambert = (normals * light_w[:, None, None, :]).sum(-1).abs()  # two-sided
    shade = AMBIENT + DIFFUSE * lambert
    rgb = torch.cat(col_list, 0)[idx] * shade[..., None]
    rgb = torch.where(hit[..., None], rgb.clamp(0, 1), torch.zeros_like(rgb))
    rgba = torch.cat([rgb, hit[..., None].float()], -1)
    out = (rgba * 255.0).round().to(torch.uint8).numpy()
    return out.reshape(n, v_count, image_size, image_size, 4)


def render_objects(
    meshes: Sequence[MeshLike],
    cameras: np.ndarray,
    image_size: int = 64,
    normalize: bool = False,
    cull_backfaces: bool = False,
) -> np.ndarray:
    """Render every mesh from every camera: uint8 (N, V, H, W, 4) RGBA.

    meshes: (verts (Nv,3), faces (Nf,3), colors (3,) or (Nv,3) in [0,1]).
    cameras: (V,3) shared by all meshes or (N,V,3) per mesh; rows are
    azimuth deg, elevation deg, distance. Background pixels are (0,0,0,0).
    normalize: apply `normalize_vertices` first (leave False for meshes
    already in the world frame the cameras look at).
    cull_backfaces: skip faces turned away from the camera (about 30% faster);
    only for closed meshes wound outward, like the synth13 ones.
    Meshes are grouped into chunks of bounded face x view count, so
    pytorch3d's naive CPU rasteriser runs large batches without huge tensors.
    """
    cams = np.asarray(cameras, dtype=np.float32)
    n = len(meshes)
    if cams.ndim == 2:
        cams = np.broadcast_to(cams, (n,) + cams.shape)
    if cams.ndim != 3 or cams.shape[0] != n or cams.shape[2] != 3:
        raise ValueError(f"cameras must be (V,3) or (N={n},V,3), got {np.asarray(cameras).shape}")
    v_count = cams.shape[1]
    out = np.zeros((n, v_count, image_size, image_size, 4), dtype=np.uint8)
    if n == 0 or v_count == 0:
        return out
    prepared = []
    for i, m in enumerate(meshes):
        if len(m) != 3:
            raise ValueError(f"mesh {i}: expected (verts, faces, colors), got {len(m)} items")
        v, f = _check_mesh(i, m[0], m[1])
        if normalize:
            v = normalize_vertices(v)
        prepared.append((v, f, _face_colors(v, f, m[2])))
    pixels_per_object = v_count * image_size * image_size
    start = 0
    while start < n:
        stop, budget = start, 0
        while stop < n and (stop == start or (
            budget + len(prepared[stop][1]) * v_count <= CHUNK_FACE_VIEWS
            and (stop - start + 1) * pixels_per_object <= CHUNK_PIXELS
        )):
            budget += len(prepared[stop][1]) * v_count
            stop += 1
        with torch.autocast("cpu", enabled=False):  # full precision, also when called inside a bf16 step
            out[start:stop] = _render_chunk(
                prepared[start:stop], np.ascontiguousarray(cams[start:stop]), image_size, cull_backfaces
            )
        start = stop
    return out

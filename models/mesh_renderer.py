"""Meshes seen by (azimuth, elevation, distance) cameras, rendered as soft silhouettes
in the crop frame of an instance.

Camera model (the choice the recon, viewpoint and render stages share):
  * a pytorch3d FoVPerspectiveCameras with the NMR field of view (30 deg) looking at
    the origin from (azimuth, elevation, distance) through `look_at_view_transform`
    (degrees; y up; azimuth 0 looks from +z) — the convention the object renders
    were made with, so a correct mesh and camera reproduce the object's render;
  * followed by a 2D similarity in NDC, x' = s*x + tx, y' = s*y + ty ("placement").
    A crop of an image is exactly such a map (zoom + shift), so perspective camera +
    placement reproduces the object's appearance in any square crop of any image.
    The placement is folded into the projection matrix (K rows 0 and 1 become
    s*K_row + t*K_row3), so every pytorch3d consumer of the cameras sees it.
  * `fit_placement` derives the placement instead of predicting it: the uniform
    scale and shift that map the 2D box of the projected vertices (the extremes of
    a mesh's projection are vertices) onto a target box — the instance's amodal box
    in the crop frame, which the crop itself is built around.

pytorch3d cameras are not nn.Modules and do not follow `.to()`, so they are built
on the vertices' device at every call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch3d.renderer import (
    BlendParams,
    FoVPerspectiveCameras,
    MeshRasterizer,
    RasterizationSettings,
    SoftSilhouetteShader,
    look_at_view_transform,
)
from pytorch3d.structures import Meshes
from torch import nn

from amodal3d.models import native_silhouette
from amodal3d.models.face_windows import compiled_window, window_sides
from amodal3d.models.hard_silhouette import HardSilhouette, check_without_grad, needs_gradient
from amodal3d.models.precision import float32_geometry

NMR_FOV = 30.0
ZNEAR = 0.1
ZFAR = 100.0


class Pytorch3DSoftSilhouette(nn.Module):
    """pytorch3d MeshRasterizer + SoftSilhouetteShader behind the interface of
    models.soft_silhouette.SoftSilhouetteRenderer: forward(meshes, cameras) -> (B,H,W)."""

    def __init__(
        self, image_size: int, sigma: float = 1e-4, faces_per_pixel: int = 10, blur_radius: float | None = None
    ) -> None:
        super().__init__()
        if blur_radius is None:
            # faces whose sigmoid(-d^2/sigma) would fall below 1e-4 cannot change a pixel
            blur_radius = math.log(1.0 / 1e-4 - 1.0) * sigma
        self.image_size = int(image_size)
        self.raster_settings = RasterizationSettings(
            image_size=self.image_size, blur_radius=blur_radius, faces_per_pixel=faces_per_pixel, bin_size=0
        )
        self.blend = BlendParams(sigma=sigma, gamma=1e-4)

    def forward(self, meshes: Meshes, cameras) -> torch.Tensor:
        fragments = MeshRasterizer(cameras=cameras, raster_settings=self.raster_settings)(meshes)
        return SoftSilhouetteShader(self.blend)(fragments, meshes, cameras=cameras)[..., 3]


def _window_log_keep(tri: torch.Tensor, origin: torch.Tensor, w: int, size: int, sigma: float, blur: float):
    """log(1 - D) of every pixel of a w x w window per face, and the pixels' flat index.

    tri (n,3,2) vertices in pixel units (u right, v down; pixel centres at i + 0.5),
    origin (n,2) window's first pixel (column, row). D = sigmoid(-d/sigma) with d the
    signed squared NDC distance of the pixel centre to the triangle (negative
    inside), as in SoftRas / pytorch3d; pixels outside the image or farther than
    `blur` contribute 0. The projection of the pixel onto each edge is held
    constant for autograd (envelope theorem: the exact derivative of the minimum)."""
    offs = torch.arange(w, device=tri.device, dtype=tri.dtype)
    px = origin[:, 0, None, None] + offs[None, None, :] + 0.5  # (n,1,w) column centres
    py = origin[:, 1, None, None] + offs[None, :, None] + 0.5  # (n,w,1) row centres
    dists, sides = [], []
    for i, j in ((0, 1), (1, 2), (2, 0)):
        sx, sy = tri[:, i, 0, None, None], tri[:, i, 1, None, None]
        ex = (tri[:, j, 0] - tri[:, i, 0])[:, None, None]
        ey = (tri[:, j, 1] - tri[:, i, 1])[:, None, None]
        rx, ry = px - sx, py - sy
        with torch.no_grad():
            t = ((rx * ex + ry * ey) / (ex * ex + ey * ey).clamp_min(1e-12)).clamp(0.0, 1.0)
            sides.append(rx * ey - ry * ex)
        dx, dy = rx - t * ex, ry - t * ey
        dists.append(dx * dx + dy * dy)
    d = torch.minimum(torch.minimum(dists[0], dists[1]), dists[2]) * (2.0 / size) ** 2
    with torch.no_grad():
        s0, s1, s2 = sides
        inside = ((s0 > 0) & (s1 > 0) & (s2 > 0)) | ((s0 < 0) & (s1 < 0) & (s2 < 0))
        col = (px - 0.5).long().expand(-1, w, -1)
        row = (py - 0.5).long().expand(-1, -1, w)
        ok = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    sd = torch.where(inside, -d, d)
    with torch.no_grad():
        ok &= sd < blur
    log_keep = torch.where(ok, F.logsigmoid(sd / sigma), torch.zeros_like(sd))
    return log_keep, row.clamp(0, size - 1) * size + col.clamp(0, size - 1)


def sparse_soft_silhouette(
    xy: torch.Tensor, faces: torch.Tensor, size: int, sigma: float, blur_radius: float,
    stats: dict | None = None, compiled: bool = False,
) -> torch.Tensor:
    """(B,S,S) SoftRas silhouettes 1 - prod_f (1 - sigmoid(-d_f/sigma)) over every face
    within blur_radius of a pixel, from NDC vertices xy (B,V,2) and faces (F,3) or
    padded (B,F,3) (-1 rows ignored).

    Each face is evaluated only on a small window around its projected box: faces
    are bucketed by window size (window_sides), so the work is about the pixels the
    faces cover, not pixels x faces as in pytorch3d's CPU rasteriser. It equals
    pytorch3d's MeshRasterizer + SoftSilhouetteShader whenever no pixel has more
    than faces_per_pixel faces within the blur radius (elsewhere it counts them
    all, as SoftRas does). `stats`, if given, gets "window_pixels": the pixels
    evaluated (the work, forward and backward, grows with it). `compiled`: the
    window maths through torch.compile (face_windows.compiled_window; same values)."""
    b = xy.shape[0]
    if faces.ndim == 2:
        faces = faces[None].expand(b, -1, -1)
    uv = (1.0 - xy) * (size / 2.0)  # pytorch3d NDC (+x left, +y up) -> pixel units
    bi, fi = (faces >= 0).all(-1).nonzero(as_tuple=True)
    tri = uv[bi[:, None], faces[bi, fi]]  # (N,3,2)
    r = math.sqrt(blur_radius) * size / 2.0
    with torch.no_grad():
        lo = torch.floor(tri.min(dim=1).values - r - 0.5)
        hi = torch.floor(tri.max(dim=1).values + r - 0.5)
        lo = torch.maximum(lo, torch.full_like(lo, -1.0))  # windows start at most one pixel off-image
        extent = (torch.minimum(hi, torch.full_like(hi, float(size))) - lo).max(dim=1).values + 1
        bucket, sides = window_sides(extent.clamp(1, size + 1))
    if stats is not None:
        stats["window_pixels"] = int((bucket * bucket).sum())
    window = compiled_window(_window_log_keep) if compiled else _window_log_keep
    values, index = [], []
    for w in sides:
        sel = (bucket == w).nonzero(as_tuple=True)[0]
        lk, pix = window(tri[sel], lo[sel], int(w), size, sigma, blur_radius)
        values.append(lk.reshape(-1))
        index.append((bi[sel, None, None] * (size * size) + pix).reshape(-1))
    acc = torch.zeros(b * size * size, device=xy.device, dtype=xy.dtype)
    if values:
        acc = acc.index_add(0, torch.cat(index), torch.cat(values))
    return (-torch.expm1(acc)).view(b, size, size)


class SparseSoftSilhouette(nn.Module):
    """SoftRas silhouettes by per-face windows (see sparse_soft_silhouette): the
    interface of SoftSilhouetteRenderer, several times faster on the CPU than a
    pixels x faces rasteriser at the crop sizes used here. A mesh reaching the
    camera's near plane goes to the exact pytorch3d path (that mesh only: its
    backward is some 100x slower; `last_exact_rows` counts them). `last_stats`
    holds the latest call's window work (sparse_soft_silhouette's stats; 0 for a native
    call); `compiled` runs the window maths through torch.compile; `native`: renders
    without gradient on the CPU go to the C++ kernel of models.native_silhouette (same
    values within 2e-6), where it builds."""

    def __init__(self, image_size: int, sigma: float = 1e-4, faces_per_pixel: int = 10,
                 blur_radius: float | None = None, compiled: bool = False, native: bool = False) -> None:
        super().__init__()
        self.compiled = bool(compiled)
        self.native = bool(native)
        self.image_size = int(image_size)
        self.sigma = float(sigma)
        self.blur_radius = math.log(1.0 / 1e-4 - 1.0) * sigma if blur_radius is None else float(blur_radius)
        self.exact = Pytorch3DSoftSilhouette(image_size, sigma, faces_per_pixel, self.blur_radius)

    def _far_meshes(self, xy: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """Silhouettes of meshes clear of the near plane: the native kernel where it applies."""
        if (self.native and xy.device.type == "cpu" and not (torch.is_grad_enabled() and xy.requires_grad)
                and native_silhouette.available()):
            return native_silhouette.soft_silhouette(xy, faces, self.image_size, self.sigma, self.blur_radius)
        return sparse_soft_silhouette(xy, faces, self.image_size, self.sigma, self.blur_radius, self.last_stats,
                                      self.compiled)

    def forward(self, meshes: Meshes, cameras) -> torch.Tensor:
        verts = meshes.verts_padded()
        ndc = cameras.transform_points(verts)
        depth = cameras.get_world_to_view_transform().transform_points(verts)[..., 2]
        znear = torch.as_tensor(cameras.get_znear(), device=depth.device, dtype=depth.dtype).reshape(-1, 1)
        near = (depth.detach() <= znear).any(dim=1)  # (B,) meshes reaching the near plane
        self.last_exact_rows = int(near.sum())
        self.last_stats = {"window_pixels": 0}
        if not near.any():
            return self._far_meshes(ndc[..., :2], meshes.faces_padded())
        # only the meshes reaching the plane take the exact (slow) path
        sil = verts.new_zeros(verts.shape[0], self.image_size, self.image_size)
        far, rows = (~near).nonzero(as_tuple=True)[0], near.nonzero(as_tuple=True)[0]
        if len(far):
            sil = sil.index_put((far,), self._far_meshes(ndc[far][..., :2], meshes.faces_padded()[far]))
        return sil.index_put((rows,), self.exact(meshes[rows.tolist()], cameras[rows]))


def make_silhouette_renderer(
    image_size: int, sigma: float = 1e-4, faces_per_pixel: int = 10, backend: str = "sparse"
) -> nn.Module:
    """The soft-silhouette renderer of a backend: "sparse" (SparseSoftSilhouette),
    "pytorch3d" (its rasteriser + shader), or "auto"/"fast" (models.soft_silhouette,
    pytorch3d-exact with a fast CPU backward)."""
    if backend == "sparse":
        return SparseSoftSilhouette(image_size, sigma=sigma, faces_per_pixel=faces_per_pixel)
    if backend == "pytorch3d":
        return Pytorch3DSoftSilhouette(image_size, sigma=sigma, faces_per_pixel=faces_per_pixel)
    if backend not in ("auto", "fast"):
        raise ValueError(f"renderer backend {backend!r}: expected sparse, auto, fast or pytorch3d")
    from amodal3d.models.soft_silhouette import SoftSilhouetteRenderer

    return SoftSilhouetteRenderer(image_size, sigma=sigma, faces_per_pixel=faces_per_pixel, backend=backend)


def view_transform(camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) of look-at cameras from (B,3) azimuth deg, elevation deg, distance."""
    if camera.ndim != 2 or camera.shape[-1] != 3:
        raise ValueError(f"camera must be (B,3) azimuth/elevation/distance, got {tuple(camera.shape)}")
    return look_at_view_transform(
        dist=camera[:, 2], elev=camera[:, 1], azim=camera[:, 0], degrees=True, device=camera.device
    )


def projection_matrix(place: torch.Tensor, fov: float = NMR_FOV) -> torch.Tensor:
    """(B,4,4) column-form perspective K followed by the NDC similarity `place`
    = (B,3) scale, tx, ty."""
    b = place.shape[0]
    k = FoVPerspectiveCameras(device=place.device).compute_projection_matrix(
        ZNEAR, ZFAR, fov, 1.0, True
    ).expand(b, 4, 4)
    s, tx, ty = place[:, 0, None], place[:, 1, None], place[:, 2, None]
    row0 = s * k[:, 0] + tx * k[:, 3]
    row1 = s * k[:, 1] + ty * k[:, 3]
    return torch.stack([row0, row1, k[:, 2], k[:, 3]], dim=1)


def make_cameras(camera: torch.Tensor, place: torch.Tensor | None = None, fov: float = NMR_FOV):
    """FoVPerspectiveCameras on camera's device; place=None means identity placement."""
    r, t = view_transform(camera)
    if place is None:
        return FoVPerspectiveCameras(R=r, T=t, fov=fov, znear=ZNEAR, zfar=ZFAR, device=camera.device)
    # znear/zfar as in K: without them the camera reports pytorch3d's default znear of 1,
    # and every mesh with a vertex within 1 of the camera looked as if it crossed the near plane
    return FoVPerspectiveCameras(R=r, T=t, K=projection_matrix(place, fov), znear=ZNEAR, zfar=ZFAR,
                                 device=camera.device)


@float32_geometry
def project(verts: torch.Tensor, camera: torch.Tensor, fov: float = NMR_FOV) -> torch.Tensor:
    """(B,V,2) NDC coordinates of the vertices under the camera, before placement."""
    return make_cameras(camera, None, fov).transform_points(verts)[..., :2]


def pixel_box_to_ndc(box: torch.Tensor, size: int) -> torch.Tensor:
    """xyxy pixel boxes of an SxS image -> (B,4) NDC (cx, cy, w, h).

    pytorch3d NDC: +x left, +y up, the image spans [-1,1]; pixel column u (edges at
    integers) maps to x = 1 - 2u/S."""
    x0, y0, x1, y1 = box.unbind(-1)
    cx = 1.0 - (x0 + x1) / size
    cy = 1.0 - (y0 + y1) / size
    return torch.stack([cx, cy, 2.0 * (x1 - x0) / size, 2.0 * (y1 - y0) / size], dim=-1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B,4) xyxy pixel boxes (x2/y2 exclusive, as the dataset's boxes) of (B,1,S,S)
    or (B,S,S) masks (> 0.5); an empty mask gets the whole frame."""
    from torchvision.ops import masks_to_boxes

    m = (masks.reshape(masks.shape[0], *masks.shape[-2:]) > 0.5)
    h, w = m.shape[-2:]
    out = m.new_tensor([[0.0, 0.0, w, h]], dtype=torch.float32).repeat(m.shape[0], 1)
    full = m.flatten(1).any(dim=1)
    if full.any():
        out[full] = masks_to_boxes(m[full]).float() + out.new_tensor([0.0, 0.0, 1.0, 1.0])
    return out


def box_in_crop(box: torch.Tensor, crop_box: torch.Tensor, size: int) -> torch.Tensor:
    """Image-frame xyxy `box` expressed in the pixel frame of the SxS crop of `crop_box`."""
    x0, y0, x1, y1 = crop_box.unbind(-1)
    sx = size / (x1 - x0).clamp_min(1e-6)
    sy = size / (y1 - y0).clamp_min(1e-6)
    return torch.stack(
        [(box[:, 0] - x0) * sx, (box[:, 1] - y0) * sy, (box[:, 2] - x0) * sx, (box[:, 3] - y0) * sy], dim=-1
    )


@float32_geometry
def fit_placement(verts: torch.Tensor, camera: torch.Tensor, target_ndc: torch.Tensor, fov: float = NMR_FOV):
    """(B,3) placement mapping the box of the projected vertices onto the NDC box
    target_ndc (cx, cy, w, h), with one uniform scale (the geometric mean of the
    two axis ratios, so a wrong aspect ratio shows up in the silhouette)."""
    p = project(verts, camera, fov)
    lo, hi = p.min(dim=1).values, p.max(dim=1).values
    size = (hi - lo).clamp_min(1e-4)
    centre = 0.5 * (lo + hi)
    s = torch.sqrt(target_ndc[:, 2] * target_ndc[:, 3] / (size[:, 0] * size[:, 1]))
    t = target_ndc[:, :2] - s[:, None] * centre
    return torch.cat([s[:, None], t], dim=1)


@float32_geometry
def centred_box_ndc(verts: torch.Tensor, camera: torch.Tensor, margin: float, fov: float = NMR_FOV):
    """The NDC box an object gets in a crop built around its own projection: centred,
    the longer side 2/margin wide (what the crop loader does with amodal boxes)."""
    p = project(verts, camera, fov)
    size = (p.max(dim=1).values - p.min(dim=1).values).clamp_min(1e-4)
    side = 2.0 / margin
    wh = side * size / size.max(dim=1, keepdim=True).values
    return torch.cat([torch.zeros_like(wh), wh], dim=1)


class CropRenderer(nn.Module):
    """Soft silhouettes of (verts, faces) under (camera, placement), in an SxS frame."""

    def __init__(
        self, sigma: float = 1e-4, faces_per_pixel: int = 10, backend: str = "sparse", fov: float = NMR_FOV,
        without_grad: str = "soft", compiled: bool = False, native: bool = False,
    ) -> None:
        super().__init__()
        self.compiled = bool(compiled)  # the per-face window maths through torch.compile (same values)
        self.native = bool(native)  # soft renders without gradient by the C++ CPU kernel (same values)
        self.sigma = sigma
        self.faces_per_pixel = faces_per_pixel
        self.backend = backend
        self.fov = fov
        self.without_grad = check_without_grad(without_grad)
        self._renderers: dict[tuple[int, bool], nn.Module] = {}
        self.last_exact_rows = 0  # meshes of the latest call that took the slow exact path
        self.last_window_pixels = 0  # pixels the sparse renderer evaluated in the latest call

    def renderer_for(self, size: int, *tensors: torch.Tensor) -> nn.Module:
        """The renderer of an SxS frame for a render of `tensors`: the hard one when no
        gradient can flow to them and without_grad is "hard", else the soft one."""
        hard = self.without_grad == "hard" and not needs_gradient(*tensors)
        if (size, hard) not in self._renderers:
            soft = make_silhouette_renderer(size, sigma=self.sigma, faces_per_pixel=self.faces_per_pixel,
                                            backend=self.backend)
            self._renderers[(size, False)] = soft
            if hard:
                self._renderers[(size, True)] = HardSilhouette(size, self.sigma, soft)
        renderer = self._renderers[(size, hard)]
        for r in (renderer, getattr(renderer, "exact", None)):
            if hasattr(r, "compiled"):
                r.compiled = self.compiled
            if hasattr(r, "native"):
                r.native = self.native
        return renderer

    @float32_geometry
    def forward(
        self, verts: torch.Tensor, faces: torch.Tensor, camera: torch.Tensor, place: torch.Tensor, size: int
    ) -> torch.Tensor:
        """(B,size,size) silhouettes in [0,1] (0/1 when hard); faces (F,3) shared or (B,F,3)."""
        if faces.ndim == 2:
            faces = faces[None].expand(verts.shape[0], -1, -1)
        meshes = Meshes(verts=verts, faces=faces)
        renderer = self.renderer_for(int(size), verts, camera, place)
        sil = renderer(meshes, make_cameras(camera, place, self.fov))
        self.last_exact_rows = int(getattr(renderer, "last_exact_rows", 0))
        self.last_window_pixels = int(getattr(renderer, "last_stats", {}).get("window_pixels", 0))
        return sil


def _set_on_renderers(module: nn.Module, attr: str, value) -> int:
    """Set `attr` of every CropRenderer inside `module`; the number set."""
    found = [m for m in module.modules() if isinstance(m, CropRenderer)]
    for m in found:
        setattr(m, attr, value)
    return len(found)


def set_renderer_compiled(module: nn.Module, on: bool) -> int:
    """Switch the torch.compile'd window maths on or off in every CropRenderer inside
    `module`; the number switched."""
    return _set_on_renderers(module, "compiled", bool(on))


def set_renderer_native(module: nn.Module, on: bool) -> int:
    """Switch the native CPU kernel (models.native_silhouette) for soft renders without
    gradient on or off in every CropRenderer inside `module`; the number switched."""
    return _set_on_renderers(module, "native", bool(on))


def set_silhouettes_without_grad(module: nn.Module, mode: str) -> int:
    """Switch every CropRenderer inside `module` (a stage, a ShapePrior) to `mode` for
    the renders no gradient flows through ("hard" | "soft"); the number switched."""
    check_without_grad(mode)
    return _set_on_renderers(module, "without_grad", mode)

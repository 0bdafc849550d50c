"""Binary mesh silhouettes for renders no gradient flows through.

A soft (SoftRas) silhouette exists for its gradient; where none is needed (the
camera-hypothesis choice, a frozen 3D prior, inference) a pixel is simply in or out:
its centre lies inside a projected triangle or not. Each face is tested only on the
pixels of its own projected box, faces bucketed by box size (window_sides) as in
models.mesh_renderer.sparse_soft_silhouette, with that function's pixel grid and
inside test (both windings count, no culling). Each face is grown across its edges by
the distance at which the soft silhouette thresholded at 0.5 still covers a pixel
next to a closed mesh's outline (soft_threshold_margin): on smooth meshes the two agree
but for a few outline pixels; on trained recon meshes thin parts make them differ
(docs/results.md, "Hard silhouettes"), hence opt-in. A mesh reaching the camera's near
plane goes to the exact soft path, thresholded at 0.5.
"""

from __future__ import annotations

import math

import torch
from pytorch3d.structures import Meshes
from torch import nn

from amodal3d.errors import ConfigError
from amodal3d.models.face_windows import compiled_window, window_sides


def _window_inside(tri: torch.Tensor, origin: torch.Tensor, w: int, size: int,
                   margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside (n,w,w) bool, flat pixel index (n,w,w)) of a w x w window per face:
    tri (n,3,2) in pixel units (u right, v down; centres at i + 0.5), origin (n,2)
    the window's first (column, row); a pixel is in when its centre is inside every
    edge's line pushed `margin` pixels outwards (either winding)."""
    offs = torch.arange(w, device=tri.device, dtype=tri.dtype)
    px = origin[:, 0, None, None] + offs[None, None, :] + 0.5
    py = origin[:, 1, None, None] + offs[None, :, None] + 0.5
    e = tri[:, [1, 2, 0]] - tri  # (n,3,2) edges v0v1, v1v2, v2v0
    # the sign every edge function takes inside: edge v0v1's at v2 (0: a degenerate face, never in)
    winding = torch.sign(e[:, 0, 0] * e[:, 2, 1] - e[:, 0, 1] * e[:, 2, 0])
    slack = margin * e.norm(dim=-1)  # the edge function is the distance to the line times the edge length
    inside = (winding != 0)[:, None, None].expand(-1, w, w).clone()
    for i in range(3):
        ex, ey = e[:, i, 0, None, None], e[:, i, 1, None, None]
        side = (px - tri[:, i, 0, None, None]) * ey - (py - tri[:, i, 1, None, None]) * ex
        inside &= winding[:, None, None] * side > -slack[:, i, None, None]
    col = (px - 0.5).long().expand(-1, w, -1)
    row = (py - 0.5).long().expand(-1, -1, w)
    inside &= (col < size) & (row < size)  # windows start on the image, may end past it
    return inside, row.clamp(max=size - 1) * size + col.clamp(max=size - 1)


@torch.no_grad()
def hard_silhouette(xy: torch.Tensor, faces: torch.Tensor, size: int, margin: float = 0.0,
                    compiled: bool = False) -> torch.Tensor:
    """(B,S,S) 0/1 silhouettes from NDC vertices xy (B,V,2) (pytorch3d: +x left, +y up)
    and faces (F,3) or padded (B,F,3) (-1 rows ignored): 1 where a pixel centre lies
    inside a projected face grown by `margin` (NDC units) across each edge; `compiled`:
    the window test through torch.compile (face_windows.compiled_window)."""
    b = xy.shape[0]
    if faces.ndim == 2:
        faces = faces[None].expand(b, -1, -1)
    uv = (1.0 - xy.float()) * (size / 2.0)
    bi, fi = (faces >= 0).all(-1).nonzero(as_tuple=True)
    tri = uv[bi[:, None], faces[bi, fi]]  # (N,3,2)
    # the pixels whose centre (i + 0.5) can lie in the face's box, clipped to the image
    m = margin * size / 2.0
    lo = torch.ceil(tri.min(dim=1).values - m - 0.5).clamp(0, size)
    hi = torch.floor(tri.max(dim=1).values + m - 0.5).clamp(-1, size - 1)
    extent = (hi - lo).max(dim=1).values + 1
    keep = ((hi - lo) >= 0).all(dim=1)
    bi, tri, lo, extent = bi[keep], tri[keep], lo[keep], extent[keep]
    bucket, sides = window_sides(extent)
    window = compiled_window(_window_inside) if compiled else _window_inside
    out = torch.zeros(b * size * size, dtype=torch.bool, device=xy.device)
    for w in sides:
        sel = (bucket == w).nonzero(as_tuple=True)[0]
        inside, pix = window(tri[sel], lo[sel], int(w), size, m)
        flat = bi[sel, None, None] * (size * size) + pix
        out[flat[inside]] = True
    return out.view(b, size, size).to(xy.dtype)


WITHOUT_GRAD = ("hard", "soft")


def check_without_grad(mode: str) -> str:
    """model.silhouette_without_grad: which silhouettes a render no gradient flows through gets."""
    if mode not in WITHOUT_GRAD:
        raise ConfigError(f"model.silhouette_without_grad={mode!r}: expected one of {', '.join(WITHOUT_GRAD)}")
    return mode


def needs_gradient(*tensors: torch.Tensor) -> bool:
    """Whether autograd would carry a gradient from a render of `tensors` back to them."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def soft_threshold_margin(sigma: float) -> float:
    """NDC margin by which the hard test grows each face: where a closed mesh's outline
    runs, two faces (its front and its back) meet, and the soft union 1 - (1 - D)^2 of
    D = sigmoid(-d / sigma) passes 0.5 at d = sigma * ln(1 + sqrt 2) (d: squared NDC
    distance), so the soft silhouette thresholded at 0.5 reaches that far outside."""
    return math.sqrt(sigma * math.log(1.0 + math.sqrt(2.0)))


class HardSilhouette(nn.Module):
    """hard_silhouette behind the renderers' interface forward(meshes, cameras) -> (B,H,W),
    faces grown as the soft renderer of `sigma` thresholded at 0.5 reaches; `exact` (a
    soft renderer of the same size) takes the meshes reaching the near plane."""

    def __init__(self, image_size: int, sigma: float, exact: nn.Module) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.compiled = False  # the window test through torch.compile (CropRenderer sets it)
        self.margin = soft_threshold_margin(float(sigma))
        self.exact = exact

    @torch.no_grad()
    def forward(self, meshes: Meshes, cameras) -> torch.Tensor:
        verts = meshes.verts_padded()
        ndc = cameras.transform_points(verts)
        depth = cameras.get_world_to_view_transform().transform_points(verts)[..., 2]
        znear = torch.as_tensor(cameras.get_znear(), device=depth.device, dtype=depth.dtype).reshape(-1, 1)
        near = (depth <= znear).any(dim=1)
        sil = hard_silhouette(ndc[..., :2], meshes.faces_padded(), self.image_size, self.margin, self.compiled)
        if near.any():
            rows = near.nonzero(as_tuple=True)[0]
            sil[rows] = (self.exact(meshes[rows.tolist()], cameras[rows]) > 0.5).to(sil.dtype)
        return sil

"""Placement of a projected mesh in the instance's crop frame, per axis, with a
learned residual.

models.mesh_renderer places a projection with one uniform scale (a camera can
only zoom), so a mesh whose projected aspect ratio is off overshoots the amodal
box along one axis and falls short along the other. Here the placement is
(sx, sy, tx, ty) in NDC: x' = sx*x + tx, y' = sy*y + ty, folded into the
perspective matrix the same way, so the renderers see an ordinary pytorch3d
camera. `box_placement` fits the projection's box onto a target box
(mode "axes": both sides exactly; "uniform": recon's geometric-mean scale), and
`PlacementHead` predicts a bounded residual (box scale and shift) from the
instance's features, which the render stage learns from visible masks alone.
"""

from __future__ import annotations

import torch
from pytorch3d.renderer import FoVPerspectiveCameras
from torch import nn

from amodal3d.models.mesh_renderer import NMR_FOV, ZFAR, ZNEAR, project, projection_matrix, view_transform

FIT_MODES = ("axes", "uniform")


def box_placement(
    verts: torch.Tensor, camera: torch.Tensor, target_ndc: torch.Tensor, mode: str = "axes", fov: float = NMR_FOV
) -> torch.Tensor:
    """(B,4) sx, sy, tx, ty mapping the box of the projected vertices onto the NDC
    box target_ndc (cx, cy, w, h)."""
    if mode not in FIT_MODES:
        raise ValueError(f"placement fit mode {mode!r}: expected one of {', '.join(FIT_MODES)}")
    p = project(verts, camera, fov)
    lo, hi = p.min(dim=1).values, p.max(dim=1).values
    size = (hi - lo).clamp_min(1e-4)
    centre = 0.5 * (lo + hi)
    scale = target_ndc[:, 2:] / size  # (B,2)
    if mode == "uniform":
        scale = torch.sqrt(scale[:, :1] * scale[:, 1:]).expand(-1, 2)
    shift = target_ndc[:, :2] - scale * centre
    return torch.cat([scale, shift], dim=1)


def placed_extent(verts: torch.Tensor, camera: torch.Tensor, place: torch.Tensor, fov: float = NMR_FOV):
    """(B,4) NDC (cx, cy, w, h) of the placed projection: the silhouette's box
    (a mesh projection's extremes are vertices)."""
    p = project(verts, camera, fov) * place[:, None, :2] + place[:, None, 2:]
    lo, hi = p.min(dim=1).values, p.max(dim=1).values
    return torch.cat([0.5 * (lo + hi), hi - lo], dim=1)


def axes_projection_matrix(place: torch.Tensor, fov: float = NMR_FOV) -> torch.Tensor:
    """(B,4,4) perspective K followed by x' = sx*x + tx, y' = sy*y + ty (place (B,4))."""
    b = place.shape[0]
    k = projection_matrix(place.new_tensor([[1.0, 0.0, 0.0]]).expand(b, 3), fov)
    sx, sy, tx, ty = (place[:, i, None] for i in range(4))
    row0 = sx * k[:, 0] + tx * k[:, 3]
    row1 = sy * k[:, 1] + ty * k[:, 3]
    return torch.stack([row0, row1, k[:, 2], k[:, 3]], dim=1)


def placed_cameras(camera: torch.Tensor, place: torch.Tensor, fov: float = NMR_FOV) -> FoVPerspectiveCameras:
    """pytorch3d cameras of (B,3) azimuth/elevation/distance with the (B,4) placement."""
    r, t = view_transform(camera)
    return FoVPerspectiveCameras(
        R=r, T=t, K=axes_projection_matrix(place, fov), znear=ZNEAR, zfar=ZFAR, device=camera.device
    )


def adjust_box(box: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """NDC box (cx, cy, w, h) moved by residual (log w-scale, log h-scale, dx, dy),
    the shifts in units of the box's own sides."""
    wh = box[:, 2:] * torch.exp(residual[:, :2])
    centre = box[:, :2] + residual[:, 2:] * box[:, 2:]
    return torch.cat([centre, wh], dim=1)


class PlacementHead(nn.Module):
    """(feature, category, geometry) -> bounded residual (log sw, log sh, dx, dy).

    geometry: (B,G) descriptors of the fit (e.g. log aspect ratios of the
    projection and of the target box). Starts at exactly zero residual, so an
    untrained head reproduces the plain box fit."""

    def __init__(
        self,
        feat_dim: int,
        num_categories: int,
        geometry_dim: int = 2,
        hidden: int = 64,
        max_log_scale: float = 0.2,
        max_shift: float = 0.1,
        category_dim: int = 8,
    ) -> None:
        super().__init__()
        if max_log_scale < 0 or max_shift < 0:
            raise ValueError(f"placement bounds must be >= 0, got scale {max_log_scale}, shift {max_shift}")
        self.category = nn.Embedding(num_categories, category_dim)
        self.mlp = nn.Sequential(
            nn.Linear(feat_dim + category_dim + geometry_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer(
            "bound", torch.tensor([max_log_scale, max_log_scale, max_shift, max_shift]), persistent=False
        )

    def forward(self, feat: torch.Tensor, category: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        h = torch.cat([feat, self.category(category), geometry], dim=1)
        return self.bound * torch.tanh(self.mlp(h))

"""Per-category template + per-instance bounded, left-right symmetric vertex offsets.

The mesh is an icosphere (level 3: 642 vertices, 1280 faces) deformed twice: a
learned template per category (free offsets, shared by its instances) and an
instance offset predicted from the crop, bounded by max_offset * tanh. Both are
predicted for one half of the sphere only (x >= 0) and mirrored under x -> -x,
which maps the icosphere onto itself, so every mesh is symmetric about x = 0.
Each mesh is then centred and scaled to a fixed RMS radius: the crop placement
fits the projection to the instance box, so absolute size is unobservable, and
fixing it keeps the camera distance meaningful (NMR objects fit a unit cube).
"""

from __future__ import annotations

import torch
from pytorch3d.utils import ico_sphere
from torch import nn


def mirror_pairs(verts: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """(V,) index of the vertex at (-x, y, z) of every vertex; an error if the vertex
    set is not mirror symmetric within `tol`."""
    mirrored = verts * torch.tensor([-1.0, 1.0, 1.0], dtype=verts.dtype)
    dist, idx = torch.cdist(mirrored, verts).min(dim=1)
    if float(dist.max()) > tol or not torch.equal(idx[idx], torch.arange(len(verts))):
        raise ValueError(
            f"the template is not symmetric under x -> -x (worst vertex off by {float(dist.max()):.2e})"
        )
    return idx


class SymmetricMeshDecoder(nn.Module):
    """feature (B,D) + category (B,) -> symmetric verts (B,V,3); faces are a buffer."""

    def __init__(
        self,
        feat_dim: int,
        num_categories: int,
        level: int = 3,
        radius: float = 0.5,
        max_offset: float = 0.2,
    ) -> None:
        super().__init__()
        sphere = ico_sphere(level)
        verts = sphere.verts_packed().float()
        mirror = mirror_pairs(verts)
        idx = torch.arange(len(verts))
        # the independent half: x > 0, plus the vertices on the plane (self-paired)
        half = idx[(verts[:, 0] > 0) | (mirror == idx)]
        pos_in_half = torch.full((len(verts),), -1, dtype=torch.long)
        pos_in_half[half] = torch.arange(len(half))
        src = torch.where(pos_in_half >= 0, pos_in_half, pos_in_half[mirror])
        sign = torch.ones(len(verts), 3)
        sign[pos_in_half < 0, 0] = -1.0
        on_plane = (mirror[half] == half).float()
        self.radius = float(radius)
        self.max_offset = float(max_offset)
        self.num_half = len(half)
        self.register_buffer("faces", sphere.faces_packed().long(), persistent=False)
        self.register_buffer("mirror", mirror, persistent=False)
        self.register_buffer("src", src, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        # offsets of on-plane vertices keep x = 0 so the mirror image is the same vertex
        keep_x = torch.stack([1.0 - on_plane, torch.ones_like(on_plane), torch.ones_like(on_plane)], 1)
        self.register_buffer("half_mask", keep_x, persistent=False)
        # the sphere itself, made exactly symmetric from its independent half
        self.register_buffer("sphere", self.symmetric(verts[half]) * radius, persistent=False)
        self.template = nn.Parameter(torch.zeros(num_categories, self.num_half, 3))
        self.head = nn.Linear(feat_dim, self.num_half * 3)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    @property
    def num_verts(self) -> int:
        return int(self.sphere.shape[0])

    def symmetric(self, half: torch.Tensor) -> torch.Tensor:
        """(..., H, 3) offsets of the independent half -> (..., V, 3) mirrored offsets."""
        return (half * self.half_mask)[..., self.src, :] * self.sign

    def normalise(self, verts: torch.Tensor) -> torch.Tensor:
        """Centre each mesh (x stays 0 by symmetry) and scale to RMS radius `radius`."""
        verts = verts - verts.mean(dim=-2, keepdim=True)
        rms = verts.pow(2).sum(-1).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
        return verts * (self.radius / rms[..., None])

    def template_verts(self, category: torch.Tensor) -> torch.Tensor:
        """(B,V,3) the normalised category templates."""
        return self.normalise(self.sphere + self.symmetric(self.template[category]))

    def instance_offsets(self, feat: torch.Tensor) -> torch.Tensor:
        """(B,H,3) bounded instance offsets of the independent half."""
        raw = self.head(feat).view(feat.shape[0], self.num_half, 3)
        return self.max_offset * torch.tanh(raw) * self.half_mask

    def forward(self, feat: torch.Tensor, category: torch.Tensor, offset_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """offset_scale < 1 damps the instance offsets (a warm-up in which the category
        template and the camera alone must explain the silhouettes)."""
        offsets = self.instance_offsets(feat) * offset_scale
        base = self.sphere + self.symmetric(self.template[category])
        verts = self.normalise(base + self.symmetric(offsets))
        return {"verts": verts, "offsets": offsets, "faces": self.faces}

"""Label-free losses of the recon stage (silhouettes, mesh priors, view and camera
consistency) and the label-free monitor (visible IoU).

Masks are (B,1,S,S) or (B,S,S) floats in [0,1]. `weight` is 1 where a pixel is
observed and 0 where it is known to be occluded: an occluded pixel may or may
not belong to the object, so it must not count either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from pytorch3d.structures import Meshes

from amodal3d.models.precision import float32_geometry


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B,1,S,S) or (B,S,S) -> (B,size,size) by area averaging (soft at the borders)."""
    if mask.ndim == 3:
        mask = mask[:, None]
    mask = mask.float()
    if mask.shape[-1] != size:
        mask = F.adaptive_avg_pool2d(mask, size) if mask.shape[-1] > size else F.interpolate(
            mask, size=(size, size), mode="bilinear", align_corners=False
        )
    return mask[:, 0]


def masked_iou_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,) 1 - soft IoU of pred and target over the observed pixels (SoftRas' IoU loss)."""
    p, t, w = _flat(pred), _flat(target), _flat(weight)
    inter = (w * p * t).sum(1)
    union = (w * (p + t - p * t)).sum(1)
    return 1.0 - inter / (union + eps)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,) squared error averaged over the observed pixels."""
    p, t, w = _flat(pred), _flat(target), _flat(weight)
    return (w * (p - t) ** 2).sum(1) / (w.sum(1) + eps)


def silhouette_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, w_iou: float = 1.0, w_mse: float = 1.0
) -> torch.Tensor:
    """(B,) masked IoU + masked L2 of a rendered silhouette against the visible mask."""
    return w_iou * masked_iou_loss(pred, target, weight) + w_mse * masked_mse(pred, target, weight)


class MeshRegularisers(nn.Module):
    """pytorch3d's mesh_laplacian_smoothing (uniform), mesh_normal_consistency and
    mesh_edge_loss (target length 0) for a batch of meshes sharing one topology.

    pytorch3d rebuilds the Laplacian and the edge/face adjacency for every new
    Meshes, which costs more than the rest of a training step on the CPU; here the
    topology work is done once and each call is a few batched tensor ops with the
    same values (tests compare them with pytorch3d's functions)."""

    def __init__(self, faces: torch.Tensor, num_verts: int) -> None:
        super().__init__()
        from pytorch3d.ops import laplacian

        template = Meshes(verts=[torch.zeros(num_verts, 3)], faces=[faces.long().cpu()])
        edges = template.edges_packed()  # (E,2)
        f2e = template.faces_packed_to_edges_packed()  # (F,3): edge opposite vertex k of each face
        faces_c = faces.long().cpu()
        opposite = torch.full((len(edges), 2), -1, dtype=torch.long)
        count = torch.zeros(len(edges), dtype=torch.long)
        for e, v in zip(f2e.flatten().tolist(), faces_c.flatten().tolist()):
            if count[e] < 2:
                opposite[e, count[e]] = v
            count[e] += 1
        if not bool((count == 2).all()):
            raise ValueError("MeshRegularisers needs a closed manifold mesh (every edge in exactly two faces)")
        lap = laplacian(torch.zeros(num_verts, 3), edges).coalesce()
        self.register_buffer("edges", edges, persistent=False)
        self.register_buffer("opposite", opposite, persistent=False)
        self.register_buffer("lap_index", lap.indices(), persistent=False)
        self.register_buffer("lap_value", lap.values(), persistent=False)
        self.num_verts = int(num_verts)

    def laplacian(self, verts: torch.Tensor) -> torch.Tensor:
        b, v, _ = verts.shape
        lap = torch.sparse_coo_tensor(self.lap_index, self.lap_value, (v, v))
        lx = torch.sparse.mm(lap, verts.transpose(0, 1).reshape(v, b * 3)).view(v, b, 3)
        return lx.norm(dim=-1).mean()

    def normal(self, verts: torch.Tensor) -> torch.Tensor:
        v0, v1 = verts[:, self.edges[:, 0]], verts[:, self.edges[:, 1]]
        va, vb = verts[:, self.opposite[:, 0]], verts[:, self.opposite[:, 1]]
        n0 = torch.cross(v1 - v0, va - v0, dim=-1)
        n1 = -torch.cross(v1 - v0, vb - v0, dim=-1)
        return (1.0 - F.cosine_similarity(n0, n1, dim=-1, eps=1e-6)).mean()

    def edge(self, verts: torch.Tensor) -> torch.Tensor:
        d = verts[:, self.edges[:, 0]] - verts[:, self.edges[:, 1]]
        return d.pow(2).sum(-1).mean()

    @float32_geometry
    def forward(self, verts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"laplacian": self.laplacian(verts), "normal": self.normal(verts), "edge": self.edge(verts)}


def view_pairs(object_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a, b) of the rows 2i, 2i+1 that show the same object (views_per_item=2)."""
    n = object_id.shape[0] // 2 * 2
    a = torch.arange(0, n, 2, device=object_id.device)
    same = object_id[a] == object_id[a + 1]
    return a[same], a[same] + 1


def azimuth_difference(a_deg: torch.Tensor, b_deg: torch.Tensor) -> torch.Tensor:
    """Absolute angular difference in degrees, in [0, 180]."""
    return torch.remainder(a_deg - b_deg + 180.0, 360.0).sub(180.0).abs()


def camera_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    elevation_range: tuple[float, float],
    distance_range: tuple[float, float],
) -> torch.Tensor:
    """(...,) distance between (...,3) cameras: 1 - cos(azimuth difference) plus
    elevation and distance errors relative to their ranges."""
    daz = (pred[..., 0] - target[..., 0]) * (math.pi / 180.0)
    el_span = elevation_range[1] - elevation_range[0]
    d_span = distance_range[1] - distance_range[0]
    return (
        (1.0 - torch.cos(daz))
        + (pred[..., 1] - target[..., 1]).abs() / el_span
        + (pred[..., 2] - target[..., 2]).abs() / d_span
    )


def azimuth_uniformity(az_deg: torch.Tensor) -> torch.Tensor:
    """Squared norm of the first two circular moments of the batch's azimuths: zero
    for azimuths spread evenly over the circle, 2 when they all coincide. A prior
    (objects are seen from all around), not a label: it keeps the camera from
    collapsing to one view while the shapes absorb the view changes."""
    th = az_deg * (math.pi / 180.0)
    m1 = torch.stack([torch.cos(th).mean(), torch.sin(th).mean()])
    m2 = torch.stack([torch.cos(2 * th).mean(), torch.sin(2 * th).mean()])
    return m1.pow(2).sum() + m2.pow(2).sum()


def sample_cameras(
    n: int,
    elevation_range: tuple[float, float],
    distance_range: tuple[float, float],
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n,3) random cameras: azimuth uniform on the circle, elevation and distance
    uniform in their ranges (the cameras of the cycle-consistency renders)."""
    u = torch.rand(n, 3, generator=generator).to(device)
    lo = torch.tensor([0.0, elevation_range[0], distance_range[0]], device=device)
    hi = torch.tensor([360.0, elevation_range[1], distance_range[1]], device=device)
    return lo + u * (hi - lo)


def visible_iou(pred: torch.Tensor, visible: torch.Tensor, occluded: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B,) IoU of the hard prediction vs the visible mask, outside the occluded
    pixels: the label-free monitor of an unsupervised stage (1 for an empty pair)."""
    p = _flat(pred) > threshold
    v = _flat(visible) > 0.5
    keep = _flat(occluded) <= 0.5
    inter = (p & v & keep).sum(1).float()
    union = ((p | v) & keep).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))

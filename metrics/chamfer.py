"""Chamfer distance between predicted and true meshes in their camera frames (evaluation only).

Functional core (`point_chamfer` on point sets, `view_frame_chamfer` on meshes and
cameras) plus the torchmetrics form (`ViewFrameChamfer`: the mean over instances,
as sum/count states that add up across batches and processes).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from amodal3d.models.precision import float32_geometry


def _normalise_points(p: torch.Tensor) -> torch.Tensor:
    """Centre each (B,N,3) point set's bounding box and scale its diagonal to 1."""
    lo, hi = p.min(dim=1, keepdim=True).values, p.max(dim=1, keepdim=True).values
    return (p - 0.5 * (lo + hi)) / (hi - lo).norm(dim=-1, keepdim=True).clamp_min(1e-6)


@float32_geometry
def point_chamfer(pred_pts: torch.Tensor, true_pts: torch.Tensor) -> torch.Tensor:
    """(B,) Chamfer distance (pytorch3d, squared L2, mean over points, both directions
    summed) between (B,N,3) and (B,M,3) point sets, each normalised first
    (_normalise_points): a scale-free shape error."""
    from pytorch3d.loss import chamfer_distance

    dist, _ = chamfer_distance(_normalise_points(pred_pts), _normalise_points(true_pts), batch_reduction=None)
    return dist


@float32_geometry
def view_frame_chamfer(
    verts: torch.Tensor,
    faces: torch.Tensor,
    camera: torch.Tensor,
    true_meshes: list[tuple[torch.Tensor, torch.Tensor]],
    true_camera: torch.Tensor,
    num_points: int = 2000,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) Chamfer distance (pytorch3d, squared L2, both directions) between the
    predicted mesh seen from the predicted camera and the true mesh seen from the
    true camera, each normalised (bbox centred, diagonal 1): a view-centred 3D error
    that needs no alignment of the learned canonical frame. The surface samples are
    random: `seeds` (B,) draws each instance's under its own seed, so a distance does
    not depend on the batch it came in (DDP and one process agree)."""
    from pytorch3d.ops import sample_points_from_meshes
    from pytorch3d.structures import Meshes

    from amodal3d.models.mesh_renderer import make_cameras

    dev = verts.device
    b = verts.shape[0]
    pred_view = make_cameras(camera).get_world_to_view_transform().transform_points(verts)
    true_tf = make_cameras(true_camera.to(dev)).get_world_to_view_transform()
    true_verts = [m[0].to(dev) for m in true_meshes]
    true_view = [true_tf[i].transform_points(v[None])[0] for i, v in enumerate(true_verts)]
    pred_faces, true_faces = [faces] * b, [m[1].to(dev) for m in true_meshes]
    if seeds is None:
        pred_pts = sample_points_from_meshes(Meshes(list(pred_view), pred_faces), num_points)
        true_pts = sample_points_from_meshes(Meshes(true_view, true_faces), num_points)
        return point_chamfer(pred_pts, true_pts)
    pred_pts, true_pts = [], []
    for i, seed in enumerate(seeds.tolist()):
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(seed))
            pred_pts.append(sample_points_from_meshes(Meshes([pred_view[i]], [pred_faces[i]]), num_points))
            true_pts.append(sample_points_from_meshes(Meshes([true_view[i]], [true_faces[i]]), num_points))
    return point_chamfer(torch.cat(pred_pts), torch.cat(true_pts))


class ViewFrameChamfer(Metric):
    """torchmetrics form of view_frame_chamfer: update(verts, faces, camera, true_meshes,
    true_camera) as the functional takes them, compute() -> the mean over every finite
    instance distance seen (what camera_errors reports as `chamfer`; NaN before any)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_points: int = 2000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_points = int(num_points)
        self.add_state("chamfer_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, verts: torch.Tensor, faces: torch.Tensor, camera: torch.Tensor,
               true_meshes: list[tuple[torch.Tensor, torch.Tensor]], true_camera: torch.Tensor,
               seeds: torch.Tensor | None = None) -> None:
        dist = view_frame_chamfer(verts, faces, camera, true_meshes, true_camera, num_points=self.num_points,
                                  seeds=seeds)
        dist = dist[torch.isfinite(dist)].to(self.chamfer_sum.device)
        self.chamfer_sum += dist.sum(dtype=torch.float64)
        self.count += dist.numel()

    def compute(self) -> torch.Tensor:
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.chamfer_sum.device)
        return self.chamfer_sum / self.count

"""Random occluders for self-generated training data, batched in torch.

The viewpoint stage renders learned meshes at sampled cameras and must see them
cut the way the dataset's `erase` composite cuts real objects, so this mirrors
datamodules/composites.py (`_eraser`): 1-2 erasers per sample, each either a
rectangle around a random point of the object's box (0.25-0.7 of the box side,
half of them stretched to one border of the frame) or a band crossing the whole
frame (axis-aligned or slanted, 0.15-0.45 of the box extent thick); a draw is
kept when the hidden share of the silhouette lies in [ratio_min, ratio_max].
Unlike the dataset, a batch cannot skip a sample: each sample gets `tries`
draws at once and keeps the first one in range, else the one nearest the range.
The occluder mask is the whole erased region (also where it misses the object),
as the dataset's `occluder` channel is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from amodal3d.models.mesh_renderer import mask_boxes


@dataclass(frozen=True)
class OccluderParams:
    count_min: int = 1
    count_max: int = 2
    ratio_min: float = 0.1
    ratio_max: float = 0.7
    tries: int = 8

    def check(self) -> None:
        if not 1 <= self.count_min <= self.count_max:
            raise ValueError(
                f"occluder count range [{self.count_min}, {self.count_max}]: need 1 <= min <= max"
            )
        if not 0.0 <= self.ratio_min <= self.ratio_max <= 1.0:
            raise ValueError(
                f"occlusion ratio range [{self.ratio_min}, {self.ratio_max}]: need 0 <= min <= max <= 1"
            )
        if self.tries < 1:
            raise ValueError(f"occluder tries={self.tries}: need at least 1")


def _uniform(shape, lo, hi, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).to(device)
    return lo + u * (hi - lo)


def eraser_masks(box: torch.Tensor, n: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,n,S,S) bool: n independent erasers per sample near its xyxy box (B,4)."""
    dev = box.device
    b = box.shape[0]
    x0, y0, x1, y1 = (box[:, i, None] for i in range(4))  # (B,1)
    bw, bh = (x1 - x0).clamp_min(2.0), (y1 - y0).clamp_min(2.0)
    shape = (b, n)
    cx = x0 + _uniform(shape, 0.0, 1.0, generator, dev) * (x1 - x0)
    cy = y0 + _uniform(shape, 0.0, 1.0, generator, dev) * (y1 - y0)
    pix = torch.arange(size, device=dev, dtype=box.dtype) + 0.5
    px = pix.view(1, 1, 1, size)
    py = pix.view(1, 1, size, 1)

    # rectangles, half of them stretched to one border
    rw = (_uniform(shape, 0.25, 0.7, generator, dev) * bw).clamp_min(2.0)
    rh = (_uniform(shape, 0.25, 0.7, generator, dev) * bh).clamp_min(2.0)
    rx0, rx1 = cx - rw / 2, cx + rw / 2
    ry0, ry1 = cy - rh / 2, cy + rh / 2
    stretch = _uniform(shape, 0.0, 1.0, generator, dev) < 0.5
    side = (torch.rand(shape, generator=generator) * 4).long().clamp_max(3).to(dev)
    zero = torch.zeros_like(rx0)
    edge = torch.full_like(rx0, float(size))
    rx0 = torch.where(stretch & (side == 0), zero, rx0)
    rx1 = torch.where(stretch & (side == 1), edge, rx1)
    ry0 = torch.where(stretch & (side == 2), zero, ry0)
    ry1 = torch.where(stretch & (side == 3), edge, ry1)
    rect = (
        (px >= rx0[..., None, None]) & (px < rx1[..., None, None])
        & (py >= ry0[..., None, None]) & (py < ry1[..., None, None])
    )

    # bands across the frame: axis-aligned half of the time, else any slant
    axis = _uniform(shape, 0.0, 1.0, generator, dev) < 0.5
    right = (_uniform(shape, 0.0, 1.0, generator, dev) < 0.5).float() * (math.pi / 2)
    theta = torch.where(axis, right, _uniform(shape, 0.0, math.pi, generator, dev))
    nx, ny = torch.cos(theta), torch.sin(theta)
    extent = nx.abs() * bw + ny.abs() * bh
    thick = (_uniform(shape, 0.15, 0.45, generator, dev) * extent).clamp_min(2.0)
    d = (px - cx[..., None, None]) * nx[..., None, None] + (py - cy[..., None, None]) * ny[..., None, None]
    band = d.abs() < thick[..., None, None] / 2

    is_rect = _uniform(shape, 0.0, 1.0, generator, dev) < 0.6
    return torch.where(is_rect[..., None, None], rect, band)


def synth_occluders(
    amodal: torch.Tensor, params: OccluderParams = OccluderParams(), generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,1,S,S) float occluder masks for (B,1,S,S) silhouettes (see the module doc).

    generator: a CPU torch.Generator for reproducible draws (None: the global RNG)."""
    params.check()
    if amodal.ndim != 4 or amodal.shape[1] != 1 or amodal.shape[-1] != amodal.shape[-2]:
        raise ValueError(f"amodal must be (B,1,S,S) square masks, got {tuple(amodal.shape)}")
    b, _, s, _ = amodal.shape
    t, k = int(params.tries), int(params.count_max)
    sil = amodal[:, 0] > 0.5  # (B,S,S)
    box = mask_boxes(amodal).repeat_interleave(t, dim=0)  # (B*T,4)
    erasers = eraser_masks(box, k, s, generator).view(b, t, k, s, s)
    span = params.count_max - params.count_min + 1
    count = params.count_min + (torch.rand(b, t, generator=generator) * span).long().clamp_max(span - 1)
    use = torch.arange(k)[None, None, :] < count[..., None]  # (B,T,K)
    occ = (erasers & use.to(amodal.device)[..., None, None]).any(dim=2)  # (B,T,S,S)
    area = sil.flatten(1).sum(1).clamp_min(1)[:, None].float()  # (B,1)
    ratio = (occ & sil[:, None]).flatten(2).sum(2).float() / area  # (B,T)
    # distance to the accepted range (0 inside it); ties go to the earliest draw
    miss = (params.ratio_min - ratio).clamp_min(0) + (ratio - params.ratio_max).clamp_min(0)
    miss = miss + (ratio >= 1.0).float()  # hiding the whole object is the worst outcome
    order = torch.arange(t, device=amodal.device, dtype=miss.dtype) * 1e-6
    pick = (miss + order).argmin(dim=1)
    return occ[torch.arange(b, device=amodal.device), pick][:, None].float()


def occlusion_ratio(amodal: torch.Tensor, occluder: torch.Tensor) -> torch.Tensor:
    """(B,) hidden share of each silhouette (0 for an empty silhouette)."""
    sil = amodal.flatten(1) > 0.5
    hid = (sil & (occluder.flatten(1) > 0.5)).sum(1).float()
    return hid / sil.sum(1).clamp_min(1).float()

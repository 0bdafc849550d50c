"""Step 5: region-specific edge refinement of the rendered coarse amodal mask.

Inputs, all in the crop frame (B,·,S,S): the crop RGB, the visible mask v, the
occluder mask o (pixels known to hide the instance), the coarse amodal mask c
rendered from the 3D prior, and its soft edge map e (Sobel magnitude of c), which
tells the network where the render's outline lies.

Region-specific output. The visible region is observed, so its boundary is kept
exactly: only the pixels that may be hidden (the "free" region: outside v and
inside o, or everywhere outside v with gate="outside_visible") are predicted:

    p = v + free · σ(h),      h = UNet(rgb, v, o, c, e) + g · logit(c)

so visible ⊆ (p > 0.5) and nothing grows where the instance cannot be hidden,
by construction. The learned gain g starts at 1: an untrained net reproduces the
render inside the free region and learns a correction of it ("refinement").
The plain ablation (region_specific=False) predicts p = σ(h) everywhere.

Losses (region_losses): binary cross-entropy averaged separately over four pixel
regions, each with its own weight, plus a soft Dice on the hidden part:
  * hidden: the hidden part of the amodal mask (amodal − visible) dilated by a few
    pixels, inside the free region — what the method is about;
  * band: a band around the amodal boundary — the edges the refinement sharpens;
  * visible: the visible mask (zero loss with the region-specific output: fixed);
  * other: the remaining pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amodal3d.errors import ConfigError
from amodal3d.models.unet import UNet

IN_CHANNELS = 7  # rgb 3, visible, occluded, coarse, coarse edges
GATES = ("occluded", "outside_visible")
_FIXED_LOGIT = 30.0  # logit of pixels the region-specific output does not predict (σ = 1 - 1e-13)


def soft_edges(mask: torch.Tensor) -> torch.Tensor:
    """(B,1,S,S) Sobel gradient magnitude of a soft mask, in [0,1] (1 at a sharp 0→1 step)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=mask.device, dtype=mask.dtype)
    k = torch.stack([kx, kx.t()])[:, None] / 4.0  # (2,1,3,3): a unit step gives 1
    g = F.conv2d(F.pad(mask, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1, keepdim=True).add(1e-12).sqrt().clamp(max=1.0)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a (2r+1)² square (max pooling)."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    return 1.0 - dilate(1.0 - mask, radius)


def free_region(visible: torch.Tensor, occluded: torch.Tensor, gate: str) -> torch.Tensor:
    """{0,1} (B,1,S,S): pixels whose amodal label the network predicts."""
    v = (visible > 0.5).float()
    if gate == "occluded":
        return (occluded > 0.5).float() * (1.0 - v)
    if gate == "outside_visible":
        return 1.0 - v
    raise ValueError(f"gate={gate!r}: expected one of {', '.join(GATES)}")


class RefineNet(nn.Module):
    """(rgb, visible, occluded, coarse) -> amodal-mask logits and probabilities.

    forward returns dict(logits (B,1,S,S): logits of p (fixed ±30 where the
    region-specific output does not predict), prob = σ(logits), free (B,1,S,S)).
    """

    def __init__(
        self,
        base_channels: int = 16,
        depth: int = 3,
        gate: str = "occluded",
        region_specific: bool = True,
        coarse_residual: bool = True,
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ConfigError(f"model.gate={gate!r}: expected one of {', '.join(GATES)}")
        self.gate = gate
        self.region_specific = bool(region_specific)
        self.coarse_residual = bool(coarse_residual)
        self.unet = UNet(IN_CHANNELS, 1, int(base_channels), int(depth))
        self.coarse_gain = nn.Parameter(torch.ones(())) if self.coarse_residual else None

    @staticmethod
    def inputs(rgb, visible, occluded, coarse) -> torch.Tensor:
        coarse = coarse.float()
        return torch.cat([rgb.float(), visible.float(), occluded.float(), coarse, soft_edges(coarse)], dim=1)

    def forward(self, rgb, visible, occluded, coarse) -> dict[str, torch.Tensor]:
        h = self.unet(self.inputs(rgb, visible, occluded, coarse))
        if self.coarse_gain is not None:
            c = coarse.float().clamp(0.02, 0.98)  # logit in [-3.9, 3.9]: a prior, not a verdict
            h = h + self.coarse_gain * torch.log(c / (1 - c))
        if self.region_specific:
            free = free_region(visible, occluded, self.gate)
            v = (visible > 0.5).float()
            fixed = _FIXED_LOGIT * (2.0 * v - 1.0)  # +30 on visible pixels, -30 elsewhere
            logits = torch.where(free > 0.5, h, fixed)
        else:
            free = torch.ones_like(h)
            logits = h
        return {"logits": logits, "prob": torch.sigmoid(logits), "free": free}


def loss_regions(
    amodal: torch.Tensor, visible: torch.Tensor, free: torch.Tensor, band_width: int = 2, hidden_dilate: int = 2
) -> dict[str, torch.Tensor]:
    """{0,1} (B,1,S,S) pixel regions of the loss (see the module doc); hidden, band
    and other lie inside `free`, visible is the visible mask."""
    a = (amodal > 0.5).float()
    v = (visible > 0.5).float()
    hidden = dilate(a * (1 - v), hidden_dilate) * free
    band = (dilate(a, band_width) - erode(a, band_width)) * free
    other = free * (1 - torch.maximum(hidden, band)) * (1 - v)
    return {"hidden": hidden, "band": band, "visible": v, "other": other}


def region_losses(
    out: dict[str, torch.Tensor],
    amodal: torch.Tensor,
    visible: torch.Tensor,
    weights: dict[str, float],
    band_width: int = 2,
    hidden_dilate: int = 2,
) -> dict[str, torch.Tensor]:
    """Per-region mean BCE and the hidden-part Dice, plus their weighted sum `loss`.

    weights: hidden, band, visible, other, dice.
    """
    target = (amodal > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(out["logits"], target, reduction="none")
    regions = loss_regions(target, visible, out["free"], band_width, hidden_dilate)
    terms = {name: (bce * m).sum() / m.sum().clamp_min(1.0) for name, m in regions.items()}
    v = regions["visible"]
    p_h, t_h = (out["prob"] * (1 - v)).flatten(1), (target * (1 - v)).flatten(1)
    terms["dice"] = (1 - (2 * (p_h * t_h).sum(1) + 1) / (p_h.sum(1) + t_h.sum(1) + 1)).mean()
    terms["loss"] = sum(float(weights[k]) * terms[k] for k in ("hidden", "band", "visible", "other", "dice"))
    return terms

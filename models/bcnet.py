"""BCNet's bilayer mask branch (Ke et al., CVPR'21): an occluder layer and an occludee
layer over the same RoI features, each 4 convs with a non-local block after the
second; the occludee layer sees the features plus the occluder layer's output.
Four class-agnostic outputs at 28x28: the occludee (= amodal) mask and boundary, the
occluder mask and boundary. Boundaries are trained on the binarised RoI target's
dilation XOR erosion (3x3), computed in the RoI frame."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from amodal3d.models.amodal_roi_heads import MaskBranch


def mask_boundary(masks: torch.Tensor) -> torch.Tensor:
    """(N,M,M) binary -> its 3x3 dilation XOR erosion (about 2 px wide), as float."""
    x = masks[:, None].float()
    dilated = F.max_pool2d(x, 3, 1, 1)
    eroded = -F.max_pool2d(-x, 3, 1, 1)
    return (dilated - eroded)[:, 0]


class NonLocalBlock(nn.Module):
    """Self-attention over the RoI's positions (1x1 Q/K/V without bias, softmax in fp32),
    a 1x1 output conv and a GroupNorm whose scale starts at 0: the block begins as the
    identity (the official code's comment asks for this; its BatchNorm is not zeroed)."""

    def __init__(self, channels: int, norm_layer) -> None:
        super().__init__()
        self.q = nn.Conv2d(channels, channels, 1, bias=False)
        self.k = nn.Conv2d(channels, channels, 1, bias=False)
        self.v = nn.Conv2d(channels, channels, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = norm_layer(channels)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = (f(x).flatten(2) for f in (self.q, self.k, self.v))  # (N,C,HW)
        attn = torch.softmax(q.float().transpose(1, 2) @ k.float() / math.sqrt(c), dim=-1)  # (N,HW,HW)
        y = (v.float() @ attn.transpose(1, 2)).to(x.dtype).view(n, c, h, w)
        return x + self.norm(self.out(y))


class BilayerLayer(nn.Module):
    """conv3x3 x2, non-local, conv3x3 x2 (GroupNorm + ReLU)."""

    def __init__(self, channels: int, norm_layer) -> None:
        super().__init__()

        def conv():
            return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm_layer(channels),
                                 nn.ReLU(inplace=True))

        self.body = nn.Sequential(conv(), conv(), NonLocalBlock(channels, norm_layer), conv(), conv())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UpLogits(nn.Module):
    """deconv 2x2 + ReLU + 1x1 to one class-agnostic logit map (predictor init N(0, 0.001))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, 2)
        self.logits = nn.Conv2d(channels, 1, 1)
        nn.init.kaiming_normal_(self.up.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.logits.weight, std=0.001)
        nn.init.zeros_(self.logits.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(F.relu(self.up(x)))


class BCNetMaskBranch(MaskBranch):
    """-> masks (occludee = amodal), boundary_masks, occluder_masks, occluder_boundary_masks.
    Loss weights as the official two-stage code: occludee mask 1, occluder mask 0.25, each
    boundary 0.5 x a doubled BCE = 1."""

    def __init__(self, in_channels: int, norm_layer) -> None:
        super().__init__()
        self.occluder = BilayerLayer(in_channels, norm_layer)
        self.occludee = BilayerLayer(in_channels, norm_layer)
        self.heads = nn.ModuleDict({k: UpLogits(in_channels) for k in
                                    ("masks", "boundary_masks", "occluder_masks", "occluder_boundary_masks")})
        self.weights = {"masks": 1.0, "boundary_masks": 1.0, "occluder_masks": 0.25, "occluder_boundary_masks": 1.0}
        self.derived = {"boundary_masks": ("masks", mask_boundary),
                        "occluder_boundary_masks": ("occluder_masks", mask_boundary)}

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        x_bo = self.occluder(features)
        x_ee = self.occludee(features + x_bo)
        return {"masks": self.heads["masks"](x_ee), "boundary_masks": self.heads["boundary_masks"](x_ee),
                "occluder_masks": self.heads["occluder_masks"](x_bo),
                "occluder_boundary_masks": self.heads["occluder_boundary_masks"](x_bo)}

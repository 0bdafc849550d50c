"""A timm CNN (random init, never pretrained) over the channels of an instance crop.

Input channels: RGB, the visible mask and (optionally) the mask of pixels known to
be occluded, so the network knows where the silhouette is cut by an occluder
rather than by the object's outline.

Where no gradient is needed in eval mode (validation, the bench, predict) the backbone
runs as a copy with every BatchNorm folded into its convolution, channels-last
(torch.fx's conv-bn fusion): the same function up to float rounding, faster on the CPU
(`make bench-speed` times it against the plain backbone: docs/results.md). The copy is
rebuilt whenever a weight changes (an optimiser step, a load_state_dict), so it never
serves stale weights; `fused_inference = False` (or models.encoder.set_fused_inference)
keeps the plain backbone.

With `channels_last=True` the backbone's weights and inputs are channels-last in training
too: oneDNN's convolutions run forward and backward about 15% faster so on the CPU (and
cuDNN prefers the layout under AMP); the values differ from the contiguous layout by float
rounding only (tests/test_encoder_fusion.py).
"""

from __future__ import annotations

import timm
import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

from amodal3d.errors import ConfigError


def crop_channels(
    rgb: torch.Tensor, visible: torch.Tensor, occluded: torch.Tensor | None, use_occluded: bool = True
) -> torch.Tensor:
    """(B,C,S,S) encoder input: rgb (B,3,S,S), visible and occluded (B,1,S,S)."""
    parts = [rgb, visible]
    if use_occluded:
        if occluded is None:
            raise ValueError("the encoder was built with use_occluded=True but no occluded mask was given")
        parts.append(occluded)
    return torch.cat([p.float() for p in parts], dim=1)


class CropEncoder(nn.Module):
    """(B,C,S,S) crop channels -> (B,feat_dim) feature, plus a category embedding."""

    def __init__(
        self,
        backbone: str = "resnet10t",
        in_chans: int = 5,
        feat_dim: int = 256,
        num_categories: int = 13,
        category_dim: int = 16,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, in_chans=in_chans, num_classes=0)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ConfigError(f"model.backbone={backbone!r} is not a timm model: {err}") from None
        self.in_chans = in_chans
        self.channels_last = bool(channels_last)
        if self.channels_last:  # a loaded state_dict is copied into these: the layout stays
            self.backbone.to(memory_format=torch.channels_last)
        self.category = nn.Embedding(num_categories, category_dim)
        self.proj = nn.Sequential(
            nn.Linear(self.backbone.num_features + category_dim, feat_dim), nn.ReLU(inplace=True)
        )
        self.feat_dim = feat_dim
        self.fused_inference = True
        self._fused: tuple[tuple, nn.Module] | None = None  # (weights' identity and versions, folded copy)

    def __getstate__(self) -> dict:  # copies and pickles rebuild the folded copy
        return {**self.__dict__, "_fused": None}

    def _weights_key(self, device: torch.device) -> tuple | None:
        """What the folded copy depends on: each weight's identity and version (None:
        inference tensors, which have no version: no folding)."""
        tensors = list(self.backbone.parameters()) + list(self.backbone.buffers())
        if any(t.is_inference() for t in tensors):
            return None
        return (device, *((id(t), t._version) for t in tensors))

    def fused_backbone(self, device: torch.device) -> nn.Module:
        """The backbone with BatchNorm folded into the convolutions, channels-last, for
        eval mode without gradient; rebuilt when any weight or statistic changed."""
        key = self._weights_key(device)
        if key is None:
            return self.backbone
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                fused = fx_optimization.fuse(self.backbone.eval(), inplace=False)
            self._fused = (key, fused.to(device=device, memory_format=torch.channels_last))
        return self._fused[1]

    def forward(self, x: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            raise ValueError(f"encoder expects {self.in_chans} input channels, got {x.shape[1]}")
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.backbone.parameters()))
        if self.fused_inference and not self.training and not needs_grad:
            h = self.fused_backbone(x.device)(x.contiguous(memory_format=torch.channels_last))
        else:
            h = self.backbone(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        return self.proj(torch.cat([h, self.category(category)], dim=1))


def set_fused_inference(module: nn.Module, on: bool) -> int:
    """Switch the folded, channels-last backbone of every CropEncoder inside `module` on
    or off (for eval mode without gradient); the number switched."""
    found = [m for m in module.modules() if isinstance(m, CropEncoder)]
    for m in found:
        m.fused_inference = bool(on)
    return len(found)

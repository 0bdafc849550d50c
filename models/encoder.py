"""A timm CNN (random init, never pretrained) over the channels of an instance crop.

Input channels: RGB, the visible mask and (optionally) the mask of pixels known to
be occluded, so the network knows where the silhouette is cut by an occluder
rather than by the object's outline.
"""

from __future__ import annotations

import timm
import torch
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
    ) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, in_chans=in_chans, num_classes=0)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ConfigError(f"model.backbone={backbone!r} is not a timm model: {err}") from None
        self.in_chans = in_chans
        self.category = nn.Embedding(num_categories, category_dim)
        self.proj = nn.Sequential(
            nn.Linear(self.backbone.num_features + category_dim, feat_dim), nn.ReLU(inplace=True)
        )
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            raise ValueError(f"encoder expects {self.in_chans} input channels, got {x.shape[1]}")
        h = self.backbone(x)
        return self.proj(torch.cat([h, self.category(category)], dim=1))

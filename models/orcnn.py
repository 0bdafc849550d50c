"""ORCNN's mask branch (Follmann et al., WACV'19): two independent Mask R-CNN heads on
the same pooled RoI features, one for the amodal mask and one for the visible mask,
and an invisible mask with no parameters of its own, amodal - relu(visible) in logit
space, trained against the part of the amodal mask that is not visible."""

from __future__ import annotations

import torch

from amodal3d.models.amodal_roi_heads import ConvMaskBranch, MaskBranch


def invisible_logits(amodal: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """ORCNN's invisible-mask logits: high where the amodal head fires and the visible one does not."""
    return amodal - torch.relu(visible)


class OrcnnMaskBranch(MaskBranch):
    """-> masks (amodal), visible_masks, invisible_masks; each loss weight 1 (the paper's)."""

    def __init__(self, in_channels: int, channels: int, layers: int, num_classes: int, norm_layer=None) -> None:
        super().__init__()
        self.amodal = ConvMaskBranch(in_channels, channels, layers, num_classes, "masks", norm_layer)
        self.visible = ConvMaskBranch(in_channels, channels, layers, num_classes, "visible_masks", norm_layer)
        self.weights = {"masks": 1.0, "visible_masks": 1.0, "invisible_masks": 1.0}

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.amodal(features)["masks"]
        v = self.visible(features)["visible_masks"]
        return {"masks": a, "visible_masks": v, "invisible_masks": invisible_logits(a, v)}

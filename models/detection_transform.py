"""torchvision's detection transform for targets and outputs with several masks.

GeneralizedRCNNTransform resizes only `masks` in the targets and pastes only
`masks` in the outputs; every other `*masks` key (amodal, visible, occluder
masks of the amodal heads) would silently stay at the wrong scale. This
subclass treats every key ending in `masks` the way torchvision treats
`masks`: nearest-neighbour resize of targets to the resized image, and
paste_masks_in_image of (N,1,M,M) head outputs into the original image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.detection.roi_heads import paste_masks_in_image


def mask_keys(d: dict) -> list[str]:
    """Keys other than `masks` that hold masks (by the `*masks` naming rule)."""
    return [k for k in d if k.endswith("masks") and k != "masks"]


class MultiMaskTransform(GeneralizedRCNNTransform):
    def resize(self, image: torch.Tensor, target: dict | None = None):
        extra = {k: target[k] for k in mask_keys(target)} if target is not None else {}
        image, target = super().resize(image, target)
        if extra:
            size = image.shape[-2:]
            for k, m in extra.items():
                target[k] = F.interpolate(m[:, None].float(), size=tuple(size))[:, 0].byte() if m.numel() else \
                    m.new_zeros((m.shape[0], *size), dtype=torch.uint8)
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        result = super().postprocess(result, image_shapes, original_image_sizes)  # boxes now in the original frame
        if self.training:
            return result
        for pred, size in zip(result, original_image_sizes):
            for k in mask_keys(pred):
                pred[k] = paste_masks_in_image(pred[k], pred["boxes"], size)
        return result

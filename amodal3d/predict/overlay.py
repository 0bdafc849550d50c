"""The overlay predict writes per image (visible part tinted, predicted hidden part
hatched, amodal outline; one colour per instance), and the mask outline the bench's
sheets reuse."""

from __future__ import annotations

import math

import numpy as np
import torch

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0),
]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a bool (H,W) mask with a 4-neighbour outside it (or on the border)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_image(
    image: np.ndarray, visible: list[np.ndarray], amodal: list[np.ndarray], min_side: int = 256,
    labels: list[str] | None = None,
) -> np.ndarray:
    """uint8 overlay: per instance its visible part tinted, the predicted hidden part
    hatched, the amodal outline drawn, and its label (e.g. class and score) written at the
    top-left of its amodal mask's box; small images are enlarged (nearest)."""
    from torchvision.ops import masks_to_boxes
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    k = max(1, math.ceil(min_side / max(image.shape[:2])))
    up = lambda a: np.repeat(np.repeat(a, k, 0), k, 1)  # noqa: E731
    # a float image in [0, 1]: draw_segmentation_masks scales its colours to that range
    out = torch.from_numpy(up(image)).permute(2, 0, 1).float() / 255
    hh, ww = out.shape[1:]
    yy, xx = np.mgrid[0:hh, 0:ww]
    hatch = torch.from_numpy(((xx + yy) // max(2, k)) % 3 == 0)
    for i, (v, a) in enumerate(zip(visible, amodal)):
        c = _PALETTE[i % len(_PALETTE)]
        colour = torch.tensor(c, dtype=torch.float32)[:, None] / 255
        v, a = up(v), up(a)
        hidden = torch.from_numpy(a & ~v)
        out = draw_segmentation_masks(out, torch.from_numpy(v), alpha=0.45, colors=c)
        out = draw_segmentation_masks(out, hidden, alpha=0.25, colors=c)
        out[:, hidden & hatch] = colour
        out[:, torch.from_numpy(mask_outline(a))] = colour
    out = (out * 255).round().clamp(0, 255).to(torch.uint8)
    shown = [i for i, a in enumerate(amodal) if labels is not None and a.any()]
    if shown:
        boxes = masks_to_boxes(torch.from_numpy(np.stack([amodal[i] for i in shown]))) * k
        out = draw_bounding_boxes(out, boxes, [labels[i] for i in shown], width=1,
                                  colors=[_PALETTE[i % len(_PALETTE)] for i in shown])
    return out.permute(1, 2, 0).numpy()

"""Contact sheet of built composites: what the stages actually see, per category.

Each cell pairs the composite image with an overlay: visible part green,
hidden part of the amodal mask red, occluder mask blue (erased region for
`erase`, objects in front for `paste`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from amodal3d.categories import CATEGORIES
from amodal3d.atomic import save_png_atomic
from amodal3d.datamodules.shard_reader import SplitReader

_GREEN, _RED, _BLUE = (40, 220, 60), (235, 40, 40), (50, 110, 255)


def overlay(image: np.ndarray, amodal: np.ndarray, visible: np.ndarray, occluder: np.ndarray) -> np.ndarray:
    """uint8 (H,W,3): the image dimmed, occluder blue, visible green, hidden amodal red."""
    from torchvision.utils import draw_segmentation_masks

    out = torch.from_numpy(image).permute(2, 0, 1).float() * (0.45 / 255)  # float in [0, 1]
    for mask, colour, alpha in ((occluder, _BLUE, 0.45), (visible, _GREEN, 0.75), (amodal & ~visible, _RED, 0.85)):
        out = draw_segmentation_masks(out, torch.from_numpy(np.ascontiguousarray(mask)), alpha=alpha, colors=colour)
    return (out * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def composite_contact_sheet(
    root: str | os.PathLike, split: str, out_png: str | os.PathLike, n_per_category: int = 4, scale: int = 2
) -> Path:
    """Write a PNG: one row per category, n instances each (image | overlay).

    Instances are spread evenly over each category's instances of the split,
    so the sheet is deterministic. Returns the path written.
    """
    reader = SplitReader(root, split, verify=False)
    idx = reader.index
    size = reader.height * scale
    label_w, pad = 84, 4
    cats = [c for c in CATEGORIES if (idx["category"] == CATEGORIES.index(c)).any()]
    if not cats:
        raise ValueError(f"{root}/{split}: no instances to show")
    cell = 2 * size + pad
    sheet = Image.new("RGB", (label_w + n_per_category * (cell + pad), len(cats) * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, cat in enumerate(cats):
        rows = np.flatnonzero(idx["category"] == CATEGORIES.index(cat))
        pick = rows[np.linspace(0, len(rows) - 1, min(n_per_category, len(rows))).round().astype(int)]
        y = pad + row * (size + pad)
        draw.text((4, y + size // 2 - 6), cat, fill=(0, 0, 0))
        for col, i in enumerate(pick):
            image = reader.image(int(idx["image"][i]))
            m = reader.instance_masks(int(i))
            ov = overlay(image, m["amodal"], m["visible"], m["occluder"])
            x = label_w + col * (cell + pad)
            for j, arr in enumerate((image, ov)):
                sheet.paste(Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST), (x + j * (size + pad), y))
            draw.text((x + 2, y + 1), f"{idx['occlusion'][i]:.2f}", fill=(255, 255, 255))
    reader.close()
    return save_png_atomic(sheet, out_png)

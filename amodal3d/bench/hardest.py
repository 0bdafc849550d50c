"""The hardest test instances of a method, per category, as an overlay sheet.

Each instance is scored exactly as the table scores it (AmodalStage.image_prediction,
image-frame IoU against the amodal mask); the `per_category` lowest-IoU instances of
every category are drawn as crop RGB | ground truth | prediction, so a person can
see where and how the method fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image, ImageDraw

from amodal3d.categories import class_names
from amodal3d.predict.overlay import mask_outline
from amodal3d.atomic import save_png_atomic
from amodal3d.datamodules.sheet_composites import overlay
from amodal3d.metrics.amodal_iou import instance_iou

_WHITE = np.array([255, 255, 255])


def _mask(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()[0] > 0.5


@torch.no_grad()
def hardest_instances(module, loader, device: torch.device, per_category: int = 3,
                      max_batches: int | None = None) -> dict[str, list[dict]]:
    """{category: [{iou, rgb, visible, occluded, amodal, pred} ...]} lowest IoU first (categories
    named by the module's table, which the bench checked is the dataset's)."""
    names = class_names(module.cfg)
    module.eval()
    kept: dict[int, list[dict]] = {}
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        batch = move_data_to_device(batch, device)
        prob, image_prob = module.image_prediction(batch)
        iou = instance_iou(image_prob > 0.5, batch["eval_image_amodal"] > 0.5)
        for i in range(len(iou)):
            c = int(batch["category"][i])
            cases = kept.setdefault(c, [])
            if len(cases) >= per_category and float(iou[i]) >= cases[-1]["iou"]:
                continue
            cases.append({
                "iou": float(iou[i]),
                "rgb": (batch["rgb"][i].detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                "visible": _mask(batch["visible"][i]), "occluder": _mask(batch["occluder"][i]),
                "amodal": _mask(batch["eval_amodal"][i]), "pred": _mask(prob[i]),
            })
            cases.sort(key=lambda d: d["iou"])
            del cases[per_category:]
    return {names[c]: kept[c] for c in sorted(kept)}


def _prediction_overlay(case: dict) -> np.ndarray:
    out = overlay(case["rgb"], case["pred"] | case["visible"], case["visible"], case["occluder"])
    out[mask_outline(case["amodal"])] = _WHITE  # the true amodal outline over the prediction
    return out


def hardest_sheet(cases: dict[str, list[dict]], out_png: str | os.PathLike, method: str, scale: int = 2) -> Path:
    """Write the PNG: a row per category, per case crop | truth | prediction with its IoU."""
    if not cases:
        raise ValueError("no instances to draw")
    size = next(iter(cases.values()))[0]["rgb"].shape[0] * scale
    n = max(len(v) for v in cases.values())
    label_w, pad, top = 84, 4, 18
    cell = 3 * (size + 2) + pad
    sheet = Image.new("RGB", (label_w + n * cell, top + len(cases) * (size + pad + 12) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"{method}: hardest test instances per category (crop | truth: visible green, hidden red, "
                      f"occluder blue | prediction, true amodal outline white)", fill=(0, 0, 0))
    for row, (cat, items) in enumerate(cases.items()):
        y = top + row * (size + pad + 12)
        draw.text((4, y + size // 2 - 6), cat, fill=(0, 0, 0))
        for col, case in enumerate(items):
            x = label_w + col * cell
            truth = overlay(case["rgb"], case["amodal"], case["visible"], case["occluder"])
            for j, arr in enumerate((case["rgb"], truth, _prediction_overlay(case))):
                tile = Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST)
                sheet.paste(tile, (x + j * (size + 2), y))
            draw.text((x, y + size + 1), f"IoU {100 * case['iou']:.1f}", fill=(0, 0, 0))
    return save_png_atomic(sheet, out_png)

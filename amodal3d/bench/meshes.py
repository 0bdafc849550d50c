"""Reconstructed meshes per category, next to their input and the true object.

For a few test instances of every category: the input crop, the predicted mesh
rendered (shaded, the dataset's renderer) from the predicted camera and from two
other azimuths, and the true synth13 mesh from the true camera. A picture of
what recon learned that no single number gives (docs/results.md shows it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image, ImageDraw

from amodal3d.categories import CATEGORIES

_GREY = np.array([0.72, 0.72, 0.75], np.float32)


def _on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)


@torch.no_grad()
def collect_reconstructions(stage, loader, device: torch.device, per_category: int = 2) -> dict[str, list[dict]]:
    """{category: [{rgb, verts, faces, camera, object_id, true_camera}]} of the first
    `per_category` test instances of each category, as recon predicts them."""
    stage.eval()
    found: dict[int, list[dict]] = {}
    for batch in loader:
        batch = move_data_to_device(batch, device)
        todo = [i for i in range(len(batch["category"]))
                if len(found.setdefault(int(batch["category"][i]), [])) < per_category]
        if todo:
            out = stage.net(batch)
            for i in todo:
                c = int(batch["category"][i])
                if len(found[c]) < per_category:
                    found[c].append({
                        "rgb": (batch["rgb"][i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8),
                        "verts": out["verts"][i].cpu().numpy(), "faces": stage.net.faces.cpu().numpy(),
                        "camera": out["camera"][i].cpu().numpy(), "object_id": int(batch["object_id"][i]),
                        "true_camera": batch["eval_camera"][i].cpu().numpy(),
                    })
        if len(found) == len(CATEGORIES) and all(len(v) >= per_category for v in found.values()):
            break
    return {CATEGORIES[c]: v for c, v in sorted(found.items())}


def mesh_sheet(cases: dict[str, list[dict]], true_meshes, out_png: str | os.PathLike, size: int = 96) -> Path:
    """Write the PNG: a row per category; per instance: crop | predicted mesh from the
    predicted camera, +90 deg, +180 deg | true mesh from the true camera."""
    from datamodules.sources.render import render_objects

    if not cases:
        raise ValueError("no reconstructions to draw")
    n = max(len(v) for v in cases.values())
    label_w, pad, top = 84, 4, 18
    cell = 5 * (size + 2) + 3 * pad
    sheet = Image.new("RGB", (label_w + n * cell, top + len(cases) * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), "input | predicted mesh: predicted camera, +90 deg, +180 deg | true mesh, true camera",
              fill=(0, 0, 0))
    for row, (cat, items) in enumerate(cases.items()):
        y = top + row * (size + pad)
        draw.text((4, y + size // 2 - 6), cat, fill=(0, 0, 0))
        for col, case in enumerate(items):
            cam = case["camera"].astype(np.float32)
            views = np.stack([cam + [d, 0.0, 0.0] for d in (0.0, 90.0, 180.0)])
            pred = render_objects([(case["verts"], case["faces"], _GREY)], views, size, normalize=True)[0]
            tiles = [case["rgb"]] + [_on_white(v) for v in pred]
            true = true_meshes.get("test", torch.tensor([case["object_id"]])) if true_meshes else None
            if true:
                v, f = true[0]
                img = render_objects([(v.numpy(), f.numpy(), _GREY)], case["true_camera"][None].astype(np.float32),
                                     size, normalize=True)[0, 0]
                tiles.append(_on_white(img))
            x = label_w + col * cell
            for j, arr in enumerate(tiles):
                sheet.paste(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR), (x + j * (size + 2), y))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out

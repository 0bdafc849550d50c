"""Contact sheet of an object source: one labelled row per category, several views.

Used to eyeball that procedural shapes are recognisable and well framed
(`make`-free: `python -m datamodules.sources.sheet --out docs/synth13_objects.png`).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from amodal3d.categories import DISPLAY_NAMES, resolve_categories
from amodal3d.atomic import save_png_atomic
from amodal3d.datamodules.sources import load_objects

LABEL_W = 78
GAP = 6
TILE_BG = (228, 228, 228)
PAGE_BG = (255, 255, 255)


def _with_count(data_cfg: Any, split: str, count: int) -> Any:
    """A copy of data_cfg that asks for `count` objects of `split`."""
    cfg = copy.deepcopy(data_cfg)
    cfg.objects_per_split = {split: int(count)}
    return cfg


def _over(rgba: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + np.asarray(bg, np.float32) * (1 - a)
    return out.round().astype(np.uint8)


def object_contact_sheet(
    data_cfg: Any,
    out_png: str | Path,
    views: Sequence[int] = (0, 3, 6, 9, 12, 15, 18, 21),
    objects_per_category: int = 2,
    split: str = "train",
    scale: int = 1,
) -> Path:
    """Write a PNG grid: rows = categories, columns = objects x views. Returns the path."""
    cats = resolve_categories(list(data_cfg.categories))
    cfg = _with_count(data_cfg, split, objects_per_category)
    views = list(views)
    if not views or min(views) < 0 or max(views) >= int(data_cfg.views):
        raise ValueError(f"views must lie in [0, {int(data_cfg.views)}), got {views}")
    tile = int(data_cfg.render_size) * scale
    block_w = len(views) * tile + GAP
    width = LABEL_W + objects_per_category * block_w
    height = GAP + len(cats) * (tile + GAP)
    page = Image.new("RGB", (width, height), PAGE_BG)
    draw = ImageDraw.Draw(page)
    for r, cat in enumerate(cats):
        objs = load_objects(cfg, cat, split)
        y = GAP + r * (tile + GAP)
        draw.text((6, y + tile // 2 - 6), DISPLAY_NAMES[cat], fill=(0, 0, 0))
        for i in range(min(objects_per_category, objs.num_objects)):
            for j, v in enumerate(views):
                img = Image.fromarray(_over(objs.rgba[i, v], TILE_BG))
                if scale != 1:
                    img = img.resize((tile, tile), Image.NEAREST)
                page.paste(img, (LABEL_W + i * block_w + j * tile, y))
    return save_png_atomic(page, out_png)


def main(argv: Sequence[str] | None = None) -> None:
    from amodal3d.config import DataConfig

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/synth13_objects.png")
    ap.add_argument("--source", default="synth13")
    ap.add_argument("--source-path", default="")
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--split", default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=1)
    args = ap.parse_args(argv)
    cfg = DataConfig(source=args.source, source_path=args.source_path, seed=args.seed)
    print(object_contact_sheet(cfg, args.out, objects_per_category=args.objects, split=args.split, scale=args.scale))


if __name__ == "__main__":
    main()

"""How alike each synth13 category looks from opposite sides.

For a camera-free method the azimuth is only as identifiable as the images are
different: an object seen from azimuth θ and from θ + 180° gives the silhouette
IoU and the colour difference printed here (renders of the dataset's own
renderer, NMR cameras, test objects). IoU 1 and no colour difference mean no
method can tell front from back. Evaluation aid only; nothing trains on it.

    python -m amodal3d.bench.symmetry [--objects 4] [--categories chair car ...]
"""

from __future__ import annotations

import argparse

import numpy as np

from amodal3d.categories import CATEGORIES


def opposite_view_similarity(rgba: np.ndarray) -> tuple[float, float]:
    """(mean silhouette IoU, mean |RGB difference| /255 where both are covered) between
    every view and the view half-way round, for uint8 (N, V, H, W, 4) renders of V
    equally spaced azimuths (V even)."""
    v = rgba.shape[1]
    if v % 2:
        raise ValueError(f"need an even number of equally spaced views, got {v}")
    a = rgba[..., 3] > 127
    b = np.roll(a, v // 2, axis=1)
    iou = (a & b).sum((2, 3)) / np.maximum((a | b).sum((2, 3)), 1)
    rgb = rgba[..., :3].astype(np.float32)
    diff = np.abs(rgb - np.roll(rgb, v // 2, axis=1)).mean(-1)
    both = a & b
    colour = (diff * both).sum((2, 3)) / np.maximum(both.sum((2, 3)), 1)
    return float(iou.mean()), float(colour.mean())


def category_report(categories=CATEGORIES, objects: int = 4, size: int = 64) -> dict[str, tuple[float, float]]:
    from datamodules.sources.base import nmr_cameras
    from datamodules.sources.render import render_objects
    from datamodules.sources.synth13 import synth_object

    cams = nmr_cameras(24)
    out = {}
    for cat in categories:
        objs = [synth_object(cat, "test", i, 0) for i in range(objects)]
        rgba = render_objects([(o.verts, o.faces, o.colors) for o in objs], cams, size, cull_backfaces=True)
        out[cat] = opposite_view_similarity(rgba)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m amodal3d.bench.symmetry", description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=4, help="test objects per category")
    ap.add_argument("--categories", nargs="*", default=list(CATEGORIES))
    args = ap.parse_args(argv)
    print("| category | silhouette IoU (θ vs θ+180°) | mean colour difference (/255) |\n|---|---|---|")
    for cat, (iou, colour) in category_report(args.categories, args.objects).items():
        print(f"| {cat} | {iou:.3f} | {colour:.1f} |")


if __name__ == "__main__":
    main()

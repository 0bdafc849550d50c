"""How alike each synth13 category looks from opposite sides.

For a camera-free method the azimuth is only as identifiable as the images are
different: an object seen from azimuth θ and from θ + 180° gives the silhouette
IoU and the colour difference printed here (renders of the dataset's own
renderer, NMR cameras, test objects). IoU 1 and no colour difference mean no
method can tell front from back. The last column counts the views that are the
same picture as some other view of their object (metrics.view_symmetry), whose
azimuth recon's symmetry-aware error forgives. Evaluation aid only.

    python -m amodal3d.bench.symmetry [--objects 4] [--categories chair car ...]
"""

from __future__ import annotations

import argparse

from amodal3d.categories import CATEGORIES
from amodal3d.metrics.view_symmetry import opposite_view_similarity, same_picture


def category_report(categories=CATEGORIES, objects: int = 4, size: int = 64) -> dict[str, tuple[float, float, float]]:
    """{category: (opposite views' mean silhouette IoU and colour difference, share of
    views that are the same picture as some other view of the object)}."""
    from amodal3d.datamodules.sources.base import nmr_cameras
    from amodal3d.datamodules.sources.synth13 import render_synth_objects, synth_object

    cams = nmr_cameras(24)
    out = {}
    for cat in categories:
        rgba = render_synth_objects([synth_object(cat, "test", i, 0) for i in range(objects)], cams, size)
        twin = same_picture(rgba).sum(-1) > 1  # (N, V): the view has a twin besides itself
        out[cat] = (*opposite_view_similarity(rgba), float(twin.mean()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m amodal3d.bench.symmetry", description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=4, help="test objects per category")
    ap.add_argument("--categories", nargs="*", default=list(CATEGORIES))
    args = ap.parse_args(argv)
    print("| category | silhouette IoU (θ vs θ+180°) | mean colour difference (/255) | views with a twin |\n"
          "|---|---|---|---|")
    for cat, (iou, colour, alike) in category_report(args.categories, args.objects).items():
        print(f"| {cat} | {iou:.3f} | {colour:.1f} | {100 * alike:.0f}% |")


if __name__ == "__main__":
    main()

"""How often a gt-visible crop holds the whole amodal mask, per crop margin.

`python -m amodal3d.bench.coverage [--root data/synth13-erase] [--split val] [--margins 1.15 2 2.5 3]`
prints, for each margin, the share of the split's instances whose amodal box lies inside
the square crop centred on their visible box (the part outside no method can predict).
Reads the amodal boxes: evaluation only, for choosing `loader.visible_crop_margin` on
the validation split.
"""

from __future__ import annotations

import argparse

from amodal3d.datamodules.crops import crop_coverage, protocol_crop_boxes
from amodal3d.datamodules.shard_reader import SplitReader


def coverage(root: str, split: str, margins: list[float]) -> dict[float, float]:
    """{margin: share of instances whose whole amodal box is inside their gt-visible crop}."""
    idx = SplitReader(root, split, verify=False).index
    return {m: float(crop_coverage(idx, protocol_crop_boxes(idx, "gt-visible", 1.0, m)).mean()) for m in margins}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m amodal3d.bench.coverage", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/synth13-erase")
    ap.add_argument("--split", default="val")
    ap.add_argument("--margins", type=float, nargs="+", default=[1.15, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0])
    args = ap.parse_args(argv)
    print(f"| visible_crop_margin | {args.split}: amodal mask inside the crop |\n|---|---|")
    for m, share in coverage(args.root, args.split, args.margins).items():
        print(f"| {m:g} | {100 * share:.2f}% |")


if __name__ == "__main__":
    main()

"""How much of the given visible mask a method's amodal prediction keeps.

In the gt-visible protocol the visible mask is given, so a prediction should
contain it. Measured in the image frame, after the crop prediction is pasted
back (what the table scores):

    python -m amodal3d.bench.visible_kept --run runs/default/refine/<id> [--run ...] [key=value ...]
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device


@torch.no_grad()
def visible_lost(module, loader, device: torch.device) -> dict[str, float]:
    """{pixels: share of visible pixels outside the prediction, instances: share of
    instances that lose at least one, count}."""
    lost = total = bad = n = 0
    module.eval()
    for batch in loader:
        batch = move_data_to_device(batch, device)
        _, image_prob = module.image_prediction(batch)
        vis = (batch["image_visible"] > 0.5).flatten(1)
        miss = (vis & ~(image_prob > 0.5).flatten(1)).sum(1)
        lost += int(miss.sum())
        total += int(vis.sum())
        bad += int((miss > 0).sum())
        n += len(miss)
    return {"pixels": lost / max(total, 1), "instances": bad / max(n, 1), "count": n}


def main(argv: list[str] | None = None) -> None:
    from amodal3d.bench.evaluate import eval_loader, load_method, named_methods, resolve_device
    from amodal3d.config import load_config

    ap = argparse.ArgumentParser(prog="python -m amodal3d.bench.visible_kept", description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="run folder or checkpoint (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--device", default="auto")
    ap.add_argument("overrides", nargs="*", help="config dot-overrides (data.root=...)")
    args = ap.parse_args(argv)
    cfg = load_config(None, None, args.overrides)
    device = resolve_device(args.device)
    print("| run | visible pixels lost | instances losing any |\n|---|---|---|")
    for entry in named_methods(args.run):
        res = visible_lost(load_method(entry, device, cfg), eval_loader(cfg, args.split), device)
        print(f"| {entry.name} | {100 * res['pixels']:.2f}% | {100 * res['instances']:.1f}% of {res['count']} |")


if __name__ == "__main__":
    main()

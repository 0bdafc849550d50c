"""VRSP's parts under the detect protocol: its row (the refined, prior-fused amodal mask,
scores rescored by the codebook) beside the same mask without the rescoring and the
coarse amodal mask A0 (before visible attention and the prior).

`python -m amodal3d.bench.vrsp_ablation [--exp default] [--split val] [--limit-batches N]`
prints detect mIoU, mIoU_occ and COCO amodal mask AP of each variant for the latest
finished vrsp run of the experiment (validation by default: an analysis, not a table).
"""

from __future__ import annotations

import argparse

import torch

from amodal3d.bench.detect import DetectResult, DetectScorer, _to, detect_loader

VARIANTS = ("VRSP (refined mask, rescored)", "refined mask, no rescoring", "coarse mask A0, rescored")


@torch.no_grad()
def vrsp_variants(cfg, device: torch.device, split: str = "val",
                  max_batches: int | None = None) -> dict[str, DetectResult]:
    """{variant: its detect figures} on `split` of cfg's dataset."""
    from amodal3d.bench.evaluate import check_module_classes, dataset_class_names
    from amodal3d.lightning_modules.baselines.vrsp import VrspStage
    from amodal3d.runs import find_stage_checkpoint

    names = dataset_class_names(cfg)
    ckpt = find_stage_checkpoint("vrsp", str(cfg.experiment), str(cfg.run.root))
    module = VrspStage.load_from_checkpoint(str(ckpt), map_location=device).to(device).eval()
    check_module_classes(module, ckpt, cfg)
    scorers = {name: DetectScorer(device, len(names)) for name in VARIANTS}
    for b, (images, targets) in enumerate(detect_loader(cfg, split)):
        if max_batches is not None and b >= max_batches:
            break
        images = [im.to(device) for im in images]
        targets = [_to(t, device) for t in targets]
        module.branch.rescore = True
        rescored = module.detect(images)
        module.branch.rescore = False
        plain = module.detect(images)
        for r, p, t in zip(rescored, plain, targets):
            scorers[VARIANTS[0]].update(r["boxes"], r["masks"][:, 0] > 0.5, r["labels"], r["scores"], t)
            scorers[VARIANTS[1]].update(p["boxes"], p["masks"][:, 0] > 0.5, p["labels"], p["scores"], t)
            scorers[VARIANTS[2]].update(r["boxes"], r["coarse_masks"][:, 0] > 0.5, r["labels"], r["scores"], t)
    module.branch.rescore = True
    return {name: s.result(name, checkpoint=str(ckpt)) for name, s in scorers.items()}


def markdown(results: dict[str, DetectResult]) -> str:
    from amodal3d.bench.table import pct

    lines = ["| variant | mIoU | mIoU_occ | AP | AP50 | AP75 |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {pct(r.row.miou)} | {pct(r.row.miou_occ)} | {pct(r.ap['AP'])} "
                     f"| {pct(r.ap['AP50'])} | {pct(r.ap['AP75'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from amodal3d.config import load_config

    ap = argparse.ArgumentParser(prog="python -m amodal3d.bench.vrsp_ablation", description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default=None)
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--limit-batches", type=int, default=None)
    args = ap.parse_args(argv)
    cfg = load_config("vrsp", args.exp)
    print(markdown(vrsp_variants(cfg, torch.device("cpu"), args.split, args.limit_batches)))


if __name__ == "__main__":
    main()

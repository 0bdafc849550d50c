"""Mask R-CNN-family rows under the gt-box protocol: each detector's RoI heads are fed
the GT amodal boxes and classes of every test image (its box branch is not used), and
the mask it predicts in each box is pasted into the image and scored per instance like
every other gt-box row (AmodalMIoU, image frame). Boxes are clipped to the image, the
frame the detectors trained their masks in.

A detector trains on whole images, whatever the crop protocol: a run of the protocol's
own experiment is used when there is one, else the run of the default experiment when
it was trained on the same dataset (the table note names the checkpoint).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from amodal3d.bench.evaluate import MethodEntry, check_module_classes, dataset_class_names, relative_to_repo
from amodal3d.bench.table import NEEDS_DETECT, NOT_TRAINED, MethodResult
from amodal3d.errors import ConfigError

DEFAULT_EXPERIMENT = "default"
GT_BOX_NOTE = ("gt-box, Mask R-CNN-family rows: the detector's RoI heads fed each test image's GT amodal boxes "
               "(clipped to the image) and classes, the predicted mask pasted into the image; the detector "
               "trained on whole images (the default experiment's run when the protocol's has none).")


def detector_checkpoint(cfg: DictConfig, stage: str):
    """The detector's checkpoint for cfg's experiment, else the default experiment's when its
    data root is the same; None when neither has a finished run."""
    from amodal3d.lightning_modules.checkpoints import checkpoint_hparams
    from amodal3d.runs import find_stage_checkpoint

    root = str(cfg.run.root)
    try:
        return find_stage_checkpoint(stage, str(cfg.experiment), root)
    except FileNotFoundError:
        pass
    if str(cfg.experiment) == DEFAULT_EXPERIMENT:
        return None
    try:
        ckpt = find_stage_checkpoint(stage, DEFAULT_EXPERIMENT, root)
    except FileNotFoundError:
        return None
    trained_on = (checkpoint_hparams(ckpt).get("cfg") or {}).get("data", {}).get("root")
    same = trained_on is not None and Path(str(trained_on)).absolute() == Path(str(cfg.data.root)).absolute()
    return ckpt if same else None


@torch.no_grad()
def gt_box_detector_rows(cfg: DictConfig, entries: list[MethodEntry], device: torch.device,
                         max_batches: int | None = None) -> dict[str, MethodResult]:
    """{entry name: its gt-box row} for the detector entries (status NEEDS_DETECT)."""
    from amodal3d.bench.detect import _to, detect_loader
    from amodal3d.lightning_modules.registry import get_stage
    from amodal3d.metrics.amodal_iou import AmodalMIoU
    from amodal3d.models.maskrcnn import boxes_in_image

    rows: dict[str, MethodResult] = {}
    models = []
    names = dataset_class_names(cfg)
    for e in entries:
        if e.status != NEEDS_DETECT:
            continue
        ckpt = detector_checkpoint(cfg, e.stage)
        if ckpt is None:
            rows[e.name] = MethodResult(name=e.name, stage=e.stage, status=NOT_TRAINED)
            continue
        module = get_stage(e.stage).module.load_from_checkpoint(str(ckpt), map_location=device).to(device).eval()
        try:
            check_module_classes(module, ckpt, cfg)
        except ConfigError as err:  # trained on another dataset's categories: this row fails, the others go on
            rows[e.name] = MethodResult(name=e.name, stage=e.stage, status=f"error: {err}",
                                        checkpoint=relative_to_repo(ckpt))
            continue
        models.append((e, module, ckpt, AmodalMIoU(len(names)).to(device), [0.0]))
    if not models:
        return rows
    for b, (images, targets) in enumerate(detect_loader(cfg)):
        if max_batches is not None and b >= max_batches:
            break
        images = [im.to(device) for im in images]
        targets = [_to(t, device) for t in targets]
        boxes = [boxes_in_image(t["amodal_boxes"], *im.shape[-2:]) for im, t in zip(images, targets)]
        labels = [t["labels"] for t in targets]
        for e, module, ckpt, metric, seconds in models:
            t0 = time.perf_counter()
            out = module.masks_at_boxes(images, boxes, labels)
            seconds[0] += time.perf_counter() - t0
            for o, t in zip(out, targets):
                metric.update(o["masks"] > 0.5, t["eval_amodal_masks"][:, None].bool(), t["masks"][:, None].bool(),
                              t["category"])
    for e, module, ckpt, metric, seconds in models:
        res = {k: v.cpu() for k, v in metric.compute().items()}
        rows[e.name] = MethodResult.from_metric(e.name, res, stage=e.stage, checkpoint=relative_to_repo(ckpt),
                                                seconds=seconds[0])
        print(f"[bench] gt-box {e.name} (GT boxes into its RoI heads): mIoU {100 * float(res['miou']):.1f}",
              file=sys.stderr, flush=True)
    return rows

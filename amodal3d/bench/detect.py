"""The `detect` protocol: amodal masks from the image alone.

Step 1 (the `visible` stage) detects each instance (class, score, visible mask,
amodal box). Every method that starts from a visible mask (the reference rows,
Deocclusion, the A3D chain, Ours; trained under gt-visible) is fed each detection
as gt-visible feeds a GT instance: its visible mask, its class, and the other
detections' visible masks as the occluders, cropped around its visible box.
Mask R-CNN-family rows are their own detectors. Every row is then scored alike
(metrics/detection.py): GT instances matched one-to-one to its detections by
amodal-box IoU >= 0.5, highest score first (the step-1 amodal box for the rows fed
by step 1), a missed instance scoring IoU 0; plus COCO amodal mask AP with the
detection's score.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.ops import masks_to_boxes

from amodal3d.bench.evaluate import (
    MethodEntry, check_module_classes, dataset_class_names, discover_methods, load_method,
)
from amodal3d.bench.ours import OURS_TRUE_CAMERA
from amodal3d.bench.reference import reference_modules
from amodal3d.bench.table import NOT_TRAINED, MethodResult
from amodal3d.errors import ConfigError
from amodal3d.protocols import GT_VISIBLE

DETECT = "detect"
STEP1 = "visible"
TRUE_CAMERA_ONLY = "reads each GT instance's true camera: not defined for detections"
DETECT_NOTES = (
    "detect: from the image alone. Rows fed by step 1 (the `visible` stage) get each detection's visible mask, "
    "class and the other detections' visible masks, as gt-visible gives GT instances; Mask R-CNN-family rows "
    "are their own detectors.",
    "GT instances are matched one-to-one to a row's detections by amodal-box IoU >= 0.5, highest score first "
    "(step 1's amodal box for the rows it feeds); an unmatched GT instance scores IoU 0.",
)


@dataclass
class DetectReport:
    """What `evaluate_detect` returns: the scored rows, the rows that could not run (with
    why), and step 1's own test figures (visible-mask and amodal-box AP; {} without it)."""

    scored: list
    unscored: list
    step1: dict = field(default_factory=dict)
    images: int = 0  # test images scored
    step1_seconds: float = 0.0  # step 1's detection time over them (the fed rows' shared first step)


@dataclass
class DetectResult:
    """A row's detect figures: the seed-layout mIoU row and its COCO amodal mask AP."""

    row: MethodResult
    ap: dict[str, float] = field(default_factory=dict)


def detect_loader(cfg: DictConfig, split: str = "test"):
    """Whole test images with their instances, in order (built first if missing; its category
    table set into cfg, dataset_class_names)."""
    from amodal3d.datamodules.images import DetectionDataModule

    dataset_class_names(cfg)
    dm = DetectionDataModule(cfg.data, OmegaConf.merge(cfg.loader, {"persistent_workers": False}))
    return dm.make_loader(dm.dataset(split), split)


def step1_crops(images: list[torch.Tensor], dets: list[dict], crop_size: int, margin: float):
    """The gt-visible crop batch of every usable step-1 detection of the images (with the
    image-frame visible and occluder masks), and per image the indices of the detections
    it kept (an empty visible mask feeds nothing)."""
    from amodal3d.predict.crops import make_crops, occluder_masks

    parts, kept = [], []
    for img, d in zip(images, dets):
        vis = (d["masks"][:, 0] > 0.5).cpu()
        keep = torch.where(vis.flatten(1).any(1))[0]
        kept.append(keep)
        if len(keep) == 0:
            continue
        v = vis[keep].numpy()
        others = occluder_masks(v, "others")
        rgb = (img.cpu().permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        crops = make_crops(rgb, v, others, masks_to_boxes(vis[keep]).numpy(), crop_size, margin)
        crops["category"] = (d["labels"][keep].cpu() - 1).clamp_min(0)
        # the image-frame inputs, as a gt-visible crop item carries them (the reference rules use them)
        crops["image_visible"] = torch.from_numpy(v[:, None].astype(np.float32))
        crops["image_occluder"] = torch.from_numpy(others[:, None].astype(np.float32))
        parts.append(crops)
    if not parts:
        return None, kept
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, kept


class DetectScorer:
    """The detect metrics of one row, fed image by image, over the dataset's `num_categories`."""

    def __init__(self, device: torch.device, num_categories: int) -> None:
        from amodal3d.lightning_modules.detector import ap_metric
        from amodal3d.metrics.detection import DetectionAmodalMIoU

        self.miou = DetectionAmodalMIoU(num_categories).to(device)
        self.ap = ap_metric("masks", num_categories).to(device)
        self.seconds = 0.0

    def update(self, boxes, amodal, labels, scores, target) -> None:
        gt_amodal = target["eval_amodal_masks"].bool()
        self.miou.update_detections(boxes, amodal, target["amodal_boxes"], gt_amodal, target["masks"].bool(),
                                    target["category"], scores=scores)
        self.ap.update([{"masks": amodal, "scores": scores, "labels": labels - 1}],
                       [{"masks": gt_amodal, "labels": target["category"], "image_id": int(target["index"])}])

    def result(self, name: str, **kw) -> DetectResult:
        res = {k: v.cpu() for k, v in self.miou.compute().items()}
        row = MethodResult.from_metric(name, res, seconds=self.seconds, **kw)
        return DetectResult(row, {k: float(v) for k, v in self.ap.compute().items()})


def _to(target: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in target.items()}


def crop_config(cfg: DictConfig) -> DictConfig:
    return OmegaConf.merge(cfg, {"protocol": GT_VISIBLE})


@torch.no_grad()
def evaluate_detect(cfg: DictConfig, device: torch.device, max_batches: int | None = None,
                    entries: list[MethodEntry] | None = None, progress_every: int = 4) -> DetectReport:
    """The detect protocol on cfg's test split, with the runs of cfg's experiment (a
    progress line on stderr every `progress_every` batches; 0: none). Rows sharing a
    checkpoint (Ours and the run it is) are inferred once."""
    from amodal3d.lightning_modules.registry import get_stage
    from amodal3d.runs import find_stage_checkpoint

    names = dataset_class_names(cfg)  # before any module: the reference rows are built for the dataset's table
    crop_cfg = crop_config(cfg)
    entries = entries if entries is not None else discover_methods(str(cfg.experiment), str(cfg.run.root))
    unscored: list[MethodResult] = []
    try:
        step1_ckpt = find_stage_checkpoint(STEP1, str(cfg.experiment), str(cfg.run.root))
        step1 = get_stage(STEP1).module.load_from_checkpoint(str(step1_ckpt), map_location=device).to(device).eval()
    except FileNotFoundError:
        step1 = None
    if step1 is not None:  # its labels feed every row's class: another table would mislabel them all
        check_module_classes(step1, step1_ckpt, cfg)
    # rows fed by step 1 (references and crop methods of gt-visible), and the detectors
    fed: list[tuple[str, object, str]] = []
    detectors: list[tuple[str, object, str]] = []
    if step1 is not None:
        fed += [(name, module, "") for name, module in reference_modules(crop_cfg, device)]
    for e in entries:
        spec = get_stage(e.stage) if e.stage else None
        is_detector = spec is not None and spec.data == "images"
        if is_detector:
            try:
                ckpt = find_stage_checkpoint(e.stage, str(cfg.experiment), str(cfg.run.root))
            except FileNotFoundError:
                unscored.append(MethodResult(name=e.name, stage=e.stage, status=NOT_TRAINED))
                continue
            detector = spec.module.load_from_checkpoint(str(ckpt), map_location=device).to(device).eval()
            try:
                check_module_classes(detector, ckpt, cfg)
            except ConfigError as err:  # trained on another dataset's categories: this row fails, the others go on
                unscored.append(MethodResult(name=e.name, stage=e.stage, status=f"error: {err}", checkpoint=str(ckpt)))
                continue
            detectors.append((e.name, detector, str(ckpt)))
            continue
        if e.status != "ok":
            unscored.append(MethodResult(name=e.name, stage=e.stage, status=e.status))
            continue
        if e.name == OURS_TRUE_CAMERA:  # it reads each instance's true camera: a detection has none
            unscored.append(MethodResult(name=e.name, stage=e.stage, status=TRUE_CAMERA_ONLY))
            continue
        if step1 is None:
            unscored.append(MethodResult(name=e.name, stage=e.stage,
                                         status="needs step 1: train it with `make train STAGE=visible`"))
            continue
        try:
            fed.append((e.name, load_method(e, device, crop_cfg), str(e.checkpoint or "")))
        except Exception as err:  # e.g. trained under gt-box: it needs a box step 1 does not give it
            unscored.append(MethodResult(name=e.name, stage=e.stage, status=f"error: {err}"))
    scorers = {name: DetectScorer(device, len(names)) for name, _, _ in fed + detectors}
    step1_metrics = {}
    if step1 is not None:
        from amodal3d.lightning_modules.detector import ap_metric

        step1_metrics = {"visible_mask": ap_metric("masks", len(names)).to(device),
                         "amodal_box": ap_metric("boxes", len(names)).to(device)}
    lc = cfg.loader
    n_images, step1_seconds, started = 0, 0.0, time.perf_counter()
    for b, (images, targets) in enumerate(detect_loader(cfg)):
        if max_batches is not None and b >= max_batches:
            break
        n_images += len(images)
        images = [im.to(device) for im in images]
        targets = [_to(t, device) for t in targets]
        for name, module, _ in detectors:
            t0 = time.perf_counter()
            out = module.detect(images)
            scorers[name].seconds += time.perf_counter() - t0
            for o, t in zip(out, targets):
                scorers[name].update(o["boxes"], o["masks"][:, 0] > 0.5, o["labels"], o["scores"], t)
        if step1 is None:
            continue
        t0 = time.perf_counter()
        dets = step1.detect(images)
        step1_seconds += time.perf_counter() - t0
        step1.update_eval(dets, targets, step1_metrics)  # its own test AP, as its validation reports it
        crops, kept = step1_crops(images, dets, int(lc.crop_size), float(lc.visible_crop_margin))
        h, w = images[0].shape[-2:]
        counts = [len(k) for k in kept]
        shared: dict[str, tuple[torch.Tensor, float]] = {}  # one inference per checkpoint (Ours is a run's row too)
        for name, module, ckpt in list(fed):
            try:
                if ckpt and ckpt in shared:
                    amodal, seconds = shared[ckpt]
                else:
                    t0 = time.perf_counter()
                    if crops is not None:  # scored as evaluate_batch scores a gt-visible batch
                        amodal = module.image_prediction({k: v.to(device) for k, v in crops.items()})[1][:, 0] > 0.5
                    else:
                        amodal = torch.zeros((0, h, w), dtype=torch.bool, device=device)
                    seconds = time.perf_counter() - t0
                    if ckpt:
                        shared[ckpt] = (amodal, seconds)
            except Exception as err:  # this row fails, the others go on
                print(f"[bench] detect {name}: evaluation failed: {err!r}", file=sys.stderr)
                fed.remove((name, module, ckpt))
                unscored.append(MethodResult(name=name, status=f"error: {err!r}", checkpoint=ckpt))
                continue
            scorers[name].seconds += seconds
            for d, keep, a, t in zip(dets, kept, amodal.split(counts), targets):
                scorers[name].update(d["boxes"][keep], a, d["labels"][keep], d["scores"][keep], t)
        if progress_every and (b + 1) % progress_every == 0:
            print(f"[bench] detect: {n_images} images, {sum(counts)} step-1 detections in the last batch, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if step1 is None:
        unscored.insert(0, MethodResult(name="visible floor (step 1)", status=(
            "needs step 1: train it with `make train STAGE=visible`; every row fed by step 1 waits for it")))
    results = []
    for name, _, ckpt in fed + detectors:
        results.append(scorers[name].result(name, checkpoint=ckpt, reference=not ckpt))
        print(f"[bench] detect {name}: mIoU {100 * results[-1].row.miou:.1f} AP {100 * results[-1].ap['AP']:.1f}",
              file=sys.stderr, flush=True)
    step1_ap = {f"{name}_{k}": float(v) for name, m in step1_metrics.items() for k, v in m.compute().items()}
    return DetectReport(results, unscored, step1_ap, n_images, step1_seconds)


def ap_markdown(report: DetectReport) -> str:
    """COCO amodal mask AP / AP50 / AP75 (%) and throughput of every scored row, then step 1's
    own APs. images/s: a detector's whole forward; a fed row's own inference on step 1's
    detections (step 1's time is given once, below)."""
    from amodal3d.bench.table import pct

    nan = float("nan")

    def rate(seconds: float) -> str:
        return f"{report.images / seconds:.1f}" if report.images and seconds > 0 else "—"

    lines = ["## COCO amodal mask AP, detect (test split)", "", "| method | AP | AP50 | AP75 | images/s |",
             "|---|---|---|---|---|"]
    for r in report.scored:
        lines.append(f"| {r.row.name} | {pct(r.ap.get('AP', nan))} | {pct(r.ap.get('AP50', nan))} "
                     f"| {pct(r.ap.get('AP75', nan))} | {rate(r.row.seconds)} |")
    if report.step1:
        lines += ["", "## Step 1 (`visible` stage) on the test split", "", "| what | AP | AP50 | AP75 |",
                  "|---|---|---|---|"]
        for name, label in (("visible_mask", "visible-mask AP"), ("amodal_box", "amodal-box AP")):
            lines.append(f"| {label} | " + " | ".join(pct(report.step1.get(f"{name}_{k}", nan))
                                                      for k in ("AP", "AP50", "AP75")) + " |")
        lines += ["", f"Step 1 detects {rate(report.step1_seconds)} images/s ({report.images} test images, "
                      "batch of the loader); a fed row's end-to-end rate adds it."]
    return "\n".join(lines)

"""A picture to judge the detect protocol by eye: test images with step 1's detections
(visible masks, class and score on each amodal box), Ours' amodal masks from those
detections, and the ground truth (`bench detections` writes bench/detections.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig


def _rgb(img: torch.Tensor) -> np.ndarray:
    return (img.cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def detection_sheet(cfg: DictConfig, device: torch.device, out_png: Path, images: int = 8,
                    min_score: float = 0.5) -> tuple[Path, str]:
    """(the PNG, a note saying which models drew it). Rows: test images spread over the
    split; columns: the image, step 1's detections, Ours' amodal masks, the ground truth."""
    from torchvision.utils import make_grid

    from amodal3d.atomic import save_png_atomic
    from amodal3d.bench.detect import STEP1, crop_config, detect_loader, step1_crops
    from amodal3d.bench.evaluate import MethodEntry, check_module_classes, dataset_class_names, load_method
    from amodal3d.bench.ours import OURS, ours_rows
    from amodal3d.lightning_modules.registry import get_stage
    from amodal3d.predict.overlay import overlay_image
    from amodal3d.runs import find_stage_checkpoint

    exp, root = str(cfg.experiment), str(cfg.run.root)
    names = dataset_class_names(cfg)  # the class labels drawn: the dataset's table, which step 1 must share
    step1_ckpt = find_stage_checkpoint(STEP1, exp, root)  # FileNotFoundError: nothing to draw
    step1 = get_stage(STEP1).module.load_from_checkpoint(str(step1_ckpt), map_location=device).to(device).eval()
    check_module_classes(step1, step1_ckpt, cfg)

    rows = {r.name: r for r in ours_rows(exp, root)}
    ours = None
    if OURS in rows and rows[OURS].status == "ok":
        r = rows[OURS]
        ours = load_method(MethodEntry(r.name, r.stage, r.checkpoint, r.status, r.load), device, crop_config(cfg))
    loader = detect_loader(cfg)
    ds = loader.dataset
    picks = np.linspace(0, len(ds) - 1, images).round().astype(int).tolist()
    panels = []
    lc = cfg.loader
    for i in picks:
        img, t = ds[i]
        img = img.to(device)
        det = step1.detect([img])[0]
        keep = det["scores"] >= min_score
        det = {k: v[keep] for k, v in det.items()}
        crops, kept = step1_crops([img], [det], int(lc.crop_size), float(lc.visible_crop_margin))
        idx = kept[0]
        vis = (det["masks"][idx, 0] > 0.5).cpu().numpy()
        labels = [f"{names[int(c) - 1]} {float(s):.2f}" for c, s in zip(det["labels"][idx], det["scores"][idx])]
        rgb = _rgb(img)
        if ours is not None and crops is not None:
            amodal = ours.image_prediction({k: v.to(device) for k, v in crops.items()})[1][:, 0] > 0.5
            amodal = amodal.cpu().numpy() | vis
        else:
            amodal = vis
        gt_vis, gt_amo = t["masks"].bool().numpy(), t["eval_amodal_masks"].bool().numpy()
        gt_labels = [names[int(c)] for c in t["category"]]
        cells = [overlay_image(rgb, [], []), overlay_image(rgb, list(vis), list(vis), labels=labels),
                 overlay_image(rgb, list(vis), list(amodal)), overlay_image(rgb, list(gt_vis), list(gt_amo),
                                                                            labels=gt_labels)]
        panels += [torch.from_numpy(c).permute(2, 0, 1) for c in cells]
    from PIL import Image

    grid = make_grid(panels, nrow=4, padding=4, pad_value=255)
    save_png_atomic(Image.fromarray(grid.permute(1, 2, 0).numpy()), out_png)
    note = (f"Columns: test image; step 1's detections (score >= {min_score}: visible mask, class and score on the "
            f"box of the mask), from {step1_ckpt}; "
            + (f"Ours' amodal masks from those detections (visible tinted, predicted hidden part hatched), from "
               f"{rows[OURS].checkpoint}; " if ours is not None else "Ours: not trained (the column repeats step 1); ")
            + "the ground truth (visible tinted, hidden part hatched, class).")
    return out_png, note

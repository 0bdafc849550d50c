"""The detect protocol: detections matched to GT instances, then amodal IoU and COCO AP.

Detections are matched to GT instances one-to-one by visible-mask IoU ≥ 0.5
(class-agnostic; the GT's category decides where the instance is counted); an
unmatched GT instance scores amodal IoU 0. COCO amodal mask AP is computed by
pycocotools with the amodal mask as each GT's segmentation (area = mask area).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from amodal3d.metrics.amodal_iou import AmodalMIoU


def _flat(masks: torch.Tensor, name: str) -> torch.Tensor:
    if masks.dtype != torch.bool or masks.ndim != 3:
        raise ValueError(f"{name}: expected bool masks (N,H,W), got {masks.dtype} {tuple(masks.shape)}")
    return masks.reshape(masks.shape[0], -1)


def pairwise_mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Na,Nb) IoU between bool masks a (Na,H,W) and b (Nb,H,W); empty vs empty is 0."""
    fa = _flat(a, "a").double()
    fb = _flat(b, "b").double()
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"mask sizes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def match_detections(
    pred_visible: torch.Tensor,
    gt_visible: torch.Tensor,
    scores: torch.Tensor | None = None,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """One-to-one matching by visible-mask IoU: (G,) index of the matched detection, -1 if none.

    Greedy over (detection, GT) pairs from the highest IoU down (ties: higher
    score first); a pair is taken when both are still free and IoU ≥ threshold.
    """
    g = gt_visible.shape[0]
    match = torch.full((g,), -1, dtype=torch.long)
    if g == 0 or pred_visible.shape[0] == 0:
        return match
    iou = pairwise_mask_iou(pred_visible, gt_visible).cpu()
    p = iou.shape[0]
    sc = torch.zeros(p, dtype=torch.float64) if scores is None else scores.detach().double().cpu().reshape(p)
    pi, gi = torch.nonzero(iou >= iou_threshold, as_tuple=True)
    if pi.numel() == 0:
        return match
    keys = sorted(zip((-iou[pi, gi]).tolist(), (-sc[pi]).tolist(), pi.tolist(), gi.tolist()))
    pred_used = set()
    for _, _, d, t in keys:
        if d in pred_used or match[t] >= 0:
            continue
        match[t] = d
        pred_used.add(d)
    return match


class DetectionAmodalMIoU(AmodalMIoU):
    """AmodalMIoU over GT instances, fed with matched detections (detect protocol)."""

    def update_detections(
        self,
        pred_visible: torch.Tensor,
        pred_amodal: torch.Tensor,
        gt_visible: torch.Tensor,
        gt_amodal: torch.Tensor,
        gt_category: torch.Tensor,
        scores: torch.Tensor | None = None,
        iou_threshold: float = 0.5,
    ) -> torch.Tensor:
        """Score one image: (P,H,W) detections vs (G,H,W) GT instances; returns the matching."""
        match = match_detections(pred_visible, gt_visible, scores, iou_threshold)
        if gt_visible.shape[0] == 0:
            return match
        matched = match >= 0
        pred = torch.zeros_like(gt_amodal)
        if bool(matched.any()):
            pred[matched] = pred_amodal[match[matched].to(pred_amodal.device)]
        self.update(pred, gt_amodal, gt_visible, gt_category, matched=matched.to(gt_amodal.device))
        return match


def coco_amodal_ap(
    gt: list[dict],
    detections: list[dict],
    category_ids: list[int],
    image_ids: list[int] | None = None,
) -> dict[str, float]:
    """COCO mask AP of amodal masks with pycocotools.

    gt: one dict per GT instance {image_id, category_id, mask (H,W) bool numpy};
    detections: {image_id, category_id, mask, score}. Every image of the
    evaluation is listed in `image_ids` (default: those named in gt or
    detections), so detections on an image without GT count as false positives. Returns AP (0.5:0.95), AP50, AP75 in [0,1];
    NaN when there is no GT instance at all.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(m: np.ndarray) -> dict:
        r = mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))
        return r

    if not gt:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    images = {int(g["image_id"]) for g in gt} | {int(d["image_id"]) for d in detections}
    images = sorted(images | {int(i) for i in (image_ids or [])})
    anns = []
    for k, g in enumerate(gt, start=1):  # ids start at 1: COCOeval uses 0 for "unmatched"
        r = rle(g["mask"])
        anns.append({
            "id": k, "image_id": int(g["image_id"]), "category_id": int(g["category_id"]),
            "segmentation": r, "area": float(mask_utils.area(r)),
            "bbox": [float(x) for x in mask_utils.toBbox(r)], "iscrowd": 0,
        })
    h, w = np.asarray(gt[0]["mask"]).shape
    coco_gt = COCO()
    coco_gt.dataset = {
        "images": [{"id": i, "height": int(h), "width": int(w)} for i in images],
        "annotations": anns,
        "categories": [{"id": int(c), "name": str(c)} for c in category_ids],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    dets = [
        {"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
         "segmentation": rle(d["mask"]), "score": float(d["score"])}
        for d in detections
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (float(x) for x in ev.stats[:3])
    # pycocotools reports -1 where nothing could be evaluated
    return {k: (v if v >= 0 else float("nan")) for k, v in (("AP", ap), ("AP50", ap50), ("AP75", ap75))}


class AmodalMaskAP(Metric):
    """COCO amodal mask AP accumulated over images (states gathered across processes).

    update(preds, target): lists with one dict per image; preds: {masks (P,H,W)
    bool amodal, scores (P,), labels (P,)}; target: {masks (G,H,W) bool amodal,
    labels (G,), image_id int unique over the dataset (e.g. its index)}.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_categories: int = 13, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_categories = int(num_categories)
        for name in ("gt_masks", "gt_labels", "gt_images", "dt_masks", "dt_labels", "dt_scores", "dt_images"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("images", default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict], target: list[dict]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"preds and target must list the same images, got {len(preds)} and {len(target)}")
        for p, t in zip(preds, target):
            if "image_id" not in t:
                raise KeyError("target dict needs 'image_id' (a dataset-wide unique image index)")
            img = torch.tensor([int(t["image_id"])], dtype=torch.long, device=self.device)
            self.images.append(img)
            gm, gl = t["masks"].bool(), t["labels"].long().reshape(-1)
            if gm.shape[0] != gl.shape[0]:
                raise ValueError(f"target of image {int(img)}: {gm.shape[0]} masks but {gl.shape[0]} labels")
            self.gt_masks.append(gm)
            self.gt_labels.append(gl)
            self.gt_images.append(img.expand(gm.shape[0]).clone())
            dm, dl, ds = p["masks"].bool(), p["labels"].long().reshape(-1), p["scores"].float().reshape(-1)
            if not (dm.shape[0] == dl.shape[0] == ds.shape[0]):
                raise ValueError(f"preds of image {int(img)}: masks, labels and scores differ in length")
            self.dt_masks.append(dm)
            self.dt_labels.append(dl)
            self.dt_scores.append(ds)
            self.dt_images.append(img.expand(dm.shape[0]).clone())

    def compute(self) -> dict[str, torch.Tensor]:
        def cat(x):
            return dim_zero_cat(x).cpu() if (isinstance(x, torch.Tensor) or len(x)) else None

        gm, gl, gi = cat(self.gt_masks), cat(self.gt_labels), cat(self.gt_images)
        if gm is None or gm.shape[0] == 0:
            nan = torch.tensor(float("nan"))
            return {"AP": nan, "AP50": nan, "AP75": nan}
        gt = [{"image_id": int(i), "category_id": int(c), "mask": m.numpy()} for m, c, i in zip(gm, gl, gi)]
        dm, dl, ds, di = cat(self.dt_masks), cat(self.dt_labels), cat(self.dt_scores), cat(self.dt_images)
        dets = [] if dm is None else [
            {"image_id": int(i), "category_id": int(c), "mask": m.numpy(), "score": float(s)}
            for m, c, s, i in zip(dm, dl, ds, di)
        ]
        images = cat(self.images)
        res = coco_amodal_ap(gt, dets, list(range(self.num_categories)), images.tolist())
        return {k: torch.tensor(v) for k, v in res.items()}

"""The detect protocol: detections matched to GT instances, then amodal IoU and COCO AP.

Detections are matched to GT instances one-to-one by amodal-box IoU ≥ 0.5, highest
score first (class-agnostic; the GT's category decides where the instance is
counted); an unmatched GT instance scores amodal IoU 0. COCO AP is computed by
pycocotools: amodal mask AP with the amodal mask as each GT's segmentation (area =
mask area), and, for step 1, visible-mask AP and amodal-box AP.
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
    pred_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    scores: torch.Tensor | None = None,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """One-to-one matching by amodal-box IoU (the detect protocol): (G,) index of the
    detection matched to each GT instance, -1 if none.

    COCO's greedy rule: detections from the highest score down (ties: the earlier
    one), each taking the still-free GT instance it overlaps most, if that IoU is
    at least the threshold. Class-agnostic: the GT's category decides where the
    instance is counted.
    """
    from torchvision.ops import box_iou

    g = gt_boxes.shape[0]
    match = torch.full((g,), -1, dtype=torch.long)
    p = pred_boxes.shape[0]
    if g == 0 or p == 0:
        return match
    iou = box_iou(pred_boxes.double().cpu(), gt_boxes.double().cpu())
    sc = torch.zeros(p, dtype=torch.float64) if scores is None else scores.detach().double().cpu().reshape(p)
    order = sorted(range(p), key=lambda d: (-float(sc[d]), d))
    free = torch.ones(g, dtype=torch.bool)
    for d in order:
        cand = torch.where(free, iou[d], torch.full_like(iou[d], -1.0))
        best = int(cand.argmax())
        if cand[best] >= iou_threshold:
            match[best] = d
            free[best] = False
    return match


class DetectionAmodalMIoU(AmodalMIoU):
    """AmodalMIoU over GT instances, fed with matched detections (detect protocol)."""

    def update_detections(
        self,
        pred_boxes: torch.Tensor,
        pred_amodal: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_amodal: torch.Tensor,
        gt_visible: torch.Tensor,
        gt_category: torch.Tensor,
        scores: torch.Tensor | None = None,
        iou_threshold: float = 0.5,
    ) -> torch.Tensor:
        """Score one image: P detections (amodal boxes (P,4), amodal masks (P,H,W))
        against its G GT instances (amodal boxes, amodal and visible masks (G,H,W));
        returns the matching. An unmatched GT instance scores IoU 0."""
        match = match_detections(pred_boxes, gt_boxes, scores, iou_threshold)
        if gt_amodal.shape[0] == 0:
            return match
        matched = match >= 0
        pred = torch.zeros_like(gt_amodal)
        if bool(matched.any()):
            pred[matched] = pred_amodal[match[matched].to(pred_amodal.device)]
        self.update(pred[:, None], gt_amodal[:, None], gt_visible[:, None], gt_category,
                    matched=matched.to(gt_amodal.device))
        return match


def coco_ap(
    gt: list[dict],
    detections: list[dict],
    category_ids: list[int],
    image_ids: list[int] | None = None,
    iou_type: str = "segm",
) -> dict[str, float]:
    """COCO AP with pycocotools, of masks (iou_type "segm") or boxes ("bbox").

    gt: one dict per GT instance {image_id, category_id, and `mask` (H,W) bool numpy
    or `box` xyxy}; detections: the same plus `score`. A GT's area is that of its mask
    (or box), so the small/medium/large split follows the mask. Every image of the
    evaluation is listed in `image_ids` (default: those named in gt or detections),
    so detections on an image without GT count as false positives. Returns AP
    (0.5:0.95), AP50, AP75 in [0,1]; NaN when there is no GT instance at all.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type={iou_type!r}: expected 'segm' or 'bbox'")
    nan = {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if not gt:
        return nan

    def region(d: dict) -> dict:
        if iou_type == "segm":
            r = mask_utils.encode(np.asfortranarray(np.asarray(d["mask"], dtype=np.uint8)))
            return {"segmentation": r, "area": float(mask_utils.area(r)),
                    "bbox": [float(x) for x in mask_utils.toBbox(r)]}
        x0, y0, x1, y1 = (float(v) for v in d["box"])
        return {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": max(x1 - x0, 0.0) * max(y1 - y0, 0.0)}

    images = {int(g["image_id"]) for g in gt} | {int(d["image_id"]) for d in detections}
    images = sorted(images | {int(i) for i in (image_ids or [])})
    anns = [{"id": k, "image_id": int(g["image_id"]), "category_id": int(g["category_id"]), "iscrowd": 0,
             **region(g)} for k, g in enumerate(gt, start=1)]  # ids from 1: COCOeval uses 0 for "unmatched"
    h, w = np.asarray(gt[0]["mask"]).shape if iou_type == "segm" else (1, 1)
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
    dets = []
    for d in detections:
        r = region(d)
        if iou_type == "segm":
            r.pop("bbox")  # the mask decides the detection's area too
        dets.append({"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
                     "score": float(d["score"]), **r})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (float(x) for x in ev.stats[:3])
    # pycocotools reports -1 where nothing could be evaluated
    return {k: (v if v >= 0 else float("nan")) for k, v in (("AP", ap), ("AP50", ap50), ("AP75", ap75))}


class DetectionAP(Metric):
    """COCO AP accumulated over images (states gathered across processes), of masks
    (`iou_type="segm"`; amodal or visible, whichever the caller passes) or boxes ("bbox").

    update(preds, target): lists with one dict per image; preds: {masks (P,H,W) bool
    or boxes (P,4), scores (P,), labels (P,)}; target: {masks or boxes, labels (G,),
    image_id int unique over the dataset (e.g. its index)}.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_categories: int = 13, iou_type: str = "segm", **kwargs) -> None:
        super().__init__(**kwargs)
        if iou_type not in ("segm", "bbox"):
            raise ValueError(f"iou_type={iou_type!r}: expected 'segm' or 'bbox'")
        self.num_categories = int(num_categories)
        self.iou_type = iou_type
        self.key = "masks" if iou_type == "segm" else "boxes"
        # masks are kept flat with each one's (H,W): images of a dataset may differ in size
        for name in ("gt_regions", "gt_labels", "gt_images", "gt_shapes", "dt_regions", "dt_labels", "dt_scores",
                     "dt_images", "dt_shapes"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("images", default=[], dist_reduce_fx="cat")

    def _region(self, d: dict, what: str) -> torch.Tensor:
        if self.key not in d:
            raise KeyError(f"{what} dict needs {self.key!r} for iou_type={self.iou_type!r}")
        x = d[self.key]
        return x.bool() if self.iou_type == "segm" else x.float().reshape(-1, 4)

    def _shapes(self, regions: torch.Tensor) -> torch.Tensor:
        """(N,2) height and width of each mask (zeros for boxes)."""
        hw = regions.shape[1:3] if self.iou_type == "segm" else (0, 0)
        return torch.tensor([list(hw)], dtype=torch.long, device=self.device).expand(regions.shape[0], 2).clone()

    def _unflatten(self, flat, shapes) -> list:
        """The regions as a list: masks cut back out of the flat state by their shapes."""
        if self.iou_type != "segm":
            return list(flat)
        sizes = (shapes[:, 0] * shapes[:, 1]).tolist()
        return [m.reshape(int(h), int(w)) for m, (h, w) in zip(torch.split(flat, sizes), shapes.tolist())]

    def update(self, preds: list[dict], target: list[dict]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"preds and target must list the same images, got {len(preds)} and {len(target)}")
        for p, t in zip(preds, target):
            if "image_id" not in t:
                raise KeyError("target dict needs 'image_id' (a dataset-wide unique image index)")
            img = torch.tensor([int(t["image_id"])], dtype=torch.long, device=self.device)
            self.images.append(img)
            gr, gl = self._region(t, "target"), t["labels"].long().reshape(-1)
            if gr.shape[0] != gl.shape[0]:
                raise ValueError(f"target of image {int(img)}: {gr.shape[0]} {self.key} but {gl.shape[0]} labels")
            self.gt_regions.append(gr.reshape(-1) if self.iou_type == "segm" else gr)
            self.gt_shapes.append(self._shapes(gr))
            self.gt_labels.append(gl)
            self.gt_images.append(img.expand(gr.shape[0]).clone())
            dr, dl, ds = self._region(p, "preds"), p["labels"].long().reshape(-1), p["scores"].float().reshape(-1)
            if not (dr.shape[0] == dl.shape[0] == ds.shape[0]):
                raise ValueError(f"preds of image {int(img)}: {self.key}, labels and scores differ in length")
            self.dt_regions.append(dr.reshape(-1) if self.iou_type == "segm" else dr)
            self.dt_shapes.append(self._shapes(dr))
            self.dt_labels.append(dl)
            self.dt_scores.append(ds)
            self.dt_images.append(img.expand(dr.shape[0]).clone())

    def compute(self) -> dict[str, torch.Tensor]:
        def cat(x):
            return dim_zero_cat(x).cpu() if (isinstance(x, torch.Tensor) or len(x)) else None

        field = "mask" if self.iou_type == "segm" else "box"
        gr, gl, gi = cat(self.gt_regions), cat(self.gt_labels), cat(self.gt_images)
        if gr is None or gl.shape[0] == 0:
            nan = torch.tensor(float("nan"))
            return {"AP": nan, "AP50": nan, "AP75": nan}
        gr = self._unflatten(gr, cat(self.gt_shapes))
        gt = [{"image_id": int(i), "category_id": int(c), field: r.numpy()} for r, c, i in zip(gr, gl, gi)]
        dr, dl, ds, di = cat(self.dt_regions), cat(self.dt_labels), cat(self.dt_scores), cat(self.dt_images)
        dets = [] if dr is None or len(dl) == 0 else [
            {"image_id": int(i), "category_id": int(c), field: r.numpy(), "score": float(s)}
            for r, c, s, i in zip(self._unflatten(dr, cat(self.dt_shapes)), dl, ds, di)
        ]
        res = coco_ap(gt, dets, list(range(self.num_categories)), cat(self.images).tolist(), self.iou_type)
        return {k: torch.tensor(v) for k, v in res.items()}

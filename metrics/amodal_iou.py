"""Amodal mask IoU under the gt-visible protocol, accumulated per category.

Every instance contributes one IoU (in the image frame) to its category; the
headline mIoU is the mean over categories of the per-category mean, so a
category with many instances weighs as much as one with few. mIoU_occ scores
only the hidden part (pred − visible vs amodal − visible) of the instances that
have one, and iou_dataset is the pooled ΣI/ΣU. A category without instances is
absent (NaN, left out of the means), never a 0 that would drag the mean down.

Convention: an instance whose prediction and ground truth are both empty scores
IoU 1 (nothing to find, nothing predicted); an instance marked unmatched (the
detection protocol) scores 0 whatever its masks.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

#: per-category sums kept as metric states (all reduced by sum across processes)
STAT_KEYS = ("iou_sum", "count", "occ_iou_sum", "occ_count", "inter", "union")


def _as_masks(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B,1,H,W) or (B,H,W) bool -> (B,H*W) bool, with a clear error otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool mask, got dtype {x.dtype}; threshold it first (e.g. prob > 0.5)")
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name}: expected shape (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name}: expected shape (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def intersection_union(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance |pred ∩ gt| and |pred ∪ gt| (float64, shape (B,)) of bool masks."""
    p = _as_masks(pred, "pred")
    g = _as_masks(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt masks differ in shape: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    inter = (p & g).sum(1, dtype=torch.float64)
    union = (p | g).sum(1, dtype=torch.float64)
    return inter, union


def instance_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-instance IoU (float64, (B,)); both masks empty scores 1."""
    inter, union = intersection_union(pred, gt)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def amodal_iou_stats(
    pred: torch.Tensor,
    amodal: torch.Tensor,
    visible: torch.Tensor,
    category: torch.Tensor,
    num_categories: int,
    matched: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-category sums of one batch: the metric's update, as a pure function.

    Returns (C,) tensors: iou_sum, occ_iou_sum, inter, union (float64) and
    count, occ_count (int64). `matched` (B,) bool: False forces the instance's
    IoU and occluded-part IoU to 0 and its intersection to 0 (its union is the
    GT area), as for a GT instance no detection was matched to.
    """
    p = _as_masks(pred, "pred")
    a = _as_masks(amodal, "amodal")
    v = _as_masks(visible, "visible")
    if not (p.shape == a.shape == v.shape):
        raise ValueError(
            f"pred, amodal and visible must have the same shape, got "
            f"{tuple(pred.shape)}, {tuple(amodal.shape)}, {tuple(visible.shape)}"
        )
    b = p.shape[0]
    category = torch.as_tensor(category, device=p.device)
    if category.ndim != 1 or category.shape[0] != b or category.dtype.is_floating_point:
        raise ValueError(f"category: expected an integer tensor of shape ({b},), got {category.dtype} {tuple(category.shape)}")
    category = category.long()
    if b and (int(category.min()) < 0 or int(category.max()) >= num_categories):
        raise ValueError(f"category: values must lie in [0, {num_categories}), got {category.tolist()}")
    if matched is None:
        ok = torch.ones(b, dtype=torch.bool, device=p.device)
    else:
        ok = torch.as_tensor(matched, device=p.device).bool().reshape(-1)
        if ok.shape[0] != b:
            raise ValueError(f"matched: expected shape ({b},), got {tuple(matched.shape)}")
        p = p & ok[:, None]  # an unmatched instance predicts nothing ...

    inter = (p & a).sum(1, dtype=torch.float64)
    union = (p | a).sum(1, dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    iou = torch.where(ok, iou, torch.zeros_like(iou))  # ... and scores 0 even against an empty GT

    hidden = a & ~v
    p_hidden = p & ~v
    has_hidden = hidden.any(1)
    occ_inter = (p_hidden & hidden).sum(1, dtype=torch.float64)
    occ_union = (p_hidden | hidden).sum(1, dtype=torch.float64)
    occ_iou = torch.where(has_hidden, occ_inter / occ_union.clamp_min(1), torch.zeros_like(occ_inter))
    occ_iou = torch.where(ok, occ_iou, torch.zeros_like(occ_iou))

    def per_cat(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(num_categories, dtype=dtype, device=p.device)
        return out.index_add_(0, category, values.to(dtype))

    return {
        "iou_sum": per_cat(iou, torch.float64),
        "count": per_cat(torch.ones_like(iou), torch.int64),
        "occ_iou_sum": per_cat(occ_iou * has_hidden, torch.float64),
        "occ_count": per_cat(has_hidden, torch.int64),
        "inter": per_cat(inter, torch.float64),
        "union": per_cat(union, torch.float64),
    }


def summarize(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reported figures from accumulated per-category sums.

    miou / miou_occ: mean over the categories that have (occluded) instances,
    NaN when none has; per_category / per_category_occ: (C,) with NaN where a
    category has no (occluded) instance; iou_dataset: ΣI/ΣU over every instance.
    """
    count = stats["count"]
    occ_count = stats["occ_count"]
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=count.device)
    per_cat = torch.where(count > 0, stats["iou_sum"] / count.clamp_min(1), nan)
    per_cat_occ = torch.where(occ_count > 0, stats["occ_iou_sum"] / occ_count.clamp_min(1), nan)

    def present_mean(x: torch.Tensor) -> torch.Tensor:
        keep = ~torch.isnan(x)
        return x[keep].mean() if bool(keep.any()) else nan

    union = stats["union"].sum()
    return {
        "miou": present_mean(per_cat),
        "miou_occ": present_mean(per_cat_occ),
        "iou_dataset": stats["inter"].sum() / union if float(union) > 0 else nan,
        "per_category": per_cat,
        "per_category_occ": per_cat_occ,
        "count": count.clone(),
        "occ_count": occ_count.clone(),
    }


class AmodalMIoU(Metric):
    """torchmetrics wrapper of amodal_iou_stats/summarize; states are (C,) sums.

    update(pred, amodal, visible, category[, matched]) with bool masks (B,1,H,W)
    or (B,H,W) and int64 categories (B,); compute() -> dict (see summarize).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_categories: int = 13, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_categories < 1:
            raise ValueError(f"num_categories must be >= 1, got {num_categories}")
        self.num_categories = int(num_categories)
        for key in STAT_KEYS:
            dtype = torch.int64 if key.endswith("count") else torch.float64
            self.add_state(key, default=torch.zeros(num_categories, dtype=dtype), dist_reduce_fx="sum")

    def update(
        self,
        pred: torch.Tensor,
        amodal: torch.Tensor,
        visible: torch.Tensor,
        category: torch.Tensor,
        matched: torch.Tensor | None = None,
    ) -> None:
        stats = amodal_iou_stats(pred, amodal, visible, category, self.num_categories, matched)
        for key in STAT_KEYS:
            setattr(self, key, getattr(self, key) + stats[key].to(getattr(self, key).device))

    def compute(self) -> dict[str, torch.Tensor]:
        return summarize({key: getattr(self, key) for key in STAT_KEYS})

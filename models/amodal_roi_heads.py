"""One RoIHeads for every Mask R-CNN-family method, with a pluggable mask branch.

torchvision's RoIHeads has one mask head trained on `masks`. Here the box branch
is torchvision's (sampling, Fast R-CNN loss, post-processing), and the mask part
is a `MaskBranch`: an nn.Module that takes the pooled RoI features and returns
named mask logits, each trained against the target key of the same name
(`masks`, `visible_masks`, `occluder_masks`, ...) and returned under that name
at inference (pasted into the image by MultiMaskTransform). A method (Mask R-CNN,
ORCNN, BCNet, ...) is then a mask branch and its target mapping, nothing more.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, project_masks_on_boxes


def pick_channel(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,1,M,M) of (N,C,M,M) logits: each RoI's class channel, or channel 0 of a
    class-agnostic (C = 1) head."""
    if logits.shape[1] == 1:
        return logits
    return logits[torch.arange(len(labels), device=logits.device), labels][:, None]


def roi_mask_loss(logits: torch.Tensor, proposals: list[torch.Tensor], gt_masks: list[torch.Tensor],
                  labels: list[torch.Tensor], matched: list[torch.Tensor], transform=None) -> torch.Tensor:
    """Binary cross-entropy of RoI mask logits against each matched GT mask cropped to
    its proposal (roi_align, as torchvision's maskrcnn_loss), on the label's channel.
    `transform` maps the binarised (N,M,M) RoI targets to the ones trained on (a boundary)."""
    size = logits.shape[-1]
    targets = [project_masks_on_boxes(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched)]
    targets = torch.cat(targets) if targets else logits.new_zeros((0, size, size))
    if transform is not None:
        targets = transform((targets > 0.5).float())
    if targets.numel() == 0:
        return logits.sum() * 0
    picked = pick_channel(logits, torch.cat(labels))[:, 0]
    return F.binary_cross_entropy_with_logits(picked, targets)


#: a mask branch output that is not a mask: (N,) factors multiplying the detections' scores
SCORE_FACTORS = "score_factors"


class MaskBranch(nn.Module, ABC):
    """Pooled RoI features (N,C,14,14) -> {target name: (N,K,28,28) logits}.
    `weights` give each named output's loss weight; `derived` names outputs trained on a
    function of another target in the RoI frame: {output: (target key, fn on (N,M,M)) or
    (target key, None)}. A branch with `uses_labels` also gets each RoI's label (N,) (the
    matched GT class in training, the predicted one at inference); at inference it may
    return SCORE_FACTORS, which rescale the detections' scores."""

    weights: dict[str, float] = {}
    derived: dict = {}
    uses_labels: bool = False

    @abstractmethod
    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named mask logits of every RoI."""


class ConvMaskBranch(MaskBranch):
    """Mask R-CNN's head: n conv3x3 (GroupNorm) + deconv + 1x1 per class, one output `name`."""

    def __init__(self, in_channels: int, channels: int, layers: int, num_classes: int, name: str = "masks",
                 norm_layer=None) -> None:
        super().__init__()
        self.name = name
        self.weights = {name: 1.0}
        self.head = MaskRCNNHeads(in_channels, [channels] * layers, 1, norm_layer=norm_layer)
        self.predictor = MaskRCNNPredictor(channels, channels, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.predictor(self.head(features))}


class AmodalRoIHeads(RoIHeads):
    """RoIHeads whose mask part is a MaskBranch (see the module docstring)."""

    def __init__(self, *args, mask_branch: MaskBranch, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_branch = mask_branch

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("AmodalRoIHeads: training needs targets")
            proposals, matched, labels, regression = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        losses: dict[str, torch.Tensor] = {}
        result: list[dict[str, torch.Tensor]] = []
        if self.training:
            cls_loss, box_loss = fastrcnn_loss(class_logits, box_regression, labels, regression)
            losses = {"loss_classifier": cls_loss, "loss_box_reg": box_loss}
            positive = [torch.where(lab > 0)[0] for lab in labels]
            mask_boxes = [p[i] for p, i in zip(proposals, positive)]
            mask_matched = [m[i] for m, i in zip(matched, positive)]
        else:
            boxes, scores, det_labels = self.postprocess_detections(class_logits, box_regression, proposals,
                                                                    image_shapes)
            result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, det_labels)]
            mask_boxes = boxes
        if not self.has_mask():
            return result, losses

        pooled = self.mask_roi_pool(features, mask_boxes, image_shapes)
        if self.training:
            gt_labels = [t["labels"][m] for t, m in zip(targets, mask_matched)]
            roi_labels = torch.cat(gt_labels)
        else:
            roi_labels = torch.cat([r["labels"] for r in result])
        logits = (self.mask_branch(pooled, roi_labels) if self.mask_branch.uses_labels
                  else self.mask_branch(pooled))
        if self.training:
            for name, lg in logits.items():
                key, fn = self.mask_branch.derived.get(name, (name, None))
                missing = [i for i, t in enumerate(targets) if key not in t]
                if missing:
                    raise KeyError(f"mask output {name!r} needs targets[{missing[0]}][{key!r}]")
                loss = roi_mask_loss(lg, mask_boxes, [t[key] for t in targets], gt_labels, mask_matched, fn)
                losses[f"loss_{name}"] = float(self.mask_branch.weights.get(name, 1.0)) * loss
        else:
            counts = [len(b) for b in mask_boxes]
            factors = logits.pop(SCORE_FACTORS, None)
            if factors is not None:
                for r, f in zip(result, factors.split(counts)):
                    r["scores"] = r["scores"] * f.to(r["scores"].dtype)
            for name, lg in logits.items():
                prob = pick_channel(lg, roi_labels).sigmoid()
                for r, p in zip(result, prob.split(counts)):
                    r[name] = p
        return result, losses

    def masks_at_boxes(self, features, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                       image_shapes) -> list[dict[str, torch.Tensor]]:
        """The mask branch on given boxes (the gt-box protocol: GT amodal boxes and classes in
        place of detections), no box branch: per image {boxes, labels, scores = 1, each mask
        output (n,1,M,M) probabilities} in the transformed frame, unpasted."""
        result = [{"boxes": b, "labels": lab, "scores": torch.ones(len(b), device=b.device)}
                  for b, lab in zip(boxes, labels)]
        flat = torch.cat(labels)
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        logits = self.mask_branch(pooled, flat) if self.mask_branch.uses_labels else self.mask_branch(pooled)
        logits.pop(SCORE_FACTORS, None)  # every given box is kept: no rescoring
        counts = [len(b) for b in boxes]
        for name, lg in logits.items():
            for r, p in zip(result, pick_channel(lg, flat).sigmoid().split(counts)):
                r[name] = p
        return result

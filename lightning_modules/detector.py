"""What every Mask R-CNN-family stage shares: the detector, its training step and
its COCO evaluation.

A detector stage subclasses DetectorStage and says (1) which GT boxes and masks
of an image it trains on (`train_targets`: the torchvision target dict of one
image, built from the whole-image target of datamodules/images.py, reading only
the labels it is allowed), (2) which mask branch its RoI heads carry
(`mask_branch`, default Mask R-CNN's conv head on `masks`) and (3) what it reports
on validation and test (`add_ap_metrics`, `update_eval`). The network is
models/maskrcnn.py; the transform runs at the data's native image size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.detection.transform import resize_boxes

from amodal3d.categories import class_names
from amodal3d.lightning_modules.common import SPLITS, as_config, build_optimizer, with_schema_defaults
from amodal3d.metrics.detection import DetectionAP
from amodal3d.models.maskrcnn import DetectorModelConfig, boxes_in_image, build_maskrcnn

#: boxes narrower or lower than this (pixels, after clipping to the image) are not trained on
MIN_BOX_SIDE = 1.0


def keep_trainable(target: dict, height: int, width: int) -> dict:
    """A torchvision target with boxes clipped to the image and degenerate ones (and
    their masks) dropped: torchvision's training asserts positive width and height."""
    boxes = boxes_in_image(target["boxes"], height, width)
    ok = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
    out = {k: (v[ok] if isinstance(v, torch.Tensor) and v.ndim >= 1 and len(v) == len(ok) else v)
           for k, v in target.items()}
    out["boxes"] = boxes[ok]
    return out


class DetectorStage(L.LightningModule, ABC):
    """Base of the detection stages (visible = step 1, maskrcnn, and the other
    Mask R-CNN-family baselines)."""

    model_schema = DetectorModelConfig

    def __init__(self, cfg) -> None:
        super().__init__()
        cfg = as_config(cfg)
        cfg.model = with_schema_defaults(cfg.model, self.model_schema)
        self.cfg = cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.m = cfg.model
        # the dataset's category table (hparams cfg.data.class_names): labels are its index + 1
        self.class_names = class_names(cfg)
        self.net = build_maskrcnn(self.m, num_classes=self.num_classes, image_size=int(cfg.data.image_size),
                                  mask_branch=self.mask_branch())
        self.eval_metrics = nn.ModuleDict({s: nn.ModuleDict(self.eval_metric_factories()) for s in SPLITS})

    @property
    def num_classes(self) -> int:
        """The detector's classes: the table's categories and the background (label 0)."""
        return len(self.class_names) + 1

    # -- what a stage defines ---------------------------------------------------------------
    @abstractmethod
    def train_targets(self, target: dict) -> dict:
        """The torchvision target (boxes, labels, masks, ...) of one image."""

    def mask_branch(self):
        """The RoI heads' mask branch (None: Mask R-CNN's conv head on `masks`)."""
        return None

    def eval_metric_factories(self) -> dict[str, nn.Module]:
        """name -> metric, one copy per split (val, test)."""
        return {}

    def update_eval(self, outputs: list[dict], targets: list[dict], metrics: nn.ModuleDict) -> None:
        """Update the split's metrics with one batch of detections."""

    def extra_losses(self, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Losses beyond the detector's own, on the batch's training targets (default none)."""
        return {}

    # -- the network --------------------------------------------------------------------------
    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        """Detections per image: boxes (P,4) xyxy, labels (P,) category + 1, scores (P,) and
        each mask output (P,1,H,W) probabilities pasted into the image."""
        return self.net(images)

    def detect(self, images: list[torch.Tensor]) -> list[dict]:
        """forward in eval mode without gradients (restores the mode)."""
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                return self.net(images)
        finally:
            self.net.train(was)

    def masks_at_boxes(self, images: list[torch.Tensor], boxes: list[torch.Tensor],
                       labels: list[torch.Tensor]) -> list[dict]:
        """The mask outputs (n,1,H,W) pasted into each image for given boxes (image frame, xyxy)
        and labels (category + 1): the RoI heads fed the GT amodal boxes of the gt-box protocol."""
        net = self.net
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                sizes = [tuple(im.shape[-2:]) for im in images]
                batch, _ = net.transform(images)
                scaled = [resize_boxes(b.float(), s, t) for b, s, t in zip(boxes, sizes, batch.image_sizes)]
                features = net.backbone(batch.tensors)
                result = net.roi_heads.masks_at_boxes(features, scaled, labels, batch.image_sizes)
                return net.transform.postprocess(result, batch.image_sizes, sizes)
        finally:
            net.train(was)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        tt = [keep_trainable(self.train_targets(t), *img.shape[-2:]) for img, t in zip(images, targets)]
        losses = self.net(images, tt)
        losses.update(self.extra_losses(tt))
        loss = sum(losses.values())
        n = len(images)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    # -- evaluation -------------------------------------------------------------------------
    def _eval_step(self, batch, split: str) -> None:
        images, targets = batch
        self.update_eval(self.net(images), targets, self.eval_metrics[split])

    def _eval_epoch_end(self, split: str) -> None:
        for name, metric in self.eval_metrics[split].items():
            for key, value in metric.compute().items():
                if torch.is_tensor(value) and value.numel() == 1:  # e.g. val/visible_mask_ap50, val/detect_miou
                    self.log(f"{split}/{name}_{key.lower()}", value.float(), sync_dist=False)
            metric.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg)

    def configure_callbacks(self):
        from lightning.pytorch.callbacks import Timer

        minutes = float(self.m.max_train_minutes)
        return [Timer(duration={"minutes": minutes}, interval="step")] if minutes > 0 else []


def ap_inputs(outputs: list[dict], targets: list[dict], pred_key: str, gt_key: str, kind: str,
              threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """(preds, target) for DetectionAP: detections' `pred_key` masks (thresholded) or boxes
    against the GT `gt_key`, labels as category ids (0..C-1), image_id = the split's index."""
    preds, gts = [], []
    for o, t in zip(outputs, targets):
        region = (o[pred_key][:, 0] > threshold) if kind == "masks" else o[pred_key]
        preds.append({kind: region, "scores": o["scores"], "labels": o["labels"] - 1})
        gts.append({kind: t[gt_key].bool() if kind == "masks" else t[gt_key], "labels": t["category"],
                    "image_id": int(t["index"])})
    return preds, gts


def ap_metric(kind: str, num_categories: int) -> DetectionAP:
    """COCO AP over the `num_categories` categories of the table scored (masks or boxes)."""
    return DetectionAP(num_categories, iou_type="segm" if kind == "masks" else "bbox")

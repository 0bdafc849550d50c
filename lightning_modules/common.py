"""What every mask-producing stage shares: config handling, gt-visible evaluation
in the image frame, and the optimizer.

A stage subclasses AmodalStage and implements `predict_amodal(batch)`, returning
amodal-mask probabilities in the crop frame; validation and test then paste
them into the image frame and score them with the protocol's metric, so every
method is evaluated by exactly the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from amodal3d.categories import CATEGORIES


def as_config(cfg) -> DictConfig:
    """Accept a DictConfig or the plain dict stored in a checkpoint's hparams."""
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def with_schema_defaults(model_cfg, schema) -> DictConfig:
    """A stage's model config completed with the schema's defaults: a checkpoint
    written before a key existed still loads, and behaves as it was trained."""
    return OmegaConf.merge(OmegaConf.structured(schema), model_cfg)


def build_optimizer(module: L.LightningModule, cfg: DictConfig, params=None):
    """AdamW over `params` (default: trainable parameters) with an optional cosine schedule."""
    params = params if params is not None else [p for p in module.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    if o.scheduler == "none":
        return opt
    if o.scheduler != "cosine":
        raise ValueError(f"optim.scheduler={o.scheduler!r}: expected 'cosine' or 'none'")
    epochs = max(int(cfg.trainer.max_epochs), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=o.lr * 0.01)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class AmodalStage(L.LightningModule, ABC):
    """Base of every stage or baseline that predicts an amodal mask per instance."""

    def __init__(self, cfg) -> None:
        super().__init__()
        cfg = as_config(cfg)
        self.cfg = cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        from amodal3d.metrics.amodal_iou import AmodalMIoU

        self.val_metric = AmodalMIoU(num_categories=len(CATEGORIES))
        self.test_metric = AmodalMIoU(num_categories=len(CATEGORIES))

    @abstractmethod
    def predict_amodal(self, batch: dict) -> torch.Tensor:
        """(B,1,S,S) amodal-mask probabilities in the crop frame of `batch`."""

    def image_prediction(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop-frame, image-frame) amodal probabilities: what every evaluation scores."""
        from amodal3d.datamodules.crops import paste_crop_to_image

        prob = self.predict_amodal(batch).float()
        h, w = batch["image_visible"].shape[-2:]
        return prob, paste_crop_to_image(prob, batch["crop_box"], h, w)

    def evaluate_batch(self, batch: dict, metric) -> torch.Tensor:
        """Score one batch under the gt-visible protocol, in the image frame."""
        _, image_prob = self.image_prediction(batch)
        metric.update(
            image_prob > 0.5,
            batch["eval_image_amodal"] > 0.5,
            batch["image_visible"] > 0.5,
            batch["category"],
        )
        return image_prob

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_batch(batch, self.val_metric)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_batch(batch, self.test_metric)

    def _log_metric(self, metric, prefix: str) -> None:
        res = metric.compute()
        self.log(f"{prefix}/miou", res["miou"], sync_dist=False)
        self.log(f"{prefix}/miou_occ", res["miou_occ"], sync_dist=False)
        self.log(f"{prefix}/iou_dataset", res["iou_dataset"], sync_dist=False)
        for name, value in zip(CATEGORIES, res["per_category"]):
            if torch.isfinite(value):
                self.log(f"{prefix}_category/{name}", value, sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg)

"""What every mask-producing stage shares: config handling, gt-visible evaluation
in the image frame, and the optimizer.

A stage subclasses AmodalStage and implements `predict_amodal(batch)`, returning
amodal-mask probabilities in the crop frame; validation and test then paste
them into the image frame and score them with the protocol's metric, so every
method is evaluated by exactly the same code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from amodal3d.categories import class_names
from amodal3d.errors import ConfigError

SPLITS = ("val", "test")


def as_config(cfg) -> DictConfig:
    """Accept a DictConfig or the plain dict stored in a checkpoint's hparams."""
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def with_schema_defaults(model_cfg, schema) -> DictConfig:
    """A stage's model config completed with the schema's defaults: a checkpoint
    written before a key existed still loads, and behaves as it was trained."""
    return OmegaConf.merge(OmegaConf.structured(schema), model_cfg)


SCHEDULERS = ("cosine", "cosine_epoch", "none")


def lr_scheduler(opt: torch.optim.Optimizer, cfg: DictConfig, total_steps: int | None, eta_min=None):
    """Lightning's lr_scheduler entry for optim.scheduler (None for `none`): a cosine from
    each parameter group's lr down to its eta_min (default 1% of optim.lr; a list: one per
    group), stepped at every optimizer step over the run's `total_steps`
    (trainer.estimated_stepping_batches) for `cosine`, or once per epoch over
    trainer.max_epochs for `cosine_epoch` (what the 3D chain of docs/results.md was
    trained with: it stays constant in a one-epoch stage)."""
    name = cfg.optim.scheduler
    if name not in SCHEDULERS:
        raise ConfigError(f"optim.scheduler={name!r}: expected one of {', '.join(SCHEDULERS)}")
    if name == "none":
        return None
    if name == "cosine":
        if not total_steps or not math.isfinite(total_steps):
            raise ConfigError("optim.scheduler=cosine steps over the run's optimizer steps, which are unknown here "
                              "(no trainer, or trainer.max_epochs=-1 without max_steps): set trainer.max_steps "
                              "or use optim.scheduler=cosine_epoch")
        length, interval = int(total_steps), "step"
    else:
        length, interval = max(int(cfg.trainer.max_epochs), 1), "epoch"
    floors = eta_min if isinstance(eta_min, (list, tuple)) else [
        float(cfg.optim.lr) * 0.01 if eta_min is None else float(eta_min)] * len(opt.param_groups)

    def cosine(base: float, floor: float):
        rel = floor / base if base > 0 else 0.0
        return lambda t: rel + (1.0 - rel) * 0.5 * (1.0 + math.cos(math.pi * min(t, length) / length))

    lambdas = [cosine(float(g["lr"]), floor) for g, floor in zip(opt.param_groups, floors)]
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambdas), "interval": interval}


def total_steps(module: L.LightningModule) -> int | None:
    """The run's optimizer steps (None outside a trainer)."""
    trainer = getattr(module, "_trainer", None)
    return trainer.estimated_stepping_batches if trainer is not None else None


def build_optimizer(module: L.LightningModule, cfg: DictConfig, params=None):
    """AdamW over `params` (default: trainable parameters) with optim.scheduler's schedule."""
    params = params if params is not None else [p for p in module.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    sched = lr_scheduler(opt, cfg, total_steps(module) if o.scheduler == "cosine" else None)
    return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}


class AmodalStage(L.LightningModule, ABC):
    """Base of every stage or baseline that predicts an amodal mask per instance."""

    def __init__(self, cfg) -> None:
        super().__init__()
        cfg = as_config(cfg)
        self.cfg = cfg
        # the category table of the data it trains on (saved in the hparams' cfg): every metric row,
        # logged name and per-category parameter is indexed by it
        self.class_names = class_names(cfg)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        from amodal3d.metrics.amodal_iou import AmodalMIoU

        self.val_metric = AmodalMIoU(num_categories=len(self.class_names))
        self.test_metric = AmodalMIoU(num_categories=len(self.class_names))

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

    # -- the evaluation pattern every stage shares -------------------------------------------
    def add_eval_metrics(self, **factories) -> None:
        """Metrics a stage reports beside the amodal mIoU, one copy per split (val, test):
        name -> a callable building a torchmetrics Metric. They are updated by
        `update_eval_metrics` and logged at epoch end through `eval_logs`."""
        self.eval_metrics = nn.ModuleDict(
            {split: nn.ModuleDict({name: make() for name, make in factories.items()}) for split in SPLITS}
        )

    def update_eval_metrics(self, batch: dict, batch_idx: int, split: str, metrics: nn.ModuleDict) -> None:
        """Update the stage's extra metrics with a batch just scored (after predict_amodal)."""

    def eval_logs(self, split: str, name: str, value) -> dict[str, torch.Tensor]:
        """The logged keys of one computed extra metric: `<split>/<name>`, or one key per
        entry of a dict-valued metric."""
        if isinstance(value, dict):
            return {f"{split}/{k}": v for k, v in value.items()}
        return {f"{split}/{name}": value}

    def on_eval_epoch_end(self, split: str, logged: dict[str, float]) -> None:
        """After a split's figures are logged (e.g. to keep the val ones in the checkpoint)."""

    def _eval_step(self, batch: dict, batch_idx: int, split: str) -> None:
        self.evaluate_batch(batch, self.val_metric if split == "val" else self.test_metric)
        metrics = getattr(self, "eval_metrics", None)
        if metrics is not None:
            self.update_eval_metrics(batch, batch_idx, split, metrics[split])

    def _eval_epoch_end(self, split: str) -> None:
        self._log_metric(self.val_metric if split == "val" else self.test_metric, split)
        logged: dict[str, float] = {}
        metrics = getattr(self, "eval_metrics", None)
        for name, metric in (metrics[split].items() if metrics is not None else ()):
            if self._updated_on_any_rank(metric):  # a split without batches logs nothing
                for key, value in self.eval_logs(split, name, metric.compute()).items():
                    self.log(key, value, sync_dist=False)
                    logged[key] = float(value)
            metric.reset()
        self.on_eval_epoch_end(split, logged)

    def _updated_on_any_rank(self, metric) -> bool:
        """One decision for every rank: compute() syncs across ranks, so a rank whose
        batches never updated this metric must still call it when another rank did."""
        count = torch.tensor(float(metric.update_count), device=self.device)
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return bool(count > 0)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _log_metric(self, metric, prefix: str) -> None:
        res = metric.compute()
        self.log(f"{prefix}/miou", res["miou"], sync_dist=False)
        self.log(f"{prefix}/miou_occ", res["miou_occ"], sync_dist=False)
        self.log(f"{prefix}/iou_dataset", res["iou_dataset"], sync_dist=False)
        # reshape: torchmetrics squeezes a one-category dataset's (1,) outputs to 0-d
        for name, value in zip(self.class_names, res["per_category"].reshape(-1)):
            if torch.isfinite(value):
                self.log(f"{prefix}_category/{name}", value, sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def image_logging_callbacks(self, **kw) -> list:
        """The TensorBoard image (and mesh) logging every stage runs, every
        run.image_log_every_n_epochs epochs."""
        from amodal3d.callbacks.tensorboard_images import TensorBoardImages

        return [TensorBoardImages(every_n_epochs=int(self.cfg.run.image_log_every_n_epochs), **kw)]

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg)

"""Stop a run cleanly when the loss stops being a number.

A NaN/Inf loss poisons every weight on the next step; stopping before the
optimizer step keeps last.ckpt at the last good state.
"""

from __future__ import annotations

import math

import lightning as L
import torch


class NonFiniteLossError(RuntimeError):
    pass


class FiniteLossGuard(L.Callback):
    """Raises on a non-finite training loss, before the optimizer step applies it."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            ckpt = trainer.checkpoint_callback
            where = getattr(ckpt, "dirpath", None) or trainer.default_root_dir
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                f"stopped before the optimizer step; the last good checkpoint is in {where}. "
                "Lower optim.lr, enable trainer.gradient_clip_val, or check the data."
            )

"""Stop a run cleanly when the loss stops being a number.

A NaN/Inf loss poisons every weight on the next step; stopping before the
optimizer step keeps last.ckpt at the last good state. Under DDP the flag is
reduced over the ranks, so every rank stops at the same step with the same
message instead of the healthy ones hanging in the next collective.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from amodal3d.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    pass


class FiniteLossGuard(L.Callback):
    """Raises on a non-finite training loss on any rank.

    check_every_n_steps=1 (the default) reads the flag every step, before the
    optimizer step applies the bad loss. On a GPU that read is a host sync per
    step; with n > 1 the flag stays on the device (reduced over ranks without a
    host read), is read every n steps and always before a checkpoint is written,
    so no checkpoint ever holds a step taken on a non-finite loss, but up to n-1
    steps after the bad one may have run in memory.
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if int(check_every_n_steps) < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps}: must be >= 1")
        self.every = int(check_every_n_steps)
        # on the device, since the last read: any rank bad, this rank's loss and the step of the first bad one
        self._state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().float().reshape(())
        bad = (~torch.isfinite(value)).float()
        if trainer.world_size > 1:  # 1.0 if any rank's loss is non-finite
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        step = torch.tensor(float(trainer.global_step), device=value.device)
        if self._state is None:
            self._state = (bad, value, step)
        else:  # keep the first bad step's loss and step; no host read
            seen, old_value, old_step = self._state
            keep = seen > 0
            self._state = (torch.maximum(seen, bad), torch.where(keep, old_value, value), torch.where(keep, old_step, step))
        if self.every == 1 or trainer.global_step % self.every == 0:
            self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)  # a checkpoint never holds a step taken on a non-finite loss

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if self._state is None:
            return
        seen, value, step = (float(t.item()) for t in self._state)
        self._state = None
        if not seen:
            return
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or trainer.default_root_dir
        what = f"{value}" if not math.isfinite(value) else "non-finite on another rank"
        when = ("stopped before the optimizer step" if self.every == 1 else
                f"checked every {self.every} steps, so later steps may have run in memory, never in a checkpoint")
        raise NonFiniteLossError(
            f"training loss became {what} at step {int(step)} (epoch {trainer.current_epoch}): {when}; "
            f"the last good checkpoint is in {folder}. "
            "Lower optim.lr, enable trainer.gradient_clip_val, or check the data."
        )

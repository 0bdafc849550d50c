"""Evaluate every DDP rank with rank 0's buffers.

DDP broadcasts buffers (BatchNorm running statistics) from rank 0 at the start of
each training forward, so after the last step of an epoch every other rank holds
statistics updated by its own last batch. Validation would then score rank 1's
instances with a model that is not the one rank 0 checkpoints; broadcasting the
buffers once before each evaluation makes the DDP figures those of the saved model.
"""

from __future__ import annotations

import lightning as L
import torch


class BroadcastBuffersBeforeEval(L.Callback):
    def _broadcast(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        for buf in pl_module.buffers():
            torch.distributed.broadcast(buf.data, src=0)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._broadcast(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._broadcast(trainer, pl_module)

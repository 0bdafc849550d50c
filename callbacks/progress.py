"""Plain periodic progress lines for non-interactive runs (cluster log files).

Progress bars redraw with carriage returns, which turn log files into noise;
when stderr is not a terminal the runner disables the bar and uses this.
"""

from __future__ import annotations

import time

import lightning as L


class PlainProgress(L.Callback):
    """Prints one line every `every_s` seconds and one per finished epoch."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s or not trainer.is_global_zero:
            return
        self._last = now
        total = trainer.num_training_batches
        loss = trainer.callback_metrics.get("train/loss")
        loss_s = f" loss {float(loss):.4f}" if loss is not None else ""
        print(
            f"[train] epoch {trainer.current_epoch} batch {batch_idx + 1}/{total} "
            f"step {trainer.global_step}{loss_s} ({now - self._t0:.0f}s)",
            flush=True,
        )

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        parts = " ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
        print(f"[val] epoch {trainer.current_epoch} step {trainer.global_step} {parts}", flush=True)

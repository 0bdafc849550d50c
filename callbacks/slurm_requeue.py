"""Save an HPC checkpoint and requeue the SLURM job when the time-limit signal comes.

Lightning's own auto-requeue saves the checkpoint inside the signal handler. A handler
runs between any two bytecodes of the main thread, so the save can start in the middle of
a TensorBoard flush, a logger write or a DataLoader call that holds a lock it needs, and
then never finishes (Lightning issue #21406; it happened in this project's CI). Here the
handler only sets a flag; the save and the requeue happen at the next training batch end
(or validation end), where the state is whole. Under DDP the flag is reduced over the
ranks so every rank saves at the same batch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

HPC_PREFIX = "hpc_ckpt_"  # the name Lightning restores from when a requeued job starts


def slurm_job_id() -> str:
    """The id `scontrol requeue` takes: <array job>_<task> for an array task, else $SLURM_JOB_ID."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        raise ValueError(f"SLURM job id {job!r} (from $SLURM_JOB_ID / $SLURM_ARRAY_JOB_ID): not a job id to requeue")
    return job


class SlurmRequeue(L.Callback):
    """On `requeue_signal` (SIGUSR1, what `make slurm` asks SLURM to send 90 s before the
    time limit): hpc_ckpt_<n>.ckpt in the run folder, older HPC checkpoints removed,
    `scontrol requeue <job>` from rank 0. Training then goes on until SLURM stops the job;
    the requeued job (same run id) resumes from that checkpoint. `sync_every` > 1 reduces
    the flag over DDP ranks every that many batches only (each reduce is a host sync)."""

    def __init__(self, requeue_signal: int = signal.SIGUSR1, sync_every: int = 1) -> None:
        if int(sync_every) < 1:
            raise ValueError(f"sync_every={sync_every}: must be >= 1")
        self.requeue_signal = requeue_signal
        self.sync_every = int(sync_every)
        self.requested = False
        self._previous = None
        self._batches = 0

    def _on_signal(self, signum, frame) -> None:  # no I/O, no locks: see the module docstring
        self.requested = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.requeue_signal, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.requeue_signal, self._previous)
            self._previous = None

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank got the signal; every rank reaches this at the same batch."""
        if trainer.world_size == 1:
            return self.requested
        self._batches += 1
        if self._batches % self.sync_every:
            return False
        return bool(trainer.strategy.reduce_boolean_decision(self.requested, all=False))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._agreed(trainer):
            self.save_and_requeue(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._agreed(trainer):
            self.save_and_requeue(trainer)

    def save_and_requeue(self, trainer: L.Trainer) -> Path:
        """Write the HPC checkpoint (all ranks take part), then requeue from rank 0."""
        self.requested = False
        for logger in trainer.loggers:
            logger.save()
        root = Path(trainer.default_root_dir)
        final = Path(_CheckpointConnector.hpc_save_path(root))
        partial = final.with_name(f".{final.name}.partial")  # not a name Lightning would restore
        trainer.save_checkpoint(partial)  # ends in a barrier: written once every rank is here
        if trainer.is_global_zero:
            os.replace(partial, final)
            for old in root.glob(f"{HPC_PREFIX}*.ckpt"):
                if old != final:
                    old.unlink(missing_ok=True)
            print(f"[slurm] saved {final}", flush=True)
            self._requeue()
        trainer.strategy.barrier("SlurmRequeue")
        return final

    @staticmethod
    def _requeue() -> None:
        job = slurm_job_id()
        try:
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (FileNotFoundError, subprocess.TimeoutExpired) as err:
            print(f"[slurm] could not requeue job {job} ({err}); the HPC checkpoint is saved: "
                  f"`scontrol requeue {job}` continues from it", flush=True)
            return
        if res.returncode == 0:
            print(f"[slurm] requeued job {job}", flush=True)
        else:
            print(f"[slurm] `scontrol requeue {job}` failed ({res.returncode}): {res.stderr.strip()}; the HPC "
                  f"checkpoint is saved: requeue the job by hand to continue from it", flush=True)

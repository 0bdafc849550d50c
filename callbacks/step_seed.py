"""Reseed every RNG before each training step from (seed, global step, rank).

With it, what a step does depends only on the weights it starts from, the seed
and the step number, so a run resumed from last.ckpt (or from a mid-epoch HPC
checkpoint) continues exactly as the uninterrupted run would have: Lightning
does not store RNG states in checkpoints, and the order in which it creates
data iterators differs between a fresh and a resumed run. Data-loader worker
processes keep their own seeds; with num_workers=0 resume is bit-exact.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class StepSeed(L.Callback):
    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # distinct per rank, so DDP processes do not draw identical augmentations
        s = (self.seed * 1_000_003 + trainer.global_step * 101 + trainer.global_rank) % (2**32)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

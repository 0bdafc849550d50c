"""Run by tests/test_ddp.py as a training command: the CLI, with pcnet_m's loss turned
NaN on rank 1 only from step 1 on. Lightning's DDP launcher re-runs this file for rank 1."""

import sys

from amodal3d.cli import main
from amodal3d.lightning_modules.baselines.pcnet_m import PCNetMModule

_step = PCNetMModule.training_step


def _poisoned(self, batch, batch_idx):
    loss = _step(self, batch, batch_idx)
    return loss * float("nan") if self.global_rank == 1 and self.global_step >= 1 else loss


PCNetMModule.training_step = _poisoned
sys.exit(main(sys.argv[1:]))

"""optim.scheduler: a cosine per optimizer step over the run, or per epoch as the 3D chain was trained."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from amodal3d.config import ConfigError
from amodal3d.lightning_modules.common import lr_scheduler


def _cfg(name: str, epochs: int = 4, lr: float = 1e-3):
    return OmegaConf.create({"optim": {"scheduler": name, "lr": lr}, "trainer": {"max_epochs": epochs}})


def _opt(*lrs: float):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=lrs[0])


def _lrs(opt, sched, n):
    seen = []
    for _ in range(n):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def test_per_epoch_cosine_is_the_schedule_the_chain_was_trained_with():
    """cosine_epoch = torch's CosineAnnealingLR to 1% of optim.lr, every group (recon's faster
    template group included): the trained runs' schedule, unchanged."""
    opt = _opt(1e-3, 1e-2)
    entry = lr_scheduler(opt, _cfg("cosine_epoch"), total_steps=None)
    assert entry["interval"] == "epoch"
    ref_opt = _opt(1e-3, 1e-2)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=4, eta_min=1e-5)
    for got, want in zip(_lrs(opt, entry["scheduler"], 5), _lrs(ref_opt, ref, 5)):
        assert got == pytest.approx(want, rel=1e-6)


def test_per_step_cosine_decays_within_a_one_epoch_run_to_each_floor():
    opt = _opt(1e-3, 4e-3)
    entry = lr_scheduler(opt, _cfg("cosine", epochs=1), total_steps=100, eta_min=[1e-5, 4e-5])
    assert entry["interval"] == "step"
    seen = _lrs(opt, entry["scheduler"], 101)
    assert seen[0] == pytest.approx([1e-3, 4e-3])
    assert seen[50] == pytest.approx([0.5 * (1e-3 + 1e-5), 0.5 * (4e-3 + 4e-5)])
    assert seen[100] == pytest.approx([1e-5, 4e-5])  # each group ends at its own floor
    assert all(a[0] >= b[0] for a, b in zip(seen, seen[1:]))


def test_schedule_names_and_unknown_lengths_are_config_errors():
    assert lr_scheduler(_opt(1e-3), _cfg("none"), None) is None
    with pytest.raises(ConfigError, match="optim.scheduler='linear'"):
        lr_scheduler(_opt(1e-3), _cfg("linear"), 10)
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        lr_scheduler(_opt(1e-3), _cfg("cosine"), float("inf"))


def test_a_stage_under_the_trainer_steps_its_lr_every_batch(tmp_path):
    """Through Lightning: the scheduler built from trainer.estimated_stepping_batches moves
    the lr at every step of a one-epoch run."""
    from amodal3d.lightning_modules.common import build_optimizer

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.cfg = OmegaConf.create({"optim": {"scheduler": "cosine", "lr": 0.1, "weight_decay": 0.0,
                                                   "betas": [0.9, 0.999]}, "trainer": {"max_epochs": 1}})
            self.seen = []

        def training_step(self, batch, idx):
            self.seen.append(self.optimizers().param_groups[0]["lr"])
            return (self.w * batch[0]).sum()

        def configure_optimizers(self):
            return build_optimizer(self, self.cfg)

    m = Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 1)), batch_size=1)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              default_root_dir=tmp_path).fit(m, data)
    assert len(m.seen) == 8 and len(set(m.seen)) == 8 and m.seen[0] == pytest.approx(0.1)

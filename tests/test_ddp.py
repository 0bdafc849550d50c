"""Two-process CPU DDP (gloo) without surprises: recon and refine validate to the
single-process figures, a NaN on one rank stops every rank with the message, and an
evaluation split too small for the world size is refused before anyone hangs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from amodal3d.config import load_config
from fakes import build_fake_dataset, tiny_overrides, write_run

ROOT = Path(__file__).resolve().parent.parent
RECON_SMALL = ["model.backbone=resnet10t", "model.feat_dim=16", "model.render_size=16", "model.ico_level=2",
               "model.camera_hypotheses=2"]
REFINE_SMALL = ["model.base_channels=4", "model.depth=2", "model.prior_render_size=16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A fake dataset (2 categories: 8 validation instances) and an untrained recon run."""
    from amodal3d.lightning_modules.recon import ReconStage

    tmp = tmp_path_factory.mktemp("ddp")
    build_fake_dataset(tmp)
    torch.manual_seed(0)
    write_run(ReconStage(load_config("recon", overrides=_data(tmp) + RECON_SMALL)), tmp / "runs", "recon")
    return tmp


def _data(tmp: Path, *extra: str) -> list[str]:
    return tiny_overrides(tmp) + ["data.categories=[chair,car]", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _train(stage: str, overrides: list[str], script: list[str] | None = None, timeout: int = 600):
    cmd = [*(script or [sys.executable, "-m", "amodal3d"]), "train", "--stage", stage, *overrides,
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "trainer.enable_progress_bar=false", "trainer.check_val_every_n_epoch=1"]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _single_process_validation(stage: str, cfg, ckpt: Path) -> dict[str, float]:
    from amodal3d.lightning_modules.registry import get_stage
    from amodal3d.train import build_datamodule

    spec = get_stage(stage)
    module = spec.module.load_from_checkpoint(ckpt, map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    return {k: float(v) for k, v in trainer.validate(module, datamodule=build_datamodule(cfg, spec), verbose=False)[0].items()}


def _assert_ddp_equals_single(stage: str, overrides: list[str], tmp_path: Path) -> dict[str, float]:
    run_root = tmp_path / "runs"
    ov = [o for o in overrides if not o.startswith("run.root=")] + [f"run.root={run_root}"]
    res = _train(stage, ov)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run,) = [p for p in (run_root / "default" / stage).iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    single = _single_process_validation(stage, load_config(stage, overrides=ov), run / "checkpoints" / "last.ckpt")
    ddp = {k: float(v) for k, v in summary["metrics"].items() if k.startswith("val")}
    assert set(single) <= set(ddp), sorted(set(single) - set(ddp))
    compared = 0
    for key, value in single.items():
        if math.isnan(value):
            assert math.isnan(ddp[key]), key
        else:
            assert ddp[key] == pytest.approx(value, abs=1e-5), key
            compared += 1
    assert compared >= 3
    return single


def test_recon_ddp_validation_equals_single_process(tiny: Path, tmp_path: Path):
    single = _assert_ddp_equals_single("recon", _data(tiny, *RECON_SMALL, "loader.batch_size=2"), tmp_path)
    # the list-state camera metric and the scalar ones were both gathered
    assert {"val/miou", "val/visible_iou", "val/az_err_raw"} <= set(single)


def test_refine_ddp_validation_equals_single_process(tiny: Path, tmp_path: Path):
    recon = tiny / "runs/default/recon/r1/checkpoints/best.ckpt"
    single = _assert_ddp_equals_single(
        "refine", _data(tiny, *REFINE_SMALL, "loader.batch_size=2", f"run.checkpoints.recon={recon}"), tmp_path)
    assert {"val/miou", "val/coarse_miou"} <= set(single)


def test_nan_on_one_rank_stops_every_rank_with_the_message(tiny: Path, tmp_path: Path):
    ov = _data(tiny, f"run.root={tmp_path / 'runs'}", "model.base_channels=4", "model.depth=2",
               "loader.batch_size=2", "trainer.limit_val_batches=1", "optim.scheduler=none")
    res = _train("pcnet_m", ov, script=[sys.executable, str(ROOT / "tests/ddp_scripts/nan_on_one_rank.py")],
                 timeout=300)  # a hang (the healthy rank waiting in a collective) fails by timeout
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "training loss became" in out and "at step 1" in out, out[-3000:]
    # rank 0 (whose own loss was finite) names the other rank; nothing was trained on the bad step
    assert "non-finite on another rank" in out, out[-3000:]
    (run,) = (tmp_path / "runs" / "default" / "pcnet_m").iterdir()
    assert not (run / "summary.json").exists()


def test_an_evaluation_split_smaller_than_the_world_size_is_refused(tmp_path: Path):
    """1 validation instance, 2 processes: rank 1 would get no batch, skip the epoch's end and
    leave rank 0 waiting in the metric sync; the run stops at once with what to change."""
    from amodal3d.datamodules.build import build_dataset
    from fakes import fake_objects

    ov = tiny_overrides(tmp_path, "data.categories=[chair]", "data.views=1",
                        "data.objects_per_split={train: 2, val: 1, test: 1}")
    build_dataset(load_config(None, overrides=ov).data, progress=False, load_objects=fake_objects)
    res = _train("pcnet_m", ov + ["model.base_channels=4", "model.depth=2", "loader.batch_size=2"], timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "val split holds 1 instance(s), fewer than the 2 DDP processes" in out, out[-3000:]

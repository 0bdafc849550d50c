"""Runs survive what clusters do to them: NaN losses, kills, SIGUSR1 requeues,
resumes, and DDP evaluation that must equal the single-process value."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amodal3d.config import load_config
from amodal3d.train import train
from amodal3d.callbacks.guards import NonFiniteLossError
from fakes import build_fake_dataset, tiny_overrides
from amodal3d.lightning_modules.baselines.pcnet_m import PCNetMModule

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("model.base_channels=4", "model.depth=2", "trainer.limit_val_batches=2", "optim.scheduler=none", "loader.batch_size=4")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("fault")
    build_fake_dataset(base)
    return base


def _cfg(base: Path, run_root: Path, *extra: str):
    ov = tiny_overrides(base, *SMALL, *extra)
    ov = [o for o in ov if not o.startswith("run.root=")] + [f"run.root={run_root}"]
    return load_config("pcnet_m", debug="tiny", overrides=ov)


def _val_miou(metrics: dict) -> float:
    return float(metrics["val/miou"])


def test_resumed_run_ends_like_uninterrupted(data_dir: Path, tmp_path: Path):
    full = train(_cfg(data_dir, tmp_path / "a", "trainer.max_epochs=3", "trainer.limit_train_batches=3", "run.run_id=full"))
    first = train(_cfg(data_dir, tmp_path / "b", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "run.run_id=r"))
    assert first["global_step"] == 6
    resumed = train(_cfg(data_dir, tmp_path / "b", "trainer.max_epochs=3", "trainer.limit_train_batches=3", "run.resume=r"))
    assert resumed["run_id"] == "r" and resumed["global_step"] == full["global_step"] == 9
    assert _val_miou(resumed["metrics"]) == pytest.approx(_val_miou(full["metrics"]), abs=1e-6)
    a = torch.load(Path(full["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # one TensorBoard run folder: the resumed curves continue the same version
    events = list((tmp_path / "b").rglob("events.out.tfevents*"))
    assert events and {p.parent for p in events} == {Path(resumed["run_dir"])}


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch):
    original = PCNetMModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch >= 1 else loss

    monkeypatch.setattr(PCNetMModule, "training_step", poisoned)
    cfg = _cfg(data_dir, tmp_path, "trainer.max_epochs=3", "trainer.limit_train_batches=2", "run.run_id=nan")
    with pytest.raises(NonFiniteLossError, match="loss became nan.*last good checkpoint"):
        train(cfg)
    last = tmp_path / "default" / "pcnet_m" / "nan" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 2  # end of the only good epoch
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def _train_cmd(base: Path, run_root: Path, *extra: str) -> list[str]:
    ov = [o for o in tiny_overrides(base, *SMALL) if not o.startswith("run.root=")] + [f"run.root={run_root}"]
    return [sys.executable, "-m", "amodal3d", "train", "--stage", "pcnet_m", "--debug", "tiny", *ov, *extra]


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """The training in the background, its output in `log`: a pipe nobody reads while the
    test waits would fill and block the child (its signal handler too, when it logs)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(path_glob, root: Path, proc: subprocess.Popen, log: Path, timeout: float = 120.0,
              kill: bool = True) -> Path | None:
    """The first file matching `path_glob` under `root`; on timeout the training is killed
    and the test fails (kill=False: None, the training left running)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        hits = sorted(root.rglob(path_glob))
        if hits:
            return hits[0]
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {path_glob} appeared:\n"
                                 f"{log.read_text()[-3000:]}")
        time.sleep(0.2)
    if not kill:
        return None
    proc.kill()
    raise AssertionError(f"{path_glob} did not appear within {timeout}s; the training's output ends:\n"
                         f"{log.read_text()[-3000:]}")


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{text!r} not in {path} within {timeout}s; the training's output ends:\n{log.read_text()[-3000:]}")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def test_killed_training_loses_nothing_completed(data_dir: Path, tmp_path: Path):
    cmd = _train_cmd(data_dir, tmp_path, "trainer.max_epochs=1000", "trainer.limit_train_batches=2", "run.run_id=k")
    out = tmp_path / "train.log"
    proc = _start(cmd, out, _env())
    last = _wait_for("k/checkpoints/last.ckpt", tmp_path, proc, out)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    step = torch.load(last, weights_only=False)["global_step"]
    assert step >= 2
    res = subprocess.run(_train_cmd(data_dir, tmp_path, f"trainer.max_epochs={step // 2 + 1}",
                                    "trainer.limit_train_batches=2", "run.resume=k"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((last.parent.parent / "summary.json").read_text())
    assert summary["global_step"] >= step + 2  # continued from the saved step, not from 0


def test_sigusr1_saves_hpc_checkpoint_and_requeued_job_resumes(data_dir: Path, tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "scontrol.log"
    scontrol = bindir / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {log}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NAME="amodal3d-test", SLURM_PROCID="0",
                 SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1",
                 PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cmd = _train_cmd(data_dir, tmp_path, "trainer.max_epochs=1000", "trainer.limit_train_batches=2",
                     "trainer.accelerator=cpu")
    out = tmp_path / "train.log"
    proc = _start(cmd, out, _env(**slurm))
    _wait_for("4242/checkpoints/last.ckpt", tmp_path, proc, out)
    proc.send_signal(signal.SIGUSR1)  # handled at the next batch end (SlurmRequeue), not inside the handler
    _wait_for("4242/hpc_ckpt_*.ckpt", tmp_path, proc, out)
    _wait_for_text(log, "requeue 4242", proc, out)  # the checkpoint is renamed into place before the requeue
    proc.kill()
    proc.wait()
    hpc = max(tmp_path.rglob("4242/hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    saved_step = torch.load(hpc, weights_only=False)["global_step"]
    # the requeued job: same job id, no RESUME; Lightning restores the HPC checkpoint
    # max_epochs as in the first job: only max_steps may end it, whatever step the signal hit
    res = subprocess.run(_train_cmd(data_dir, tmp_path, f"trainer.max_steps={saved_step + 2}", "trainer.max_epochs=1000",
                                    "trainer.limit_train_batches=2", "trainer.accelerator=cpu"),
                         cwd=ROOT, env=_env(**slurm), capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "hpc_ckpt" in out
    summary = json.loads((hpc.parent / "summary.json").read_text())
    assert summary["run_id"] == "4242" and summary["global_step"] == saved_step + 2


def test_requeue_signal_only_flags_and_the_save_waits_for_the_batch_end(data_dir: Path, tmp_path: Path, monkeypatch):
    """Lightning's own handler saves inside the signal handler, which can hang forever when
    the signal lands in a lock the save needs (seen in CI); here the handler writes nothing."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    scontrol = bindir / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    for k, v in dict(SLURM_JOB_ID="4343", SLURM_NTASKS="1", SLURM_JOB_NAME="amodal3d-test", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "default" / "pcnet_m" / "4343"
    seen = {}
    original = PCNetMModule.training_step

    def signalled(self, batch, batch_idx):
        if self.global_step == 1 and not seen:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler has run when os.kill returns
            seen["in_step"] = sorted(p.name for p in run.glob("*.ckpt"))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(PCNetMModule, "training_step", signalled)
    before = signal.getsignal(signal.SIGUSR1)
    summary = train(_cfg(data_dir, tmp_path, "trainer.max_epochs=2", "trainer.limit_train_batches=2"))
    assert seen["in_step"] == []  # nothing written from inside the handler
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert not list(run.glob(".*partial"))
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 2  # that batch's end
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4343"]
    assert summary["global_step"] == 4  # training went on until the (simulated) time limit
    assert signal.getsignal(signal.SIGUSR1) == before  # restored after fit


def test_two_process_ddp_validation_equals_single_process(data_dir: Path, tmp_path: Path):
    """No run id pinned: rank 0 picks it and both ranks write the one run folder."""
    cmd = _train_cmd(data_dir, tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1.0", "trainer.accelerator=cpu", "trainer.devices=2",
                     "loader.batch_size=4")
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = [p for p in (tmp_path / "default" / "pcnet_m").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    ddp_miou = summary["metrics"]["val/miou"]

    import lightning as L

    from amodal3d.train import build_datamodule
    from amodal3d.lightning_modules.registry import get_stage

    cfg = _cfg(data_dir, tmp_path, "trainer.limit_val_batches=1.0", "loader.batch_size=4")
    module = PCNetMModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    dm = build_datamodule(cfg, get_stage("pcnet_m"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/miou"]
    assert ddp_miou == pytest.approx(single, abs=1e-6)

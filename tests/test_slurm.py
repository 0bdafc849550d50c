"""The sbatch script is exactly what multi-node Lightning + requeue needs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from amodal3d.config import REPO_ROOT, ConfigError
from amodal3d.slurm import SlurmRequest, render_sbatch, write_and_submit

EXPECTED_2x4 = f"""#!/bin/bash
#SBATCH --job-name=amodal3d-default-recon
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --partition=gpu
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/logs/%x-%j.out

set -euo pipefail
export HDF5_USE_FILE_LOCKING=FALSE
cd {REPO_ROOT}

srun .venv/bin/python -m amodal3d train --stage recon trainer.devices=4 trainer.num_nodes=2 trainer.accelerator=gpu loader.batch_size=64
"""


def test_script_for_2_nodes_x_4_gpus_is_exact():
    req = SlurmRequest(stage="recon", experiment=None, nodes=2, gpus=4, time="04:00:00",
                       partition="gpu", overrides=("loader.batch_size=64",))
    assert render_sbatch(req, Path("/logs")) == EXPECTED_2x4


def test_signal_has_no_batch_prefix_and_requeue_is_set():
    text = render_sbatch(SlurmRequest(stage="recon", experiment="x"), Path("/l"))
    assert "--signal=SIGUSR1@90" in text and "B:" not in text and "--requeue" in text
    assert "\nsrun " in text


def test_sweep_becomes_job_array():
    req = SlurmRequest(stage="recon", experiment=None, sweep=("optim.lr=1e-3", "optim.lr=1e-4 seed=2"))
    text = render_sbatch(req, Path("/l"))
    assert "#SBATCH --array=0-1" in text
    assert "'optim.lr=1e-4 seed=2'" in text and "${SWEEP[$SLURM_ARRAY_TASK_ID]}" in text


def test_bad_time_and_counts_are_refused():
    with pytest.raises(ConfigError, match="TIME"):
        render_sbatch(SlurmRequest(stage="recon", experiment=None, time="four hours"), Path("/l"))
    with pytest.raises(ConfigError, match="NODES"):
        render_sbatch(SlurmRequest(stage="recon", experiment=None, nodes=0), Path("/l"))


def test_fake_sbatch_captures_submission(tmp_path: Path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    capture = tmp_path / "captured.sh"
    fake = bindir / "sbatch"
    fake.write_text(f"#!/bin/bash\ncp \"$1\" {capture}\necho 'Submitted batch job 4242'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    req = SlurmRequest(stage="recon", experiment="exp1", nodes=1, gpus=2)
    path, job = write_and_submit(req, root=str(tmp_path / "runs"))
    assert job == "4242"
    assert path.parent == tmp_path / "runs" / "exp1" / "recon" / "slurm"
    assert capture.read_text() == path.read_text()
    assert "--ntasks-per-node=2" in capture.read_text()


def test_dry_run_does_not_call_sbatch(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    path, job = write_and_submit(SlurmRequest(stage="recon", experiment=None), dry_run=True,
                                 root=str(tmp_path / "runs"))
    assert job == "" and path.is_file()

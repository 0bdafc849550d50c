"""Render and submit sbatch scripts for a stage (`make slurm`).

At run time Lightning detects the environment and restores the HPC checkpoint when
the requeued job starts with ckpt_path=None; callbacks/slurm_requeue.py handles SIGUSR1
(saves that checkpoint at the next batch end, requeues the job). This file only
writes the script that makes those conditions true: one task per GPU launched
by srun, the signal sent 90 s before the time limit to the job steps (no `B:`,
so it reaches the Python processes, not the batch shell), --requeue, and the
run id taken from $SLURM_JOB_ID so a requeued job lands in the same run folder.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from amodal3d.config import REPO_ROOT, ConfigError
from amodal3d.runs import runs_root


@dataclass
class SlurmRequest:
    stage: str
    experiment: str | None
    nodes: int = 1
    gpus: int = 1
    time: str = "24:00:00"
    partition: str = ""
    cpus_per_task: int = 8
    overrides: tuple[str, ...] = ()
    sweep: tuple[str, ...] = ()  # one line of space-separated overrides per array task
    account: str = ""
    debug: str | None = None


def _check(req: SlurmRequest) -> None:
    if req.nodes < 1 or req.gpus < 1:
        raise ConfigError(f"slurm: NODES={req.nodes} and GPUS={req.gpus} must both be >= 1")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", req.time):
        raise ConfigError(f"slurm: TIME={req.time!r} is not a SLURM time (e.g. 04:00:00 or 1-12:00:00)")


def check_batch_size(cfg, req: SlurmRequest) -> None:
    """The job's global loader.batch_size must split evenly over its NODES x GPUS processes
    (what the runner checks at start-up, refused here before anything is submitted)."""
    world = req.nodes * req.gpus
    bs = int(cfg.loader.batch_size)
    if bs % world:
        raise ConfigError(
            f"slurm: loader.batch_size={bs} is the global batch size and must divide evenly over the "
            f"{world} GPU processes (NODES={req.nodes} x GPUS={req.gpus}); choose a multiple of {world} "
            f"or another GPUS/NODES"
        )


def render_sbatch(req: SlurmRequest, log_dir: Path, python: str = ".venv/bin/python") -> str:
    """The sbatch script text for `req` (deterministic: no timestamps inside)."""
    _check(req)
    exp = req.experiment or "default"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=amodal3d-{exp}-{req.stage}",
        f"#SBATCH --nodes={req.nodes}",
        f"#SBATCH --ntasks-per-node={req.gpus}",
        f"#SBATCH --gres=gpu:{req.gpus}",
        f"#SBATCH --cpus-per-task={req.cpus_per_task}",
        f"#SBATCH --time={req.time}",
    ]
    if req.partition:
        lines.append(f"#SBATCH --partition={req.partition}")
    if req.account:
        lines.append(f"#SBATCH --account={req.account}")
    lines += [
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={log_dir}/%x-%j.out",
    ]
    if req.sweep:
        lines.append(f"#SBATCH --array=0-{len(req.sweep) - 1}")
    lines += [
        "",
        "set -euo pipefail",
        "export HDF5_USE_FILE_LOCKING=FALSE",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        "",
    ]
    cmd = [python, "-m", "amodal3d", "train", "--stage", req.stage]
    if req.experiment:
        cmd += ["--exp", req.experiment]
    if req.debug:
        cmd += ["--debug", req.debug]
    cmd += [f"trainer.devices={req.gpus}", f"trainer.num_nodes={req.nodes}", "trainer.accelerator=gpu"]
    cmd += list(req.overrides)
    launch = "srun " + " ".join(shlex.quote(c) for c in cmd)
    if req.sweep:
        lines.append("SWEEP=(")
        lines += [f"  {shlex.quote(s)}" for s in req.sweep]
        lines.append(")")
        lines.append("# the run id is ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (see amodal3d/runs.py)")
        launch += " ${SWEEP[$SLURM_ARRAY_TASK_ID]}"
    lines.append(launch)
    return "\n".join(lines) + "\n"


def write_and_submit(req: SlurmRequest, dry_run: bool = False, root: str = "runs") -> tuple[Path, str]:
    """Write the script under runs/<exp>/<stage>/slurm/ and submit it with sbatch.

    Returns (script path, job id or "" for a dry run)."""
    exp = req.experiment or "default"
    folder = runs_root(root) / exp / req.stage / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    text = render_sbatch(req, folder)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    if dry_run:
        return path, ""
    try:
        res = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"sbatch not found on PATH: run this on a SLURM login node, or use the dry run and submit {path} yourself"
        ) from None
    if res.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed ({res.returncode}): {res.stderr.strip()}")
    m = re.search(r"Submitted batch job (\d+)", res.stdout)
    return path, m.group(1) if m else res.stdout.strip()

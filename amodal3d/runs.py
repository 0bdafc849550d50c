"""Run folders: runs/<experiment>/<stage>/<run_id>/ and the checkpoints inside.

A run folder holds config.yaml (the resolved config), checkpoints/last.ckpt and
checkpoints/best.ckpt, the TensorBoard event files (the logger's version is
pinned to the run id so a resumed run continues the same curves) and
summary.json, written when training ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from amodal3d.errors import MissingCheckpointError

SUMMARY = "summary.json"


def runs_root(root: str | os.PathLike = "runs") -> Path:
    """run.root as a path: a relative one is taken from the current directory, as data.root
    is (make runs every command from the repository root)."""
    return Path(root).absolute()


def new_run_id() -> str:
    """$SLURM_JOB_ID under SLURM (so a requeued job finds its folder), else a timestamp."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{array}" if array else job
    return time.strftime("%Y%m%d-%H%M%S")


def run_dir(root: str | os.PathLike, experiment: str, stage: str, run_id: str) -> Path:
    return runs_root(root) / experiment / stage / run_id


def list_runs(root: str | os.PathLike, experiment: str, stage: str) -> list[Path]:
    """Run folders of an experiment's stage, oldest first (by folder mtime, then name)."""
    base = runs_root(root) / experiment / stage
    if not base.is_dir():
        return []
    runs = [p for p in base.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))


def is_finished(run: Path) -> bool:
    """A run that ended: the runner writes summary.json only after Trainer.fit returns."""
    return (run / SUMMARY).is_file()


def best_checkpoint(run: Path) -> Path | None:
    """The run's best.ckpt (a finished run always has one), else its last.ckpt."""
    for name in ("best.ckpt", "last.ckpt"):
        p = run / "checkpoints" / name
        if p.is_file():
            return p
    return None


def find_stage_checkpoint(
    stage: str, experiment: str, root: str | os.PathLike = "runs", override: str | None = None
) -> Path:
    """The checkpoint a dependent stage (or the bench) consumes: an explicit path, else
    best.ckpt of the stage's latest *finished* run (one with summary.json: a run still
    training, or one that crashed, is never picked); a clear error naming the command
    that produces it when there is none."""
    if override:
        p = Path(override)
        if not p.is_file():
            raise MissingCheckpointError(f"checkpoint for stage {stage!r} not found: {p} (run.checkpoints.{stage})")
        return p
    runs = list_runs(root, experiment, stage)
    for run in reversed(runs):
        ckpt = run / "checkpoints" / "best.ckpt"
        if is_finished(run) and ckpt.is_file():
            return ckpt
    exp_arg = "" if experiment == "default" else f" EXP={experiment}"
    unfinished = sorted(r.name for r in runs if not is_finished(r))
    why = f" (run(s) {', '.join(unfinished)} have no {SUMMARY}: still training or stopped early)" if unfinished else ""
    raise MissingCheckpointError(
        f"no finished run of stage {stage!r} under {runs_root(root) / experiment / stage}{why}: "
        f"train it first with `make train STAGE={stage}{exp_arg}` "
        f"or set run.checkpoints.{stage}=<path/to.ckpt>"
    )


def resume_checkpoint(root: str | os.PathLike, experiment: str, stage: str, run_id: str) -> Path:
    """last.ckpt of the run `run_id` to resume, or a MissingCheckpointError naming the run id,
    where it was looked for and the run ids that exist."""
    base = runs_root(root) / experiment / stage
    last = base / run_id / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    known = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != "slurm") if base.is_dir() else []
    what = "no such run" if not (base / run_id).is_dir() else f"{last} does not exist"
    have = f"runs here: {', '.join(known)}" if known else "no run of this stage yet"
    raise MissingCheckpointError(
        f"cannot resume run {run_id!r} of stage {stage!r}: {what} under {base} ({have}); "
        "give RESUME (--resume) the id of a run folder with checkpoints/last.ckpt"
    )

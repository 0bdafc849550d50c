"""Stage dependencies, resolved once by the runner before any module is built.

A stage's StageSpec names what it consumes (`dependencies(cfg, find)`); the runner
fills `run.checkpoints.<stage>` with absolute paths (an explicit path stays, else the
best checkpoint of the latest finished run), saves them in the run's config.yaml,
and the LightningModule reads them from its config: it never searches runs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from amodal3d.runs import find_stage_checkpoint

# find(stage, experiment, required=True) -> absolute checkpoint path, or None when an
# optional dependency has no finished run
Finder = Callable[..., "str | None"]


def check_checkpoint_stage(path: str | Path, stage: str) -> None:
    """A checkpoint given as run.checkpoints.<stage> must be readable and of that stage (a
    refine checkpoint given as the recon one would otherwise fail deep inside the build).
    `amodal3d train` checks the paths given on its command line with it."""
    from amodal3d.errors import CheckpointError
    from amodal3d.lightning_modules.checkpoints import checkpoint_hparams

    cfg = checkpoint_hparams(path).get("cfg") or {}
    got = cfg.get("stage") if hasattr(cfg, "get") else None
    if got is not None and str(got) != stage:
        raise CheckpointError(f"run.checkpoints.{stage}={path}: a checkpoint of stage {got!r}, not {stage!r}; "
                              f"give the best.ckpt of a {stage} run (runs/<experiment>/{stage}/<run_id>/checkpoints/)")


def make_finder(cfg: DictConfig) -> Finder:
    """A `find` over cfg's runs root that honours explicit run.checkpoints.<stage> paths."""
    explicit = cfg.run.checkpoints

    def find(stage: str, experiment: str, required: bool = True) -> str | None:
        given = explicit.get(stage)
        if given:  # an explicit path must exist, optional or not
            return str(find_stage_checkpoint(stage, experiment, cfg.run.root, str(given)).resolve())
        try:
            return str(find_stage_checkpoint(stage, experiment, cfg.run.root).resolve())
        except FileNotFoundError:
            if required:
                raise
            return None

    return find


def resolve_checkpoints(cfg: DictConfig, spec=None) -> DictConfig:
    """cfg with run.checkpoints.<stage> set for every stage cfg.stage consumes (in place)."""
    if spec is None:
        from amodal3d.lightning_modules.registry import get_stage

        spec = get_stage(str(cfg.stage))
    if spec.dependencies is None:
        return cfg
    found = spec.dependencies(cfg, make_finder(cfg))
    for stage, path in found.items():
        if path:
            cfg.run.checkpoints[stage] = path
    return cfg


def saved_checkpoints(run_config: Path) -> dict[str, str]:
    """run.checkpoints as a run's config.yaml recorded them."""
    from omegaconf import OmegaConf

    if not run_config.is_file():
        return {}
    saved = OmegaConf.load(run_config)
    ckpts = OmegaConf.select(saved, "run.checkpoints") or {}
    return {str(k): str(v) for k, v in ckpts.items() if v}


def keep_recorded_checkpoints(cfg: DictConfig, run_folder: Path) -> DictConfig:
    """A resumed or requeued run keeps the inputs it started with (a newer finished run of
    a dependency does not swap in mid-run); a path given on the command line still wins."""
    for stage, path in saved_checkpoints(run_folder / "config.yaml").items():
        if not cfg.run.checkpoints.get(stage):
            cfg.run.checkpoints[stage] = path
    return cfg

"""The `Ours` row: which refine-family run stands for the method (chosen on validation
scores, never the test split), and the rows the bench adds for it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from amodal3d.runs import SUMMARY, find_stage_checkpoint
from amodal3d.lightning_modules.checkpoints import read_checkpoint
from amodal3d.lightning_modules.common import AmodalStage


OURS = "Ours"
OURS_TRUE_CAMERA = "Ours + true-camera render (eval only)"
#: the true-camera row on a dataset without true cameras (an imported one)
TRUE_CAMERA_UNDEFINED = "reads each instance's true camera: this dataset has none (imported data)"


def dataset_has_cameras(cfg: DictConfig) -> bool:
    """Whether the dataset cfg reads holds true cameras: built from objects, not imported
    (an imported dataset's cameras are NaN)."""
    from amodal3d.datamodules.shard_format import read_manifest

    return read_manifest(cfg.data.root).get("format") != "amodal3d.import"


def validation_score(checkpoint: Path) -> float | None:
    """The best validation score of the run a checkpoint belongs to (summary.json,
    else the checkpoint callback's state)."""
    summary = Path(checkpoint).parent.parent / SUMMARY
    if summary.is_file():
        try:
            score = json.loads(summary.read_text()).get("best_score")
            if score is not None and math.isfinite(float(score)):
                return float(score)
        except (ValueError, OSError):
            pass
    try:
        ckpt = read_checkpoint(checkpoint)
    except (OSError, ValueError):
        return None
    for key, state in (ckpt.get("callbacks") or {}).items():
        if "ModelCheckpoint" in str(key) and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


def ours_checkpoint(experiment: str, root: str = "runs", overrides: dict | None = None) -> tuple[str, Path]:
    """(stage, checkpoint) of the Ours row: joint, unless it is missing or its
    validation mIoU is not higher than refine's. Selection uses validation scores,
    never the test split."""
    overrides = overrides or {}
    found: dict[str, Path] = {}
    for stage in ("joint", "refine"):
        try:
            found[stage] = find_stage_checkpoint(stage, experiment, root, overrides.get(stage))
        except FileNotFoundError:
            continue
    if not found:
        exp_arg = "" if experiment == "default" else f" EXP={experiment}"
        raise FileNotFoundError(f"no refine or joint checkpoint for experiment {experiment!r}: train them with "
                                f"`make train STAGE=refine{exp_arg}` then `make train STAGE=joint{exp_arg}`")
    if "joint" in found and "refine" in found:
        sj, sr = validation_score(found["joint"]), validation_score(found["refine"])
        if sj is None or (sr is not None and sj <= sr):
            return "refine", found["refine"]
        return "joint", found["joint"]
    stage = next(iter(found))
    return stage, found[stage]


def load_stage_module(stage: str, checkpoint: str | Path, device: torch.device | str = "cpu") -> AmodalStage:
    """A refine-family stage module (refine, refine_2d, joint) from its checkpoint, in eval mode."""
    from amodal3d.lightning_modules.registry import get_stage

    module = get_stage(stage).module.load_from_checkpoint(str(checkpoint), map_location=device)
    return module.to(device).eval()


@dataclass
class BenchRow:
    """A table row computed from a stage's checkpoint by the bench's own recipe.

    load(cfg, device) -> AmodalStage ready to score; status "ok" or why not.
    """

    name: str
    stage: str
    checkpoint: Path | None
    status: str
    load: Callable[[DictConfig, torch.device], AmodalStage] | None = None


def ours_rows(experiment: str, root: str = "runs") -> list[BenchRow]:
    """The Ours row and Ours fed with the true-camera render (evaluation only)."""
    from amodal3d.bench.evaluate import eval_loader
    from amodal3d.bench.table import NOT_TRAINED
    from amodal3d.bench.true_camera import calibrate_true_camera

    try:
        stage, ckpt = ours_checkpoint(experiment, root)
    except FileNotFoundError:
        return [BenchRow(OURS, "refine", None, NOT_TRAINED), BenchRow(OURS_TRUE_CAMERA, "refine", None, NOT_TRAINED)]

    def load_ours(cfg: DictConfig, device: torch.device) -> AmodalStage:
        return load_stage_module(stage, ckpt, device)

    def load_true_camera(cfg: DictConfig, device: torch.device) -> AmodalStage:
        module = load_stage_module(stage, ckpt, device)
        calibrate_true_camera(module, eval_loader(cfg, "val"), device)
        return module

    return [BenchRow(OURS, stage, ckpt, "ok", load_ours),
            BenchRow(OURS_TRUE_CAMERA, stage, ckpt, "ok", load_true_camera)]



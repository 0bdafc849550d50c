"""The one way a stage reads a checkpoint file, and the checkpoints its config names.

Every helper that opens a Lightning checkpoint goes through `read_checkpoint` (CPU,
memory-mapped, a clear error naming the file); a stage reads the checkpoints it builds
on from `run.checkpoints.<stage>`, which the runner filled before building it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from amodal3d.errors import CheckpointError, MissingCheckpointError


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict at `path` (tensors on the CPU, memory-mapped)."""
    p = Path(path)
    if not p.is_file():
        raise MissingCheckpointError(f"checkpoint not found: {p}")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated file, not a torch file, ...
        raise CheckpointError(f"{p}: not a readable checkpoint, truncated or not a torch file "
                              f"({type(err).__name__}: {err}); "
                         "retrain the stage or point run.checkpoints at another file") from None


def checkpoint_hparams(path: str | Path) -> dict:
    """The hyper-parameters a LightningModule saved in its checkpoint ({} if none)."""
    return read_checkpoint(path).get("hyper_parameters") or {}


def checkpoint_model_config(path: str | Path) -> dict:
    """The `model` section of the config a stage was trained with."""
    try:
        return dict(checkpoint_hparams(path)["cfg"]["model"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a stage checkpoint of this project (no hyper_parameters.cfg.model)") from None


def checkpoint_class_names(path: str | Path) -> tuple[str, ...]:
    """The category table a checkpoint was trained on (its hparams cfg.data.class_names; a
    checkpoint from before the key holds the 13 ShapeNet categories)."""
    from omegaconf import OmegaConf

    from amodal3d.categories import class_names

    cfg = checkpoint_hparams(path).get("cfg") or {}
    return class_names(OmegaConf.create(dict(cfg)))


def check_checkpoint_classes(path: str | Path, dataset: tuple[str, ...], data_root: str = "") -> None:
    """ConfigError when the checkpoint at `path` was trained on another category table than
    `dataset` (amodal3d.categories.check_class_names)."""
    from amodal3d.categories import check_class_names

    check_class_names(path, checkpoint_class_names(path), dataset, data_root)


def submodule_state(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The state dict entries under `prefix.` with the prefix removed (e.g. 'net')."""
    state = read_checkpoint(path)["state_dict"]
    head = prefix + "."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def dependency(cfg: DictConfig, stage: str, consumer: str) -> str:
    """The checkpoint of `stage` this config consumes (run.checkpoints.<stage>)."""
    path = cfg.run.checkpoints.get(stage)
    if not path:
        raise MissingCheckpointError(
            f"stage {consumer} needs a {stage} checkpoint: set run.checkpoints.{stage}=<path/to.ckpt>, or train "
            f"through the runner (`make train STAGE={consumer}`), which uses the latest finished {stage} run "
            f"(`make train STAGE={stage}` trains one)"
        )
    if not Path(path).is_file():
        raise MissingCheckpointError(f"run.checkpoints.{stage}={path}: no such checkpoint file (stage {consumer})")
    return str(path)


def optional_dependency(cfg: DictConfig, stage: str, consumer: str) -> str | None:
    """Like `dependency`, but None when the config names no checkpoint of `stage`."""
    return dependency(cfg, stage, consumer) if cfg.run.checkpoints.get(stage) else None

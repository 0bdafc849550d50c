"""The training runner behind `make train`: config -> data -> stage -> Trainer.fit.

Lightning owns the loop, checkpoints, DDP and SLURM; this file only wires the
run folder, logger, callbacks and resume logic around it.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from amodal3d.categories import resolve_class_names
from amodal3d.config import ConfigError, load_config, save_config
from amodal3d.dependencies import check_checkpoint_stage, keep_recorded_checkpoints, resolve_checkpoints
from amodal3d.atomic import write_json_atomic
from amodal3d.runs import SUMMARY, is_finished, new_run_id, resume_checkpoint, run_dir
from amodal3d.lightning_modules.registry import StageSpec, get_stage


def world_size(cfg: DictConfig) -> int:
    """Number of training processes the trainer settings ask for."""
    devices = cfg.trainer.devices
    if isinstance(devices, int):
        n = devices
    elif isinstance(devices, str) and devices.isdigit():
        n = int(devices)
    elif devices in ("auto", -1, "-1"):
        n = max(torch.cuda.device_count(), 1) if _uses_gpu(cfg) else 1
    else:  # a list of device ids
        n = len(devices)
    return max(n, 1) * int(cfg.trainer.num_nodes)


def _uses_gpu(cfg: DictConfig) -> bool:
    acc = str(cfg.trainer.accelerator)
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def per_rank_batch_size(cfg: DictConfig) -> int:
    """loader.batch_size is the global batch; each rank gets an equal share."""
    world = world_size(cfg)
    bs = int(cfg.loader.batch_size)
    if bs % world:
        raise ConfigError(
            f"loader.batch_size={bs} is the global batch size and must divide evenly over "
            f"{world} processes (trainer.devices x trainer.num_nodes); choose a multiple of {world}"
        )
    return bs // world


def check_precision(cfg: DictConfig) -> None:
    """Refuse precisions the device cannot run, with a message saying what to use."""
    prec = str(cfg.trainer.precision)
    gpu = _uses_gpu(cfg)
    if prec in ("16-mixed", "16", "16-true") and not gpu:
        raise ConfigError(
            f"trainer.precision={prec} needs a CUDA GPU; on the CPU use 32-true or bf16-mixed"
        )
    if prec.startswith("bf16") and gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"trainer.precision={prec}: this GPU has no bfloat16 support; use 16-mixed or 32-true"
        )


def build_datamodule(cfg: DictConfig, spec: StageSpec) -> L.LightningDataModule:
    loader = OmegaConf.merge(cfg.loader, {"batch_size": per_rank_batch_size(cfg)})
    if spec.data == "crops":
        from amodal3d.datamodules.crops import CropDataModule

        return CropDataModule(cfg.data, loader, protocol=cfg.protocol, targets=spec.targets)
    if spec.data == "images":
        from amodal3d.datamodules.images import DetectionDataModule

        return DetectionDataModule(cfg.data, loader, targets=spec.targets)
    raise ValueError(f"stage {spec.name}: unknown data kind {spec.data!r}")


def _progress_callbacks(cfg: DictConfig) -> tuple[list[L.Callback], bool]:
    from amodal3d.callbacks.progress import PlainProgress

    bar = cfg.trainer.enable_progress_bar
    if bar is None:
        bar = sys.stderr.isatty()
    return ([] if bar else [PlainProgress()]), bool(bar)


def make_trainer(cfg: DictConfig, out: Path, extra_callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """A Trainer whose logs and checkpoints live in the run folder `out`."""
    from amodal3d.callbacks.step_seed import StepSeed
    from amodal3d.callbacks.ddp_buffers import BroadcastBuffersBeforeEval
    from amodal3d.callbacks.guards import FiniteLossGuard

    t = cfg.trainer
    check_precision(cfg)
    logger = TensorBoardLogger(save_dir=str(out.parent), name="", version=out.name, default_hp_metric=False)
    # Two callbacks: Lightning 2.6 refreshes `save_last` only when a top-k
    # checkpoint was written in the same step, but resume needs the latest state
    # every epoch whether or not the monitored metric improved.
    best = ModelCheckpoint(
        dirpath=str(out / "checkpoints"),
        filename="best",
        monitor=cfg.run.monitor,
        mode=cfg.run.monitor_mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=str(out / "checkpoints"),
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    progress, bar = _progress_callbacks(cfg)
    callbacks = [best, last, LearningRateMonitor(logging_interval="epoch"),
                 FiniteLossGuard(int(cfg.run.finite_check_every_n_steps)), StepSeed(cfg.seed),
                 BroadcastBuffersBeforeEval(), *progress]
    callbacks += extra_callbacks or []
    plugins = []
    if SLURMEnvironment.detect():  # our requeue callback instead of Lightning's in-handler save
        from amodal3d.callbacks.slurm_requeue import SlurmRequeue

        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(SlurmRequeue())
    strategy = t.strategy
    if strategy == "auto" and world_size(cfg) > 1:
        strategy = "ddp"
    return L.Trainer(
        default_root_dir=str(out),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        log_every_n_steps=t.log_every_n_steps,
        fast_dev_run=t.fast_dev_run,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        enable_progress_bar=bar,
        logger=logger,
        callbacks=callbacks,
        plugins=plugins or None,
    )


RUN_ID_ENV = "AMODAL3D_RUN_ID"


def shared_run_id(cfg: DictConfig) -> str:
    """A new run id that every DDP rank agrees on: the launching process (rank 0) picks it
    and puts it in the environment, which the ranks Lightning starts as subprocesses
    inherit (each would otherwise stamp its own time, a second apart)."""
    inherited = os.environ.get(RUN_ID_ENV)
    if inherited:
        return inherited
    run_id = new_run_id()
    if world_size(cfg) > 1:
        os.environ[RUN_ID_ENV] = run_id
    return run_id


def prepare_run(cfg: DictConfig, spec: StageSpec | None = None) -> tuple[Path, str | None]:
    """Pick the run folder and the checkpoint to resume from.

    RESUME=<id> continues runs/<exp>/<stage>/<id>/checkpoints/last.ckpt (a stage with
    phases continues the folder: its first unfinished phase from that phase's last.ckpt).
    Under SLURM a requeued job gets the same run id ($SLURM_JOB_ID) and ckpt_path stays
    None, so Lightning restores its own HPC checkpoint from the run folder.
    """
    root = cfg.run.root
    if cfg.run.resume:
        folder = run_dir(root, cfg.experiment, cfg.stage, cfg.run.resume)
        if spec is not None and spec.phases and folder.is_dir():
            return folder, None
        last = resume_checkpoint(root, cfg.experiment, cfg.stage, cfg.run.resume)
        return folder, str(last)
    run_id = cfg.run.run_id or shared_run_id(cfg)
    out = run_dir(root, cfg.experiment, cfg.stage, run_id)
    cfg.run.run_id = run_id
    return out, None


def resolve_dataset_classes(cfg: DictConfig, manifest: dict, resume_from: str | None = None) -> tuple[str, ...]:
    """Set cfg.data.class_names from the dataset's manifest (left empty for the 13 ShapeNet
    categories) before any module is built and before config.yaml is written: the run's heads,
    metrics and per-category parameters are sized by it, and its checkpoints and config then
    know their classes without the dataset. Every checkpoint the run starts from (its
    run.checkpoints dependencies, the one it resumes) must have been trained on the same table."""
    from amodal3d.lightning_modules.checkpoints import check_checkpoint_classes

    names = resolve_class_names(cfg, manifest)
    starts_from = [str(p) for p in cfg.run.checkpoints.values() if p] + ([str(resume_from)] if resume_from else [])
    for path in starts_from:
        check_checkpoint_classes(path, names, str(cfg.data.root))
    return names


def train(cfg: DictConfig) -> dict:
    """Train one stage as configured (every phase of a stage with phases); returns the run summary."""
    spec = get_stage(cfg.stage)
    given = {str(k): str(v) for k, v in cfg.run.checkpoints.items() if v}  # run.checkpoints.<stage>=<path>
    out, ckpt_path = prepare_run(cfg, spec)
    keep_recorded_checkpoints(cfg, out)  # resume / requeue: the inputs it started with
    resolve_checkpoints(cfg, spec)
    for stage, path in given.items():
        check_checkpoint_stage(path, stage)  # readable, and of that stage
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # after the checks that may refuse the run
    from amodal3d.datamodules.build import ensure_dataset

    resolve_dataset_classes(cfg, ensure_dataset(cfg.data), ckpt_path)  # before any module or config.yaml
    try:
        if spec.phases:
            return _train_phases(cfg, spec, out)
        return _fit(cfg, spec, out, ckpt_path)
    finally:  # the next run of this process picks a new id
        os.environ.pop(RUN_ID_ENV, None)


def _train_phases(cfg: DictConfig, spec: StageSpec, out: Path) -> dict:
    """Each phase in order (StageSpec.phases): a finished one (summary.json) is skipped, an
    interrupted fit resumes from its last.ckpt; the last phase is the run folder itself."""
    summary: dict = {}
    for i, phase in enumerate(spec.phases):
        final = i == len(spec.phases) - 1
        folder = out if final else out / "phases" / phase.name
        if not final and is_finished(folder):
            print(f"[run] {spec.name}: phase {phase.name} finished earlier ({folder}); skipped", flush=True)
            continue
        pcfg = phase.configure(copy.deepcopy(cfg), out)
        L.seed_everything(int(cfg.seed) + i, workers=True, verbose=False)
        if phase.run is not None:
            print(f"[run] {spec.name}: phase {phase.name}: {folder}", flush=True)
            t0 = time.time()
            summary = phase.run(pcfg, folder)
            print(f"[run] {spec.name}: phase {phase.name} done in {time.time() - t0:.0f} s", flush=True)
            continue
        last = folder / "checkpoints" / "last.ckpt"
        summary = _fit(pcfg, spec, folder, str(last) if last.is_file() else None, phase=phase.name,
                       hand_off=not final)
    return summary


def _fit(cfg: DictConfig, spec: StageSpec, out: Path, ckpt_path: str | None, phase: str | None = None,
         hand_off: bool = False) -> dict:
    """One Trainer.fit of the stage in the run folder `out`; writes and returns its summary.
    `hand_off`: a phase whose weights a later phase reads; under fast_dev_run (which writes
    no checkpoints) they are saved as its best.ckpt all the same."""
    dm = build_datamodule(cfg, spec)
    module = spec.module(cfg)
    trainer = make_trainer(cfg, out)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        print(f"[run] {spec.name}{f' (phase {phase})' if phase else ''}: {out}", flush=True)
    t0 = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    summary = {
        "stage": spec.name,
        "experiment": cfg.experiment,
        "run_id": cfg.run.run_id or out.name,
        "run_dir": str(out),
        "train_seconds": time.time() - t0,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "",
        "best_score": _to_float(trainer.checkpoint_callback.best_model_score) if trainer.checkpoint_callback else None,
        "metrics": {k: _to_float(v) for k, v in trainer.callback_metrics.items()},
        "device": str(module.device),
        "world_size": trainer.world_size,
    }
    if phase:
        summary["phase"] = phase
    if hand_off and cfg.trainer.fast_dev_run:
        trainer.save_checkpoint(out / "checkpoints" / "best.ckpt")
    if trainer.is_global_zero and not cfg.trainer.fast_dev_run:
        write_json_atomic(out / SUMMARY, summary)
    return summary


def _to_float(v) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def train_from_args(
    stage: str, experiment: str | None, overrides: list[str], resume: str | None, debug: str | None = None
) -> dict:
    ov = list(overrides)
    if resume:
        ov.append(f"run.resume={resume}")
    cfg = load_config(stage, experiment, ov, debug=debug)
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    return train(cfg)

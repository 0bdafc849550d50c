"""Typed experiment configs: schema first, then base, stage, experiment, overrides.

The schema is a tree of dataclasses, so a misspelt or unknown key fails at load
time with the closest valid keys named, instead of being silently ignored.
Each stage registers the dataclass of its `model` section (see
lightning_modules.registry); everything else is shared.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from amodal3d.errors import ConfigError  # re-exported: amodal3d.config.ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO_ROOT / "experiments"


@dataclass
class DataConfig:
    """What dataset to build (`make data`) and read (training, bench)."""

    root: str = "data/synth13-erase"
    source: str = "synth13"  # synth13 | nmr | shapenet (objects, composited) | kins | kins2020 | cocoa | coco_amodal (imported)
    source_path: str = ""  # folder of the nmr npz files, the ShapeNetCore tree, or an imported dataset's images
    # imported sources: the annotation file of each split ({train: .., val: .., test: ..}); a split without one
    # is not built
    annotations: dict[str, str] = field(default_factory=dict)
    val_fraction: float = 0.0  # imported sources without a val file: this share of train (by image-id hash) is val
    # the category table of the dataset read (filled from its manifest by train, bench and predict; empty: the 13
    # ShapeNet categories). Saved in every run's config, so a checkpoint knows its classes without the disk
    class_names: list[str] = field(default_factory=list)
    split_file: str = ""  # shapenet: ShapeNet's official split CSV instead of the id hash (docs/data.md)
    categories: list[str] = field(default_factory=lambda: ["all"])
    objects_per_split: dict[str, int] = field(
        default_factory=lambda: {"train": 40, "val": 6, "test": 8}
    )
    views: int = 24
    render_size: int = 64
    composite: str = "erase"  # erase | paste
    image_size: int = 64
    occluders_min: int = 1
    occluders_max: int = 2
    occlusion_min: float = 0.1
    occlusion_max: float = 0.7
    paste_objects_min: int = 2
    paste_objects_max: int = 4
    paste_images_per_split: dict[str, int] = field(
        default_factory=lambda: {"train": 4000, "val": 500, "test": 1000}
    )
    shard_size: int = 4096
    seed: int = 0


@dataclass
class LoaderConfig:
    """How instances are cropped and batched."""

    batch_size: int = 32
    num_workers: int = 2
    crop_size: int = 64
    crop_margin: float = 1.15  # gt-box: crop side = amodal box's longer side x this
    visible_crop_margin: float = 2.5  # gt-visible: crop side = visible box's longer side x this (val: 98.2% covered)
    views_per_item: int = 1  # >1: train items hold k views of one object (recon's cross-view loss)
    pin_memory: bool = False
    persistent_workers: bool = True


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer (subset that experiments need)."""

    max_epochs: int = 10
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 20
    fast_dev_run: Any = False
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    val_check_interval: Any = 1.0
    check_val_every_n_epoch: int = 1
    gradient_clip_val: Any = None
    deterministic: bool = False
    enable_progress_bar: Any = None  # None: bars on a terminal, plain lines otherwise


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"  # cosine (per optimizer step over the run) | cosine_epoch | none


@dataclass
class RunConfig:
    """Where the run folder lives and how it is named."""

    root: str = "runs"
    run_id: str = ""  # empty: a timestamp; under SLURM: $SLURM_JOB_ID
    resume: str = ""  # a run id of the same experiment and stage
    monitor: str = "val/miou"
    monitor_mode: str = "max"
    image_log_every_n_epochs: int = 1
    # how often the non-finite-loss flag is read on the host: 1 = before every optimizer step
    # (exact; a host sync per step), n > 1 = every n steps and before each checkpoint (GPU runs)
    finite_check_every_n_steps: int = 1
    checkpoints: dict[str, str] = field(default_factory=dict)  # stage -> ckpt path override


@dataclass
class BenchConfig:
    """How `make bench` runs the trained methods (not how they train)."""

    # renders no gradient flows through, in every 3D row: checkpoint (each checkpoint's
    # model.silhouette_without_grad; soft for checkpoints older than the key) | hard | soft
    # (the path before hard silhouettes existed)
    silhouettes: str = "checkpoint"
    # the renderers' per-face window maths through torch.compile in every 3D row (same
    # values, faster; the first call of each process compiles): checkpoint (each
    # checkpoint's model.renderer_compiled) | true | false
    renderer_compiled: str = "checkpoint"
    # soft renders without gradient on the CPU by the C++ kernel of models/native_silhouette.py
    # in every 3D row (same values within 2e-6): checkpoint (each checkpoint's
    # model.renderer_native; on for checkpoints older than the key) | true | false
    renderer_native: str = "checkpoint"
    # the encoders' backbones with BatchNorm folded in, channels-last, in eval mode without
    # gradient (models/encoder.py; the same function up to float rounding): checkpoint (the
    # encoders' default: on) | true | false
    fused_encoders: str = "checkpoint"


@dataclass
class Config:
    stage: str = "recon"
    experiment: str = "default"
    protocol: str = "gt-visible"  # gt-visible | gt-box (amodal3d.protocols): what a method is handed
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    model: Any = None




def _valid_keys(node: Any, dotted: str) -> list[str]:
    """Keys valid at the parent of `dotted` in the schema (for suggestions)."""
    parts = dotted.split(".")[:-1]
    for p in parts:
        if isinstance(node, DictConfig) and p in node:
            node = node[p]
        else:
            return []
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        valid = _valid_keys(schema, key)
        leaf = key.split(".")[-1]
        close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return ConfigError(
            f"{origin}: unknown config key '{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}"
        )
    msg = str(err.msg if hasattr(err, "msg") else err).strip().splitlines() or [type(err).__name__]
    return ConfigError(f"{origin}: invalid value for '{key}': {msg[0]}")  # the first line says it all


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        raise _explain(err, base, origin) from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def stage_file(stage: str) -> Path:
    return EXPERIMENTS_DIR / "stage" / f"{stage}.yaml"


def experiment_file(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    return EXPERIMENTS_DIR / "exp" / f"{name}.yaml"


def load_config(
    stage: str | None,
    experiment: str | None = None,
    overrides: list[str] | None = None,
    model_schema: type | None = None,
    debug: str | None = None,
) -> DictConfig:
    """Schema -> base.yaml -> stage/<stage>.yaml -> exp/<experiment>.yaml (its shared part,
    then its `stages.<stage>` section) -> debug/<debug>.yaml -> command-line dot-overrides.

    stage=None loads only the shared sections (for `make data`, `validate`, `bench`);
    an experiment file's `model` section is then ignored.
    """
    if stage is None:
        model_schema = object
    elif model_schema is None:
        from amodal3d.lightning_modules.registry import get_stage

        try:
            model_schema = get_stage(stage).model_schema
        except ValueError as err:  # an unknown stage name: the message lists the valid ones
            raise ConfigError(f"--stage {stage}: {err}") from None
    schema = OmegaConf.structured(Config)
    schema.model = OmegaConf.structured(model_schema) if is_dataclass(model_schema) else {}
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.run.checkpoints, False)  # keyed by stage name: run.checkpoints.<stage>=<ckpt>
    OmegaConf.set_struct(schema.data.annotations, False)  # keyed by split: data.annotations.<split>=<json>
    cfg = _merge(schema, _load_yaml(EXPERIMENTS_DIR / "base.yaml"), "experiments/base.yaml")
    sf = stage_file(stage) if stage else None
    if sf is not None and sf.is_file():
        cfg = _merge(cfg, _load_yaml(sf), str(sf.relative_to(REPO_ROOT)))
    if experiment:
        ef = experiment_file(experiment)
        if not ef.is_file():
            avail = sorted(p.stem for p in (EXPERIMENTS_DIR / "exp").glob("*.yaml"))
            raise ConfigError(
                f"experiment {experiment!r} not found at {ef}; available: {', '.join(avail)}"
            )
        exp_cfg = _load_yaml(ef)
        per_stage = exp_cfg.pop("stages", None)  # stages.<stage>: what only that stage changes here
        if per_stage is not None and not isinstance(per_stage, DictConfig):
            raise ConfigError(f"{ef}: 'stages' must map stage names to config sections")
        if per_stage is not None:
            from amodal3d.lightning_modules.registry import available_stages

            unknown = sorted(set(map(str, per_stage)) - set(available_stages()))
            if unknown:
                raise ConfigError(f"{ef}: stages.{unknown[0]} is not a stage; stages: {', '.join(available_stages())}")
        if stage is None and "model" in exp_cfg:  # stage-less commands (data, bench) have no model
            exp_cfg.pop("model")
        cfg = _merge(cfg, exp_cfg, str(ef))
        if stage and per_stage is not None and stage in per_stage:
            cfg = _merge(cfg, per_stage[stage], f"{ef} stages.{stage}")
        cfg.experiment = Path(experiment).stem
    if debug:
        df = EXPERIMENTS_DIR / "debug" / f"{debug}.yaml"
        if not df.is_file():
            avail = sorted(p.stem for p in (EXPERIMENTS_DIR / "debug").glob("*.yaml"))
            raise ConfigError(f"debug preset {debug!r} not found at {df}; available: {', '.join(avail)}")
        cfg = _merge(cfg, _load_yaml(df), str(df.relative_to(REPO_ROOT)))
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.path=value")
        key, value = ov.split("=", 1)
        if value.startswith("{") and value.endswith("}"):
            # a flow mapping typed without spaces ({train:1,val:0}, as a shell passes it whole)
            # means {train: 1, val: 0}: no key of ours holds a colon
            value = re.sub(r"([:,])(?=\S)", r"\1 ", value)
        try:
            dotted = OmegaConf.from_dotlist([f"{key}={value}"])
        except Exception as err:
            raise ConfigError(f"override {ov!r}: {err}") from None
        cfg = _merge(cfg, dotted, f"override {ov!r}")
    if stage:
        cfg.stage = stage
    OmegaConf.resolve(cfg)
    from amodal3d.protocols import PROTOCOLS

    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={cfg.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    check_values(cfg)
    return cfg


#: keys that count something and must be >= 1 (objects_per_split may hold 0: a split not built)
POSITIVE_KEYS = (
    "data.views", "data.render_size", "data.image_size", "loader.batch_size", "loader.crop_size",
    "trainer.max_epochs", "run.finite_check_every_n_steps", "run.image_log_every_n_epochs",
)


def check_values(cfg: DictConfig) -> None:
    """Values a type check lets through but no run can use: a non-finite number anywhere,
    a negative count, a zero size or batch."""
    def walk(node, prefix):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, DictConfig):
                walk(value, dotted + ".")
            elif isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{dotted}={value}: must be a finite number")

    walk(cfg, "")
    for dotted in POSITIVE_KEYS:
        value = OmegaConf.select(cfg, dotted)
        if value is not None and int(value) < 1:
            raise ConfigError(f"{dotted}={value}: must be at least 1")
    for split, n in (OmegaConf.select(cfg, "data.objects_per_split") or {}).items():
        if int(n) < -1:
            raise ConfigError(f"data.objects_per_split.{split}={n}: must be -1 (every model of a real source), "
                              "0 (the split is not built) or a positive count")


def dataclass_keys(dc: type) -> list[str]:
    return [f.name for f in fields(dc)]


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config atomically."""
    from amodal3d.atomic import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))

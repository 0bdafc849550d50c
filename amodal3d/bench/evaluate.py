"""Find the trained methods, load them, and score them on the test split under the
config's protocol (amodal3d.protocols).

Scoring goes through the stage's own `evaluate_batch` (the code validation
uses), so the table and the training curves cannot disagree on the protocol.
The reference rows (amodal3d.bench.reference) need no training and come first.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf

from amodal3d.bench.table import NEEDS_DETECT, NOT_TRAINED, MethodResult
from amodal3d.categories import check_class_names, class_names, resolve_class_names
from amodal3d.config import REPO_ROOT
from amodal3d.errors import ConfigError
from amodal3d.runs import best_checkpoint, find_stage_checkpoint
from amodal3d.bench.reference import FLOOR, VisibleFloor, reference_modules
from amodal3d.protocols import protocol_of
from amodal3d.lightning_modules.common import AmodalStage



@dataclass
class MethodEntry:
    """A row to evaluate: a registered method's stage and its checkpoint (or why not).

    load(cfg, device): how to build the module when the row is not simply the
    stage's checkpoint (the Ours rows, amodal3d.bench.ours).
    """

    name: str
    stage: str | None
    checkpoint: Path | None = None
    status: str = "ok"
    load: Callable | None = None
    protocol: str | None = None  # a named run's protocol (None: that of the experiment it was found in)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def _run_of(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) of a run folder or a checkpoint path named on the command line."""
    if path.is_file() and path.suffix == ".ckpt":
        return path.parent.parent, path
    if path.is_dir():
        ckpt = best_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"run {path} has no checkpoints/best.ckpt or last.ckpt")
        return path, ckpt
    raise FileNotFoundError(f"--runs {path}: not a run folder or a .ckpt file")


def named_methods(paths: list[str]) -> list[MethodEntry]:
    """Rows for runs named on the command line (run folders or checkpoints)."""
    from amodal3d.lightning_modules.registry import get_stage

    out = []
    for p in paths:
        run, ckpt = _run_of(Path(p))
        cfg_path = run / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--runs {p}: {cfg_path} is missing, cannot tell which stage trained it")
        run_cfg = OmegaConf.load(cfg_path)
        stage = str(run_cfg.stage)
        spec = get_stage(stage)
        out.append(MethodEntry(name=f"{spec.method or stage} [{run.name}]", stage=stage, checkpoint=ckpt,
                               protocol=protocol_of(run_cfg)))
    return out


def discover_methods(experiment: str, root: str) -> list[MethodEntry]:
    """Every registered method (stage with a table row), with the best checkpoint of its
    latest run under runs/<experiment>/<stage>/, or marked "not trained"."""
    from amodal3d.lightning_modules.registry import available_stages, get_stage

    out: list[MethodEntry] = []
    specs = []
    for stage in available_stages():
        try:
            spec = get_stage(stage)
        except Exception as err:  # a broken stage module keeps a row, with the reason
            print(f"[bench] warning: stage {stage!r} cannot be imported: {err}", file=sys.stderr)
            out.append(MethodEntry(name=stage, stage=stage, status=f"error: import failed: {err}"))
            continue
        if spec.method is not None:
            specs.append(spec)
    for spec in sorted(specs, key=lambda sp: (sp.table_order, sp.name)):
        stage = spec.name
        if spec.data == "images":  # detectors: their rows come from the detect protocol
            out.append(MethodEntry(name=spec.method, stage=stage, status=NEEDS_DETECT))
            continue
        try:
            ckpt = find_stage_checkpoint(stage, experiment, root)
            out.append(MethodEntry(name=spec.method, stage=stage, checkpoint=ckpt))
        except FileNotFoundError:
            out.append(MethodEntry(name=spec.method, stage=stage, status=NOT_TRAINED))
    from amodal3d.bench.ours import ours_rows

    out += [MethodEntry(name=row.name, stage=row.stage, checkpoint=row.checkpoint, status=row.status, load=row.load)
            for row in ours_rows(experiment, root)]  # Ours and its true-camera variant come last
    seen: dict[str, int] = {}
    for e in out:  # two stages reporting the same method name get told apart
        seen[e.name] = seen.get(e.name, 0) + 1
    for e in out:
        if seen[e.name] > 1:
            e.name = f"{e.name} ({e.stage})"
    return out


def dataset_class_names(cfg: DictConfig) -> tuple[str, ...]:
    """The category table of the dataset the bench scores (built first if missing), set into
    cfg.data.class_names: the metric sizes, the table's columns and the checkpoint checks
    of the bench all read it from there."""
    from amodal3d.datamodules.build import ensure_dataset

    return resolve_class_names(cfg, ensure_dataset(cfg.data))


def check_module_classes(module, checkpoint, cfg: DictConfig) -> None:
    """A module restored from `checkpoint` scores only the dataset of its own category table
    (ConfigError naming both otherwise); cfg: the bench config, resolved (dataset_class_names)."""
    check_class_names(checkpoint, class_names(module.cfg), class_names(cfg), str(cfg.data.root))


def bench_render_settings(cfg: DictConfig | None) -> dict[str, str]:
    """{"silhouettes", "renderer_compiled", "renderer_native", "fused_encoders"} of a bench config:
    "checkpoint" (each checkpoint's own setting) or the value every 3D row is switched to
    (hard | soft; true | false — YAML reads on/off as true/false); ConfigError names a bad one."""
    bench = cfg.bench if cfg is not None and "bench" in cfg else {}
    mode = str(bench.get("silhouettes", "checkpoint"))
    if mode not in ("checkpoint", "hard", "soft"):
        raise ConfigError(f"bench.silhouettes={mode!r}: expected checkpoint, hard or soft")
    settings = {"silhouettes": mode}
    for key in ("renderer_compiled", "renderer_native", "fused_encoders"):
        value = str(bench.get(key, "checkpoint"))
        if value.lower() not in ("checkpoint", "true", "false"):
            raise ConfigError(f"bench.{key}={value!r}: expected checkpoint, true or false")
        settings[key] = value.lower()
    return settings


def load_method(entry: MethodEntry, device: torch.device, cfg: DictConfig | None = None) -> AmodalStage:
    """The stage module of `entry` restored from its checkpoint (or built by its own
    `load`), in eval mode on `device`. With the bench config `cfg`: refused (ConfigError) when
    trained on another category table than cfg's dataset, or under another protocol; its
    renders without gradient switched to cfg.bench.silhouettes, its renderers' compilation
    to cfg.bench.renderer_compiled, their native kernel to cfg.bench.renderer_native and
    its encoders' folded backbones to cfg.bench.fused_encoders, unless they are "checkpoint"."""
    from amodal3d.lightning_modules.registry import get_stage

    if entry.load is not None:
        module = entry.load(cfg, device)
    else:
        spec = get_stage(entry.stage)
        module = spec.module.load_from_checkpoint(str(entry.checkpoint), map_location=device)
    if not isinstance(module, AmodalStage):
        raise TypeError(f"stage {entry.stage!r}: {type(module).__name__} is not an AmodalStage, "
                        "it cannot be scored per instance")
    if cfg is not None:
        dataset_class_names(cfg)
        check_module_classes(module, entry.checkpoint or entry.name, cfg)
    if cfg is not None and protocol_of(module.cfg) != protocol_of(cfg):
        raise ValueError(f"{entry.name}: trained under protocol {protocol_of(module.cfg)}, benchmarked under "
                         f"{protocol_of(cfg)}; benchmark it with --protocol {protocol_of(module.cfg)}")
    from amodal3d.models.encoder import set_fused_inference
    from amodal3d.models.mesh_renderer import set_renderer_compiled, set_renderer_native, set_silhouettes_without_grad

    settings = bench_render_settings(cfg)
    if settings["silhouettes"] != "checkpoint":
        set_silhouettes_without_grad(module, settings["silhouettes"])
    for key, switch in (("renderer_compiled", set_renderer_compiled), ("renderer_native", set_renderer_native),
                        ("fused_encoders", set_fused_inference)):
        if settings[key] != "checkpoint":
            switch(module, settings[key] == "true")
    return module.to(device).eval()


def floor_module(cfg: DictConfig, device: torch.device) -> VisibleFloor:
    cfg = OmegaConf.merge(cfg, {"stage": FLOOR})
    return VisibleFloor(cfg).to(device).eval()


def eval_loader(cfg: DictConfig, split: str = "test"):
    """A split's crop loader (in order, each instance once) of the config's dataset,
    built first if missing (its category table set into cfg, dataset_class_names)."""
    from amodal3d.datamodules.crops import CropDataModule

    dataset_class_names(cfg)
    dm = CropDataModule(cfg.data, OmegaConf.merge(cfg.loader, {"persistent_workers": False}),
                        protocol=protocol_of(cfg))
    return dm.make_loader(dm.dataset(split), split)


@torch.no_grad()
def evaluate_module(module: AmodalStage, loader, device: torch.device, max_batches: int | None = None) -> dict:
    """AmodalMIoU.compute() of `module` over `loader` (one row per category of the module's
    table, which load_method checked is the dataset's), plus seconds and instances."""
    from amodal3d.metrics.amodal_iou import AmodalMIoU

    metric = AmodalMIoU(num_categories=len(class_names(module.cfg))).to(device)
    module.eval()
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        module.evaluate_batch(move_data_to_device(batch, device), metric)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res = {k: v.cpu() for k, v in metric.compute().items()}
    res["seconds"] = time.perf_counter() - t0
    return res


def evaluate_all(
    cfg: DictConfig,
    entries: list[MethodEntry],
    device: torch.device,
    max_batches: int | None = None,
    with_floor: bool = True,
) -> list[MethodResult]:
    """The table's rows: the protocol's reference rows first (with_floor), then every
    entry (evaluated or marked)."""
    loader = eval_loader(cfg)
    rows: list[MethodResult] = []
    todo: list[tuple[MethodEntry, AmodalStage | None]] = []
    if with_floor:
        todo += [(MethodEntry(name, None), module) for name, module in reference_modules(cfg, device)]
    from amodal3d.bench.ours import OURS_TRUE_CAMERA, TRUE_CAMERA_UNDEFINED, dataset_has_cameras

    for e in entries:
        if e.status != "ok":
            rows.append(MethodResult(name=e.name, stage=e.stage, status=e.status))
            continue
        if e.name == OURS_TRUE_CAMERA and not dataset_has_cameras(cfg):
            rows.append(MethodResult(name=e.name, stage=e.stage, status=TRUE_CAMERA_UNDEFINED))
            continue
        todo.append((e, None))
    evaluated = []
    for e, module in todo:
        name, stage, ckpt = e.name, e.stage, e.checkpoint
        try:
            module = module if module is not None else load_method(e, device, cfg)
            res = evaluate_module(module, loader, device, max_batches)
        except Exception as err:
            print(f"[bench] {name}: evaluation failed: {err!r}", file=sys.stderr)
            evaluated.append(MethodResult(name=name, stage=stage, status=f"error: {err!r}",
                                          checkpoint=str(ckpt or "")))
            continue
        print(f"[bench] {name}: mIoU {100 * float(res['miou']):.1f} ({res['seconds']:.1f}s)", flush=True)
        evaluated.append(MethodResult.from_metric(
            name, res, stage=stage, checkpoint=relative_to_repo(ckpt), seconds=res["seconds"],
            reference=stage is None))
    # the reference rows first, then evaluated methods, then those that could not be evaluated
    return evaluated + rows


def relative_to_repo(p: Path | None) -> str:
    """A checkpoint path relative to the repo root when inside it (shorter table notes)."""
    if p is None:
        return ""
    try:
        return str(Path(p).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)

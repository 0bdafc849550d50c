"""Stage registry: a stage name maps to its LightningModule, config schema and data.

Stages are discovered by convention, so adding one needs no central edit: the
module `lightning_modules/<name>.py` (or `lightning_modules/baselines/<name>.py`)
defines `STAGE = StageSpec(...)`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

_PACKAGES = ("amodal3d.lightning_modules", "amodal3d.lightning_modules.baselines")
_NOT_STAGES = {"registry", "common", "checkpoints", "detector"}


@dataclass(frozen=True)
class Phase:
    """One phase of a stage trained in several (VRSP: prior, codebook, final).

    configure(cfg, run_folder) -> the phase's config (it gets a copy to edit);
    run(cfg, folder) -> summary dict: a phase without a Trainer (it writes
    folder/summary.json when done); without `run` the phase is a Lightning fit. Every
    phase but the last lives in run_folder/phases/<name>/; the last is the run itself.
    """

    name: str
    configure: Callable
    run: Callable | None = None


@dataclass(frozen=True)
class StageSpec:
    """What the runner needs to know about a stage.

    module: the LightningModule class, constructed as module(cfg).
    model_schema: dataclass of the config's `model` section.
    data: "crops" (per-instance crops) or "images" (whole images, detection).
    depends_on: stages whose frozen checkpoints this one consumes (listed by `make stages`).
    dependencies: dependencies(cfg, find) -> {stage: checkpoint path or None}: which of
        them this config needs, from which experiment, and which are optional. The
        runner calls it (find searches finished runs) and puts the paths in
        run.checkpoints before building the module, which only reads them.
    method: the row name in the results table (None: not a benchmarked method).
    table_order: where its row goes in the results table (baselines first, then the
        pipeline in order; the bench's Ours rows come last).
    phases: a stage trained in several phases by one `make train` (see Phase).
    targets: the labels a supervised stage trains on beyond the protocol's inputs
        (amodal3d.protocols.TRAINING_TARGETS): ("amodal",) gives its training and
        validation batches the amodal mask under a training key; an unsupervised stage
        declares none, so its batches hold amodal masks only as evaluation-only eval_* keys.
    """

    name: str
    module: type
    model_schema: type
    data: str = "crops"
    depends_on: tuple[str, ...] = ()
    dependencies: Callable | None = None
    method: str | None = None
    table_order: int = 100
    help: str = ""
    phases: tuple[Phase, ...] = ()
    targets: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def _module_names() -> list[str]:
    names = []
    for pkg in _PACKAGES:
        path = Path(importlib.import_module(pkg).__file__).parent
        for info in pkgutil.iter_modules([str(path)]):
            if not info.ispkg and info.name not in _NOT_STAGES and not info.name.startswith("_"):
                names.append(f"{pkg}.{info.name}")
    return names


def available_stages() -> list[str]:
    """Names of every stage module present (without importing them)."""
    return sorted(n.rsplit(".", 1)[1] for n in _module_names())


def get_stage(name: str) -> StageSpec:
    """The StageSpec of `name`, with a clear error listing the valid stages."""
    for mod_name in _module_names():
        if mod_name.rsplit(".", 1)[1] == name:
            spec = getattr(importlib.import_module(mod_name), "STAGE", None)
            if not isinstance(spec, StageSpec):
                raise RuntimeError(f"{mod_name} does not define STAGE = StageSpec(...)")
            return spec
    from amodal3d.errors import ConfigError

    raise ConfigError(
        f"unknown stage {name!r}: available stages are {', '.join(available_stages())}"
    )

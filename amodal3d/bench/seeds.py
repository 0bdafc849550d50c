"""Seeds of the refine family (`make bench` part `seeds`): mean ± std per row, and which
differences are beyond the seeds' spread.

The rows that differ by a point or two (the 2D-only network, refine on the frozen 3D
prior, joint, Ours) are each trained once per seed, one seed per experiment
(`experiments/exp/seed1.yaml`, ...; all over the same frozen recon chain), and scored
on the test split. A difference between two rows counts as significant only when it
is at least twice the larger of their standard deviations; the reference rows need no
training and have no spread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from amodal3d.bench.evaluate import relative_to_repo

SEEDED_STAGES = ("refine_2d", "refine", "joint")


@dataclass
class SeedRow:
    name: str
    runs: list[dict] = field(default_factory=list)  # experiment, seed, checkpoint, miou, miou_occ
    reference: bool = False

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.runs]

    def mean(self, key: str) -> float:
        v = self.values(key)
        return statistics.fmean(v) if v else math.nan

    def std(self, key: str) -> float:
        """Sample standard deviation (n - 1); 0 for a reference row, NaN with one run."""
        if self.reference:
            return 0.0
        v = self.values(key)
        return statistics.stdev(v) if len(v) > 1 else math.nan


def _seed_of(checkpoint) -> int | None:
    cfg_path = checkpoint.parent.parent / "config.yaml"
    return int(OmegaConf.load(cfg_path).seed) if cfg_path.is_file() else None


def seed_results(cfg, experiments: list[str], device: torch.device, max_batches: int | None = None
                 ) -> tuple[list[SeedRow], list[SeedRow]]:
    """(seeded rows, reference rows) on the test split of cfg's protocol."""
    from amodal3d.bench.evaluate import MethodEntry, eval_loader, evaluate_module, load_method
    from amodal3d.bench.reference import reference_modules
    from amodal3d.runs import find_stage_checkpoint
    from amodal3d.bench.ours import OURS, ours_checkpoint
    from amodal3d.lightning_modules.registry import get_stage

    loader = eval_loader(cfg)
    refs = []
    for name, module in reference_modules(cfg, device):
        res = evaluate_module(module, loader, device, max_batches)
        refs.append(SeedRow(name, [{"experiment": "-", "seed": None, "checkpoint": "", "miou": float(res["miou"]),
                                    "miou_occ": float(res["miou_occ"])}], reference=True))
    rows = {s: SeedRow(get_stage(s).method or s) for s in SEEDED_STAGES}
    ours = SeedRow(OURS)
    for exp in experiments:
        scored = {}
        for stage in SEEDED_STAGES:
            try:
                ckpt = find_stage_checkpoint(stage, exp, cfg.run.root)
            except FileNotFoundError:
                continue
            entry = MethodEntry(rows[stage].name, stage, ckpt)
            res = evaluate_module(load_method(entry, device, cfg), loader, device, max_batches)
            run = {"experiment": exp, "seed": _seed_of(ckpt), "checkpoint": relative_to_repo(ckpt),
                   "miou": float(res["miou"]), "miou_occ": float(res["miou_occ"])}
            rows[stage].runs.append(run)
            scored[stage] = run
            print(f"[bench] seeds {exp} {stage}: mIoU {100 * run['miou']:.1f}", flush=True)
        try:
            stage, _ = ours_checkpoint(exp, cfg.run.root)
        except FileNotFoundError:
            continue
        if stage in scored:
            ours.runs.append(dict(scored[stage], stage=stage))
    return [r for r in (*rows.values(), ours) if r.runs], refs


def _pm(row: SeedRow, key: str) -> str:
    m, s = row.mean(key), row.std(key)
    if not math.isfinite(m):
        return "—"
    return f"{100 * m:.1f}" if row.reference else (f"{100 * m:.1f} ± {100 * s:.1f}" if math.isfinite(s)
                                                  else f"{100 * m:.1f} (1 seed)")


def significance(a: SeedRow, b: SeedRow, key: str) -> tuple[float, float, bool | None]:
    """(mean difference a - b, twice the larger std, significant?) — None when a spread is unknown."""
    diff = a.mean(key) - b.mean(key)
    stds = (a.std(key), b.std(key))
    if not all(math.isfinite(s) for s in stds):
        return diff, math.nan, None
    spread = 2 * max(stds)
    return diff, spread, abs(diff) >= spread


def seeds_markdown(rows: list[SeedRow], references: list[SeedRow], meta: dict) -> str:
    protocol = meta.get("protocol", "")
    lines = [f"# Seeds, {protocol} protocol (test split)", "",
             "| method | seeds | mIoU | mIoU_occ | mIoU per seed |", "|---|---|---|---|---|"]
    for r in references + rows:
        per = "—" if r.reference else ", ".join(
            f"{100 * x['miou']:.1f} (seed {x['seed']}{', ' + x['stage'] if 'stage' in x else ''})" for x in r.runs)
        lines.append(f"| {r.name} | {'—' if r.reference else len(r.runs)} | {_pm(r, 'miou')} | "
                     f"{_pm(r, 'miou_occ')} | {per} |")
    ours = next((r for r in rows if r.name == "Ours"), None)
    if ours is not None:
        lines += ["", "Ours against each row (difference of the means; significant when at least twice the "
                  "larger standard deviation):", "",
                  "| Ours minus | ΔmIoU | 2·std | significant | ΔmIoU_occ | 2·std | significant |",
                  "|---|---|---|---|---|---|---|"]
        for r in references + rows:
            if r is ours:
                continue
            cells = []
            for key in ("miou", "miou_occ"):
                d, sp, sig = significance(ours, r, key)
                cells += [f"{100 * d:+.1f}", "—" if not math.isfinite(sp) else f"{100 * sp:.1f}",
                          "unknown (one seed)" if sig is None else ("yes" if sig else "no")]
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Setup", ""] + [f"- {k}: `{v}`" for k, v in meta.items()]
    return "\n".join(lines) + "\n"

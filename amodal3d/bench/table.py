"""The results table of `make bench`: rows, the exact layout of the reference table (docs/design.md), and the files.

The first table reproduces the seed table's layout exactly (method, the dataset's
categories in its table's order: for synth13, nmr and shapenet the 13 in seed order;
mIoU; % with one decimal). A category without test
instances shows "—" and is left out of the row's mean; a method that could not
be evaluated keeps its row, marked in the method cell. The occluded-region
figures (mIoU_occ) go in a second table of the same shape.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from amodal3d.atomic import write_text_atomic
from amodal3d.categories import CATEGORIES, display_name

MISSING = "—"
NOT_TRAINED = "not trained"
#: a Mask R-CNN-family row under a protocol that hands out no box to feed its RoI heads with
NEEDS_DETECT = "a detector: needs a box; scored under gt-box (fed the GT amodal boxes) and detect"


@dataclass
class MethodResult:
    """One row: a method's figures under one protocol (fractions in [0,1], NaN where absent).
    reference: a row that needs no training (amodal3d.bench.reference). The per-category lists
    follow the scored dataset's category table; a row without figures (not trained, failed)
    leaves them empty and is drawn as absent in every column."""

    name: str
    stage: str | None = None
    status: str = "ok"  # "ok" | "not trained" | "error: <why>"
    checkpoint: str = ""
    per_category: list[float] = field(default_factory=list)
    per_category_occ: list[float] = field(default_factory=list)
    miou: float = math.nan
    miou_occ: float = math.nan
    iou_dataset: float = math.nan
    count: list[int] = field(default_factory=list)
    seconds: float = math.nan
    reference: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def values(self, n: int, occluded: bool = False) -> list[float]:
        """The row's per-category figures for a table of n categories (NaN where it has none);
        a row of another length is a bug of its scorer, not a cell to leave blank."""
        values = list(self.per_category_occ if occluded else self.per_category)
        if not values:
            return [math.nan] * n
        if len(values) != n:
            raise ValueError(f"row {self.name!r}: {len(values)} per-category figures for a table of {n} categories")
        return values

    def counts(self, n: int) -> list[int]:
        """Test instances per category of a table of n categories (0 where the row has none)."""
        return list(self.count) if self.count else [0] * n

    @classmethod
    def from_metric(cls, name: str, res: dict, **kw) -> "MethodResult":
        """From AmodalMIoU.compute()'s dict (a one-category dataset's (1,) outputs come back 0-d from
        torchmetrics: flattened)."""
        def flat(x):
            return x.reshape(-1).tolist() if hasattr(x, "reshape") else list(x)

        return cls(
            name=name,
            per_category=[float(x) for x in flat(res["per_category"])],
            per_category_occ=[float(x) for x in flat(res["per_category_occ"])],
            miou=float(res["miou"]),
            miou_occ=float(res["miou_occ"]),
            iou_dataset=float(res["iou_dataset"]),
            count=[int(x) for x in flat(res["count"])],
            **kw,
        )


def pct(x: float) -> str:
    """A fraction as % with one decimal; absent values as "—"."""
    return MISSING if x is None or not math.isfinite(x) else f"{100.0 * x:.1f}"


def header(last: str = "mIoU", categories=CATEGORIES) -> list[str]:
    """The table's header cells: method, one column per category of the table (display names), `last`."""
    return ["method", *(display_name(c) for c in categories), last]


def _md_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _row_label(r: MethodResult) -> str:
    return r.name if r.ok else f"{r.name} ({r.status})"


def markdown_table(results: list[MethodResult], occluded: bool = False, categories=CATEGORIES) -> str:
    """The seed layout: `| method | Airplane | ... | Vessel | mIoU |` (or mIoU_occ), one column
    per category of the scored dataset's table (`categories`)."""
    n = len(categories)
    cols = header("mIoU_occ" if occluded else "mIoU", categories)
    lines = [_md_line(cols), "|" + "---|" * len(cols)]
    for r in results:
        if r.ok:
            values, mean = r.values(n, occluded), (r.miou_occ if occluded else r.miou)
        else:
            values, mean = [math.nan] * n, math.nan
        lines.append(_md_line([_row_label(r), *(pct(v) for v in values), pct(mean)]))
    return "\n".join(lines)


def csv_text(results: list[MethodResult], categories=CATEGORIES) -> str:
    """Every figure of every row (in %, three decimals; empty where absent), a column per category."""
    def num(x: float) -> str:
        return "" if not math.isfinite(x) else f"{100.0 * x:.3f}"

    n = len(categories)
    names = [display_name(c) for c in categories]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "stage", "status", "checkpoint", *names, "mIoU",
                *(f"occ_{n}" for n in names), "mIoU_occ", "iou_dataset", "instances", "eval_seconds"])
    for r in results:
        w.writerow([
            r.name, r.stage or "", r.status, r.checkpoint,
            *(num(v) for v in r.values(n)), num(r.miou),
            *(num(v) for v in r.values(n, occluded=True)), num(r.miou_occ), num(r.iou_dataset),
            sum(r.count), "" if not math.isfinite(r.seconds) else f"{r.seconds:.2f}",
        ])
    return buf.getvalue()


def notes(results: list[MethodResult], categories=CATEGORIES) -> list[str]:
    """Footnotes: categories absent from the test split, failed methods."""
    out = []
    counts = [r.counts(len(categories)) for r in results if r.ok and sum(r.count)]
    if counts:
        absent = [display_name(c) for c, n in zip(categories, counts[0]) if n == 0]
        if absent:
            out.append(f"No test instances of {', '.join(absent)}: shown as {MISSING}, and the mIoU is the "
                       f"mean over the {len(categories) - len(absent)} categories present.")
        out.append(f"Test instances: {sum(counts[0])} (per category: "
                   + ", ".join(f"{display_name(c)} {n}" for c, n in zip(categories, counts[0])) + ").")
    for r in results:
        if r.status == NOT_TRAINED:
            out.append(f"{r.name}: no checkpoint found; train it with `make train STAGE={r.stage}`.")
        elif not r.ok:
            out.append(f"{r.name}: {r.status}")
    return out


def results_markdown(results: list[MethodResult], meta: dict, extra_notes: list[str] | None = None,
                     appendix: str = "", categories=CATEGORIES) -> str:
    """One protocol's document, written to bench/results-<protocol>.md (and shown in TensorBoard);
    `categories`: the scored dataset's table (amodal3d.categories.class_names of the bench config)."""
    protocol = meta.get("protocol", "gt-visible")
    parts = [
        f"# Amodal mIoU, {protocol} protocol (test split)",
        "",
        markdown_table(results, categories=categories),
        "",
        f"## Occluded region only (mIoU_occ), {protocol}",
        "",
        markdown_table(results, occluded=True, categories=categories),
        "",
    ]
    refs = [r.name for r in results if r.reference]
    if refs:
        parts.append(f"- Reference rows (no training): {', '.join(refs)}.")
    parts += [f"- {n}" for n in notes(results, categories) + list(extra_notes or [])]
    if appendix:
        parts += ["", appendix]
    parts += ["", "## Setup", ""] + [f"- {k}: `{v}`" for k, v in meta.items()]
    return "\n".join(parts) + "\n"


def write_tensorboard_text(log_dir: Path, tag: str, text: str) -> None:
    """A markdown text summary TensorBoard shows under TEXT (one event file per call)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        writer.add_text(tag, text, global_step=0)
    finally:
        writer.close()


def write_results(out_dir: Path, results: list[MethodResult], meta: dict, extra_notes: list[str] | None = None,
                  appendix: str = "", categories=CATEGORIES) -> dict[str, Path]:
    """bench/results-<protocol>.md and .csv, and a TensorBoard text under bench/tb."""
    out_dir = Path(out_dir)
    protocol = meta.get("protocol", "gt-visible")
    md = results_markdown(results, meta, extra_notes, appendix, categories)
    paths = {"markdown": out_dir / f"results-{protocol}.md", "csv": out_dir / f"results-{protocol}.csv",
             "tensorboard": out_dir / "tb"}
    write_text_atomic(paths["markdown"], md)
    write_text_atomic(paths["csv"], csv_text(results, categories))
    write_tensorboard_text(paths["tensorboard"], f"bench/results/{protocol}", md)
    return paths

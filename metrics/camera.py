"""Camera errors of recon-style predictions against the true cameras (evaluation only).

Functional core (`camera_errors`, `camera_offsets` on per-instance rows) plus the
torchmetrics form (`CameraError`), which gathers the rows of every batch (and
process) before scoring them: the per-category azimuth offsets are fitted on all
rows at once, so the errors cannot be averaged batch by batch.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from amodal3d.models.recon_losses import azimuth_difference


def _offset_grids(rows: torch.Tensor, num_categories: int):
    """Per category present: (c, rows selected, (360, n) aligned errors for every azimuth
    offset, and the symmetry-aware ones or None): what camera_errors and camera_offsets pick from."""
    cat = rows[:, 0].long()
    pred, true = rows[:, 1:4], rows[:, 4:7]
    same = rows[:, 8:]
    known = ~torch.isnan(same).any(dim=1) if same.shape[1] else torch.zeros_like(cat, dtype=torch.bool)
    view_az = torch.arange(same.shape[1], dtype=rows.dtype, device=rows.device) * (360.0 / max(same.shape[1], 1))
    grid = torch.arange(360, dtype=rows.dtype, device=rows.device)
    for c in range(num_categories):
        sel = cat == c
        if not sel.any():
            continue
        shifted = pred[sel, 0][None] + grid[:, None]  # (360, n)
        err = azimuth_difference(shifted, true[sel, 0][None])
        sym = None
        if known[sel].any():
            to_views = azimuth_difference(shifted[..., None], view_az)  # (360, n, V)
            twins = torch.where(same[sel] == 1, to_views, torch.full_like(to_views, float("inf"))).amin(-1)
            sym = torch.where(known[sel][None], twins, err)
        yield c, sel, err, sym


def camera_offsets(rows: torch.Tensor, num_categories: int) -> dict[str, list[int]]:
    """Per-category azimuth offsets (degrees, 1 degree grid) that minimise the mean
    aligned and symmetry-aware errors of `rows` (camera_errors' layout); categories
    absent from rows get 0. Fit them on validation, apply them to test."""
    out = {"aligned": [0] * num_categories, "symaware": [0] * num_categories}
    for c, _, err, sym in _offset_grids(rows, num_categories):
        out["aligned"][c] = int(err.mean(dim=1).argmin())
        out["symaware"][c] = int((err if sym is None else sym).mean(dim=1).argmin())
    return out


def camera_errors(rows: torch.Tensor, num_categories: int, offsets: dict | None = None) -> dict[str, torch.Tensor]:
    """Camera and shape errors from per-instance rows (category, az, el, dist
    predicted, az, el, dist true, chamfer[, same-picture views]).

    The learned canonical frame of each category is arbitrary, so besides the raw
    azimuth error the errors are also reported after one global azimuth offset per
    category (on a 1 degree grid): by default the offset that minimises that
    category's mean error on the evaluated split itself (training curves); with
    `offsets` (camera_offsets of another split, e.g. validation) those offsets are
    applied instead, so the scored split decides nothing. acc30: share of instances within 30 deg;
    flip_share: share off by more than 135 deg (a front/back flip), quarter_share: off
    by 45-135 deg (the view turned by about a quarter); uniform guesses give 25% / 50%.
    az_err_aligned_sym folds front/back flips (min(e, 180 - e)) of every instance: a
    diagnostic for objects whose silhouettes are nearly the same from opposite sides.
    Optional columns 8.. (V of them): 1 for each of V equally spaced azimuths
    (360 k / V) whose view is the same picture as the true one (TrueMeshes.same_views;
    a NaN row: unknown). az_err_symaware is then the error to the nearest of those
    azimuths, with its own offset per category: the error no method can avoid is not
    counted, everything a method could see still is. views_with_twin: share of
    instances whose view has such a twin.
    """
    pred, true = rows[:, 1:4], rows[:, 4:7]
    same = rows[:, 8:]
    known = (~torch.isnan(same).any(dim=1) if same.shape[1]
             else torch.zeros(len(rows), dtype=torch.bool, device=rows.device))
    raw = azimuth_difference(pred[:, 0], true[:, 0])
    aligned, symaware = raw.clone(), raw.clone()
    offsets = offsets or camera_offsets(rows, num_categories)
    for c, sel, err, sym in _offset_grids(rows, num_categories):
        aligned[sel] = err[offsets["aligned"][c]]
        if sym is not None:
            symaware[sel] = sym[offsets["symaware"][c]]
    out = {
        "az_err_raw": raw.mean(),
        "az_err_aligned": aligned.mean(),
        "az_median_aligned": aligned.median(),
        "az_acc30_aligned": (aligned < 30).float().mean(),
        "az_flip_share": (aligned > 135).float().mean(),
        "az_quarter_share": ((aligned > 45) & (aligned <= 135)).float().mean(),
        "az_err_aligned_sym": torch.minimum(aligned, 180.0 - aligned).mean(),
        "el_err": (pred[:, 1] - true[:, 1]).abs().mean(),
        "dist_err": (pred[:, 2] - true[:, 2]).abs().mean(),
    }
    if known.any():
        out["az_err_symaware"] = symaware.mean()
        out["views_with_twin"] = ((same[known] == 1).sum(dim=1) > 1).float().mean()
    chamfer = rows[:, 7]
    if torch.isfinite(chamfer).any():
        out["chamfer"] = chamfer[torch.isfinite(chamfer)].mean()
    return out


class CameraError(Metric):
    """torchmetrics form of camera_errors: update(rows) with (B, 8[+V]) rows in its
    layout, compute() -> camera_errors of every row seen (under `offsets` if given;
    {} before any row). Unlike CatMetric it keeps NaN entries (unknown Chamfer,
    unknown same-picture views), which camera_errors reads as such."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_categories: int, offsets: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_categories = int(num_categories)
        self.offsets = offsets
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, rows: torch.Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] < 8:
            raise ValueError(f"rows: expected shape (B, 8[+V]) in camera_errors' layout, got {tuple(rows.shape)}")
        if rows.numel():
            self.rows.append(rows.to(self.dtype))

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.rows, list) and not self.rows:
            return {}
        rows = dim_zero_cat(self.rows)
        return camera_errors(rows, self.num_categories, self.offsets) if rows.numel() else {}

"""The evaluation-only true-camera variant of Ours: the prior's shape rendered from the
true camera, mapped into the learned canonical frame by per-category offsets fitted on
the validation split (the learned frame is arbitrary up to a rotation and a mirror)."""

from __future__ import annotations

import torch

from amodal3d.categories import CATEGORIES
from amodal3d.lightning_modules.refine import RefineStage, identity_camera_map


def fit_camera_map(category: torch.Tensor, pred: torch.Tensor, true: torch.Tensor,
                   num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """(C,4) camera map, C the module's categories, minimising the mean azimuth error per
    category (1 degree grid, both azimuth directions: the learned frame may be mirrored) plus
    the mean elevation and distance differences. Categories without rows keep the identity."""
    from amodal3d.models.recon_losses import azimuth_difference

    cmap = identity_camera_map(num_categories).to(pred.dtype)
    grid = torch.arange(360, dtype=pred.dtype)
    for c in range(int(num_categories)):
        sel = category.long().cpu() == c
        if not sel.any():
            continue
        p, t = pred[sel].cpu(), true[sel].cpu()
        best = None
        for sign in (1.0, -1.0):
            err = azimuth_difference(p[None, :, 0], sign * t[None, :, 0] + grid[:, None]).mean(1)
            k = int(err.argmin())
            if best is None or float(err[k]) < best[0]:
                best = (float(err[k]), sign, float(grid[k]))
        cmap[c] = torch.tensor([best[1], best[2], float((p[:, 1] - t[:, 1]).mean()), float((p[:, 2] - t[:, 2]).mean())])
    return cmap


@torch.no_grad()
def calibrate_true_camera(
    module: RefineStage, loader, device: torch.device, max_batches: int | None = None
) -> torch.Tensor:
    """Fit module.true_camera_map on `loader` (the validation split: evaluation only)
    and switch the module to camera_source='true'."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    if module.prior is None or not callable(getattr(module.prior, "camera", None)):
        raise TypeError(f"the 3D prior {type(module.prior).__name__} exposes no camera(batch): the true-camera "
                        "variant needs it to align the learned frame with the true one")
    cats, preds, trues = [], [], []
    module.eval()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = move_data_to_device(batch, device)
        preds.append(module.prior.camera(batch).float().cpu())
        trues.append(batch["eval_camera"].float().cpu())
        cats.append(batch["category"].cpu())
    if not preds:
        raise ValueError("calibrate_true_camera: the loader is empty")
    cmap = fit_camera_map(torch.cat(cats), torch.cat(preds), torch.cat(trues), len(module.class_names))
    module.true_camera_map = cmap.to(device)
    module.camera_source = "true"
    return cmap



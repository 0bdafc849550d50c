"""TensorBoard pictures of what a mask-predicting stage does on validation data.

Every `every_n_epochs` epochs, the first validation batch is shown as a grid, one
row per instance: the input crop, then the crop tinted with the visible mask
(green, occluded pixels grey), the prediction (red) and the amodal ground truth
(blue). Stages that also predict meshes (`predict_meshes(batch) -> (verts, faces)`)
get a few of them through SummaryWriter.add_mesh every `mesh_every_n_epochs`
epochs. Only global rank 0 writes, and only to a TensorBoard logger.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

GREEN = (0.1, 0.9, 0.1)
RED = (0.95, 0.1, 0.1)
BLUE = (0.1, 0.3, 1.0)
GREY = (0.5, 0.5, 0.5)


def tint(rgb: torch.Tensor, mask: torch.Tensor, color: tuple[float, float, float], alpha: float = 0.55) -> torch.Tensor:
    """(B,3,S,S) images with (B,1,S,S) masks in [0,1] blended in `color`."""
    c = torch.tensor(color, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    a = alpha * mask.to(rgb.dtype).clamp(0, 1)
    return rgb * (1 - a) + c * a


def overlay_rows(batch: dict, pred: torch.Tensor, max_items: int) -> torch.Tensor:
    """(3,H,W) grid: per instance [crop, visible (+occluded), prediction, amodal GT]."""
    n = min(max_items, pred.shape[0])
    rgb = batch["rgb"][:n].float().cpu()
    vis = batch["visible"][:n].float().cpu()
    pred = pred[:n].float().cpu()
    tiles = [rgb, tint(rgb, vis, GREEN)]
    if "occluder" in batch:
        tiles[1] = tint(tiles[1], batch["occluder"][:n].float().cpu(), GREY, 0.4)
    tiles.append(tint(rgb, pred, RED))
    if "eval_amodal" in batch:  # evaluation-only key: pictures, never losses
        tiles.append(tint(rgb, batch["eval_amodal"][:n].float().cpu(), BLUE))
    rows = torch.stack(tiles, dim=1).flatten(0, 1)  # item-major: one row per instance
    return make_grid(rows, nrow=len(tiles), padding=2, pad_value=1.0)


class TensorBoardImages(L.Callback):
    def __init__(self, every_n_epochs: int = 1, mesh_every_n_epochs: int = 5, max_items: int = 8, max_meshes: int = 4) -> None:
        if every_n_epochs < 1 or mesh_every_n_epochs < 1:
            raise ValueError(
                f"image/mesh logging intervals must be >= 1 epoch, got {every_n_epochs} and {mesh_every_n_epochs}"
            )
        self.every_n_epochs = every_n_epochs
        self.mesh_every_n_epochs = mesh_every_n_epochs
        self.max_items = max_items
        self.max_meshes = max_meshes
        self._last: dict[str, int] = {}  # kind -> epoch it was last logged

    def due(self, kind: str, epoch: int) -> bool:
        """Whether `kind` (images, meshes) is logged at this validation epoch: at the first
        validation of the run, then once at least its interval has passed since the last
        time. Validation need not fall on multiples of the interval (check_val_every_n_epoch,
        a short run), so a rule on `epoch % n` could never fire."""
        every = self.every_n_epochs if kind == "images" else self.mesh_every_n_epochs
        last = self._last.get(kind)
        return last is None or epoch - last >= every

    @staticmethod
    def _writer(trainer: L.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        want_images = self.due("images", epoch)
        want_meshes = hasattr(pl_module, "predict_meshes") and self.due("meshes", epoch)
        writer = self._writer(trainer)
        if writer is None or not (want_images or want_meshes):
            return
        for kind, wanted in (("images", want_images), ("meshes", want_meshes)):
            if wanted:
                self._last[kind] = epoch
        step = trainer.global_step
        with torch.no_grad():
            if want_images:
                pred = pl_module.predict_amodal(batch)
                writer.add_image("val/overlays", overlay_rows(batch, pred, self.max_items), step)
            if want_meshes:
                verts, faces = pl_module.predict_meshes(batch)
                n = min(self.max_meshes, verts.shape[0])
                faces = faces[None].expand(n, -1, -1) if faces.ndim == 2 else faces[:n]
                writer.add_mesh("val/meshes", vertices=verts[:n].float().cpu(), faces=faces.int().cpu(), global_step=step)

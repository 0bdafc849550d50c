"""TensorBoard images and meshes go out at validation epochs by a rule that fires at least
once in every run, whatever epochs validation runs on."""

from __future__ import annotations

from amodal3d.callbacks.tensorboard_images import TensorBoardImages
from amodal3d.config import load_config


def _fired(cb: TensorBoardImages, kind: str, epochs: list[int]) -> list[int]:
    out = []
    for e in epochs:
        if cb.due(kind, e):
            cb._last[kind] = e
            out.append(e)
    return out


def test_meshes_are_logged_on_the_default_recon_schedule():
    cfg = load_config("recon")
    every = int(cfg.trainer.check_val_every_n_epoch)
    val_epochs = [e for e in range(int(cfg.trainer.max_epochs)) if (e + 1) % every == 0]
    cb = TensorBoardImages(every_n_epochs=int(cfg.run.image_log_every_n_epochs),
                           mesh_every_n_epochs=int(cfg.model.mesh_log_every_n_epochs))
    assert val_epochs and _fired(cb, "meshes", val_epochs)[0] == val_epochs[0]
    assert _fired(TensorBoardImages(1, 5), "meshes", [1, 3]) == [1]  # what `epoch % 5 == 0` never logged
    assert _fired(TensorBoardImages(1, 5), "meshes", list(range(11))) == [0, 5, 10]
    assert _fired(TensorBoardImages(2, 5), "images", [1, 2, 3, 4, 7]) == [1, 3, 7]

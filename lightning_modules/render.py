"""Stage `render`: the predicted mesh, seen by the predicted camera, placed in the
instance's crop frame — the coarse amodal mask the refine stage consumes. The name is
step 4 of the method (differentiable rendering 3D -> 2D); what it trains is only the
placement of that rendering (below).

Everything 3D is frozen: the mesh comes from recon, the camera from recon's head
or from the viewpoint estimator (`model.camera_source`: `recon`, `viewpoint`, or
`auto` = the estimator when its checkpoint records a higher validation
visible-mask IoU of its render (outside the unknown pixels: no label) than
recon's own camera and was trained on the recon checkpoint in use;
the choice and its reason are printed and stored in the checkpoint). The mesh
and camera of the viewpoint checkpoint's own embedded recon are used together,
so the camera is always in the frame of the mesh it is applied to.

The trainable part is the placement (models.placement): the projection's box
is fitted onto the amodal box in the crop frame per axis (`model.fit: axes`, or
recon's single scale: `uniform`), then moved by a bounded residual (box scale and
shift) predicted from recon's crop feature. It learns only from what the
gt-visible protocol gives: the rendered silhouette must match the visible mask
outside the pixels known to be occluded (masked IoU + L2, as recon), and its
extent must stay on the amodal box. Validation logs val/miou (this stage's coarse
mask), val/miou_recon_render (recon's own rendering, for comparison) and the
label-free monitor val/visible_iou.

For other stages: `shape_prior_from_checkpoint(path)` returns the frozen ShapePrior
of a render checkpoint; `ShapePrior.coarse_mask(batch)` is the coarse mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchmetrics.aggregation import MeanMetric

from amodal3d.errors import ConfigError
from amodal3d.protocols import monitor_unknown, unknown_pixels
from amodal3d.lightning_modules.checkpoints import dependency, optional_dependency
from amodal3d.lightning_modules.common import AmodalStage, as_config
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.lightning_modules.viewpoint import (
    ViewpointStage,
    check_crop_geometry,
    load_recon_dependency,
    read_viewpoint_checkpoint,
)
from amodal3d.models.placement import FIT_MODES, placed_extent
from amodal3d.models.shape_prior import ShapePrior, freeze_
from amodal3d.models.recon_losses import resize_mask, silhouette_loss, visible_iou

CAMERA_SOURCES = ("auto", "recon", "viewpoint")


@dataclass
class RenderModelConfig:
    camera_source: str = "auto"  # auto | recon | viewpoint
    fit: str = "axes"  # axes: both sides of the amodal box | uniform: recon's single scale
    hidden: int = 64
    max_log_scale: float = 0.2  # residual box scale bound (log units)
    max_shift: float = 0.1  # residual box shift bound (in box sides)
    render_size: int = 32  # resolution of the training losses
    w_iou: float = 1.0
    w_mse: float = 1.0
    w_box: float = 1.0
    mesh_log_every_n_epochs: int = 5


# -- camera source ------------------------------------------------------------------------------


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def choose_camera_source(requested: str, recon_checkpoint: str | Path, viewpoint: dict | None) -> tuple[str, str]:
    """(source, reason). viewpoint: read_viewpoint_checkpoint(...) or None when there is none."""
    if requested not in CAMERA_SOURCES:
        raise ConfigError(f"model.camera_source={requested!r}: expected one of {', '.join(CAMERA_SOURCES)}")
    if requested == "recon":
        return "recon", "model.camera_source=recon"
    if requested == "viewpoint":
        if viewpoint is None:
            raise FileNotFoundError("model.camera_source=viewpoint but no viewpoint checkpoint was given")
        note = "" if _same_file(viewpoint["recon_checkpoint"], recon_checkpoint) else (
            f"; its embedded recon ({viewpoint['recon_checkpoint']}) is used, not {recon_checkpoint}")
        return "viewpoint", f"model.camera_source=viewpoint{note}"
    if viewpoint is None:
        return "recon", "auto: no viewpoint checkpoint"
    if not _same_file(viewpoint["recon_checkpoint"], recon_checkpoint):
        return "recon", (f"auto: the viewpoint checkpoint was trained on another recon checkpoint "
                         f"({viewpoint['recon_checkpoint']}); retrain viewpoint to use it")
    # label-free: how well each camera's render explains the visible mask outside the
    # unknown pixels on validation (no true camera is read)
    scores = viewpoint["camera_errors"]
    vp, rc = scores.get("visible_iou_viewpoint"), scores.get("visible_iou_recon")
    if vp is None or rc is None or not (math.isfinite(vp) and math.isfinite(rc)):
        return "recon", "auto: the viewpoint checkpoint records no validation visible IoUs (retrain viewpoint)"
    if vp > rc:
        return "viewpoint", f"auto: val visible-mask IoU {vp:.3f} (viewpoint) > {rc:.3f} (recon)"
    return "recon", f"auto: val visible-mask IoU {rc:.3f} (recon) >= {vp:.3f} (viewpoint)"


# -- the shape prior ----------------------------------------------------------------------------


# -- the stage ----------------------------------------------------------------------------------


def _check_model(m: DictConfig) -> None:
    if m.camera_source not in CAMERA_SOURCES:
        raise ConfigError(f"model.camera_source={m.camera_source!r}: expected one of {', '.join(CAMERA_SOURCES)}")
    if m.fit not in FIT_MODES:
        raise ConfigError(f"model.fit={m.fit!r}: expected one of {', '.join(FIT_MODES)}")
    if int(m.render_size) < 8:
        raise ConfigError(f"model.render_size={m.render_size}: use at least 8 pixels")


def resolve_prior(cfg: DictConfig) -> tuple[dict, dict[str, dict]]:
    """Load the checkpoints a fresh render stage builds on (run.checkpoints) and pick the camera source.

    Returns (deps for the hyperparameters, state dicts {"recon": ..., "viewpoint": ...})."""
    m = cfg.model
    recon_ckpt = dependency(cfg, "recon", "render")
    vp_ckpt, vp_info = None, None
    if m.camera_source == "viewpoint":
        vp_ckpt = dependency(cfg, "viewpoint", "render")
    elif m.camera_source == "auto":
        vp_ckpt = optional_dependency(cfg, "viewpoint", "render")
    if m.camera_source in ("auto", "viewpoint"):
        vp_info = read_viewpoint_checkpoint(vp_ckpt) if vp_ckpt is not None else None
    source, reason = choose_camera_source(str(m.camera_source), recon_ckpt, vp_info)
    states: dict[str, dict] = {}
    if source == "viewpoint":
        vstage = ViewpointStage.load_from_checkpoint(str(vp_ckpt), map_location="cpu")
        recon_spec, vp_spec = vstage.deps["recon"], vstage.net.spec
        states = {"recon": vstage.recon.state_dict(), "viewpoint": vstage.net.state_dict()}
    else:
        recon_net, recon_spec = load_recon_dependency(recon_ckpt)
        vp_spec = None
        states = {"recon": recon_net.state_dict()}
    spec = {
        "recon": recon_spec, "viewpoint": vp_spec, "camera_source": source, "fit": str(m.fit),
        "placement": {"hidden": int(m.hidden), "max_log_scale": float(m.max_log_scale),
                      "max_shift": float(m.max_shift)},
    }
    deps = {
        "spec": spec, "recon_checkpoint": str(Path(recon_ckpt).resolve()),
        "viewpoint_checkpoint": vp_info["checkpoint"] if vp_info else None,
        "camera_choice": reason, "viewpoint_camera_errors": vp_info["camera_errors"] if vp_info else {},
    }
    return deps, states


class RenderStage(AmodalStage):
    """The `render` stage (see the module docstring).

    deps: None when training starts (checkpoints are found and the camera source
    chosen); the stored choice when Lightning restores a checkpoint."""

    def __init__(self, cfg, deps: dict | None = None) -> None:
        super().__init__(cfg)
        cfg = as_config(cfg)
        self.m = cfg.model
        _check_model(self.m)
        states = None
        if deps is None:
            deps, states = resolve_prior(cfg)
            print(f"[render] camera source: {deps['spec']['camera_source']} ({deps['camera_choice']})", flush=True)
        check_crop_geometry(cfg, deps["spec"]["recon"])
        self.prior = ShapePrior(deps["spec"])
        if states is not None:
            self.prior.recon.load_state_dict(states["recon"])
            if self.prior.viewpoint is not None:
                self.prior.viewpoint.load_state_dict(states["viewpoint"])
        self.save_hyperparameters({"deps": deps})
        self.deps = deps
        from amodal3d.metrics.amodal_iou import AmodalMIoU

        # recon_render: recon's own rendering (its camera, single-scale fit), the row this stage improves on
        self.add_eval_metrics(visible_iou=MeanMetric,
                              recon_render=lambda: AmodalMIoU(num_categories=len(self.class_names)))
        self._last: dict | None = None

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        m = self.m
        size = int(m.render_size)
        out = self.prior(batch)
        sil = self.prior.render(out, size)[:, 0]
        target = resize_mask(batch["visible"], size)
        weight = 1.0 - resize_mask(unknown_pixels(batch), size)
        extent = placed_extent(out["verts"], out["camera"], out["place"], self.prior.recon.renderer.fov)
        losses = {
            "silhouette": silhouette_loss(sil, target, weight, float(m.w_iou), float(m.w_mse)).mean(),
            "box": (extent - out["box"]).abs().sum(dim=1).mean(),
        }
        loss = losses["silhouette"] + float(m.w_box) * losses["box"]
        b = sil.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=b)
        with torch.no_grad():
            self.log("train/residual_abs", out["residual"].abs().mean(), batch_size=b)
            self.log("train/visible_iou", visible_iou(sil, target, 1.0 - weight).mean(), batch_size=b)
        return loss

    # -- prediction -----------------------------------------------------------------------------
    def predict_amodal(self, batch: dict) -> torch.Tensor:
        out = self.prior(batch)
        sil = self.prior.render(out)
        self._last = {"out": out, "sil": sil}
        return sil

    def predict_meshes(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prior(batch)["verts"], self.prior.faces

    # -- evaluation -----------------------------------------------------------------------------
    def update_eval_metrics(self, batch: dict, batch_idx: int, split: str, metrics) -> None:
        from amodal3d.datamodules.crops import paste_crop_to_image

        metrics["visible_iou"].update(visible_iou(self._last["sil"], batch["visible"], monitor_unknown(batch)))
        # recon's own rendering (its camera, single-scale fit): the row this stage improves on
        recon = self.prior.recon
        if self.prior.viewpoint is None:  # same mesh and camera as ours: only the placement differs
            out = self._last["out"]
            plain = recon.render(out["verts"], out["camera"], out["box"], recon.crop_size)[:, None]
        else:
            plain = recon.silhouette(batch)
        h, w = batch["image_visible"].shape[-2:]
        image_prob = paste_crop_to_image(plain.float(), batch["crop_box"], h, w)
        metrics["recon_render"].update(image_prob > 0.5, batch["eval_image_amodal"] > 0.5,
                                       batch["image_visible"] > 0.5, batch["category"])

    def eval_logs(self, split: str, name: str, value) -> dict:
        if name == "recon_render":
            return {f"{split}/miou_recon_render": value["miou"], f"{split}/miou_occ_recon_render": value["miou_occ"]}
        return super().eval_logs(split, name, value)

    def configure_callbacks(self):
        return self.image_logging_callbacks(mesh_every_n_epochs=int(self.m.mesh_log_every_n_epochs))


# -- the API for the refine stage ---------------------------------------------------------------


def shape_prior_from_checkpoint(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> ShapePrior:
    """The frozen ShapePrior (eval mode, no gradients) of a render checkpoint."""
    stage = RenderStage.load_from_checkpoint(str(checkpoint), map_location=map_location)
    return freeze_(stage.prior)


def render_dependencies(cfg: DictConfig, find) -> dict:
    """recon always; viewpoint when the camera may come from it (optional under auto)."""
    deps = {"recon": find("recon", str(cfg.experiment))}
    source = str(cfg.model.camera_source)
    if source in ("auto", "viewpoint"):
        deps["viewpoint"] = find("viewpoint", str(cfg.experiment), required=source == "viewpoint")
    return deps


STAGE = StageSpec(
    name="render",
    module=RenderStage,
    model_schema=RenderModelConfig,
    data="crops",
    depends_on=("recon", "viewpoint"),
    dependencies=render_dependencies,
    method="render",
    table_order=30,
    help="step 4: trains the placement of the rendered silhouette (recon mesh under the better camera,"
    " model.camera_source) on the amodal box: the coarse amodal mask",
)

"""Stage `recon`: unsupervised single-view 3D reconstruction with a jointly learned camera.

From an instance crop (RGB + visible mask + occluded mask) one network predicts a
symmetric mesh (category template + bounded instance offsets) and a camera
(azimuth, elevation, distance). The mesh is rendered as a soft silhouette in the
crop frame (models.mesh_renderer: perspective camera, then the similarity that fits
the projection to a box: the amodal box under the gt-box protocol; under gt-visible
a box predicted from the crop feature as a bounded residual over the visible box)
and compared with the visible mask, ignoring the pixels whose content is unknown
(the batch's `unknown`: the eraser of the training composite). Nothing else
supervises it:

* cross-view: two crops of one object (rows 2i, 2i+1) swap shapes: view a's mesh
  under view b's camera must explain b's visible mask, and both predict the same
  instance offsets — so view changes must be explained by the camera, not the shape;
* camera cycle: the predicted mesh is re-rendered at a random camera, re-encoded,
  and the encoder must recover that camera and the same shape (SMR-style), which
  makes the camera a function of the silhouette instead of a free latent;
* priors: Laplacian, normal-consistency and edge regularisers on the mesh; azimuths
  of a batch spread over the circle; optionally a camera multiplex (K azimuth
  sectors: the hypothesis whose render fits the visible mask best is used, in
  training and at test time, and a score learns to rank it first);
* optionally (model.w_colour > 0) category colour templates (models.appearance): the
  colours where the visible vertices land join the multiplex choice, for objects
  whose opposite sides differ in colour more than in silhouette;
* a warm-up in which the instance offsets are off, so the category template and
  the camera alone must explain the silhouettes (the camera cannot be skipped by
  deforming each instance into its view).

Amodal masks, true cameras and true meshes (`eval_*` keys, the dataset's meshes)
are read only in validation/test to report amodal mIoU, camera errors and Chamfer
distance. The best checkpoint is chosen on `val/visible_iou`, which needs no labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from amodal3d.errors import ConfigError
from amodal3d.protocols import gives_amodal_box, monitor_unknown, protocol_of, unknown_pixels
from amodal3d.datamodules.true_meshes import TrueMeshes
from amodal3d.lightning_modules.common import AmodalStage, as_config, build_optimizer, with_schema_defaults
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.metrics.camera import CameraError
from amodal3d.metrics.chamfer import view_frame_chamfer
from amodal3d.models.mesh_renderer import centred_box_ndc
from amodal3d.models.recon_losses import (
    azimuth_uniformity,
    MeshRegularisers,
    camera_loss,
    resize_mask,
    sample_cameras,
    silhouette_loss,
    view_pairs,
    visible_iou,
)
from amodal3d.models.recon_net import ReconModelConfig, ReconNet, observed_pixels


def synthetic_crop_margin(cfg) -> float:
    """The margin of a crop around a whole (unoccluded) object under the config's protocol:
    its amodal box is its visible box, so gt-visible frames it by visible_crop_margin."""
    if gives_amodal_box(protocol_of(cfg)):
        return float(cfg.loader.crop_margin)
    return float(cfg.loader.get("visible_crop_margin", cfg.loader.crop_margin))


class ReconStage(AmodalStage):
    """The `recon` stage (see the module docstring)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        cfg = as_config(cfg)
        m = with_schema_defaults(cfg.model, ReconModelConfig)
        if int(m.render_size) < 8:
            raise ConfigError(f"model.render_size={m.render_size}: use at least 8 pixels")
        if not 0.0 <= float(m.rgb_dropout) <= 1.0:
            raise ConfigError(f"model.rgb_dropout={m.rgb_dropout}: expected a probability in [0, 1]")
        if float(m.select_tie_margin) < 0:
            raise ConfigError(f"model.select_tie_margin={m.select_tie_margin}: expected >= 0 (0 turns tie-breaking off)")
        for key in ("w_colour", "colour_select", "colour_init_noise"):
            if float(m[key]) < 0:
                raise ConfigError(f"model.{key}={m[key]}: expected >= 0 (w_colour=0 turns the colour templates off)")
        self.m = m
        self.protocol = protocol_of(cfg)
        # the cycle's renders are framed as the loader frames an unoccluded object under the protocol
        self.crop_margin = synthetic_crop_margin(cfg)
        self.net = ReconNet(m, num_categories=len(self.class_names), crop_size=int(cfg.loader.crop_size),
                            protocol=self.protocol)
        self.regularisers = MeshRegularisers(self.net.faces, self.net.decoder.num_verts)
        self.el_range = tuple(float(v) for v in m.elevation_range)
        self.dist_range = tuple(float(v) for v in m.distance_range)
        # cameras: per instance category, az/el/dist predicted and true, chamfer (NaN: no true mesh), same views
        self.add_eval_metrics(visible_iou=MeanMetric, cameras=lambda: CameraError(len(self.class_names)))
        self._last: dict | None = None
        self._true_meshes = None

    # -- training -----------------------------------------------------------------------
    def _drop_rgb(self, x: torch.Tensor) -> torch.Tensor:
        p = float(self.m.rgb_dropout)
        if p <= 0:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= p).float()
        return torch.cat([x[:, :3] * keep, x[:, 3:]], dim=1)

    def _cycle(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        """Re-render the predicted meshes at random cameras, re-encode, and ask for the
        cameras and shapes back. Inputs: no RGB (a silhouette render has none), the
        real item's occluder applied to the render."""
        b = out["verts"].shape[0]
        s = self.net.crop_size
        with torch.no_grad():
            verts = out["verts"].detach()
            cams = sample_cameras(b, self.el_range, self.dist_range, verts.device)
            box = centred_box_ndc(verts, cams, self.crop_margin, self.net.renderer.fov)
            sil = self.net.render(verts, cams, box, s)[:, None]
            occ = batch["occluder"].float()
            vis = (sil > 0.5).float() * (1.0 - occ)
            parts = [torch.zeros_like(batch["rgb"]), vis] + ([occ] if self.net.use_occluded else [])
            x = torch.cat(parts, dim=1)
        rec = self.net.encode(x, batch["category"])
        err = camera_loss(rec["hypotheses"], cams[:, None], self.el_range, self.dist_range)  # (B,K)
        best = err.argmin(dim=1)
        losses = {
            "cycle_camera": err.gather(1, best[:, None]).mean(),
            "cycle_shape": F.mse_loss(rec["offsets"], out["offsets"].detach()) / self.net.decoder.max_offset**2,
        }
        if err.shape[1] > 1:
            losses["cycle_hypothesis"] = F.cross_entropy(rec["logits"], best)
        return losses

    def offset_scale(self, step: int) -> float:
        """Weight of the instance offsets at a training step (the warm-up schedule)."""
        start, ramp = int(self.m.offset_warmup_steps), int(self.m.offset_ramp_steps)
        if step < start:
            return 0.0
        return 1.0 if ramp <= 0 else min(1.0, (step - start + 1) / ramp)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        m = self.m
        self.net.offset_scale = self.offset_scale(self.global_step)
        self.net.break_ties = self.net.tie_margin > 0 and self.global_step >= int(m.select_tie_start_step)
        size = int(m.render_size)
        x = self._drop_rgb(self.net.inputs(batch))
        out = self.net.encode(x, batch["category"])
        verts = out["verts"]
        b = verts.shape[0]
        box = self.net.target_box(batch, out["feat"])
        target = resize_mask(batch["visible"], size)
        weight = 1.0 - resize_mask(unknown_pixels(batch), size)
        camera, best = self.net.select_camera(out, batch, box, tie_noise=1e-4)

        # one render call: every row with its own shape, then the swapped pairs
        a, bb = view_pairs(batch["object_id"])
        rows = torch.arange(b, device=verts.device)
        shape_idx = torch.cat([rows, a, bb])
        view_idx = torch.cat([rows, bb, a])
        sil = self.net.render(verts[shape_idx], camera[view_idx], box[view_idx], size)
        # the render's cost: meshes on pytorch3d's slow exact path, pixels of the sparse windows
        self.log("train/exact_render_rows", float(self.net.renderer.last_exact_rows), batch_size=b)
        self.log("train/render_window_mpx", self.net.renderer.last_window_pixels / 1e6, batch_size=b)
        sil_err = silhouette_loss(sil, target[view_idx], weight[view_idx], m.w_iou, m.w_mse)
        losses = {"silhouette": sil_err[:b].mean()}
        if out["logits"].shape[1] > 1:
            losses["hypothesis"] = F.cross_entropy(out["logits"], best)
        if len(a):
            losses["swap"] = sil_err[b:].mean()
            if self.net.offset_scale > 0:
                losses["shape_consistency"] = F.mse_loss(out["offsets"][a], out["offsets"][bb]) / m.max_offset**2
        if self.net.appearance is not None:  # the colour templates, under the chosen cameras
            col = self.net.colour_error(verts[shape_idx], camera[view_idx], box[view_idx], batch["category"][shape_idx],
                                        batch["rgb"][view_idx], observed_pixels(batch)[view_idx])
            losses["colour"] = col[:b].mean()
            if len(a):
                losses["swap_colour"] = col[b:].mean()
        losses.update(self.regularisers(verts))
        losses["azimuth_uniform"] = azimuth_uniformity(camera[:, 0])
        if "tie_broken" in out:  # share of instances whose near-tie the score decided
            self.log("train/tie_broken", out["tie_broken"].mean(), batch_size=b)
        if (m.w_cycle_camera > 0 or m.w_cycle_shape > 0) and self.global_step >= int(m.cycle_start_step):
            losses.update(self._cycle(batch, out))
        weights = {
            "silhouette": 1.0, "swap": m.w_swap, "shape_consistency": m.w_shape_consistency,
            "laplacian": m.w_laplacian, "normal": m.w_normal, "edge": m.w_edge,
            "azimuth_uniform": m.w_azimuth_uniform, "hypothesis": m.w_hypothesis,
            "cycle_camera": m.w_cycle_camera, "cycle_shape": m.w_cycle_shape, "cycle_hypothesis": m.w_hypothesis,
            "colour": m.w_colour, "swap_colour": m.w_colour,
        }
        loss = sum(weights[k] * v for k, v in losses.items())
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=b)
        with torch.no_grad():
            self.log("train/visible_iou", visible_iou(sil[:b], target, 1.0 - weight).mean(), batch_size=b)
        return loss

    # -- prediction -----------------------------------------------------------------------
    def predict_amodal(self, batch: dict) -> torch.Tensor:
        out = self.net(batch)
        sil = self.net.renderer(out["verts"], self.net.faces, out["camera"], out["place"], self.net.crop_size)
        self._last = {"out": out, "sil": sil[:, None]}
        return sil[:, None]

    def predict_meshes(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(verts (B,V,3), faces (F,3)) of the predicted meshes (TensorBoard, other stages)."""
        out = self.net(batch)
        return out["verts"], self.net.faces

    # -- evaluation -----------------------------------------------------------------------
    def update_eval_metrics(self, batch: dict, batch_idx: int, split: str, metrics) -> None:
        out, sil = self._last["out"], self._last["sil"]
        metrics["visible_iou"].update(visible_iou(sil, batch["visible"], monitor_unknown(batch)))
        true = batch["eval_camera"].float()
        chamfer, same = self._chamfer(out, batch, split), self._same_views(batch, split)
        metrics["cameras"].update(torch.cat(
            [batch["category"].float()[:, None], out["camera"].detach(), true, chamfer[:, None], same], dim=1
        ))

    def _truth(self) -> "TrueMeshes | bool":
        """The dataset's true meshes (False: none), looked up once."""
        if self._true_meshes is None:
            trainer = getattr(self, "_trainer", None)
            root = getattr(trainer.datamodule, "root", None) if trainer is not None else None
            self._true_meshes = TrueMeshes(root) if root else False
        return self._true_meshes

    def _chamfer(self, out: dict, batch: dict, split: str) -> torch.Tensor:
        """(B,) Chamfer distance to the true mesh in the camera frames (NaN: unknown)."""
        nan = torch.full((out["verts"].shape[0],), float("nan"), device=out["verts"].device)
        meshes = self._truth().get(split, batch["object_id"]) if self._truth() else None
        if meshes is None:
            return nan
        return view_frame_chamfer(
            out["verts"].detach(), self.net.faces, out["camera"].detach(), meshes, batch["eval_camera"].float(),
            seeds=batch["index"],  # per-instance samples: the same distance in any batch, on any rank
        )

    def _same_views(self, batch: dict, split: str) -> torch.Tensor:
        """(B,V) the views that are the same picture as each instance's (TrueMeshes.same_views);
        (B,0) without true meshes."""
        dev = batch["eval_camera"].device
        same = None
        if self._truth():
            same = self._truth().same_views(split, batch["object_id"].cpu(), batch["eval_camera"][:, 0].cpu())
        return torch.zeros((len(batch["eval_camera"]), 0), device=dev) if same is None else same.to(dev)

    def configure_optimizers(self):
        # the templates (shape, and colour if any) are few parameters with a long way to go
        template = [self.net.decoder.template]
        if self.net.appearance is not None:
            template += list(self.net.appearance.parameters())
        rest = [p for p in self.parameters() if p.requires_grad and all(p is not t for t in template)]
        groups = [
            {"params": rest},
            {"params": template, "lr": float(self.cfg.optim.lr) * float(self.m.template_lr_mult)},
        ]
        return build_optimizer(self, self.cfg, params=groups)

    def configure_callbacks(self):
        from lightning.pytorch.callbacks import Timer

        callbacks = self.image_logging_callbacks(mesh_every_n_epochs=int(self.m.mesh_log_every_n_epochs))
        minutes = float(self.m.max_train_minutes)
        if minutes > 0:
            callbacks.append(Timer(duration={"minutes": minutes}, interval="step"))
        return callbacks


def load_recon(checkpoint: str, map_location: str | torch.device = "cpu", freeze: bool = True) -> ReconNet:
    """The ReconNet of a recon checkpoint (eval mode, frozen by default): what the
    viewpoint and render stages consume."""
    stage = ReconStage.load_from_checkpoint(checkpoint, map_location=map_location)
    net = stage.net.eval()
    if freeze:
        for p in net.parameters():
            p.requires_grad_(False)
    return net


STAGE = StageSpec(
    name="recon",
    module=ReconStage,
    model_schema=ReconModelConfig,
    data="crops",
    method="recon-render",
    table_order=20,
    help="unsupervised 3D reconstruction + camera from silhouettes (rendered silhouette as amodal mask)",
)

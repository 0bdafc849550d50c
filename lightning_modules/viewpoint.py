"""Stage `viewpoint`: a camera estimator made robust to occlusion with data it makes itself.

No pose labels: for each batch of real crops the frozen recon network (the
checkpoint of stage `recon`) predicts the instances' meshes; each mesh is
rendered at a camera sampled from recon's prior (azimuth uniform on the circle,
elevation and distance uniform in recon's ranges) into the crop frame the
loader would build around it, cut by random erasers like the dataset's
(models.occlusion_synth; under gt-visible re-framed on the visible part, with an
empty occluded channel, as real gt-visible crops are), and the estimator
regresses the sampled camera from the visible and occluded masks. The cameras live in recon's learned canonical
frame, so the estimator can stand in for recon's camera head.

The estimator reuses recon's classes (models.encoder.CropEncoder +
models.camera_head.CameraHead, with recon's multiplex size K by default) and
starts from recon's encoder and head weights; training keeps the hypothesis
nearest the sampled camera and teaches the score to rank it first. At inference
its camera is picked among its hypotheses by recon's own rule (the render that
best explains the visible mask, ReconNet.select_camera), so both are compared
under the same selection. Its RGB channels are always zero: a silhouette render
has no texture, so training and test inputs only agree on the masks.

Validation compares, on real crops, the estimator's cameras and recon's own
camera head with the true cameras (`eval_camera`: evaluation only), after the
same per-category azimuth alignment recon reports (recon.camera_errors):
`val/az_err_viewpoint`, `val/az_err_recon` (aligned mean azimuth error, deg) and
the raw / median / acc30 / elevation / distance variants: evaluation only. Every
checkpoint stores them with the label-free visible-mask IoUs of both cameras'
renders on validation (`val/visible_iou`, `val/visible_iou_recon`: outside the
unknown pixels), and the render stage's camera_source=auto compares those IoUs,
never the camera errors. The checkpoint monitor needs no labels either: the
estimator's loss on self-generated renders of the val crops' meshes with fixed
seeds (`val/synth_camera_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.aggregation import CatMetric, MeanMetric

from amodal3d.categories import check_class_names, class_names
from amodal3d.errors import ConfigError
from amodal3d.protocols import LEGACY_PROTOCOL, gives_amodal_box, monitor_unknown, protocol_of
from amodal3d.lightning_modules.checkpoints import checkpoint_hparams, dependency, read_checkpoint
from amodal3d.lightning_modules.common import AmodalStage, as_config
from amodal3d.lightning_modules.recon import load_recon
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.metrics.camera import camera_errors
from amodal3d.models.mesh_renderer import centred_box_ndc, mask_boxes
from amodal3d.models.occlusion_synth import OccluderParams, synth_occluders
from amodal3d.models.recon_losses import camera_loss, sample_cameras, visible_iou
from amodal3d.models.recon_net import ReconNet
from amodal3d.models.shape_prior import ReconShapePrior, freeze_, recon_net_from_spec, spec_class_names
from amodal3d.models.viewpoint_net import ViewpointNet, estimator_camera


@dataclass
class ViewpointModelConfig:
    backbone: str = "resnet10t"  # timm model name, pretrained=False
    feat_dim: int = 256
    hypotheses: int = 0  # camera multiplex size K; 0: recon's K (the head is copied from recon only when K matches)
    init_from_recon: bool = True  # start from recon's encoder (and camera head when K matches)
    occluders_min: int = 1
    occluders_max: int = 2
    occlusion_min: float = 0.1
    occlusion_max: float = 0.7
    occluder_tries: int = 8
    unoccluded_fraction: float = 0.1  # share of self-generated samples left whole
    w_hypothesis: float = 0.1
    mesh_log_every_n_epochs: int = 5


# -- the frozen recon dependency ---------------------------------------------------------------


def load_recon_dependency(checkpoint: str | Path) -> tuple[ReconNet, dict]:
    """The frozen ReconNet of a recon checkpoint and the spec that rebuilds it."""
    checkpoint = Path(checkpoint)
    net = load_recon(str(checkpoint))
    cfg = checkpoint_hparams(checkpoint).get("cfg") or {}
    if cfg.get("stage") != "recon" or "model" not in cfg:
        raise ValueError(f"{checkpoint}: not a checkpoint of stage 'recon' (hyper_parameters.cfg.stage="
                         f"{cfg.get('stage')!r}); point run.checkpoints.recon at a recon run's .ckpt")
    spec = {
        "checkpoint": str(checkpoint.resolve()),
        "model": dict(cfg["model"]),
        "crop_size": int(cfg["loader"]["crop_size"]),
        "crop_margin": float(cfg["loader"]["crop_margin"]),
        "protocol": protocol_of(cfg),
        "class_names": list(class_names(as_config(cfg))),  # what its per-category parameters are sized by
    }
    return net, spec


def check_crop_geometry(cfg: DictConfig, recon_spec: dict) -> None:
    """A frozen recon only places meshes correctly in crops built like its own, and only knows
    the categories of the table it was trained on."""
    if protocol_of(cfg) != recon_spec.get("protocol", LEGACY_PROTOCOL):
        raise ValueError(
            f"protocol={protocol_of(cfg)} but the recon checkpoint {recon_spec['checkpoint']} was trained under "
            f"{recon_spec.get('protocol', LEGACY_PROTOCOL)}: train recon under this protocol, or point "
            "run.checkpoints.recon at one that was"
        )
    if int(cfg.loader.crop_size) != int(recon_spec["crop_size"]):
        raise ValueError(
            f"loader.crop_size={cfg.loader.crop_size} but the recon checkpoint {recon_spec['checkpoint']} was "
            f"trained with crop_size={recon_spec['crop_size']}: use loader.crop_size={recon_spec['crop_size']}"
        )
    check_class_names(recon_spec.get("checkpoint", "the recon checkpoint"), spec_class_names(recon_spec),
                      class_names(cfg), str(cfg.data.root))


# -- the estimator -----------------------------------------------------------------------------


# -- self-generated data -----------------------------------------------------------------------


def synthesise(
    recon: ReconNet,
    verts: torch.Tensor,
    category: torch.Tensor,
    occluders: OccluderParams,
    crop_margin: float,
    unoccluded_fraction: float = 0.0,
    generator: torch.Generator | None = None,
    visible_margin: float | None = None,
) -> dict[str, torch.Tensor]:
    """Renders of `verts` at sampled cameras, framed like the loader's crops and cut by
    random erasers: dict(camera (B,3), amodal, visible, occluded, unknown (B,1,S,S) {0,1},
    category). Under gt-box (visible_margin None) the frame is centred on the whole
    render and `occluder` is the eraser; under gt-visible the samples are re-framed on
    their visible box with `visible_margin`, as the loader frames real crops, and
    `occluder` is empty, as in a gt-visible `erase` item (the eraser is `unknown`)."""
    b = verts.shape[0]
    s = recon.crop_size
    el = recon.camera_head.el_range
    dist = recon.camera_head.dist_range
    camera = sample_cameras(b, el, dist, verts.device, generator)
    box = centred_box_ndc(verts, camera, crop_margin, recon.renderer.fov)
    amodal = (recon.render(verts, camera, box, s) > 0.5).float()[:, None]
    occluded = synth_occluders(amodal, occluders, generator)
    if unoccluded_fraction > 0:
        whole = torch.rand(b, generator=generator).to(verts.device) < unoccluded_fraction
        occluded = occluded * (~whole).float()[:, None, None, None]
    visible = amodal * (1.0 - occluded)
    if visible_margin is not None:
        from amodal3d.datamodules.crops import crop_to_box, square_crop_box

        frame = square_crop_box(mask_boxes(visible), float(visible_margin))
        stacked = crop_to_box(torch.cat([amodal, visible, occluded], 1), frame, s)
        amodal, visible, occluded = (stacked > 0.5).float().split(1, 1)
        return {"camera": camera, "amodal": amodal, "visible": visible, "occluder": torch.zeros_like(occluded),
                "unknown": occluded, "category": category}
    return {"camera": camera, "amodal": amodal, "visible": visible, "occluder": occluded, "unknown": occluded,
            "category": category}


# -- the stage ---------------------------------------------------------------------------------


class ViewpointStage(AmodalStage):
    """The `viewpoint` stage (see the module docstring).

    deps: None when training starts (the recon checkpoint is found and loaded);
    the stored spec when Lightning restores a checkpoint (weights come from it)."""

    def __init__(self, cfg, deps: dict | None = None) -> None:
        super().__init__(cfg)
        cfg = as_config(cfg)
        m = cfg.model
        self.m = m
        fresh = deps is None
        if fresh:
            recon, recon_spec = load_recon_dependency(dependency(cfg, "recon", "viewpoint"))
            deps = {"recon": recon_spec}
        else:
            recon = recon_net_from_spec(deps["recon"])
        check_crop_geometry(cfg, deps["recon"])
        self.recon = freeze_(recon)
        head = self.recon.camera_head
        if int(m.hypotheses) < 0:
            raise ConfigError(f"model.hypotheses={m.hypotheses}: expected K >= 1, or 0 for recon's K")
        k = int(m.hypotheses) or head.k
        self.net = ViewpointNet(m.backbone, int(m.feat_dim), k, head.el_range, head.dist_range,
                                num_categories=len(self.class_names))
        if fresh and bool(m.init_from_recon):
            deps["initialised_from_recon"] = self.net.init_from(self.recon)
        self.save_hyperparameters({"deps": deps})
        self.deps = deps
        self.occluders = OccluderParams(
            int(m.occluders_min), int(m.occluders_max), float(m.occlusion_min), float(m.occlusion_max),
            int(m.occluder_tries),
        )
        self.occluders.check()
        if not 0.0 <= float(m.unoccluded_fraction) <= 1.0:
            raise ConfigError(f"model.unoccluded_fraction={m.unoccluded_fraction}: expected a share in [0, 1]")
        self.crop_margin = float(cfg.loader.crop_margin)
        self.visible_margin = (None if gives_amodal_box(protocol_of(cfg))
                               else float(cfg.loader.get("visible_crop_margin", 2.5)))
        self.el_range, self.dist_range = head.el_range, head.dist_range
        # per instance: category, estimator az/el/dist, recon az/el/dist, true az/el/dist
        # cameras: per instance category, the estimator's and recon's az/el/dist, the true ones
        # synth_camera_loss: the camera loss on self-generated samples (the label-free monitor)
        self.add_eval_metrics(cameras=CatMetric, synth_camera_loss=MeanMetric, visible_iou=MeanMetric,
                              visible_iou_recon=MeanMetric)
        self.camera_summary: dict[str, float] = {}
        self._last: dict | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        if "recon" in self._modules:
            self.recon.eval()  # frozen: BatchNorm keeps the checkpoint's statistics
        return self

    # -- training -------------------------------------------------------------------------------
    def make_samples(self, batch: dict, generator: torch.Generator | None = None, verts=None) -> dict:
        """Self-generated samples from the meshes recon predicts for this batch's crops."""
        with torch.no_grad():
            if verts is None:
                verts = self.recon.encode(self.recon.inputs(batch), batch["category"])["verts"]
            frac = float(self.m.unoccluded_fraction)
            return synthesise(self.recon, verts, batch["category"], self.occluders, self.crop_margin, frac, generator,
                              self.visible_margin)

    def camera_losses(self, samples: dict) -> dict[str, torch.Tensor]:
        out = self.net(samples["visible"], samples["occluder"], samples["category"])
        err = camera_loss(out["hypotheses"], samples["camera"][:, None], self.el_range, self.dist_range)
        best = err.argmin(dim=1)
        losses = {"camera": err.gather(1, best[:, None]).mean()}
        if err.shape[1] > 1:
            losses["hypothesis"] = F.cross_entropy(out["logits"], best)
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        samples = self.make_samples(batch)
        losses = self.camera_losses(samples)
        loss = losses["camera"] + float(self.m.w_hypothesis) * losses.get("hypothesis", 0.0)
        b = samples["camera"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=b)
        return loss

    # -- prediction -----------------------------------------------------------------------------
    @property
    def prior(self) -> ReconShapePrior:
        """recon's coarse-mask path at the crop size (not a registered submodule: its weights
        are self.recon's, and the checkpoint keeps their names)."""
        if self.__dict__.get("_prior") is None:
            self.__dict__["_prior"] = ReconShapePrior(self.recon, render_size=self.recon.crop_size)
        return self.__dict__["_prior"]

    def predict_amodal(self, batch: dict) -> torch.Tensor:
        """recon's mesh seen by the estimator's camera, fitted to the amodal box."""
        cams = {}

        def estimator(rec: dict) -> torch.Tensor:
            cams["camera"] = estimator_camera(self.recon, self.net.predict(batch), rec["verts"], batch, rec["box"])
            return cams["camera"]

        sil, rec = self.prior.render_outputs(batch, estimator)
        self._last = {"recon": rec, "camera": cams["camera"], "sil": sil[:, None]}
        return sil[:, None]

    def predict_meshes(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.recon(batch)["verts"], self.recon.faces

    # -- evaluation -----------------------------------------------------------------------------
    def update_eval_metrics(self, batch: dict, batch_idx: int, split: str, metrics) -> None:
        last = self._last
        unknown = monitor_unknown(batch)
        metrics["visible_iou"].update(visible_iou(last["sil"], batch["visible"], unknown))
        rec = last["recon"]  # recon's own camera, for the label-free comparison camera_source=auto makes
        rec_sil = self.recon.renderer(rec["verts"], self.recon.faces, rec["camera"], rec["place"], self.recon.crop_size)
        metrics["visible_iou_recon"].update(visible_iou(rec_sil[:, None], batch["visible"], unknown))
        metrics["cameras"].update(torch.cat([
            batch["category"].float()[:, None], last["camera"], last["recon"]["camera"],
            batch["eval_camera"].float(),
        ], dim=1))
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + batch_idx)
        samples = self.make_samples(batch, g, verts=last["recon"]["verts"])
        metrics["synth_camera_loss"].update(self.camera_losses(samples)["camera"])

    def eval_logs(self, split: str, name: str, value) -> dict:
        if name != "cameras":
            return super().eval_logs(split, name, value)
        rows = value
        if rows.numel() == 0:
            return {}
        nan = torch.full_like(rows[:, :1], float("nan"))
        out = {}
        for source, cols in (("viewpoint", slice(1, 4)), ("recon", slice(4, 7))):
            errs = camera_errors(torch.cat([rows[:, :1], rows[:, cols], rows[:, 7:10], nan], dim=1),
                                 len(self.class_names))
            for k, v in errs.items():
                out[f"{split}/az_err_{source}" if k == "az_err_aligned" else f"{split}/{k}_{source}"] = v
        return out

    def on_eval_epoch_end(self, split: str, logged: dict[str, float]) -> None:
        """Keeps the val figures (label-free visible IoUs of both camera sources, and the
        evaluation-only camera errors) for the checkpoint: render's camera_source=auto reads them."""
        if split != "val" or not logged or self.trainer.sanity_checking:
            return
        summary = {k.split("/", 1)[1]: v for k, v in logged.items() if k.startswith("val/")}
        summary.pop("synth_camera_loss", None)
        summary["visible_iou_viewpoint"] = summary.pop("visible_iou")
        self.camera_summary = {"split": "val", "epoch": int(self.current_epoch), **summary}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the val figures of the weights being saved: camera_source=auto compares their visible IoUs
        checkpoint["camera_errors"] = dict(self.camera_summary)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.camera_summary = dict(checkpoint.get("camera_errors") or {})

    def configure_callbacks(self):
        return self.image_logging_callbacks(mesh_every_n_epochs=int(self.m.mesh_log_every_n_epochs))


def read_viewpoint_checkpoint(checkpoint: str | Path) -> dict:
    """What the render stage needs to know about a viewpoint checkpoint without building
    it: {"checkpoint", "recon_checkpoint", "camera_errors"}."""
    ck = read_checkpoint(checkpoint)
    deps = (ck.get("hyper_parameters") or {}).get("deps") or {}
    if "recon" not in deps:
        raise ValueError(f"{checkpoint}: not a checkpoint of stage 'viewpoint' (no hyper_parameters.deps.recon)")
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "recon_checkpoint": deps["recon"].get("checkpoint", ""),
        "camera_errors": dict(ck.get("camera_errors") or {}),
    }


STAGE = StageSpec(
    name="viewpoint",
    module=ViewpointStage,
    model_schema=ViewpointModelConfig,
    data="crops",
    depends_on=("recon",),
    dependencies=lambda cfg, find: {"recon": find("recon", str(cfg.experiment))},
    method=None,
    help="occlusion-robust camera estimator trained on self-generated renders of recon's meshes",
)

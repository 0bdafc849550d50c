"""Stage `joint`: fine-tunes the whole chain (recon -> viewpoint -> render -> refine) end to end.

Starts from the stage checkpoints: the 3D prior is built from the latest recon /
viewpoint / render checkpoints exactly as `refine` builds it (render when it
exists, else the recon render), and the refine network from the latest refine
checkpoint (its architecture settings are taken from that checkpoint). A missing
checkpoint is an error naming the `make train STAGE=<stage>` that produces it.

Loss: refine's supervised region loss (through the differentiable render, so its
gradient reaches the mesh and camera) + w_recon x recon's label-free losses on
the same forward pass (masked silhouette IoU + L2 against the visible mask, mesh
regularisers, azimuth spread: models/recon_losses.py), which keep the shapes
explaining the observed silhouettes while the refine loss pulls them towards the
amodal masks. Each stage gets its own learning rate and can be frozen
(model.stages in experiments/stage/joint.yaml); the optimizer has one parameter
group per trainable stage. It is a RefineStage, so its checkpoints load, predict
and benchmark like refine's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from amodal3d.errors import ConfigError
from amodal3d.protocols import unknown_pixels
from amodal3d.lightning_modules.checkpoints import checkpoint_hparams, dependency, read_checkpoint
from amodal3d.lightning_modules.common import as_config, lr_scheduler, total_steps
from amodal3d.lightning_modules.refine import RefineModelConfig, RefineStage, prior_dependencies
from amodal3d.lightning_modules.registry import StageSpec

JOINT_STAGES = ("recon", "viewpoint", "render", "refine")
#: refine settings that fix the network's shape: taken from the refine checkpoint
ARCHITECTURE_KEYS = ("base_channels", "depth", "gate", "region_specific", "coarse_residual", "prior_render_size")


@dataclass
class StageOptim:
    lr: float = 1.0e-5
    freeze: bool = False


def _default_stages() -> dict[str, StageOptim]:
    return {
        "recon": StageOptim(lr=1.0e-5),
        "viewpoint": StageOptim(lr=1.0e-5),
        "render": StageOptim(lr=1.0e-5),
        "refine": StageOptim(lr=1.0e-4),
    }


@dataclass
class JointModelConfig(RefineModelConfig):
    stages: dict[str, StageOptim] = field(default_factory=_default_stages)
    w_recon: float = 0.1  # weight of recon's label-free losses (0: refine loss only)


class JointStage(RefineStage):
    """RefineStage whose prior is trainable, initialised from the stage checkpoints."""

    trainable_prior = True

    def __init__(self, cfg, prior_source: dict | None = None, prior_factory=None) -> None:
        cfg = as_config(cfg)
        if str(cfg.model.prior) == "none":
            raise ValueError("stage joint fine-tunes the 3D prior chain; model.prior=none leaves nothing to fine-tune "
                             "(the 2D-only ablation is stage refine_2d)")
        unknown = set(cfg.model.stages) - set(JOINT_STAGES)
        if unknown:
            raise ConfigError(f"model.stages: unknown stage(s) {sorted(unknown)}; expected {', '.join(JOINT_STAGES)}")
        refine_state = None
        if prior_source is None:  # a new run, not a restored checkpoint: start from the stage checkpoints
            ckpt = dependency(cfg, "refine", "joint")
            hp = checkpoint_hparams(ckpt)
            refine_model = (hp.get("cfg") or {}).get("model") or {}
            cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            for key in ARCHITECTURE_KEYS:
                if key in refine_model:
                    cfg.model[key] = refine_model[key]
            if (hp.get("prior_source") or {}).get("kind") == "none":
                raise ValueError(f"{ckpt} was trained without a 3D prior; joint needs a refine checkpoint "
                                 "trained with one (`make train STAGE=refine`)")
            refine_state = read_checkpoint(ckpt)["state_dict"]
            self_refine_ckpt = str(ckpt)
        super().__init__(cfg, prior_source=prior_source, prior_factory=prior_factory)
        if refine_state is not None:
            trained_on = (hp.get("prior_source") or {}).get("kind")
            if trained_on != self.prior_source.get("kind"):
                print(f"[joint] warning: the refine checkpoint {self_refine_ckpt} was trained on the {trained_on} "
                      f"prior, joint now starts from the {self.prior_source.get('kind')} prior", file=sys.stderr)
            net_state = {k[len("net."):]: v for k, v in refine_state.items() if k.startswith("net.")}
            self.net.load_state_dict(net_state)
            self.refine_checkpoint = self_refine_ckpt
        stages = self.cfg.model.stages
        trainable = {s: not bool(stages[s].freeze) for s in stages}
        self.set_prior_trainable(trainable)
        for p in self.net.parameters():
            p.requires_grad_(trainable.get("refine", True))
        self._regularisers = None

    # -- recon's label-free losses --------------------------------------------------------
    def _recon_weights(self) -> dict:
        from amodal3d.lightning_modules.recon import ReconModelConfig

        model = dict(OmegaConf.to_container(OmegaConf.structured(ReconModelConfig)))
        src = self.prior_source
        model.update(src.get("model") or ((src.get("spec") or {}).get("recon") or {}).get("model") or {})
        return model

    def recon_losses(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(coarse mask (B,1,S,S), recon's label-free loss terms) from one prior forward pass.

        Without a recon net in the prior, or with it frozen, only the coarse mask."""
        from amodal3d.models.shape_prior import to_crop_size
        from amodal3d.models.recon_losses import MeshRegularisers, azimuth_uniformity, resize_mask, silhouette_loss

        net = getattr(self.prior, "recon_net", None)
        render = getattr(self.prior, "render_outputs", None)
        if (net is None or render is None or float(self.cfg.model.w_recon) <= 0
                or not any(p.requires_grad for p in net.parameters())):
            return self.coarse_mask(batch), {}
        sil, out = render(batch)
        rm = self._recon_weights()
        size = sil.shape[-1]
        target = resize_mask(batch["visible"], size)
        weight = 1.0 - resize_mask(unknown_pixels(batch), size)
        if self._regularisers is None:
            self._regularisers = MeshRegularisers(net.faces, net.decoder.num_verts).to(sil.device)
        terms = {"silhouette": silhouette_loss(sil, target, weight, rm["w_iou"], rm["w_mse"]).mean()}
        reg = self._regularisers(out["verts"])
        terms["laplacian"] = rm["w_laplacian"] * reg["laplacian"]
        terms["normal"] = rm["w_normal"] * reg["normal"]
        terms["edge"] = rm["w_edge"] * reg["edge"]
        terms["azimuth_uniform"] = rm["w_azimuth_uniform"] * azimuth_uniformity(out["camera"][:, 0])
        return to_crop_size(sil[:, None], int(net.crop_size)), terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.camera_source != "predicted":
            raise RuntimeError("camera_source='true' reads the true camera: evaluation only, never in training")
        b = batch["visible"].shape[0]
        coarse, recon_terms = self.recon_losses(batch)
        terms = self.refine_terms(batch, coarse)
        loss = terms["loss"]
        if recon_terms:
            recon = sum(recon_terms.values())
            loss = loss + float(self.cfg.model.w_recon) * recon
            self.log("train/recon_loss", recon, batch_size=b)
            for k, v in recon_terms.items():
                self.log(f"train/recon_{k}", v, batch_size=b)
        terms = dict(terms, refine_loss=terms["loss"], loss=loss)
        self._log_terms(terms, b)
        return loss

    # -- optimisation ---------------------------------------------------------------------
    def stage_parameter_groups(self) -> list[dict]:
        """One AdamW group per trainable stage, with that stage's learning rate."""
        stages = self.cfg.model.stages
        parts = {**self.prior_stage_modules(), "refine": self.net}
        groups = []
        for stage, mod in parts.items():
            if stage not in stages:
                raise ConfigError(f"model.stages has no entry for stage {stage!r} (its lr and freeze flag)")
            params = [p for p in mod.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": float(stages[stage].lr), "name": stage})
        if not groups:
            raise ValueError("joint: every stage is frozen (model.stages.*.freeze); nothing to train")
        return groups

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(self.stage_parameter_groups(), weight_decay=o.weight_decay, betas=tuple(o.betas))
        # each stage's group decays to 1% of its own lr
        sched = lr_scheduler(opt, self.cfg, total_steps(self) if o.scheduler == "cosine" else None,
                             eta_min=[0.01 * float(g["lr"]) for g in opt.param_groups])
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}


def joint_dependencies(cfg, find) -> dict:
    """This experiment's own refine (seeded families share only the 3D chain, which
    comes from model.prior_experiment) and the prior chain refine's prior needs."""
    return {"refine": find("refine", str(cfg.experiment)), **prior_dependencies(cfg, find)}


STAGE = StageSpec(
    name="joint",
    module=JointStage,
    model_schema=JointModelConfig,
    data="crops",
    depends_on=("recon", "viewpoint", "render", "refine"),
    dependencies=joint_dependencies,
    method="joint (end-to-end fine-tuning)",
    targets=("amodal",),
    table_order=60,
    help="fine-tunes recon, viewpoint, render and refine together from their checkpoints",
)

"""Stage `refine` (step 5): region-specific edge refinement of the 3D prior's render.

The 3D prior chain (recon -> viewpoint -> render, frozen here) renders a coarse
amodal mask of each instance in its crop; models.refine_net.RefineNet turns crop
RGB + visible mask + occluder mask + coarse mask (+ its soft edges) into the
amodal mask, keeping the visible region as observed and predicting only the
pixels that may be hidden. Supervised by amodal masks (the crops' `amodal` key,
present because the stage declares targets=("amodal",), like the reference
method); no other hidden ground truth is read in training.

The prior comes from a factory, so any nn.Module with `coarse_mask(batch) ->
(B,1,S,S)` probabilities can be plugged in (tests use stand-ins):
  * model.prior=auto (default): the render stage's ShapePrior (wrapped in
    RenderShapePrior) when a finished render run exists, else the recon render (`ReconShapePrior`: the
    recon net's mesh and camera, rendered in the crop);
  * render | recon: only that one; none: a zero coarse mask (the 2D-only
    ablation, stage `refine_2d`).
Where the prior came from is stored in the checkpoint's hyper-parameters and its
weights in the state dict, so a refine checkpoint with the recon prior reloads
without the recon checkpoint.

A frozen prior is a deterministic function of each crop, so during fit its coarse
masks are cached per instance (training: uint8; validation: exact, so the figures
that choose the best checkpoint equal a reload's), and the prior runs once per instance.

Evaluation-only variant: `camera_source="true"` feeds refine the render of the
predicted shape from the true camera (`eval_camera`, mapped into the learned
canonical frame by per-category offsets fitted on the validation split with
`amodal3d.bench.true_camera`). A training step refuses to run in that mode.

The checkpoints of the prior chain come from run.checkpoints, which the runner
resolves (`prior_dependencies`) before building the stage. Which refine-family run
is "Ours" is the bench's choice (amodal3d.bench.ours).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from amodal3d.categories import CATEGORIES, check_class_names, class_names
from amodal3d.errors import ConfigError
from amodal3d.protocols import gives_amodal_box, protocol_of
from amodal3d.lightning_modules.checkpoints import (
    checkpoint_class_names, checkpoint_model_config, dependency, optional_dependency,
)
from amodal3d.lightning_modules.common import AmodalStage
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.models.refine_net import GATES, RefineNet, region_losses
from amodal3d.models.shape_prior import (
    ReconShapePrior, RenderShapePrior, ShapePrior, recon_net_from_spec, spec_class_names,
)

PRIOR_KINDS = ("auto", "render", "recon", "none")
PRIOR_STAGES = ("recon", "viewpoint", "render")


@dataclass
class RefineModelConfig:
    prior: str = "auto"  # auto | render | recon | none (see the module doc)
    prior_experiment: str = ""  # experiment whose stage checkpoints feed the prior ("": this one)
    prior_render_size: int = 32  # recon prior: silhouette resolution, bilinearly resized to the crop
    cache_prior: bool = True  # frozen prior: cache its coarse masks per instance during fit
    base_channels: int = 16
    depth: int = 3
    gate: str = "auto"  # free region: occluded (outside visible, inside the occluder) | outside_visible | auto: by protocol
    region_specific: bool = True  # false: the plain ablation, p = sigmoid(h) everywhere
    coarse_residual: bool = True  # add gain * logit(coarse) to the UNet's logits
    unknown_occluder_prob: float = 0.1  # P(occluder input replaced by "anything outside visible") in training
    w_hidden: float = 2.0
    w_band: float = 2.0
    w_visible: float = 1.0
    w_other: float = 0.5
    w_dice: float = 1.0
    band_width: int = 2  # half-width in pixels of the band around the amodal boundary
    hidden_dilate: int = 2  # the hidden region is amodal - visible dilated by this many pixels


# ----------------------------------------------------------------------------- priors


def prior_experiment(cfg: DictConfig) -> str:
    """The experiment whose 3D chain (recon, viewpoint, render) feeds the prior."""
    return str(cfg.model.prior_experiment or cfg.experiment)


def prior_dependencies(cfg: DictConfig, find) -> dict:
    """What model.prior needs (the runner resolves it): the render checkpoint where it is
    used (optional under auto), recon where the render one is absent; the chain's other
    finished checkpoints are recorded too, as the prior's provenance."""
    kind = str(cfg.model.prior)
    if kind not in PRIOR_KINDS:
        raise ConfigError(f"model.prior={kind!r}: expected one of {', '.join(PRIOR_KINDS)}")
    if kind == "none":
        return {}
    exp = prior_experiment(cfg)
    deps = {"render": find("render", exp, required=kind == "render")} if kind in ("auto", "render") else {}
    deps["recon"] = find("recon", exp, required=kind == "recon" or not deps.get("render"))
    if deps.get("render"):
        deps["viewpoint"] = find("viewpoint", exp, required=False)
    return deps


def recon_prior(checkpoint: str | Path, render_size: int) -> tuple[ReconShapePrior, dict]:
    from amodal3d.lightning_modules.recon import load_recon

    net = load_recon(str(checkpoint))
    source = {
        "kind": "recon", "checkpoint": str(checkpoint), "model": checkpoint_model_config(checkpoint),
        "crop_size": int(net.crop_size), "protocol": net.protocol,
        "class_names": list(checkpoint_class_names(checkpoint)),  # rebuilds its per-category templates
    }
    return ReconShapePrior(net, render_size), source


def build_prior(cfg: DictConfig) -> tuple[nn.Module | None, dict]:
    """(frozen prior module or None, where it came from) for cfg.model.prior, from the
    checkpoints cfg names (run.checkpoints, filled by the runner)."""
    from amodal3d.lightning_modules.render import shape_prior_from_checkpoint

    kind = str(cfg.model.prior)
    if kind not in PRIOR_KINDS:
        raise ConfigError(f"model.prior={kind!r}: expected one of {', '.join(PRIOR_KINDS)}")
    if kind == "none":
        return None, {"kind": "none"}
    stage = str(cfg.stage)
    if kind == "render":
        render_ckpt = dependency(cfg, "render", stage)
    else:
        render_ckpt = optional_dependency(cfg, "render", stage) if kind == "auto" else None
    if render_ckpt:
        shape = shape_prior_from_checkpoint(render_ckpt)
        check_class_names(render_ckpt, spec_class_names(shape.spec["recon"]), class_names(cfg), str(cfg.data.root))
        checkpoints = {s: str(cfg.run.checkpoints[s]) for s in PRIOR_STAGES if cfg.run.checkpoints.get(s)}
        source = {"kind": "render", "experiment": prior_experiment(cfg), "checkpoints": checkpoints,
                  "spec": shape.spec}
        return RenderShapePrior(shape, int(cfg.model.prior_render_size)), source
    ckpt = dependency(cfg, "recon", stage)
    if kind == "auto":
        print(f"[{stage}] 3D prior: no render checkpoint (no finished render run of experiment "
              f"{prior_experiment(cfg)!r}); using the recon render of {ckpt}", file=sys.stderr, flush=True)
    prior, source = recon_prior(ckpt, int(cfg.model.prior_render_size))
    if int(source["crop_size"]) != int(cfg.loader.crop_size):
        raise ConfigError(f"loader.crop_size={cfg.loader.crop_size} but the recon checkpoint {ckpt} was trained with "
                         f"crop_size={source['crop_size']}: use loader.crop_size={source['crop_size']}")
    check_class_names(ckpt, spec_class_names(source), class_names(cfg), str(cfg.data.root))
    return prior, source


def prior_from_source(cfg: DictConfig, source: dict) -> nn.Module | None:
    """Rebuild the prior recorded in a checkpoint (its weights then come from the state dict)."""
    kind = source.get("kind")
    if kind == "none":
        return None
    if kind == "recon":
        return ReconShapePrior(recon_net_from_spec(source).eval(), int(cfg.model.prior_render_size))
    if kind == "render" and "spec" in source:  # rebuilt from its spec: no checkpoint file needed
        return RenderShapePrior(ShapePrior(source["spec"]), int(cfg.model.prior_render_size))
    if kind == "render":  # written before the spec was stored: rebuilt from its render checkpoint
        from amodal3d.lightning_modules.render import shape_prior_from_checkpoint

        path = source.get("checkpoints", {}).get("render", "")
        if not Path(path).is_file():
            raise FileNotFoundError(f"the render prior of this checkpoint was built from {path or '(unrecorded)'} "
                                    "(stage render), which no longer exists")
        return RenderShapePrior(shape_prior_from_checkpoint(path), int(cfg.model.prior_render_size))
    if kind == "custom":
        raise ValueError("this checkpoint was trained with a prior injected through prior_factory: pass the same "
                         "prior_factory to load_from_checkpoint")
    raise ValueError(f"unknown prior source {source!r}")


def _rows(batch: dict, rows: list[int]) -> dict:
    n = batch["visible"].shape[0]
    idx = torch.as_tensor(rows, device=batch["visible"].device)
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- the stage


def protocol_gate(gate: str, protocol: str) -> str:
    """The free region of `model.gate` under `protocol`: auto = the occluder where the
    protocol hands it out (gt-box), else everything outside the visible mask."""
    if gate == "auto":
        return "occluded" if gives_amodal_box(protocol) else "outside_visible"
    if gate not in GATES:
        raise ConfigError(f"model.gate={gate!r}: expected auto or one of {', '.join(GATES)}")
    return gate


class RefineStage(AmodalStage):
    """The `refine` stage (see the module doc). prior_factory(cfg) -> nn.Module
    replaces build_prior (tests, custom priors); prior_source is what a checkpoint
    recorded (load_from_checkpoint passes it back)."""

    trainable_prior = False

    def __init__(self, cfg, prior_source: dict | None = None, prior_factory: Callable | None = None) -> None:
        super().__init__(cfg)
        m = self.cfg.model
        if str(m.prior) not in PRIOR_KINDS:
            raise ConfigError(f"model.prior={m.prior!r}: expected one of {', '.join(PRIOR_KINDS)}")
        self.protocol = protocol_of(self.cfg)
        self.gate = protocol_gate(str(m.gate), self.protocol)
        if not 0.0 <= float(m.unknown_occluder_prob) <= 1.0:
            raise ConfigError(f"model.unknown_occluder_prob={m.unknown_occluder_prob}: expected a probability")
        self.m = m
        self.net = RefineNet(int(m.base_channels), int(m.depth), self.gate, bool(m.region_specific),
                             bool(m.coarse_residual))
        if str(m.prior) == "none":
            prior, source = None, {"kind": "none"}
        elif prior_factory is not None:
            prior, source = prior_factory(self.cfg), {"kind": "custom"}
        elif prior_source is not None:
            prior, source = prior_from_source(self.cfg, prior_source), dict(prior_source)
        else:
            prior, source = build_prior(self.cfg)
        if prior is not None and not callable(getattr(prior, "coarse_mask", None)):
            raise TypeError(f"the 3D prior {type(prior).__name__} has no coarse_mask(batch) method")
        self.prior = prior
        self.prior_source = source
        self.save_hyperparameters({"cfg": OmegaConf.to_container(self.cfg, resolve=True), "prior_source": source})
        self.set_prior_trainable({})
        self.camera_source = "predicted"
        self.register_buffer("true_camera_map", identity_camera_map(len(self.class_names)), persistent=False)
        self._cache: dict[str, dict[int, torch.Tensor]] = {}
        self._last_coarse: torch.Tensor | None = None
        from amodal3d.metrics.amodal_iou import AmodalMIoU

        # the prior's own mask
        self.add_eval_metrics(coarse_miou=lambda: AmodalMIoU(num_categories=len(self.class_names)))

    # -- the prior ------------------------------------------------------------------------
    def prior_stage_modules(self) -> dict[str, nn.Module]:
        """The prior's parts by stage (a prior that does not say counts as `render`)."""
        if self.prior is None:
            return {}
        if hasattr(self.prior, "stage_modules"):
            return dict(self.prior.stage_modules())
        return {"render": self.prior}

    def set_prior_trainable(self, trainable: dict[str, bool]) -> None:
        """requires_grad per prior stage (refine: everything frozen)."""
        if self.prior is None:
            return
        for p in self.prior.parameters():
            p.requires_grad_(False)
        for stage, mod in self.prior_stage_modules().items():
            for p in mod.parameters():
                p.requires_grad_(bool(trainable.get(stage, False)))
        self.prior.eval()

    def prior_is_frozen(self) -> bool:
        return self.prior is None or not any(p.requires_grad for p in self.prior.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.prior is not None:  # the prior keeps its checkpoint's normalisation statistics, also in joint
            self.prior.eval()
        return self

    def _cache_split(self) -> str | None:
        trainer = getattr(self, "_trainer", None)
        if not self.m.cache_prior or trainer is None or not self.prior_is_frozen() or self.camera_source != "predicted":
            return None
        if trainer.state.fn != "fit":
            return None
        return "train" if self.training else "val"

    def _run_prior(self, batch: dict) -> torch.Tensor:
        if self.camera_source == "true":
            camera = self.mapped_true_camera(batch)
            with torch.no_grad():
                try:
                    return self.prior.coarse_mask(batch, camera=camera).float()
                except TypeError as err:
                    raise TypeError(f"the 3D prior {type(self.prior).__name__} cannot render from a given camera "
                                    f"(coarse_mask(batch, camera=...)): {err}") from None
        if self.prior_is_frozen():
            with torch.no_grad():
                return self.prior.coarse_mask(batch).float()
        return self.prior.coarse_mask(batch).float()

    def coarse_mask(self, batch: dict) -> torch.Tensor:
        """(B,1,S,S) coarse amodal mask of the prior (zeros without one)."""
        if self.prior is None:
            return torch.zeros_like(batch["visible"], dtype=torch.float32)
        split = self._cache_split()
        if split is None:
            return self._run_prior(batch)
        cache = self._cache.setdefault(split, {})
        keys = [int(k) for k in batch["index"].tolist()]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            fresh = self._run_prior(_rows(batch, missing) if len(missing) < len(keys) else batch)
            # training inputs quantised to uint8 (memory); validation kept exact, so the figures
            # that choose the best checkpoint are those a reload of it scores
            q = (fresh.clamp(0, 1) * 255).round().to(torch.uint8).cpu() if split == "train" else fresh.cpu()
            for j, i in enumerate(missing):
                cache[keys[i]] = q[j]
        dev = batch["visible"].device
        stacked = torch.stack([cache[k] for k in keys]).to(dev)
        return stacked.float() / 255.0 if split == "train" else stacked

    # -- the true-camera evaluation variant -------------------------------------------------
    def mapped_true_camera(self, batch: dict) -> torch.Tensor:
        """The true camera (evaluation only) in the prior's learned frame (true_camera_map)."""
        return map_true_camera(batch["eval_camera"].float(), batch["category"], self.true_camera_map)

    # -- training -----------------------------------------------------------------------
    def occluder_input(self, visible: torch.Tensor, occluded: torch.Tensor) -> torch.Tensor:
        """Training augmentation: with probability unknown_occluder_prob an item's occluder
        becomes "anything outside the visible mask", what predict uses when no occluder
        is known."""
        p = float(self.m.unknown_occluder_prob)
        if not self.training or p <= 0 or not gives_amodal_box(self.protocol):  # gt-visible: never known
            return occluded
        unknown = (torch.rand(visible.shape[0], 1, 1, 1, device=visible.device) < p).float()
        return unknown * (1.0 - (visible > 0.5).float()) + (1.0 - unknown) * occluded

    def loss_weights(self) -> dict[str, float]:
        m = self.m
        return {"hidden": m.w_hidden, "band": m.w_band, "visible": m.w_visible, "other": m.w_other, "dice": m.w_dice}

    def refine_terms(self, batch: dict, coarse: torch.Tensor) -> dict[str, torch.Tensor]:
        """The supervised refine loss terms of a batch (target: the amodal crop)."""
        visible = batch["visible"]
        out = self.net(batch["rgb"], visible, self.occluder_input(visible, batch["occluder"]), coarse)
        return region_losses(out, batch["amodal"], visible, self.loss_weights(), int(self.m.band_width),
                             int(self.m.hidden_dilate))

    def _log_terms(self, terms: dict[str, torch.Tensor], b: int, prefix: str = "train") -> None:
        self.log(f"{prefix}/loss", terms["loss"], prog_bar=True, batch_size=b)
        for k, v in terms.items():
            if k != "loss":
                self.log(f"{prefix}/{k}", v, batch_size=b)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.camera_source != "predicted":
            raise RuntimeError("camera_source='true' reads the true camera: evaluation only, never in training")
        terms = self.refine_terms(batch, self.coarse_mask(batch))
        self._log_terms(terms, batch["visible"].shape[0])
        if self.net.coarse_gain is not None:
            self.log("train/coarse_gain", self.net.coarse_gain.detach(), batch_size=batch["visible"].shape[0])
        return terms["loss"]

    # -- prediction and evaluation ---------------------------------------------------------
    def predict_amodal(self, batch: dict) -> torch.Tensor:
        coarse = self.coarse_mask(batch)
        self._last_coarse = coarse
        return self.net(batch["rgb"], batch["visible"], batch["occluder"], coarse)["prob"]

    def update_eval_metrics(self, batch: dict, batch_idx: int, split: str, metrics) -> None:
        from amodal3d.datamodules.crops import paste_crop_to_image

        if self.prior is None:  # the 2D-only ablation has no coarse mask to score
            return
        h, w = batch["image_visible"].shape[-2:]
        coarse = paste_crop_to_image(self._last_coarse, batch["crop_box"], h, w)
        metrics["coarse_miou"].update(coarse > 0.5, batch["eval_image_amodal"] > 0.5, batch["image_visible"] > 0.5,
                                      batch["category"])

    def eval_logs(self, split: str, name: str, value) -> dict:
        return {f"{split}/coarse_miou": value["miou"]} if name == "coarse_miou" else super().eval_logs(split, name, value)

    def configure_callbacks(self):
        return self.image_logging_callbacks()


# ----------------------------------------------------------------------------- true camera (evaluation only)


def identity_camera_map(num_categories: int = len(CATEGORIES)) -> torch.Tensor:
    """(C,4) per category of the table: azimuth sign, azimuth offset, elevation offset, distance offset."""
    out = torch.zeros(int(num_categories), 4)
    out[:, 0] = 1.0
    return out


def map_true_camera(true: torch.Tensor, category: torch.Tensor, cmap: torch.Tensor) -> torch.Tensor:
    """(B,3) true cameras mapped into the learned frame: az' = sign*az + off, el + d_el, dist + d_dist."""
    t = cmap.to(true.device, true.dtype)[category.long()]
    az = torch.remainder(t[:, 0] * true[:, 0] + t[:, 1], 360.0)
    return torch.stack([az, true[:, 1] + t[:, 2], true[:, 2] + t[:, 3]], dim=1)


STAGE = StageSpec(
    name="refine",
    module=RefineStage,
    model_schema=RefineModelConfig,
    data="crops",
    depends_on=("recon",),
    dependencies=prior_dependencies,
    method="refine (3D prior frozen)",
    targets=("amodal",),
    table_order=50,
    help="step 5: region-specific refinement of the 3D prior's render (supervised by amodal masks)",
)

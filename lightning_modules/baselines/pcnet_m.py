"""Deocclusion baseline: PCNet-M (Zhan et al., "Self-Supervised Scene De-occlusion", CVPR'20).

A UNet learns to complete a modal mask given an eraser mask, from visible
masks alone: another instance's visible mask is placed as an eraser in front
of the target (probability 0.8: the erased part must be recovered) or behind
it (the mask must be left as it is, which stops the net from growing every
shape into every eraser). The loss is weighted up inside the eraser. No amodal
label is read in training. At test time the eraser is what the protocol
allows (`model.test_eraser`): under gt-box the region known to occlude the
instance (the batch's `occluder` key), under gt-visible everything outside the
visible mask (no eraser is given there); the completion replaces the mask only
inside the eraser. The checkpoint is chosen by the label-free
`val/completion_loss`: the training loss on validation crops with erasers drawn
from a fixed seed per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from amodal3d.errors import ConfigError
from amodal3d.protocols import gives_amodal_box, protocol_of
from amodal3d.lightning_modules.common import AmodalStage
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.models.unet import UNet


@dataclass
class PCNetMConfig:
    base_channels: int = 16
    depth: int = 3
    use_rgb: bool = True  # feed the crop RGB (zeroed inside the eraser) besides the masks
    eraser_front_prob: float = 0.8  # P(eraser in front of the target); else behind it
    inmask_weight: float = 5.0  # loss weight of pixels inside the eraser
    outmask_weight: float = 1.0  # ... and outside it
    eraser_shift: float = 0.3  # max random translation of the eraser, fraction of the crop size
    eraser_scale_min: float = 0.8  # random eraser scale range
    eraser_scale_max: float = 1.25
    test_eraser: str = "auto"  # occluded | outside_visible | auto: occluded under gt-box, else outside_visible

TEST_ERASERS = ("auto", "occluded", "outside_visible")


class PCNetMModule(AmodalStage):
    """PCNet-M: UNet([modal ∖ eraser, eraser, rgb·(1−eraser)]) -> modal-mask logits."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        m = self.cfg.model
        if not 0.0 <= float(m.eraser_front_prob) <= 1.0:
            raise ConfigError(f"model.eraser_front_prob={m.eraser_front_prob}: expected a probability in [0, 1]")
        if not 0.0 < float(m.eraser_scale_min) <= float(m.eraser_scale_max):
            raise ValueError(
                f"model.eraser_scale_min={m.eraser_scale_min}, eraser_scale_max={m.eraser_scale_max}: "
                "expected 0 < min <= max"
            )
        if str(m.test_eraser) not in TEST_ERASERS:
            raise ConfigError(f"model.test_eraser={m.test_eraser!r}: expected one of {', '.join(TEST_ERASERS)}")
        self.test_eraser = str(m.test_eraser)
        if self.test_eraser == "auto":
            self.test_eraser = "occluded" if gives_amodal_box(protocol_of(self.cfg)) else "outside_visible"
        self.use_rgb = bool(m.use_rgb)
        from torchmetrics.aggregation import MeanMetric

        self.add_eval_metrics(completion_loss=MeanMetric)  # the label-free monitor
        self.net = UNet(2 + 3 * self.use_rgb, 1, int(m.base_channels), int(m.depth))

    # -- the network ------------------------------------------------------------------
    def forward(self, modal: torch.Tensor, eraser: torch.Tensor, rgb: torch.Tensor | None = None) -> torch.Tensor:
        """Completion logits (B,1,S,S) of `modal` (B,1,S,S) under `eraser` (B,1,S,S)."""
        parts = [modal * (1 - eraser), eraser]
        if self.use_rgb:
            if rgb is None:
                raise ValueError("PCNet-M was built with model.use_rgb=true: pass the crop RGB")
            parts.append(rgb * (1 - eraser))
        return self.net(torch.cat(parts, 1))

    # -- self-supervised training --------------------------------------------------------
    def sample_erasers(self, visible: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Erasers from other instances' visible masks, randomly shifted and scaled,
        and which of them lie in front of their target (B,) bool. A (CPU) generator
        makes the draw repeatable (validation)."""
        b, _, s, _ = visible.shape
        dev = visible.device
        m = self.cfg.model

        def rand(*shape):
            return torch.rand(*shape, generator=generator).to(dev) if generator is not None else torch.rand(
                *shape, device=dev)

        if b > 1:  # each target gets another instance of the batch
            other = (torch.arange(b, device=dev) + 1 + (rand(1) * (b - 1)).long().clamp_max(b - 2)) % b
        else:
            other = torch.zeros(1, dtype=torch.long, device=dev)
        src = visible[other]
        lo, hi = float(m.eraser_scale_min), float(m.eraser_scale_max)
        scale = lo + (hi - lo) * rand(b)
        shift = (rand(b, 2) * 2 - 1) * 2 * float(m.eraser_shift)  # normalised coords span 2
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(src.shape), align_corners=False)
        eraser = F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        front = rand(b) < float(m.eraser_front_prob)
        return eraser, front

    def pcnet_loss(self, visible: torch.Tensor, rgb: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Weighted BCE of recovering the visible mask from itself minus an eraser."""
        target = visible.float()
        eraser, front = self.sample_erasers(target, generator)
        # behind the target, the eraser only covers what the target does not
        eraser = torch.where(front[:, None, None, None], eraser, eraser * (1 - target))
        logits = self(target, eraser, rgb)
        m = self.cfg.model
        weight = float(m.inmask_weight) * eraser + float(m.outmask_weight) * (1 - eraser)
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
        return loss / weight.sum().clamp_min(1e-6)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # reads only the visible mask and the RGB: no amodal or other evaluation-only key
        visible = batch["visible"]
        rgb = batch["rgb"] if self.use_rgb else None
        loss = self.pcnet_loss(visible, rgb)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=visible.shape[0])
        return loss

    def update_eval_metrics(self, batch: dict, batch_idx: int, split: str, metrics) -> None:
        # the label-free monitor: the training loss under erasers fixed per batch
        g = torch.Generator().manual_seed(1_000_003 + batch_idx)
        visible = batch["visible"]
        loss = self.pcnet_loss(visible, batch["rgb"] if self.use_rgb else None, g)
        metrics["completion_loss"].update(loss, weight=visible.shape[0])

    # -- inference ----------------------------------------------------------------------
    def predict_amodal(self, batch: dict) -> torch.Tensor:
        visible = batch["visible"].float()
        if self.test_eraser == "occluded":
            eraser = batch["occluder"].float() * (1 - visible)
        else:
            eraser = 1 - visible
        rgb = batch["rgb"] if self.use_rgb else None
        prob = torch.sigmoid(self(visible, eraser, rgb))
        # outside the occluder the visible mask is the observed truth
        return torch.where(eraser > 0.5, prob, visible)


STAGE = StageSpec(
    name="pcnet_m",
    module=PCNetMModule,
    model_schema=PCNetMConfig,
    data="crops",
    method="Deocclusion",
    table_order=10,
    help="Deocclusion (PCNet-M, CVPR'20) baseline: self-supervised mask completion from visible masks",
)

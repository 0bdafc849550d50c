"""The recon network: crop -> symmetric mesh + camera, and its silhouette in the crop frame.

A plain nn.Module, apart from the `recon` LightningModule (lightning_modules.recon)
that trains it, so the stages that consume a frozen recon (viewpoint, render,
refine) depend on the network only. Its config `m` is any attribute-style config
with the fields of ReconModelConfig (below; the recon stage's `model` schema).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from amodal3d.categories import CATEGORIES
from amodal3d.protocols import LEGACY_PROTOCOL, check_protocol, gives_amodal_box
from amodal3d.models.appearance import ColourTemplates, colour_error, visible_vertices
from amodal3d.models.camera_head import CameraHead
from amodal3d.models.encoder import CropEncoder, crop_channels
from amodal3d.models.mesh_decoder import SymmetricMeshDecoder
from amodal3d.models.mesh_renderer import CropRenderer, box_in_crop, fit_placement, mask_boxes, pixel_box_to_ndc
from amodal3d.models.placement import PlacementHead, adjust_box
from amodal3d.models.recon_losses import resize_mask, silhouette_loss


def observed_pixels(batch: dict) -> torch.Tensor:
    """(B,1,S,S) where the crop shows the object itself: visible and not known to be occluded."""
    vis, occ = batch["visible"].float(), batch["occluder"].float()
    return (vis * (1.0 - occ)).reshape(vis.shape[0], 1, *vis.shape[-2:])


def _finished_schedule_if_missing(module, state_dict, prefix, *args) -> None:
    """A state dict saved before the schedule state was: the schedule had finished
    (full offsets, ties broken when a margin is set), as those checkpoints were used."""
    state_dict.setdefault(prefix + "_extra_state", {"offset_scale": 1.0, "break_ties": module.tie_margin > 0})


class ReconNet(nn.Module):
    """Crop -> symmetric mesh + camera, and their silhouette in the crop frame.

    forward(batch) -> dict(verts (B,V,3), faces (F,3), offsets (B,H,3), camera (B,3)
    azimuth deg [0,360) / elevation deg / distance, hypotheses (B,K,3), best (B,),
    place (B,3) NDC scale/tx/ty, box (B,4) NDC target box, feat (B,D)).
    With a camera multiplex (K > 1) `camera` is the hypothesis whose silhouette best
    explains the visible mask outside the occluded pixels (analysis by synthesis).
    Where the mesh is placed (`box`): under gt-box the amodal box the protocol
    hands out; under gt-visible a box predicted from the crop feature as a bounded
    residual over the visible box (`box_head`), learned by the silhouette losses.
    Reads batch keys rgb, visible, occluded, category, crop_box (and amodal_box
    under gt-box) only.
    """

    def __init__(self, m, num_categories: int = len(CATEGORIES), crop_size: int = 64,
                 protocol: str = LEGACY_PROTOCOL) -> None:
        super().__init__()
        self.protocol = check_protocol(protocol)
        self.crop_size = int(crop_size)
        self.use_occluded = bool(m.use_occluded)
        self.select_size = int(m.select_size)
        self.select_prior = float(m.select_prior)
        self.tie_margin = float(m.select_tie_margin)
        self.break_ties = self.tie_margin > 0  # switched off by the stage before select_tie_start_step
        self.loss_weights = (float(m.w_iou), float(m.w_mse))
        self.encoder = CropEncoder(
            backbone=str(m.backbone), in_chans=4 + self.use_occluded, feat_dim=int(m.feat_dim),
            num_categories=num_categories, channels_last=bool(m.encoder_channels_last),
        )
        self.decoder = SymmetricMeshDecoder(
            int(m.feat_dim), num_categories, level=int(m.ico_level), radius=float(m.radius),
            max_offset=float(m.max_offset),
        )
        self.camera_head = CameraHead(
            int(m.feat_dim), hypotheses=int(m.camera_hypotheses),
            elevation_range=tuple(m.elevation_range), distance_range=tuple(m.distance_range),
        )
        self.offset_scale = 1.0  # set by the stage during the offset warm-up
        # the schedule state is part of the weights: a checkpoint taken mid warm-up reloads
        # as the model that was validated (checkpoints from before: the finished schedule)
        self.register_load_state_dict_pre_hook(_finished_schedule_if_missing)
        self.renderer = CropRenderer(
            sigma=float(m.sigma), faces_per_pixel=int(m.faces_per_pixel), backend=str(m.renderer_backend),
            without_grad=str(m.silhouette_without_grad), compiled=bool(m.renderer_compiled),
            native=bool(m.renderer_native),
        )
        # colour templates only when asked for: checkpoints trained without them keep loading
        self.appearance = (ColourTemplates(num_categories, self.decoder.src, init_noise=float(m.colour_init_noise))
                           if float(m.w_colour) > 0 else None)
        self.colour_select = float(m.colour_select)
        # gt-visible: the box is predicted (zero residual at the start: the visible box)
        self.box_head = None if gives_amodal_box(self.protocol) else PlacementHead(
            int(m.feat_dim), num_categories, geometry_dim=4, max_log_scale=float(m.box_max_log_scale),
            max_shift=float(m.box_max_shift),
        )

    def get_extra_state(self) -> dict:
        return {"offset_scale": float(self.offset_scale), "break_ties": bool(self.break_ties)}

    def set_extra_state(self, state: dict) -> None:
        self.offset_scale = float(state["offset_scale"])
        self.break_ties = bool(state["break_ties"])

    @property
    def faces(self) -> torch.Tensor:
        return self.decoder.faces

    def inputs(self, batch: dict) -> torch.Tensor:
        return crop_channels(batch["rgb"], batch["visible"], batch["occluder"] if self.use_occluded else None,
                             self.use_occluded)

    def encode(self, x: torch.Tensor, category: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.encoder(x, category)
        out = self.decoder(feat, category, self.offset_scale)
        out.update(self.camera_head(feat))
        out["feat"] = feat
        return out

    def target_box(self, batch: dict, feat: torch.Tensor | None = None) -> torch.Tensor:
        """(B,4) NDC (cx, cy, w, h) box the mesh's projection is fitted to, in the crop
        frame: the amodal box (gt-box), or the box predicted from `feat` (gt-visible)."""
        if self.box_head is None:
            box = box_in_crop(batch["amodal_box"].float(), batch["crop_box"].float(), self.crop_size)
            return pixel_box_to_ndc(box, self.crop_size)
        if feat is None:
            raise ValueError("under gt-visible the mesh's box is predicted: pass the crop feature (encode()['feat'])")
        vis = pixel_box_to_ndc(mask_boxes(batch["visible"]), self.crop_size)
        return adjust_box(vis, self.box_head(feat.float(), batch["category"], vis))

    def render(self, verts: torch.Tensor, camera: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
        """(B,size,size) soft silhouettes, placed so the projection fills `box`."""
        place = fit_placement(verts, camera, box, self.renderer.fov)
        return self.renderer(verts, self.faces, camera, place, size)

    def colour_error(self, verts: torch.Tensor, camera: torch.Tensor, box: torch.Tensor, category: torch.Tensor,
                     rgb: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """(B,) colour error of the category colour templates on the meshes placed in
        `box` under `camera`, against the crop's RGB where `observed` (B,1,S,S) holds
        (models.appearance; the meshes and cameras get no gradient from it)."""
        verts, camera = verts.detach(), camera.detach()
        place = fit_placement(verts, camera, box, self.renderer.fov)
        xy, visible = visible_vertices(verts, self.faces, camera, place)
        detail, share = self.appearance(category)
        return colour_error(xy, visible, detail, share, rgb, observed)[0]

    def select_camera(self, out: dict, batch: dict, box: torch.Tensor, tie_noise: float = 0.0):
        """(camera (B,3), best (B,)): the hypothesis whose render (at select_size, no
        gradient) has the lowest masked silhouette loss against the visible mask, plus
        colour_select x the colour templates' error where they exist (a phone's screen
        tells its front from its back when the silhouettes cannot), plus
        select_prior x the score's -log p (silhouettes seen from opposite sides often
        fit equally well; the score, which also sees the RGB, then decides).
        With a tie margin (and break_ties on), every hypothesis within the margin of
        the lowest loss counts as a tie and the highest score among them wins: a
        convention shared by all instances, which the score can learn from the RGB
        (screens, windows), instead of a per-instance coin toss."""
        hyp = out["hypotheses"]
        b, k, _ = hyp.shape
        if k == 1:
            return hyp[:, 0], torch.zeros(b, dtype=torch.long, device=hyp.device)
        size = self.select_size
        with torch.no_grad():
            target = resize_mask(batch["visible"], size).repeat_interleave(k, 0)
            weight = 1.0 - resize_mask(batch["occluder"], size).repeat_interleave(k, 0)
            verts = out["verts"].detach().repeat_interleave(k, 0)
            sil = self.render(verts, hyp.detach().reshape(b * k, 3), box.repeat_interleave(k, 0), size)
            err = silhouette_loss(sil, target, weight, *self.loss_weights).view(b, k)
            if self.appearance is not None and self.colour_select > 0:
                col = self.colour_error(
                    verts, hyp.reshape(b * k, 3), box.repeat_interleave(k, 0), batch["category"].repeat_interleave(k),
                    batch["rgb"].repeat_interleave(k, 0), observed_pixels(batch).repeat_interleave(k, 0),
                )
                err = err + self.colour_select * col.view(b, k)
            if self.select_prior > 0:
                err = err - self.select_prior * torch.log_softmax(out["logits"].detach(), dim=1)
            if tie_noise > 0:
                err = err + tie_noise * torch.rand_like(err)
            best = err.argmin(dim=1)
            if self.break_ties:
                tied = err <= err.min(dim=1, keepdim=True).values + self.tie_margin
                by_score = out["logits"].detach().masked_fill(~tied, float("-inf")).argmax(dim=1)
                out["tie_broken"] = (by_score != best).float()
                best = by_score
        return hyp[torch.arange(b, device=hyp.device), best], best

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.encode(self.inputs(batch), batch["category"])
        out["box"] = self.target_box(batch, out["feat"])
        out["camera"], out["best"] = self.select_camera(out, batch, out["box"])
        out["place"] = fit_placement(out["verts"], out["camera"], out["box"], self.renderer.fov)
        return out

    def silhouette(self, batch: dict, size: int | None = None) -> torch.Tensor:
        """(B,1,S,S) rendered silhouette in the crop frame (S = crop size by default)."""
        out = self(batch)
        sil = self.renderer(out["verts"], self.faces, out["camera"], out["place"], size or self.crop_size)
        return sil[:, None]


@dataclass
class ReconModelConfig:
    backbone: str = "resnet10t"  # any timm model name; always built with pretrained=False
    encoder_channels_last: bool = True  # channels-last weights and inputs in training (faster; same values up to rounding)
    feat_dim: int = 256
    use_occluded: bool = True  # the occluded mask is an encoder input channel
    ico_level: int = 3  # icosphere subdivision: 3 = 642 vertices
    radius: float = 0.5  # RMS radius every mesh is normalised to
    max_offset: float = 0.2  # bound of the per-instance vertex offsets (tanh)
    camera_hypotheses: int = 1  # > 1: camera multiplex, the best-fitting hypothesis is used
    select_size: int = 16  # resolution at which the multiplex hypotheses are compared
    select_prior: float = 0.0  # weight of the score's -log p in the selection: breaks near-ties consistently
    select_tie_margin: float = 0.0  # > 0: hypotheses within this silhouette loss of the best tie; the score picks
    select_tie_start_step: int = 0  # training step from which the score breaks those ties (before: at random)
    elevation_range: list[float] = field(default_factory=lambda: [0.0, 60.0])
    distance_range: list[float] = field(default_factory=lambda: [2.2, 3.2])
    render_size: int = 32  # resolution of the silhouette losses
    sigma: float = 1e-4  # soft-rasteriser sharpness
    faces_per_pixel: int = 10
    renderer_backend: str = "sparse"  # sparse | pytorch3d | auto/fast (models.soft_silhouette)
    renderer_compiled: bool = False  # the renderers' per-face window maths through torch.compile: same values, faster (docs/results.md)
    renderer_native: bool = True  # soft renders without gradient on the CPU by a C++ kernel (models/native_silhouette.py): same values, faster
    silhouette_without_grad: str = "soft"  # renders no gradient flows through: soft | hard (models.hard_silhouette; faster, masks differ: docs/results.md)
    template_lr_mult: float = 10.0  # the templates are few parameters with a long way to go
    w_hypothesis: float = 0.1  # multiplex: the score learns to rank the best-fitting hypothesis first
    rgb_dropout: float = 0.3  # P(crop RGB zeroed) in training: the cycle renders have no RGB
    w_iou: float = 1.0
    w_mse: float = 1.0
    w_swap: float = 1.0
    w_shape_consistency: float = 1.0
    w_laplacian: float = 10.0  # the regularisers are means over vertices/edges
    w_normal: float = 0.5
    w_edge: float = 0.5
    w_azimuth_uniform: float = 0.5
    w_cycle_camera: float = 0.5
    w_cycle_shape: float = 1.0
    offset_warmup_steps: int = 300  # instance offsets off: template + camera must fit the silhouettes
    offset_ramp_steps: int = 200  # then the offsets fade in linearly
    cycle_start_step: int = 300  # the cycle starts once the templates carry shape
    mesh_log_every_n_epochs: int = 5  # TensorBoard meshes (images: run.image_log_every_n_epochs)
    max_train_minutes: float = 0.0  # > 0: stop fitting after this wall-clock time (lightning Timer)
    w_colour: float = 0.0  # > 0: category colour templates (models.appearance), fitted with this weight
    colour_select: float = 1.0  # weight of their colour error in the multiplex choice (with w_colour > 0)
    colour_init_noise: float = 0.0  # std of the colour templates' initial logits (0: uniform grey, no bias)
    box_max_log_scale: float = 1.1  # gt-visible: bound of the predicted box's log-scale residual over the visible box
    box_max_shift: float = 0.75  # gt-visible: bound of its shift, in visible-box sides

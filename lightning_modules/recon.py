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

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import CatMetric, MeanMetric

from amodal3d.categories import CATEGORIES
from datamodules.protocols import (
    LEGACY_PROTOCOL, check_protocol, gives_amodal_box, monitor_unknown, protocol_of, unknown_pixels,
)
from lightning_modules.common import AmodalStage, as_config, build_optimizer, with_schema_defaults
from lightning_modules.registry import StageSpec
from models.appearance import ColourTemplates, colour_error, visible_vertices
from models.camera_head import CameraHead
from models.encoder import CropEncoder, crop_channels
from models.mesh_decoder import SymmetricMeshDecoder
from models.mesh_renderer import (
    CropRenderer, box_in_crop, centred_box_ndc, fit_placement, mask_boxes, pixel_box_to_ndc,
)
from models.placement import PlacementHead, adjust_box
from models.precision import float32_geometry
from models.recon_losses import (
    azimuth_difference,
    azimuth_uniformity,
    MeshRegularisers,
    camera_loss,
    resize_mask,
    sample_cameras,
    silhouette_loss,
    view_pairs,
    visible_iou,
)


@dataclass
class ReconModelConfig:
    backbone: str = "resnet10t"  # any timm model name; always built with pretrained=False
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


def synthetic_crop_margin(cfg) -> float:
    """The margin of a crop around a whole (unoccluded) object under the config's protocol:
    its amodal box is its visible box, so gt-visible frames it by visible_crop_margin."""
    if gives_amodal_box(protocol_of(cfg)):
        return float(cfg.loader.crop_margin)
    return float(cfg.loader.get("visible_crop_margin", cfg.loader.crop_margin))


def observed_pixels(batch: dict) -> torch.Tensor:
    """(B,1,S,S) where the crop shows the object itself: visible and not known to be occluded."""
    vis, occ = batch["visible"].float(), batch["occluded"].float()
    return (vis * (1.0 - occ)).reshape(vis.shape[0], 1, *vis.shape[-2:])


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
            num_categories=num_categories,
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
        self.renderer = CropRenderer(
            sigma=float(m.sigma), faces_per_pixel=int(m.faces_per_pixel), backend=str(m.renderer_backend)
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

    @property
    def faces(self) -> torch.Tensor:
        return self.decoder.faces

    def inputs(self, batch: dict) -> torch.Tensor:
        return crop_channels(batch["rgb"], batch["visible"], batch["occluded"] if self.use_occluded else None,
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
            weight = 1.0 - resize_mask(batch["occluded"], size).repeat_interleave(k, 0)
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


# -- evaluation-only helpers (hidden ground truth: never used in a loss) ----------------------


def _offset_grids(rows: torch.Tensor, num_categories: int):
    """Per category present: (c, rows selected, (360, n) aligned errors for every azimuth
    offset, and the symmetry-aware ones or None): what camera_errors and camera_offsets pick from."""
    cat = rows[:, 0].long()
    pred, true = rows[:, 1:4], rows[:, 4:7]
    same = rows[:, 8:]
    known = ~torch.isnan(same).any(dim=1) if same.shape[1] else torch.zeros_like(cat, dtype=torch.bool)
    view_az = torch.arange(same.shape[1], dtype=rows.dtype, device=rows.device) * (360.0 / max(same.shape[1], 1))
    grid = torch.arange(360, dtype=rows.dtype, device=rows.device)
    for c in range(num_categories):
        sel = cat == c
        if not sel.any():
            continue
        shifted = pred[sel, 0][None] + grid[:, None]  # (360, n)
        err = azimuth_difference(shifted, true[sel, 0][None])
        sym = None
        if known[sel].any():
            to_views = azimuth_difference(shifted[..., None], view_az)  # (360, n, V)
            twins = torch.where(same[sel] == 1, to_views, torch.full_like(to_views, float("inf"))).amin(-1)
            sym = torch.where(known[sel][None], twins, err)
        yield c, sel, err, sym


def camera_offsets(rows: torch.Tensor, num_categories: int) -> dict[str, list[int]]:
    """Per-category azimuth offsets (degrees, 1 degree grid) that minimise the mean
    aligned and symmetry-aware errors of `rows` (camera_errors' layout); categories
    absent from rows get 0. Fit them on validation, apply them to test."""
    out = {"aligned": [0] * num_categories, "symaware": [0] * num_categories}
    for c, _, err, sym in _offset_grids(rows, num_categories):
        out["aligned"][c] = int(err.mean(dim=1).argmin())
        out["symaware"][c] = int((err if sym is None else sym).mean(dim=1).argmin())
    return out


def camera_errors(rows: torch.Tensor, num_categories: int, offsets: dict | None = None) -> dict[str, torch.Tensor]:
    """Camera and shape errors from per-instance rows (category, az, el, dist
    predicted, az, el, dist true, chamfer[, same-picture views]).

    The learned canonical frame of each category is arbitrary, so besides the raw
    azimuth error the errors are also reported after one global azimuth offset per
    category (on a 1 degree grid): by default the offset that minimises that
    category's mean error on the evaluated split itself (training curves); with
    `offsets` (camera_offsets of another split, e.g. validation) those offsets are
    applied instead, so the scored split decides nothing. acc30: share of instances within 30 deg;
    flip_share: share off by more than 135 deg (a front/back flip), quarter_share: off
    by 45-135 deg (the view turned by about a quarter); uniform guesses give 25% / 50%.
    az_err_aligned_sym folds front/back flips (min(e, 180 - e)) of every instance: a
    diagnostic for objects whose silhouettes are nearly the same from opposite sides.
    Optional columns 8.. (V of them): 1 for each of V equally spaced azimuths
    (360 k / V) whose view is the same picture as the true one (TrueMeshes.same_views;
    a NaN row: unknown). az_err_symaware is then the error to the nearest of those
    azimuths, with its own offset per category: the error no method can avoid is not
    counted, everything a method could see still is. views_with_twin: share of
    instances whose view has such a twin.
    """
    pred, true = rows[:, 1:4], rows[:, 4:7]
    same = rows[:, 8:]
    known = (~torch.isnan(same).any(dim=1) if same.shape[1]
             else torch.zeros(len(rows), dtype=torch.bool, device=rows.device))
    raw = azimuth_difference(pred[:, 0], true[:, 0])
    aligned, symaware = raw.clone(), raw.clone()
    offsets = offsets or camera_offsets(rows, num_categories)
    for c, sel, err, sym in _offset_grids(rows, num_categories):
        aligned[sel] = err[offsets["aligned"][c]]
        if sym is not None:
            symaware[sel] = sym[offsets["symaware"][c]]
    out = {
        "az_err_raw": raw.mean(),
        "az_err_aligned": aligned.mean(),
        "az_median_aligned": aligned.median(),
        "az_acc30_aligned": (aligned < 30).float().mean(),
        "az_flip_share": (aligned > 135).float().mean(),
        "az_quarter_share": ((aligned > 45) & (aligned <= 135)).float().mean(),
        "az_err_aligned_sym": torch.minimum(aligned, 180.0 - aligned).mean(),
        "el_err": (pred[:, 1] - true[:, 1]).abs().mean(),
        "dist_err": (pred[:, 2] - true[:, 2]).abs().mean(),
    }
    if known.any():
        out["az_err_symaware"] = symaware.mean()
        out["views_with_twin"] = ((same[known] == 1).sum(dim=1) > 1).float().mean()
    chamfer = rows[:, 7]
    if torch.isfinite(chamfer).any():
        out["chamfer"] = chamfer[torch.isfinite(chamfer)].mean()
    return out


class TrueMeshes:
    """The true mesh of an object of a built dataset, for evaluation only.

    synth13 objects are regenerated from (category, split, index, seed), which the
    manifest's `objects` table gives for every split-wide object id; other sources
    keep no meshes in the dataset, so `get` and `same_views` return None for them.
    """

    def __init__(self, root) -> None:
        from datamodules.shards import read_manifest

        try:
            manifest = read_manifest(root)
        except Exception:  # no readable dataset: no 3D diagnostics, not a training error
            manifest = {}
        gen = manifest.get("generator", {})
        self.enabled = gen.get("source") == "synth13" and "objects" in manifest
        self.seed = int(gen.get("seed", 0))
        self.views = int(gen.get("views", 24))
        self.render_size = int(gen.get("render_size", 64))
        self.objects = manifest.get("objects", {})
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._same: dict[tuple[str, int], np.ndarray] = {}

    def __bool__(self) -> bool:
        return self.enabled

    def _object(self, split: str, object_id: int):
        """The regenerated synth13 object behind a split-wide object id (None: unknown)."""
        from datamodules.sources.synth13 import synth_object

        for cat, info in self.objects.get(split, {}).items():
            k = object_id - int(info["offset"])
            if 0 <= k < int(info["count"]):
                return synth_object(cat, split, k, self.seed)
        return None

    def get(self, split: str, object_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not self.enabled:
            return None
        meshes = []
        for oid in object_ids.tolist():
            key = (split, int(oid))
            if key not in self._cache:
                obj = self._object(split, int(oid))
                if obj is None:
                    return None
                self._cache[key] = (torch.from_numpy(obj.verts).float(), torch.from_numpy(obj.faces).long())
            meshes.append(self._cache[key])
        return meshes

    def same_views(self, split: str, object_ids: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor | None:
        """(B, V) 1 for every one of the object's V views that is the same picture as the
        instance's own view (metrics.view_symmetry.same_picture on the object's renders,
        the view itself included), else 0; a NaN row for an azimuth between views or
        an unknown object; None without true meshes."""
        from datamodules.sources.base import nmr_cameras
        from datamodules.sources.synth13 import render_synth_objects
        from metrics.view_symmetry import same_picture

        if not self.enabled:
            return None
        out = torch.full((len(object_ids), self.views), float("nan"))
        step = 360.0 / self.views
        for i, (oid, az) in enumerate(zip(object_ids.tolist(), azimuth.tolist())):
            key = (split, int(oid))
            if key not in self._same:
                obj = self._object(split, int(oid))
                if obj is None:  # not in the manifest: unknown, like an azimuth between views
                    continue
                self._same[key] = same_picture(render_synth_objects([obj], nmr_cameras(self.views), self.render_size))[0]
            view = az / step
            if abs(view - round(view)) < 1e-3:
                out[i] = torch.from_numpy(self._same[key][int(round(view)) % self.views].astype(np.float32))
        return out


def _normalise_points(p: torch.Tensor) -> torch.Tensor:
    """Centre each (B,N,3) point set's bounding box and scale its diagonal to 1."""
    lo, hi = p.min(dim=1, keepdim=True).values, p.max(dim=1, keepdim=True).values
    return (p - 0.5 * (lo + hi)) / (hi - lo).norm(dim=-1, keepdim=True).clamp_min(1e-6)


@float32_geometry
def view_frame_chamfer(
    verts: torch.Tensor,
    faces: torch.Tensor,
    camera: torch.Tensor,
    true_meshes: list[tuple[torch.Tensor, torch.Tensor]],
    true_camera: torch.Tensor,
    num_points: int = 2000,
) -> torch.Tensor:
    """(B,) Chamfer distance (pytorch3d, squared L2, both directions) between the
    predicted mesh seen from the predicted camera and the true mesh seen from the
    true camera, each normalised (bbox centred, diagonal 1): a view-centred 3D error
    that needs no alignment of the learned canonical frame."""
    from pytorch3d.loss import chamfer_distance
    from pytorch3d.ops import sample_points_from_meshes
    from pytorch3d.structures import Meshes

    from models.mesh_renderer import make_cameras

    dev = verts.device
    b = verts.shape[0]
    pred_view = make_cameras(camera).get_world_to_view_transform().transform_points(verts)
    true_tf = make_cameras(true_camera.to(dev)).get_world_to_view_transform()
    true_verts = [m[0].to(dev) for m in true_meshes]
    true_view = [true_tf[i].transform_points(v[None])[0] for i, v in enumerate(true_verts)]
    pred_pts = sample_points_from_meshes(Meshes(pred_view, faces[None].expand(b, -1, -1)), num_points)
    true_pts = sample_points_from_meshes(Meshes(true_view, [m[1].to(dev) for m in true_meshes]), num_points)
    dist, _ = chamfer_distance(_normalise_points(pred_pts), _normalise_points(true_pts), batch_reduction=None)
    return dist


class ReconStage(AmodalStage):
    """The `recon` stage (see the module docstring)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        cfg = as_config(cfg)
        m = with_schema_defaults(cfg.model, ReconModelConfig)
        if int(m.render_size) < 8:
            raise ValueError(f"model.render_size={m.render_size}: use at least 8 pixels")
        if not 0.0 <= float(m.rgb_dropout) <= 1.0:
            raise ValueError(f"model.rgb_dropout={m.rgb_dropout}: expected a probability in [0, 1]")
        if float(m.select_tie_margin) < 0:
            raise ValueError(f"model.select_tie_margin={m.select_tie_margin}: expected >= 0 (0 turns tie-breaking off)")
        for key in ("w_colour", "colour_select", "colour_init_noise"):
            if float(m[key]) < 0:
                raise ValueError(f"model.{key}={m[key]}: expected >= 0 (w_colour=0 turns the colour templates off)")
        self.m = m
        self.protocol = protocol_of(cfg)
        # the cycle's renders are framed as the loader frames an unoccluded object under the protocol
        self.crop_margin = synthetic_crop_margin(cfg)
        self.net = ReconNet(m, num_categories=len(CATEGORIES), crop_size=int(cfg.loader.crop_size),
                            protocol=self.protocol)
        self.regularisers = MeshRegularisers(self.net.faces, self.net.decoder.num_verts)
        self.el_range = tuple(float(v) for v in m.elevation_range)
        self.dist_range = tuple(float(v) for v in m.distance_range)
        self.val_visible_iou = MeanMetric()
        self.test_visible_iou = MeanMetric()
        # per instance: category, az/el/dist predicted, az/el/dist true, chamfer (NaN: no true mesh)
        self.val_cameras = CatMetric()
        self.test_cameras = CatMetric()
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
            occ = batch["occluded"].float()
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
    def _evaluate(self, batch: dict, split: str, metric, vis_metric, cam_metric) -> None:
        self.evaluate_batch(batch, metric)
        out, sil = self._last["out"], self._last["sil"]
        vis_metric.update(visible_iou(sil, batch["visible"], monitor_unknown(batch)))
        true = batch["eval_camera"].float()
        chamfer, same = self._chamfer(out, batch, split), self._same_views(batch, split)
        cam_metric.update(torch.cat(
            [batch["category"].float()[:, None], out["camera"].detach(), true, chamfer[:, None], same], dim=1
        ))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metric, self.val_visible_iou, self.val_cameras)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metric, self.test_visible_iou, self.test_cameras)

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
            out["verts"].detach(), self.net.faces, out["camera"].detach(), meshes, batch["eval_camera"].float()
        )

    def _same_views(self, batch: dict, split: str) -> torch.Tensor:
        """(B,V) the views that are the same picture as each instance's (TrueMeshes.same_views);
        (B,0) without true meshes."""
        dev = batch["eval_camera"].device
        same = None
        if self._truth():
            same = self._truth().same_views(split, batch["object_id"].cpu(), batch["eval_camera"][:, 0].cpu())
        return torch.zeros((len(batch["eval_camera"]), 0), device=dev) if same is None else same.to(dev)

    def _log_cameras(self, cam_metric, prefix: str) -> None:
        rows = cam_metric.compute() if cam_metric.update_count else None
        cam_metric.reset()
        if rows is None or rows.numel() == 0:
            return
        for k, v in camera_errors(rows, len(CATEGORIES)).items():
            self.log(f"{prefix}/{k}", v, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val/visible_iou", self.val_visible_iou.compute())
        self.val_visible_iou.reset()
        self._log_cameras(self.val_cameras, "val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log("test/visible_iou", self.test_visible_iou.compute())
        self.test_visible_iou.reset()
        self._log_cameras(self.test_cameras, "test")

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

        from callbacks.tensorboard_images import TensorBoardImages

        callbacks = [
            TensorBoardImages(
                every_n_epochs=int(self.cfg.run.image_log_every_n_epochs),
                mesh_every_n_epochs=int(self.m.mesh_log_every_n_epochs),
            )
        ]
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

"""The 3D prior as nn.Modules: crop batch -> the coarse amodal mask of the instance.

ShapePrior (what the render stage trains and refine/joint/predict consume) renders
recon's mesh under the chosen camera (recon's or the viewpoint estimator's), placed by
a learned residual over the protocol's box. ReconShapePrior and RenderShapePrior give
refine one interface over the recon render and the ShapePrior (coarse_mask, camera,
rendering from a given camera, parts by stage). Everything is rebuilt from plain spec
dicts, so a checkpoint that holds a prior needs no other file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch3d.structures import Meshes
from torch import nn

from amodal3d.categories import CATEGORIES
from amodal3d.errors import ConfigError
from amodal3d.protocols import LEGACY_PROTOCOL
from amodal3d.models.mesh_renderer import project
from amodal3d.models.placement import FIT_MODES, PlacementHead, adjust_box, box_placement, placed_cameras
from amodal3d.models.recon_net import ReconModelConfig, ReconNet
from amodal3d.models.viewpoint_net import ViewpointNet, estimator_camera


def spec_class_names(spec: dict) -> tuple[str, ...]:
    """The category table a recon dependency spec was trained on (recorded from its checkpoint's
    cfg; a spec written before the key: the 13 ShapeNet categories). Its per-category templates,
    embeddings and placement rows are sized by it."""
    return tuple(str(n) for n in (spec.get("class_names") or ())) or CATEGORIES


def recon_net_from_spec(spec: dict) -> ReconNet:
    """An (untrained) ReconNet of a recon dependency spec {"model": ..., "crop_size": ...,
    "class_names": ...}; keys recon added since the spec was written take recon's defaults,
    keys it dropped are carried along unread."""
    model = OmegaConf.merge(OmegaConf.create(asdict(ReconModelConfig())), spec["model"])
    return ReconNet(model, num_categories=len(spec_class_names(spec)), crop_size=int(spec["crop_size"]),
                    protocol=spec.get("protocol", LEGACY_PROTOCOL))


def freeze_(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients (BatchNorm statistics stay those of the checkpoint)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class ShapePrior(nn.Module):
    """Crop batch -> mesh, camera, placement and the coarse amodal mask in the crop frame.

    Built from a plain `spec` dict (ShapePrior(spec); `prior.spec` gives it back), so a
    module holding a ShapePrior can rebuild it from its own hyperparameters and take the
    weights from its own state_dict. recon and the viewpoint estimator are always
    frozen (eval mode, no gradients); the placement head is trainable until frozen.
    Reads batch keys rgb, visible, occluded, category, crop_box (and amodal_box under
    gt-box, through recon's box) only."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        if spec["camera_source"] not in ("recon", "viewpoint"):
            raise ValueError(f"ShapePrior spec camera_source={spec['camera_source']!r}: expected recon or viewpoint")
        if spec["fit"] not in FIT_MODES:
            raise ConfigError(f"model.fit={spec['fit']!r}: expected one of {', '.join(FIT_MODES)}")
        self.spec = spec
        self.recon = freeze_(recon_net_from_spec(spec["recon"]))
        self.viewpoint = (freeze_(ViewpointNet.from_spec(spec["viewpoint"]))
                          if spec["camera_source"] == "viewpoint" else None)
        p = spec["placement"]
        self.placement = PlacementHead(
            self.recon.encoder.feat_dim, len(spec_class_names(spec["recon"])), geometry_dim=2, hidden=int(p["hidden"]),
            max_log_scale=float(p["max_log_scale"]), max_shift=float(p["max_shift"]),
        )
        self.fit = spec["fit"]

    @property
    def crop_size(self) -> int:
        return self.recon.crop_size

    @property
    def faces(self) -> torch.Tensor:
        return self.recon.faces

    def train(self, mode: bool = True):
        super().train(mode)
        for name in ("recon", "viewpoint"):
            if self._modules.get(name) is not None:
                self._modules[name].eval()
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """dict(verts (B,V,3), faces (F,3), camera (B,3) from the chosen source, box (B,4) NDC
        amodal box, target (B,4) box after the residual, residual (B,4), place (B,4)
        sx/sy/tx/ty, feat (B,D))."""
        if self.viewpoint is None:  # recon's own inference: its camera selection included
            rec = self.recon(batch)
            verts, box, camera = rec["verts"], rec["box"], rec["camera"]
        else:
            rec = self.recon.encode(self.recon.inputs(batch), batch["category"])
            verts, box = rec["verts"], self.recon.target_box(batch, rec["feat"])
            camera = estimator_camera(self.recon, self.viewpoint.predict(batch), verts, batch, box)
        p = project(verts, camera, self.recon.renderer.fov)
        extent = (p.max(dim=1).values - p.min(dim=1).values).clamp_min(1e-4)
        geometry = torch.stack([torch.log(extent[:, 0] / extent[:, 1]),
                                torch.log(box[:, 2].clamp_min(1e-4) / box[:, 3].clamp_min(1e-4))], dim=1)
        residual = self.placement(rec["feat"], batch["category"], geometry)
        target = adjust_box(box, residual)
        place = box_placement(verts, camera, target, self.fit, self.recon.renderer.fov)
        return {"verts": verts, "faces": self.faces, "camera": camera, "box": box, "target": target,
                "residual": residual, "place": place, "feat": rec["feat"]}

    def render(self, out: dict, size: int | None = None) -> torch.Tensor:
        """(B,1,S,S) silhouettes of forward()'s output (S = crop size by default): soft, or
        hard where no gradient flows (recon's renderer decides: CropRenderer.renderer_for)."""
        verts = out["verts"]
        meshes = Meshes(verts=verts, faces=self.faces[None].expand(verts.shape[0], -1, -1))
        cams = placed_cameras(out["camera"], out["place"], self.recon.renderer.fov)
        renderer = self.recon.renderer.renderer_for(int(size or self.crop_size), verts, out["camera"], out["place"])
        return renderer(meshes, cams)[:, None]

    def coarse_mask(self, batch: dict, size: int | None = None) -> torch.Tensor:
        """(B,1,S,S) coarse amodal-mask probabilities in the crop frame of `batch`."""
        return self.render(self(batch), size)


class PriorAdapter(nn.Module, ABC):
    """What refine, joint and the viewpoint stage use of a 3D prior: coarse_mask(batch[,
    camera]) rendered at render_size and brought to the crop size, camera(batch), the recon
    net inside, and the prior's parts by stage (joint's parameter groups)."""

    def __init__(self, render_size: int) -> None:
        super().__init__()
        if int(render_size) < 8:
            raise ConfigError(f"model.prior_render_size={render_size}: use at least 8 pixels")
        self.render_size = int(render_size)

    @property
    @abstractmethod
    def recon_net(self) -> nn.Module:
        """The ReconNet whose mesh is rendered."""

    @abstractmethod
    def render_outputs(self, batch: dict, camera: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(silhouette (B,r,r) at render_size, the forward outputs) for the prior's camera or `camera`."""

    def coarse_mask(self, batch: dict, camera: torch.Tensor | None = None) -> torch.Tensor:
        sil, _ = self.render_outputs(batch, camera)
        return to_crop_size(sil[:, None], int(self.recon_net.crop_size))


class ReconShapePrior(PriorAdapter):
    """The recon stage's mesh + camera rendered in the crop frame: the coarse mask
    when the render stage is not available (the recon net already places its
    render on the amodal box, models.mesh_renderer.fit_placement)."""

    def __init__(self, net: nn.Module, render_size: int = 32) -> None:
        super().__init__(render_size)
        self.net = net

    @property
    def recon_net(self) -> nn.Module:
        return self.net

    def stage_modules(self) -> dict[str, nn.Module]:
        return {"recon": self.net}

    def camera(self, batch: dict) -> torch.Tensor:
        """(B,3) predicted azimuth, elevation, distance."""
        return self.net(batch)["camera"]

    def render_outputs(self, batch: dict, camera=None) -> tuple[torch.Tensor, dict]:
        """(silhouette (B,r,r) at render_size, the recon net's outputs) for the predicted
        camera, or for `camera` (B,3) with the placement refitted to the amodal box.
        `camera` may also be a function of the recon outputs (the viewpoint estimator's
        camera is solved against recon's mesh and box)."""
        out = self.net(batch)
        if callable(camera):
            camera = camera(out)
        if camera is None:
            sil = self.net.renderer(out["verts"], self.net.faces, out["camera"], out["place"], self.render_size)
        else:
            sil = self.net.render(out["verts"], camera.to(out["verts"].dtype), out["box"], self.render_size)
        return sil, out


class RenderShapePrior(PriorAdapter):
    """The render stage's ShapePrior (recon mesh, chosen camera, learned placement) with
    the interface refine uses: coarse_mask at prior_render_size, camera, rendering
    from a given camera, and its parts by stage for joint's parameter groups."""

    def __init__(self, shape_prior: nn.Module, render_size: int = 32) -> None:
        super().__init__(render_size)
        self.shape = shape_prior

    @property
    def recon_net(self) -> nn.Module:
        return self.shape.recon

    def stage_modules(self) -> dict[str, nn.Module]:
        parts = {"recon": self.shape.recon, "render": self.shape.placement}
        if self.shape.viewpoint is not None:
            parts["viewpoint"] = self.shape.viewpoint
        return parts

    def camera(self, batch: dict) -> torch.Tensor:
        return self.shape(batch)["camera"]

    def render_outputs(self, batch: dict, camera: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        out = self.shape(batch)
        if camera is not None:
            from amodal3d.models.placement import box_placement

            camera = camera.to(out["verts"].dtype)
            out = dict(out, camera=camera)
            out["place"] = box_placement(out["verts"], camera, out["target"], self.shape.fit,
                                         self.shape.recon.renderer.fov)
        return self.shape.render(out, self.render_size)[:, 0], out


def to_crop_size(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B,1,r,r) -> (B,1,size,size), bilinear (a coarse prior needs no more)."""
    if mask.shape[-1] == size:
        return mask
    return F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)

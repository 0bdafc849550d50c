"""The occlusion-robust camera estimator (trained by the viewpoint stage): visible and
occluded masks of a crop -> camera hypotheses, with recon's encoder and head classes."""

from __future__ import annotations

import torch
from torch import nn

from amodal3d.categories import CATEGORIES
from amodal3d.models.camera_head import CameraHead
from amodal3d.models.encoder import CropEncoder, crop_channels
from amodal3d.models.recon_net import ReconNet


class ViewpointNet(nn.Module):
    """Visible + occluded masks (+ category) -> camera, with recon's encoder and head classes.

    forward(visible, occluded, category) -> CameraHead's dict (camera (B,3), hypotheses
    (B,K,3), logits (B,K), best) plus feat (B,D). The encoder's RGB channels are fed zeros."""

    def __init__(
        self,
        backbone: str,
        feat_dim: int,
        hypotheses: int,
        elevation_range: tuple[float, float],
        distance_range: tuple[float, float],
        num_categories: int = len(CATEGORIES),
    ) -> None:
        super().__init__()
        self.spec = {
            "backbone": str(backbone), "feat_dim": int(feat_dim), "hypotheses": int(hypotheses),
            "elevation_range": [float(v) for v in elevation_range],
            "distance_range": [float(v) for v in distance_range],
            "num_categories": int(num_categories),  # its category embedding: one row per category of the table
        }
        self.encoder = CropEncoder(backbone=str(backbone), in_chans=5, feat_dim=int(feat_dim),
                                   num_categories=num_categories)
        self.camera_head = CameraHead(int(feat_dim), hypotheses=int(hypotheses),
                                      elevation_range=tuple(elevation_range), distance_range=tuple(distance_range))

    @classmethod
    def from_spec(cls, spec: dict) -> "ViewpointNet":
        return cls(spec["backbone"], spec["feat_dim"], spec["hypotheses"],
                   tuple(spec["elevation_range"]), tuple(spec["distance_range"]),
                   int(spec.get("num_categories", len(CATEGORIES))))  # specs from before the key: the 13

    @staticmethod
    def channels(visible: torch.Tensor, occluded: torch.Tensor) -> torch.Tensor:
        """(B,5,S,S) input: zero RGB, visible, occluded."""
        b, _, h, w = visible.shape
        return crop_channels(visible.new_zeros(b, 3, h, w), visible, occluded, True)

    def forward(self, visible: torch.Tensor, occluded: torch.Tensor, category: torch.Tensor) -> dict:
        feat = self.encoder(self.channels(visible, occluded), category)
        out = self.camera_head(feat)
        out["feat"] = feat
        return out

    def predict(self, batch: dict) -> dict:
        """The estimator on a crop batch (reads visible, occluded, category only)."""
        return self(batch["visible"], batch["occluder"], batch["category"])

    def init_from(self, recon: ReconNet) -> list[str]:
        """Copy recon's encoder (and camera head when the shapes agree); names what was copied."""
        copied = []
        if recon.encoder.in_chans != self.encoder.in_chans:
            raise ValueError(
                "model.init_from_recon=true needs a recon trained with use_occluded=true (5 input channels, "
                f"this one has {recon.encoder.in_chans}); set model.init_from_recon=false"
            )
        try:
            self.encoder.load_state_dict(recon.encoder.state_dict())
        except RuntimeError as err:
            raise ValueError(
                f"model.init_from_recon=true but the estimator differs from recon's encoder ({err}); use recon's "
                "backbone and feat_dim or set model.init_from_recon=false"
            ) from None
        copied.append("encoder")
        head = recon.camera_head
        if head.k == self.camera_head.k:
            self.camera_head.load_state_dict(head.state_dict())
            copied.append("camera_head")
        return copied


def estimator_camera(recon: ReconNet, out: dict, verts: torch.Tensor, batch: dict, box: torch.Tensor) -> torch.Tensor:
    """(B,3) the estimator's camera, picked among its K hypotheses by recon's own
    inference rule (ReconNet.select_camera: the one whose render of the mesh best
    explains the visible mask outside occluded pixels; no labels); K = 1: its only one."""
    if out["hypotheses"].shape[1] == 1:
        return out["hypotheses"][:, 0]
    camera, _ = recon.select_camera({"hypotheses": out["hypotheses"], "verts": verts}, batch, box)
    return camera

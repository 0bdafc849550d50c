"""Camera (azimuth, elevation, distance) from a crop feature, without pose labels.

Elevation and distance are squashed into bounded ranges (the prior range of the
renders). Azimuth:
  * one hypothesis (K = 1): the full circle as atan2 of two outputs (no seam to
    learn), initialised spread over the circle;
  * a camera multiplex (K > 1): hypothesis k covers the sector 360k/K +- 180/K
    (a tanh-bounded residual), so together they always cover the circle, plus a
    score per hypothesis. Training picks the hypothesis whose render explains the
    visible mask best (analysis by synthesis, models/recon_net.py), which
    avoids the azimuth local minima (front/back flips) a single regressed camera
    falls into, and teaches the score to rank it first; `camera` is the
    top-scoring hypothesis (a prediction that needs no rendering).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from amodal3d.errors import ConfigError


class CameraHead(nn.Module):
    def __init__(
        self,
        feat_dim: int,
        hypotheses: int = 1,
        elevation_range: tuple[float, float] = (0.0, 60.0),
        distance_range: tuple[float, float] = (2.2, 3.2),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if hypotheses < 1:
            raise ConfigError(f"model.camera_hypotheses must be >= 1, got {hypotheses}")
        for name, (lo, hi) in (("elevation_range", elevation_range), ("distance_range", distance_range)):
            if not hi > lo:
                raise ConfigError(f"model.{name} must be [low, high] with high > low, got {[lo, hi]}")
        self.k = int(hypotheses)
        self.el_range = (float(elevation_range[0]), float(elevation_range[1]))
        self.dist_range = (float(distance_range[0]), float(distance_range[1]))
        self.n_az = 2 if self.k == 1 else 1  # (cos, sin) or a sector residual
        self.mlp = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True))
        self.n_out = self.n_az + 3  # azimuth, elevation, distance, score
        self.out = nn.Linear(hidden, self.k * self.n_out)
        with torch.no_grad():
            w = self.out.weight.view(self.k, self.n_out, hidden)
            w[:, self.n_az:].mul_(0.1)  # elevation, distance and score start near their middles
            if self.k > 1:
                w[:, : self.n_az].mul_(0.1)  # residuals start near the sector centres
            self.out.bias.zero_()
        self.register_buffer(
            "az_offset", torch.arange(self.k, dtype=torch.float32) * (360.0 / self.k), persistent=False
        )

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """hypotheses (B,K,3) azimuth deg in [0,360), elevation deg, distance;
        logits (B,K) scores; camera (B,3) the top-scoring hypothesis, best (B,) its index."""
        raw = self.out(self.mlp(feat)).view(feat.shape[0], self.k, self.n_out)
        if self.k == 1:
            az = torch.atan2(raw[..., 1], raw[..., 0]) * (180.0 / math.pi)
        else:
            az = self.az_offset + (180.0 / self.k) * torch.tanh(raw[..., 0])
        az = torch.remainder(az, 360.0)
        el_raw, dist_raw = raw[..., self.n_az], raw[..., self.n_az + 1]
        el = self.el_range[0] + (self.el_range[1] - self.el_range[0]) * torch.sigmoid(el_raw)
        dist = self.dist_range[0] + (self.dist_range[1] - self.dist_range[0]) * torch.sigmoid(dist_raw)
        hyp = torch.stack([az, el, dist], dim=-1)
        logits = raw[..., self.n_az + 2]
        best = logits.argmax(dim=1)
        camera = hyp[torch.arange(hyp.shape[0], device=hyp.device), best]
        return {"camera": camera, "hypotheses": hyp, "logits": logits, "best": best}

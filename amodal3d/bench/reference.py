"""Reference rows that need no training: the bar every learned row must clear.

- `visible` (every protocol): the visible mask taken as the amodal prediction.
- `box rule` (gt-box): visible ∪ (occluded ∩ amodal box). The protocol's amodal box
  and occluder together say most of the answer; a method that does not beat this
  row has learned nothing the inputs did not already give.
- `convex hull` (gt-visible): the convex hull of the visible mask, the simplest
  completion from the visible mask alone (it closes the gaps that erasers cut
  through an object and nothing else).

The rules are computed in the image frame from the image-frame inputs, so the
score carries no resampling error of the crop paste; `predict_amodal` gives the
same rule in the crop frame (the hardest-case sheets draw it).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from amodal3d.protocols import GT_BOX, GT_VISIBLE, check_protocol
from amodal3d.lightning_modules.common import AmodalStage

FLOOR = "visible"
BOX_RULE = "box rule: visible ∪ (occluder ∩ amodal box)"
HULL_RULE = "convex hull of visible"


def box_mask(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B,1,H,W) {0,1}: pixels whose centre lies inside xyxy boxes (B,4) (x2/y2 exclusive)."""
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5
    b = boxes.float()
    inx = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])  # (B,W)
    iny = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])  # (B,H)
    return (iny[:, :, None] & inx[:, None, :]).float()[:, None]


def _cross(o: tuple, a: tuple, b: tuple) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (counter-clockwise, no repeated end) of (N,2) points: Andrew's monotone chain."""
    pts = [tuple(p) for p in np.unique(points, axis=0).tolist()]
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64).reshape(-1, 2)

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def convex_hull_mask(mask: np.ndarray) -> np.ndarray:
    """bool (H,W): the pixels whose centre lies in the convex hull of the pixel squares of `mask`.
    Only each row's first and last pixel can reach the hull: their corners are its points."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if len(rows) == 0:
        return np.zeros_like(mask, bool)
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    xs, ys = np.concatenate([first, last + 1]), np.concatenate([rows, rows])
    corners = np.concatenate([np.stack([xs, ys + dy], 1) for dy in (0, 1)]).astype(np.float64)
    hull = _hull(corners)
    h, w = mask.shape
    gy, gx = np.mgrid[0:h, 0:w]
    centres = np.stack([gx.ravel() + 0.5, gy.ravel() + 0.5], 1)
    inside = np.ones(len(centres), bool)
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):  # left of every counter-clockwise edge
        inside &= (b[0] - a[0]) * (centres[:, 1] - a[1]) - (b[1] - a[1]) * (centres[:, 0] - a[0]) >= -1e-9
    return inside.reshape(h, w) | mask.astype(bool)


def hull_masks(masks: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) {0,1} convex hulls of (B,1,H,W) masks (> 0.5)."""
    arr = (masks[:, 0] > 0.5).cpu().numpy()
    out = np.stack([convex_hull_mask(m) for m in arr]) if len(arr) else arr
    return torch.from_numpy(out).to(masks.device).float()[:, None]


class ReferenceRule(AmodalStage):
    """A rule scored like a method: `rule(visible, occluded, box)` in both frames."""

    @abstractmethod
    def rule(self, visible: torch.Tensor, occluded: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        """(B,1,H,W) prediction from the visible and occluded masks (and the amodal box, gt-box)."""

    def predict_amodal(self, batch: dict) -> torch.Tensor:
        s = batch["visible"].shape[-1]
        box = None
        if "amodal_box" in batch:
            from amodal3d.models.mesh_renderer import box_in_crop

            box = box_in_crop(batch["amodal_box"].float(), batch["crop_box"].float(), s)
        return self.rule(batch["visible"].float(), batch["occluder"].float(), box)

    def image_prediction(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        box = batch["amodal_box"].float() if "amodal_box" in batch else None
        image = self.rule(batch["image_visible"].float(), batch["image_occluder"].float(), box)
        return self.predict_amodal(batch), image


class VisibleFloor(ReferenceRule):
    """The visible mask taken as the amodal prediction."""

    def rule(self, visible, occluded, box):
        return visible


class BoxRule(ReferenceRule):
    """gt-box: visible ∪ (occluded ∩ amodal box)."""

    def rule(self, visible, occluded, box):
        if box is None:
            raise KeyError("the box rule needs the amodal box: it is a gt-box reference row")
        h, w = visible.shape[-2:]
        return torch.maximum(visible, occluded * box_mask(box, h, w))


class HullRule(ReferenceRule):
    """gt-visible: the convex hull of the visible mask."""

    def rule(self, visible, occluded, box):
        return hull_masks(visible)


#: the reference rows of each protocol, in table order
REFERENCE_ROWS = {
    GT_VISIBLE: ((FLOOR, VisibleFloor), (HULL_RULE, HullRule)),
    GT_BOX: ((FLOOR, VisibleFloor), (BOX_RULE, BoxRule)),
}


def reference_modules(cfg, device: torch.device) -> list[tuple[str, AmodalStage]]:
    """(row name, module in eval mode) of the config's protocol's reference rows."""
    from omegaconf import OmegaConf

    rows = []
    for name, cls in REFERENCE_ROWS[check_protocol(str(cfg.protocol))]:
        rows.append((name, cls(OmegaConf.merge(cfg, {"stage": name})).to(device).eval()))
    return rows

"""Which views of an object are the same picture (same silhouette, same colours).

A camera-free method can only tell azimuths apart as far as the images differ:
where two of an object's views are the same picture (every view of a synth13
table and its view half-way round; most views of a turned lamp), no method can
know which of them it is looking at. recon's symmetry-aware azimuth error
(metrics.camera.camera_errors) therefore takes the error to the
nearest azimuth that shows the same picture as the true one, as pose
benchmarks do for the symmetries of their objects. Evaluation only.
"""

from __future__ import annotations

import numpy as np

#: views this alike are the same picture up to rasterisation noise
SAME_IOU_MIN = 0.99
SAME_COLOUR_MAX = 1.0  # mean |RGB difference| /255 where both views are covered


def view_differences(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For uint8 (N, V, H, W, 4) renders: (N, V, V) silhouette IoU and (N, V, V) mean
    |RGB difference| /255 where both views are covered, between every pair of views
    of each object."""
    if rgba.ndim != 5 or rgba.shape[-1] != 4:
        raise ValueError(f"expected uint8 (N, V, H, W, 4) renders, got shape {rgba.shape}")
    n, v = rgba.shape[:2]
    mask = (rgba[..., 3] > 127).reshape(n, v, -1)
    m = mask.astype(np.float32)
    inter = np.einsum("nvp,nwp->nvw", m, m)
    area = m.sum(-1)
    iou = inter / np.maximum(area[:, :, None] + area[:, None, :] - inter, 1)
    rgb = rgba[..., :3].reshape(n, v, -1, 3).astype(np.float32)
    colour = np.zeros((n, v, v), np.float32)
    for i in range(n):
        diff = np.abs(rgb[i, :, None] - rgb[i, None, :]).mean(-1)  # (V, V, P)
        both = mask[i, :, None] & mask[i, None, :]
        colour[i] = (diff * both).sum(-1) / np.maximum(both.sum(-1), 1)
    return iou, colour


def same_picture(rgba: np.ndarray, iou_min: float = SAME_IOU_MIN, colour_max: float = SAME_COLOUR_MAX) -> np.ndarray:
    """(N, V, V) bool: views i and j of an object are the same picture (diagonal: True)."""
    iou, colour = view_differences(rgba)
    return (iou >= iou_min) & (colour <= colour_max)


def opposite_view_similarity(rgba: np.ndarray) -> tuple[float, float]:
    """(mean silhouette IoU, mean colour difference /255) between every view and the
    view half-way round, for renders of V equally spaced azimuths (V even)."""
    v = rgba.shape[1]
    if v % 2:
        raise ValueError(f"need an even number of equally spaced views, got {v}")
    iou, colour = view_differences(rgba)
    k = np.arange(v)
    return float(iou[:, k, (k + v // 2) % v].mean()), float(colour[:, k, (k + v // 2) % v].mean())

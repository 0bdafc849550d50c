"""What the model is fed for predict: the DataModule's crops of each instance and
the occluder mask the chosen mode assumes (see amodal3d.predict)."""

from __future__ import annotations

import numpy as np
import torch

OCCLUDER_MODES = ("unknown", "others")


def make_crops(
    image: np.ndarray, visible: np.ndarray, occluded: np.ndarray, boxes: np.ndarray, crop_size: int, margin: float
) -> dict[str, torch.Tensor]:
    """The DataModule's crops of n instances of one image: uint8 (H,W,3), bool (n,H,W)
    visible and occluder masks, (n,4) xyxy boxes -> rgb, visible, occluded, crop_box."""
    from amodal3d.datamodules.crops import crop_to_box, square_crop_box

    n = visible.shape[0]
    rgb = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255))
    crop_box = torch.from_numpy(square_crop_box(boxes.astype(np.float32), margin))
    chans = torch.cat([rgb[None].expand(n, -1, -1, -1), torch.from_numpy(visible[:, None].astype(np.float32)),
                       torch.from_numpy(occluded[:, None].astype(np.float32))], dim=1)
    out = crop_to_box(chans, crop_box, crop_size)
    return {"rgb": out[:, :3].contiguous(), "visible": (out[:, 3:4] > 0.5).float(),
            "occluder": (out[:, 4:5] > 0.5).float(), "crop_box": crop_box}


def occluder_masks(visible: np.ndarray, mode: str) -> np.ndarray:
    """(n,H,W) bool occluder mask of each instance of an image (modes: amodal3d.predict)."""
    if mode == "unknown":
        return ~visible
    if mode == "others":
        total = visible.sum(0)
        return (total[None] - visible.astype(np.int64)) > 0
    raise ValueError(f"occluder={mode!r}: expected one of {', '.join(OCCLUDER_MODES)}")


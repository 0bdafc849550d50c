"""Writing predict's results: mask and overlay PNGs, COCO RLE and boxes, amodal.json.

Files are written under a temporary name and renamed, so a reader never sees a
partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from amodal3d.datamodules.composites import mask_boxes

JSON_NAME = "amodal.json"


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def encode_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def boxes_xywh(masks: np.ndarray) -> list[list[float]]:
    """COCO bbox [x, y, w, h] of each bool (H,W) mask of (n,H,W); x + w, y + h exclusive."""
    return [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in mask_boxes(masks).tolist()]


def write_json(doc: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)

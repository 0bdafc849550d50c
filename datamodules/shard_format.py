"""The on-disk contract of a built dataset (schema: docs/data.md), shared by the
shard writer, reader and validator: schema version, file names, mask packing,
the errors they raise, and checking the manifest and a shard file against it.

A dataset is a folder with `manifest.json` (written last) and shards
`<split>-<unit>-<k>.h5`, immutable once renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from amodal3d.errors import DatasetError

#: version of the shard and manifest layout written; bump on any incompatible change.
#: 3: images of any size (padded per shard, `image_hw` each), masks packed inside a
#: per-instance window; 2: square images, full-frame masks (still read)
SCHEMA_VERSION = 3
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
MASKS = ("amodal", "visible", "occluder")


class ShardError(DatasetError):
    """One shard is missing, truncated, corrupt or does not match the manifest."""


class SchemaVersionError(DatasetError):
    """The dataset was written by an incompatible version of this code."""


# ----------------------------------------------------------------------------- masks and hashes


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool (M,H,W) -> uint8 (M,H,ceil(W/8)), bits along the last axis."""
    return np.packbits(np.asarray(masks, bool), axis=-1)


def unpack_masks(bits: np.ndarray, width: int) -> np.ndarray:
    """uint8 (...,H,ceil(W/8)) -> bool (...,H,W)."""
    return np.unpackbits(bits, axis=-1, count=width).view(bool)


def mask_windows(masks: list[np.ndarray]) -> np.ndarray:
    """int32 (M,4) xyxy (x2/y2 exclusive) window of each instance: the box of the union of its
    masks (a list of bool (M,H,W), one per mask kind); (0,0,0,0) for an instance without pixels."""
    union = np.zeros_like(np.asarray(masks[0], bool))
    for m in masks:
        union |= np.asarray(m, bool)
    out = np.zeros((union.shape[0], 4), np.int32)
    rows, cols = union.any(axis=2), union.any(axis=1)  # (M,H), (M,W)
    for j in np.flatnonzero(rows.any(axis=1)):
        ys, xs = np.flatnonzero(rows[j]), np.flatnonzero(cols[j])
        out[j] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def window_bytes(windows: np.ndarray) -> np.ndarray:
    """int64 (M,) bytes of each instance's packed window: height x ceil(width / 8)."""
    w = np.asarray(windows, np.int64)
    return (w[:, 3] - w[:, 1]) * ((w[:, 2] - w[:, 0] + 7) // 8)


def pack_windows(masks: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """bool (M,H,W) masks -> one flat uint8 array: each instance's window, bits along x, row by row."""
    parts = [np.packbits(np.asarray(m[y1:y2, x1:x2], bool), axis=-1).ravel()
             for m, (x1, y1, x2, y2) in zip(masks, np.asarray(windows))]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_window(bits: np.ndarray, window: np.ndarray, height: int, width: int) -> np.ndarray:
    """The inverse of pack_windows for one instance: bool (height,width), False outside its window."""
    x1, y1, x2, y2 = (int(v) for v in window)
    out = np.zeros((height, width), bool)
    if x2 > x1 and y2 > y1:
        rows = np.asarray(bits, np.uint8).reshape(y2 - y1, -1)
        out[y1:y2, x1:x2] = np.unpackbits(rows, axis=-1, count=x2 - x1).view(bool)
    return out


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifest


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a dataset folder, after checking its schema version."""
    root = Path(root).absolute()  # errors name the folder whatever the current directory
    path = root / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: {root} is not a built dataset (or its build did not finish); "
            "run `make data` (python -m amodal3d data) with the same data config"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the manifest ({err}); delete {root} and rebuild") from None
    version = manifest.get("schema_version")
    if version in READABLE_VERSIONS:
        return manifest
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: dataset schema version {version}, but this code reads version {SCHEMA_VERSION} "
            f"(the dataset was written by a newer amodal3d): update this checkout, or rebuild it "
            f"(delete {root} or set another data.root, then `make data`)"
        )
    raise SchemaVersionError(
        f"{path}: dataset schema version {version}, but this code reads versions "
        f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild it (delete {root} or set another data.root, then `make data`)"
    )


def manifest_image_shape(manifest: dict) -> tuple[int, int]:
    """(height, width) every image of the dataset fits in: schema 3 records the largest of each;
    schema 2 images are all image_size square."""
    size = int(manifest.get("image_size", 0))
    return int(manifest.get("image_height", size)), int(manifest.get("image_width", size))


def split_shards(manifest: dict, split: str, root: str | os.PathLike = "") -> list[dict]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DatasetError(
            f"{Path(root) / MANIFEST}: no split {split!r}; this dataset has {', '.join(sorted(splits)) or 'none'}"
        )
    return list(splits[split]["shards"])


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_shard(path: Path, record: dict, check_hash: bool = True) -> None:
    """Raise ShardError naming `path` if it is missing, of the wrong size or hash."""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing (listed in the manifest); rebuild the dataset")
    st = path.stat()
    if st.st_size != record["bytes"]:
        raise ShardError(
            f"shard {path} has {st.st_size} bytes, the manifest says {record['bytes']} "
            "(truncated or replaced); rebuild the dataset"
        )
    if not check_hash:
        return
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(path)
    if digest != record["sha256"]:
        raise ShardError(
            f"shard {path}: sha256 {digest[:12]}... does not match the manifest's "
            f"{record['sha256'][:12]}... (corrupt); rebuild the dataset"
        )
    _VERIFIED[key] = digest

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

#: version of the shard and manifest layout; bump on any incompatible change
SCHEMA_VERSION = 2
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
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: dataset schema version {version}, but this code reads version {SCHEMA_VERSION} "
            f"(the dataset was written by a newer amodal3d): update this checkout, or rebuild it "
            f"(delete {root} or set another data.root, then `make data`)"
        )
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: dataset schema version {version}, but this code reads version {SCHEMA_VERSION}; "
            f"rebuild it (delete {root} or set another data.root, then `make data`)"
        )
    return manifest


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

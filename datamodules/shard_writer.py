"""Writing a dataset's HDF5 shards atomically (its JSON files: amodal3d.atomic, durable).

Every file is written under a temporary `.tmp` name, fsynced and renamed into place
(amodal3d.atomic), so a crash leaves at most a `.tmp` file, never a partial file under
its final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from amodal3d.atomic import replace_atomically
from amodal3d.datamodules.composites import INSTANCE_FIELDS, Composite
from amodal3d.datamodules.shard_format import MASKS, SCHEMA_VERSION, pack_masks, sha256_file

_COMPRESSION = "lzf"


def write_shard(path: str | os.PathLike, composites: list[Composite], attrs: dict[str, Any]) -> dict:
    """Write composites (all of one image size) to the shard `path`, atomically.

    The file is written under a `.tmp` name, flushed to disk and renamed; a crash
    leaves at most a `.tmp` file, never a partial `path`. Returns the shard's
    record: file, images, instances, bytes, sha256.
    """
    path = Path(path)
    if not composites:
        raise ValueError(f"{path}: refusing to write a shard without images")
    h, w = composites[0].image.shape[:2]
    for c in composites:
        if c.image.shape != (h, w, 3):
            raise ValueError(f"{path}: image {c.image_id} has shape {c.image.shape}, expected {(h, w, 3)}")
    counts = np.array([c.num_instances for c in composites], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(offsets[-1])
    wb = (w + 7) // 8
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", track_order=False) as f:
            def put(name: str, data: np.ndarray, chunks: Any = True, compress: bool = False) -> None:
                f.create_dataset(
                    name, data=data, chunks=chunks if data.size else None, track_times=False,
                    compression=_COMPRESSION if compress and data.size else None,
                )

            put("images", np.stack([c.image for c in composites]), chunks=(1, h, w, 3), compress=True)
            put("image_ids", np.array([c.image_id for c in composites], np.int64), chunks=None)
            put("inst_offsets", offsets, chunks=None)
            put("image_index", np.repeat(np.arange(len(composites), dtype=np.int32), counts), chunks=None)
            for name, dtype in INSTANCE_FIELDS.items():
                put(name, np.concatenate([c.fields[name] for c in composites]).astype(dtype), chunks=None)
            for mask in MASKS:
                bits = np.concatenate([pack_masks(getattr(c, mask)) for c in composites]) if m else np.zeros((0, h, wb), np.uint8)
                put(f"{mask}_bits", bits, chunks=(1, h, wb), compress=True)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["height"] = h
            f.attrs["width"] = w
            f.attrs["num_images"] = len(composites)
            f.attrs["num_instances"] = m
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v

    replace_atomically(path, write, durable=True)
    return {
        "file": path.name, "images": len(composites), "instances": m,
        "bytes": path.stat().st_size, "sha256": sha256_file(path),
    }

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
from amodal3d.datamodules.shard_format import MASKS, SCHEMA_VERSION, mask_windows, pack_windows, sha256_file, window_bytes

_COMPRESSION = "lzf"
#: bytes per chunk of the flat mask arrays: a random instance read decompresses one or two
_BITS_CHUNK = 8192


def write_shard(path: str | os.PathLike, composites: list[Composite], attrs: dict[str, Any]) -> dict:
    """Write composites (images of any size) to the shard `path`, atomically (schema 3).

    Images are padded (zeros, bottom and right) to the shard's largest height and width,
    `image_hw` holds each one's own size; each instance's three masks are packed inside its
    window (the box of their union), one flat byte array per mask kind, `mask_offsets` (M+1)
    into them. The file is written under a `.tmp` name, flushed to disk and renamed; a crash
    leaves at most a `.tmp` file, never a partial `path`. Returns the shard's record: file,
    images, instances, bytes, sha256.
    """
    path = Path(path)
    if not composites:
        raise ValueError(f"{path}: refusing to write a shard without images")
    for c in composites:
        if c.image.ndim != 3 or c.image.shape[2] != 3 or c.image.dtype != np.uint8:
            raise ValueError(f"{path}: image {c.image_id} is {c.image.dtype} {c.image.shape}, expected uint8 (H,W,3)")
        for mask in MASKS:
            shape = getattr(c, mask).shape
            if shape != (c.num_instances, *c.image.shape[:2]):
                raise ValueError(f"{path}: image {c.image_id}: {mask} masks {shape}, expected "
                                 f"{(c.num_instances, *c.image.shape[:2])}")
    hw = np.array([c.image.shape[:2] for c in composites], np.int32)
    h, w = (int(v) for v in hw.max(axis=0))
    counts = np.array([c.num_instances for c in composites], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(offsets[-1])
    windows = [mask_windows([getattr(c, k) for k in MASKS]) for c in composites]
    window = np.concatenate(windows) if m else np.zeros((0, 4), np.int32)
    mask_offsets = np.concatenate([[0], np.cumsum(window_bytes(window))]).astype(np.int64)
    images = np.zeros((len(composites), h, w, 3), np.uint8)
    for i, c in enumerate(composites):
        images[i, :c.image.shape[0], :c.image.shape[1]] = c.image

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", track_order=False) as f:
            def put(name: str, data: np.ndarray, chunks: Any = True, compress: bool = False) -> None:
                f.create_dataset(
                    name, data=data, chunks=chunks if data.size else None, track_times=False,
                    compression=_COMPRESSION if compress and data.size else None,
                )

            put("images", images, chunks=(1, h, w, 3), compress=True)
            put("image_hw", hw, chunks=None)
            put("image_ids", np.array([c.image_id for c in composites], np.int64), chunks=None)
            put("inst_offsets", offsets, chunks=None)
            put("image_index", np.repeat(np.arange(len(composites), dtype=np.int32), counts), chunks=None)
            for name, dtype in INSTANCE_FIELDS.items():
                put(name, np.concatenate([c.fields[name] for c in composites]).astype(dtype), chunks=None)
            put("mask_window", window, chunks=None)
            put("mask_offsets", mask_offsets, chunks=None)
            for mask in MASKS:
                bits = np.concatenate([pack_windows(getattr(c, mask), win) for c, win in zip(composites, windows)])
                put(f"{mask}_bits", bits, chunks=(min(_BITS_CHUNK, max(1, bits.size)),), compress=True)
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
        "height": h, "width": w,
        "bytes": path.stat().st_size, "sha256": sha256_file(path),
    }

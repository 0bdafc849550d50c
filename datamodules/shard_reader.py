"""Random access to one split of a built dataset (SplitReader), for the DataModules.

Shards are immutable once renamed into place, so the reader opens them without
HDF5 file locking. The reader never opens HDF5 in the process that constructs it:
handles are opened on first use and kept per process id, so DataLoader workers
(fork or spawn) each get their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from amodal3d.datamodules.composites import INSTANCE_FIELDS
from amodal3d.datamodules.shard_format import (
    MASKS, SchemaVersionError, ShardError, manifest_image_shape, read_manifest, split_shards, unpack_masks,
    unpack_window, verify_shard,
)


@dataclass
class _Shard:
    path: Path
    record: dict
    image_start: int
    inst_start: int


class SplitReader:
    """Random access to the images and instances of one split.

    Construction reads only the manifest (and, with verify=True, hashes the
    shard files as plain bytes); HDF5 files are opened on first access in each
    process. The small per-instance arrays of all shards are loaded into memory
    on first access; an image's instances are one contiguous slice.

    Images come back at their own size (schema 3 datasets hold images of any size;
    `height`/`width` are the largest of the dataset, for padding a batch); masks at the
    size of their image.
    """

    def __init__(self, root: str | os.PathLike, split: str, verify: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        records = split_shards(self.manifest, split, self.root)
        self.version = int(self.manifest["schema_version"])
        self.height, self.width = manifest_image_shape(self.manifest)
        self.shards: list[_Shard] = []
        img, inst = 0, 0
        for rec in records:
            path = self.root / rec["file"]
            verify_shard(path, rec, check_hash=verify)
            self.shards.append(_Shard(path, rec, img, inst))
            img += int(rec["images"])
            inst += int(rec["instances"])
        self.num_images, self.num_instances = img, inst
        self._image_starts = np.array([s.image_start for s in self.shards] + [img], np.int64)
        self._inst_starts = np.array([s.inst_start for s in self.shards] + [inst], np.int64)
        self._pid: int | None = None
        self._files: dict[int, h5py.File] = {}
        self._dsets: dict[tuple[int, str], h5py.Dataset] = {}
        self._index: dict[str, np.ndarray] | None = None

    # pickling (spawned workers, DDP): never carry open handles or loaded arrays
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _files={}, _dsets={}, _index=None)
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                try:
                    f.close()
                except Exception:
                    pass
        self._files, self._dsets = {}, {}

    def _file(self, k: int) -> h5py.File:
        pid = os.getpid()
        if self._pid != pid:  # forked: the parent's handles are not ours
            self._files, self._dsets, self._index, self._pid = {}, {}, None, pid
        f = self._files.get(k)
        if f is None:
            shard = self.shards[k]
            try:
                f = h5py.File(shard.path, "r", locking=False)
                version = int(f.attrs.get("schema_version", -1))
            except (OSError, KeyError, ValueError) as err:
                raise ShardError(f"shard {shard.path} cannot be opened ({err}); it is truncated or corrupt") from None
            if version != self.version:
                f.close()
                raise SchemaVersionError(
                    f"shard {shard.path}: schema version {version}, its manifest says {self.version}; "
                    "rebuild the dataset"
                )
            self._files[k] = f
        return f

    def _dataset(self, k: int, name: str) -> h5py.Dataset:
        f = self._file(k)  # resets the caches after a fork
        ds = self._dsets.get((k, name))
        if ds is None:  # `file[name]` costs ~70 us per lookup; reads themselves ~5 us
            ds = self._dsets[(k, name)] = f[name]
        return ds

    def _read(self, k: int, name: str, sel: Any) -> np.ndarray:
        try:
            return self._dataset(k, name)[sel]
        except ShardError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise ShardError(f"shard {self.shards[k].path}: cannot read {name}[{sel}] ({err}); it is corrupt") from None

    @property
    def index(self) -> dict[str, np.ndarray]:
        """Per-instance arrays of the whole split (M rows), loaded once per process.

        Keys: the INSTANCE_FIELDS, `image` (global image index of each
        instance), `image_ids`, `inst_offsets` (global, N+1), `image_hw` (N,2);
        schema 3 also `mask_window` (M,4) and `mask_start`/`mask_stop` (M,), each
        instance's bytes in its shard's flat mask arrays.
        """
        if self._index is None or self._pid != os.getpid():
            parts: dict[str, list[np.ndarray]] = {n: [] for n in INSTANCE_FIELDS}
            parts.update(image=[], image_ids=[], inst_offsets=[], image_hw=[])
            if self.version >= 3:
                parts.update(mask_window=[], mask_start=[], mask_stop=[])
            for k, shard in enumerate(self.shards):
                f = self._file(k)
                n_img, n_inst = int(shard.record["images"]), int(shard.record["instances"])
                for name in INSTANCE_FIELDS:
                    parts[name].append(self._read(k, name, ()))
                parts["image"].append(self._read(k, "image_index", ()).astype(np.int64) + shard.image_start)
                parts["image_ids"].append(self._read(k, "image_ids", ()))
                offs = self._read(k, "inst_offsets", ())
                if len(offs) != n_img + 1 or offs[-1] != n_inst or f["images"].shape[0] != n_img:
                    raise ShardError(
                        f"shard {shard.path}: {len(offs) - 1} images / {offs[-1]} instances, "
                        f"the manifest says {n_img} / {n_inst}; rebuild the dataset"
                    )
                parts["inst_offsets"].append(offs[:-1] + shard.inst_start)
                if self.version >= 3:
                    parts["image_hw"].append(self._read(k, "image_hw", ()).astype(np.int64))
                    parts["mask_window"].append(self._read(k, "mask_window", ()).astype(np.int64))
                    moffs = self._read(k, "mask_offsets", ())
                    if len(moffs) != n_inst + 1:
                        raise ShardError(f"shard {shard.path}: {len(moffs) - 1} mask offsets for {n_inst} "
                                         "instances; rebuild the dataset")
                    parts["mask_start"].append(moffs[:-1])
                    parts["mask_stop"].append(moffs[1:])
                else:
                    parts["image_hw"].append(np.tile(np.array([[self.height, self.width]], np.int64), (n_img, 1)))
            idx = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
            idx["inst_offsets"] = np.concatenate([idx["inst_offsets"], [self.num_instances]]).astype(np.int64)
            self._index = idx
        return self._index

    def locate_instance(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_instances:
            raise IndexError(f"instance {i} out of range for {self.split} ({self.num_instances} instances)")
        k = int(np.searchsorted(self._inst_starts, i, side="right") - 1)
        return k, i - int(self._inst_starts[k])

    def locate_image(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_images:
            raise IndexError(f"image {i} out of range for {self.split} ({self.num_images} images)")
        k = int(np.searchsorted(self._image_starts, i, side="right") - 1)
        return k, i - int(self._image_starts[k])

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image i."""
        h, w = self.index["image_hw"][i]
        return int(h), int(w)

    def image(self, i: int) -> np.ndarray:
        """uint8 (H,W,3) image i of the split, at its own size."""
        k, r = self.locate_image(i)
        pixels = self._read(k, "images", r)
        if self.version < 3:
            return pixels
        h, w = self.image_size(i)
        return pixels if pixels.shape[:2] == (h, w) else np.ascontiguousarray(pixels[:h, :w])

    def instance_masks(self, i: int, names: Iterable[str] = MASKS) -> dict[str, np.ndarray]:
        """bool (H,W) masks of instance i, at its image's size (one small read per mask)."""
        k, r = self.locate_instance(i)
        if self.version < 3:
            return {n: unpack_masks(self._read(k, f"{n}_bits", r), self.width) for n in names}
        idx = self.index
        h, w = self.image_size(int(idx["image"][i]))
        sel = slice(int(idx["mask_start"][i]), int(idx["mask_stop"][i]))
        return {n: unpack_window(self._read(k, f"{n}_bits", sel), idx["mask_window"][i], h, w) for n in names}

    def image_masks(self, i: int, names: Iterable[str] = MASKS) -> dict[str, np.ndarray]:
        """bool (M_i,H,W) masks of every instance of image i, at its size (one slice per mask)."""
        k, r = self.locate_image(i)
        idx = self.index
        start, stop = int(idx["inst_offsets"][i]), int(idx["inst_offsets"][i + 1])
        if self.version < 3:
            lo = start - self.shards[k].inst_start
            sel = slice(lo, lo + stop - start)
            return {n: unpack_masks(self._read(k, f"{n}_bits", sel), self.width) for n in names}
        h, w = self.image_size(i)
        out = {n: np.zeros((stop - start, h, w), bool) for n in names}
        if stop == start:
            return out
        base = int(idx["mask_start"][start])
        sel = slice(base, int(idx["mask_stop"][stop - 1]))
        for n in names:
            flat = self._read(k, f"{n}_bits", sel)
            for j, row in enumerate(range(start, stop)):
                a, b = int(idx["mask_start"][row]) - base, int(idx["mask_stop"][row]) - base
                out[n][j] = unpack_window(flat[a:b], idx["mask_window"][row], h, w)
        return out

    def instance_range(self, i: int) -> tuple[int, int]:
        """Global instance rows [start, stop) of image i."""
        offs = self.index["inst_offsets"]
        return int(offs[i]), int(offs[i + 1])

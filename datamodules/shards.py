"""HDF5 shard writer, reader and dataset validation (schema: docs/data.md).

A dataset is a folder with `manifest.json` (written last) and shards
`<split>-<unit>-<k>.h5`. Shards are immutable once renamed into place, so the
reader opens them without HDF5 file locking. The reader never opens HDF5 in the
process that constructs it: handles are opened on first use and kept per
process id, so DataLoader workers (fork or spawn) each get their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from datamodules.composites import INSTANCE_FIELDS, Composite

#: version of the shard and manifest layout; bump on any incompatible change
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MASKS = ("amodal", "visible", "occluder")
_COMPRESSION = "lzf"


class DatasetError(RuntimeError):
    """A dataset folder that cannot be read as built."""


class ShardError(DatasetError):
    """One shard is missing, truncated, corrupt or does not match the manifest."""


class SchemaVersionError(DatasetError):
    """The dataset was written by an incompatible version of this code."""


# ----------------------------------------------------------------------------- helpers


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `<path>.tmp`, fsync, rename over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- writer


def write_shard(path: str | os.PathLike, composites: list[Composite], attrs: dict[str, Any]) -> dict:
    """Write composites (all of one image size) to the shard `path`, atomically.

    The file is written as `<path>.tmp`, flushed to disk and renamed; a crash
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
    tmp = path.with_name(path.name + ".tmp")
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
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {
        "file": path.name, "images": len(composites), "instances": m,
        "bytes": path.stat().st_size, "sha256": sha256_file(path),
    }


# ----------------------------------------------------------------------------- manifest


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a dataset folder, after checking its schema version."""
    path = Path(root) / MANIFEST
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


# ----------------------------------------------------------------------------- reader


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
    """

    def __init__(self, root: str | os.PathLike, split: str, verify: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        records = split_shards(self.manifest, split, self.root)
        self.height = int(self.manifest["image_size"])
        self.width = int(self.manifest["image_size"])
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
            if version != SCHEMA_VERSION:
                f.close()
                raise SchemaVersionError(
                    f"shard {shard.path}: schema version {version}, this code reads {SCHEMA_VERSION}"
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
        instance), `image_ids`, `inst_offsets` (global, N+1).
        """
        if self._index is None or self._pid != os.getpid():
            parts: dict[str, list[np.ndarray]] = {n: [] for n in INSTANCE_FIELDS}
            parts.update(image=[], image_ids=[], inst_offsets=[])
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

    def image(self, i: int) -> np.ndarray:
        """uint8 (H,W,3) image i of the split."""
        k, r = self.locate_image(i)
        return self._read(k, "images", r)

    def instance_masks(self, i: int, names: Iterable[str] = MASKS) -> dict[str, np.ndarray]:
        """bool (H,W) masks of instance i (one chunk read per mask)."""
        k, r = self.locate_instance(i)
        return {n: unpack_masks(self._read(k, f"{n}_bits", r), self.width) for n in names}

    def image_masks(self, i: int, names: Iterable[str] = MASKS) -> dict[str, np.ndarray]:
        """bool (M_i,H,W) masks of every instance of image i (one slice per mask)."""
        k, r = self.locate_image(i)
        idx = self.index
        start, stop = int(idx["inst_offsets"][i]), int(idx["inst_offsets"][i + 1])
        lo = start - self.shards[k].inst_start
        sel = slice(lo, lo + stop - start)
        return {n: unpack_masks(self._read(k, f"{n}_bits", sel), self.width) for n in names}

    def instance_range(self, i: int) -> tuple[int, int]:
        """Global instance rows [start, stop) of image i."""
        offs = self.index["inst_offsets"]
        return int(offs[i]), int(offs[i + 1])


# ----------------------------------------------------------------------------- validation


def _box_of(masks: np.ndarray) -> np.ndarray:
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    out = np.zeros((masks.shape[0], 4), np.float32)
    for j in range(masks.shape[0]):
        ys, xs = np.flatnonzero(rows[j]), np.flatnonzero(cols[j])
        if ys.size:
            out[j] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def _check_shard(path: Path, rec: dict, size: int, problems: list[str]) -> None:
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        problems.append(f"shard {path}: cannot be opened ({err})")
        return
    with f:
        try:
            n, m = int(rec["images"]), int(rec["instances"])
            wb = (size + 7) // 8
            expect = {"images": (n, size, size, 3), "image_ids": (n,), "inst_offsets": (n + 1,), "image_index": (m,)}
            expect.update({f"{k}_bits": (m, size, wb) for k in MASKS})
            for name in INSTANCE_FIELDS:
                expect[name] = (m,) + ((3,) if name == "camera" else (4,) if name.endswith("_box") else ())
            for name, shape in expect.items():
                if name not in f:
                    problems.append(f"shard {path}: dataset {name!r} missing")
                elif f[name].shape != shape:
                    problems.append(f"shard {path}: {name} has shape {f[name].shape}, expected {shape}")
            if problems and any(str(path) in p for p in problems):
                return
            offs = f["inst_offsets"][()]
            if offs[0] != 0 or offs[-1] != m or np.any(np.diff(offs) < 0):
                problems.append(f"shard {path}: inst_offsets not monotone from 0 to {m}")
            f["images"][()]  # decompress every chunk once: catches corrupt image chunks
            am = unpack_masks(f["amodal_bits"][()], size)
            vi = unpack_masks(f["visible_bits"][()], size)
            oc = unpack_masks(f["occluder_bits"][()], size)
            bad = np.flatnonzero((vi & ~am).reshape(m, -1).any(1))
            if bad.size:
                problems.append(f"shard {path}: visible not inside amodal for instances {bad[:5].tolist()}")
            bad = np.flatnonzero((vi & oc).reshape(m, -1).any(1))
            if bad.size:
                problems.append(f"shard {path}: occluder overlaps visible for instances {bad[:5].tolist()}")
            bad = np.flatnonzero(~vi.reshape(m, -1).any(1))
            if bad.size:
                problems.append(f"shard {path}: empty visible mask for instances {bad[:5].tolist()}")
            for name, masks in (("amodal_box", am), ("visible_box", vi)):
                if not np.array_equal(_box_of(masks), f[name][()]):
                    problems.append(f"shard {path}: {name} does not match the {name.split('_')[0]} masks")
            a = am.reshape(m, -1).sum(1)
            occ = 1.0 - vi.reshape(m, -1).sum(1) / np.maximum(a, 1)
            if not np.allclose(occ, f["occlusion"][()], atol=1e-5):
                problems.append(f"shard {path}: occlusion differs from 1 - visible/amodal area")
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            problems.append(f"shard {path}: cannot be read ({err})")


def validate_dataset(root: str | os.PathLike, raise_on_error: bool = True) -> dict:
    """Check a whole dataset folder; return a report, raise DatasetError on problems.

    Checks: manifest present and of this schema version; every shard present,
    of the recorded size and sha256; each shard opens, its arrays have the
    shapes the manifest's counts imply; visible inside amodal, occluder
    disjoint from visible, non-empty visible masks, boxes and occlusion
    consistent with the masks; no leftover temporary files.
    """
    root = Path(root)
    manifest = read_manifest(root)
    size = int(manifest["image_size"])
    problems: list[str] = []
    report: dict[str, Any] = {"root": str(root), "schema_version": manifest["schema_version"], "splits": {}}
    for split, info in manifest.get("splits", {}).items():
        n_img = n_inst = 0
        for rec in info["shards"]:
            path = root / rec["file"]
            try:
                verify_shard(path, rec, check_hash=True)
            except ShardError as err:
                problems.append(str(err))
                continue
            _check_shard(path, rec, size, problems)
            n_img += int(rec["images"])
            n_inst += int(rec["instances"])
        if (n_img, n_inst) != (info["images"], info["instances"]):
            problems.append(
                f"split {split}: shards hold {n_img} images / {n_inst} instances, "
                f"the manifest says {info['images']} / {info['instances']}"
            )
        report["splits"][split] = {"images": n_img, "instances": n_inst, "shards": len(info["shards"])}
    leftovers = sorted(p.name for p in root.iterdir() if re.search(r"\.tmp$", p.name))
    if leftovers:
        problems.append(f"{root}: leftover temporary files {leftovers} (an interrupted build); rerun `make data`")
    report["problems"] = problems
    report["ok"] = not problems
    if problems and raise_on_error:
        raise DatasetError(f"dataset {root} is invalid:\n  " + "\n  ".join(problems))
    return report

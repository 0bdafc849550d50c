"""Full check of a built dataset folder (`make validate`): files against the
manifest, array shapes against the counts, masks, boxes and occlusion against
each other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from amodal3d.datamodules.composites import INSTANCE_FIELDS, mask_box
from amodal3d.datamodules.shard_format import (
    MASKS, DatasetError, ShardError, read_manifest, unpack_masks, unpack_window, verify_shard, window_bytes,
)


def _shard_masks(f: h5py.File, version: int, size: int, hw: np.ndarray, image_index: np.ndarray):
    """Yield (instance row, amodal, visible, occluder) bool masks at each instance's image size."""
    if version < 3:
        am, vi, oc = (unpack_masks(f[f"{k}_bits"][()], size) for k in MASKS)
        for j in range(am.shape[0]):
            yield j, am[j], vi[j], oc[j]
        return
    window, offs = f["mask_window"][()], f["mask_offsets"][()]
    flat = {k: f[f"{k}_bits"][()] for k in MASKS}
    for j in range(len(window)):
        h, w = (int(v) for v in hw[image_index[j]])
        yield j, *(unpack_window(flat[k][offs[j]:offs[j + 1]], window[j], h, w) for k in MASKS)


def _check_shard(path: Path, rec: dict, version: int, size: int, problems: list[str]) -> None:
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        problems.append(f"shard {path}: cannot be opened ({err})")
        return
    with f:
        try:
            n, m = int(rec["images"]), int(rec["instances"])
            expect = {"image_ids": (n,), "inst_offsets": (n + 1,), "image_index": (m,)}
            if version < 3:
                expect["images"] = (n, size, size, 3)
                expect.update({f"{k}_bits": (m, size, (size + 7) // 8) for k in MASKS})
            else:
                expect.update({"image_hw": (n, 2), "mask_window": (m, 4), "mask_offsets": (m + 1,)})
            for name in INSTANCE_FIELDS:
                expect[name] = (m,) + ((3,) if name == "camera" else (4,) if name.endswith("_box") else ())
            for name, shape in expect.items():
                if name not in f:
                    problems.append(f"shard {path}: dataset {name!r} missing")
                elif f[name].shape != shape:
                    problems.append(f"shard {path}: {name} has shape {f[name].shape}, expected {shape}")
            if version >= 3:
                for name in ("images", *(f"{k}_bits" for k in MASKS)):
                    if name not in f:
                        problems.append(f"shard {path}: dataset {name!r} missing")
            if problems and any(str(path) in p for p in problems):
                return
            offs = f["inst_offsets"][()]
            if offs[0] != 0 or offs[-1] != m or np.any(np.diff(offs) < 0):
                problems.append(f"shard {path}: inst_offsets not monotone from 0 to {m}")
            images = f["images"]
            hw = f["image_hw"][()] if version >= 3 else np.full((n, 2), size, np.int64)
            if version >= 3:
                if images.shape[0] != n or images.shape[3] != 3 or (n and (hw.max(0) > images.shape[1:3]).any()):
                    problems.append(f"shard {path}: images {images.shape} do not hold the sizes in image_hw")
                    return
                moffs = f["mask_offsets"][()]
                need = window_bytes(f["mask_window"][()])
                if moffs[0] != 0 or np.any(np.diff(moffs) != need) or any(f[f"{k}_bits"].shape != (moffs[-1],)
                                                                          for k in MASKS):
                    problems.append(f"shard {path}: mask_offsets do not match the mask windows")
                    return
            images[()]  # decompress every chunk once: catches corrupt image chunks
            image_index = f["image_index"][()]
            boxes = {k: f[k][()] for k in ("amodal_box", "visible_box")}
            occlusion = f["occlusion"][()]
            bad: dict[str, list[int]] = {}
            for j, am, vi, oc in _shard_masks(f, version, size, hw, image_index):
                checks = {
                    "visible not inside amodal": (vi & ~am).any(),
                    "occluder overlaps visible": (vi & oc).any(),
                    "empty visible mask": not vi.any(),
                    "amodal_box does not match the amodal masks": not np.array_equal(mask_box(am), boxes["amodal_box"][j]),
                    "visible_box does not match the visible masks": not np.array_equal(mask_box(vi), boxes["visible_box"][j]),
                    "occlusion differs from 1 - visible/amodal area":
                        abs(1.0 - vi.sum() / max(int(am.sum()), 1) - float(occlusion[j])) > 1e-5,
                }
                for what, failed in checks.items():
                    if failed:
                        bad.setdefault(what, []).append(j)
            for what, rows in bad.items():
                problems.append(f"shard {path}: {what} for instances {rows[:5]}")
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
    size = int(manifest.get("image_size", 0))
    version = int(manifest["schema_version"])
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
            _check_shard(path, rec, version, size, problems)
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
        raise DatasetError(f"dataset {root} is invalid ({len(problems)} problem(s)): " + "; ".join(problems))
    return report

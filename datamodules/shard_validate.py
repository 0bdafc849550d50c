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

from amodal3d.datamodules.composites import INSTANCE_FIELDS, mask_boxes
from amodal3d.datamodules.shard_format import MASKS, DatasetError, ShardError, read_manifest, unpack_masks, verify_shard


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
                if not np.array_equal(mask_boxes(masks), f[name][()]):
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
        raise DatasetError(f"dataset {root} is invalid ({len(problems)} problem(s)): " + "; ".join(problems))
    return report

"""What every dataset build shares (composites in datamodules/build.py, imports in
datamodules/imports/build.py): the generator-config check, the lock of concurrent
builders, the claim of a folder by a build in progress, and the `.done.json` sidecars
that make a build resumable one unit (shard) at a time."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from amodal3d.atomic import write_json_atomic
from amodal3d.datamodules.shard_format import (
    MANIFEST, READABLE_VERSIONS, SCHEMA_VERSION, DatasetError, read_manifest, sha256_file,
)
from amodal3d.datamodules.shard_writer import write_shard

GENERATOR_FILE = "generator.json"
LOCK_FILE = ".lock"


class BuildConfigError(DatasetError):
    """data.root already holds (part of) a dataset built with another config."""


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def same_generator(old: dict | None, new: dict) -> bool:
    """Whether a built dataset's generator config is `new`: a schema-2 dataset built with the
    same config still counts (it is read as it is; only a rebuild writes schema 3)."""
    if not isinstance(old, dict):
        return False
    if old.get("schema_version") in READABLE_VERSIONS:
        old = {**old, "schema_version": new.get("schema_version")}
    return old == new


def config_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def done_path(root: Path, shard: str) -> Path:
    return root / f"{shard}.done.json"


def load_done(root: Path, shard: str, gen_hash: str) -> dict | None:
    """The sidecar of a finished unit, or None if the unit must be (re)built."""
    p = done_path(root, shard)
    if not p.is_file():
        return None
    try:
        done = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("generator_hash") != gen_hash or done.get("schema_version") != SCHEMA_VERSION:
        return None
    rec = done.get("record")
    if rec is None:  # a unit whose every sample was skipped: no shard file
        return done
    f = root / rec["file"]
    if not f.is_file() or f.stat().st_size != rec["bytes"] or sha256_file(f) != rec["sha256"]:
        return None
    return done


def write_unit(root: Path, shard: str, composites: list, attrs: dict, extra: dict, gen_hash: str) -> dict:
    rec = write_shard(root / f"{shard}.h5", composites, attrs) if composites else None
    if rec is not None:
        rec.update({k: v for k, v in attrs.items() if k in ("split", "category", "unit", "chunk")})
    done = {"schema_version": SCHEMA_VERSION, "generator_hash": gen_hash, "record": rec, **extra}
    write_json_atomic(done_path(root, shard), done, indent=1, durable=True)
    return done


@contextmanager
def locked(root: Path, prog) -> Iterator[None]:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            prog.log(f"waiting for another builder of {root} (lock {root / LOCK_FILE})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def existing_manifest(root: Path, gen: dict) -> dict | None:
    """The manifest if the dataset is already built with `gen`; error if with another."""
    if not (root / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(root)
    except DatasetError as err:
        raise BuildConfigError(f"{err}") from None
    if not same_generator(manifest.get("generator"), gen):
        raise BuildConfigError(
            f"{root} already holds a dataset built with another data config "
            f"({config_diff(manifest.get('generator', {}), gen)}); set another data.root or delete {root}"
        )
    return manifest


def claim_folder(root: Path, gen: dict) -> None:
    """Record the generator config of a build in progress; refuse a different one."""
    p = root / GENERATOR_FILE
    if p.is_file():
        try:
            old = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            raise BuildConfigError(f"{p}: cannot read the config of a partial build ({err}); delete {root}") from None
        if old == gen:
            return
        if not same_generator(old, gen):
            raise BuildConfigError(
                f"{root} holds a partial build with another data config ({config_diff(old, gen)}); "
                f"set another data.root or delete {root}"
            )
    write_json_atomic(p, gen, indent=1, durable=True)  # new, or a schema-2 partial build continued in schema 3


def write_manifest(root: Path, manifest: dict, prog, t0: float) -> dict:
    """Add the shards' total size and the software versions, write the manifest (last, atomically:
    the dataset exists from then on) and log it."""
    import time

    import h5py
    import numpy as np

    manifest["bytes"] = sum(r["bytes"] for v in manifest["splits"].values() for r in v["shards"])
    manifest["software"] = {"numpy": np.__version__, "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version}
    write_json_atomic(root / MANIFEST, manifest, indent=1, durable=True)
    prog.log(f"wrote {root / MANIFEST} ({manifest['bytes'] / 2**20:.1f} MiB) in {time.time() - t0:.0f}s")
    return manifest


def release_claim(root: Path) -> None:
    """After a failed build in which no unit finished: drop the claim, so a corrected config (a
    fixed data.source_path, say) is not refused as "another config's partial build"."""
    if not any(root.glob("*.done.json")):
        (root / GENERATOR_FILE).unlink(missing_ok=True)


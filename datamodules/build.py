"""Build a composite dataset into HDF5 shards: idempotent, resumable, locked.

Units of work are small and deterministic: for `erase`, chunk k of the
(object, view) samples of one (split, category), `shard_size` samples max, as
`<split>-<category>-<k>.h5`; for `paste`, chunk k of the scenes of a split,
`shard_size // paste_objects_max` images max, as `<split>-paste-<k>.h5`. Each
finished shard gets a sidecar `<shard>.done.json` (sha256, counts, objects);
a rerun skips every unit whose shard matches its sidecar, so an interrupted
build loses at most the unit in flight. `manifest.json` is written last: when it
exists with the same generator config, a build returns at once; with another
config it is an error. Concurrent builders (DDP ranks, SLURM array jobs)
serialise on `fcntl.flock(<root>/.lock)`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from amodal3d.categories import CATEGORIES, category_index, resolve_categories
from amodal3d.datamodules.composites import GENERATOR_VERSION, CompositeParams, ObjectPool, erase, paste
from amodal3d.datamodules.shard_format import SCHEMA_VERSION
from amodal3d.datamodules.build_progress import BuildProgress
from amodal3d.datamodules.build_units import (  # noqa: F401 (BuildConfigError: raised here too)
    BuildConfigError, claim_folder, config_hash, existing_manifest, load_done, locked, release_claim, write_manifest,
    write_unit,
)
from amodal3d.datamodules.imports.build import import_dataset, is_import
from amodal3d.datamodules.sources.base import ALL_OBJECTS, SPLITS, ObjectRenders
from amodal3d.errors import ConfigError

LoadObjects = Callable[[Any, str, str], ObjectRenders]


# ----------------------------------------------------------------------------- config


def data_config_dict(data_cfg: Any) -> dict:
    """A DataConfig dataclass, OmegaConf node or mapping as a plain dict."""
    if dataclasses.is_dataclass(data_cfg):
        return dataclasses.asdict(data_cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data_cfg, DictConfig):
            return OmegaConf.to_container(data_cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(data_cfg)


def generator_config(data_cfg: Any) -> dict:
    """The config fields that determine a dataset's content (not where it lives).

    Fields the chosen composite ignores are left out, so changing them does not
    invalidate a built dataset.
    """
    cfg = data_config_dict(data_cfg)
    # where it lives, the category table read back from it, and the imported sources' keys
    gen = {k: v for k, v in cfg.items() if k not in ("root", "class_names", "annotations", "val_fraction")}
    if not gen.get("split_file"):  # no split file: the id hash, as datasets built before the key existed
        gen.pop("split_file", None)
    gen["categories"] = resolve_categories(cfg.get("categories"))
    gen["objects_per_split"] = {k: int(v) for k, v in dict(cfg["objects_per_split"]).items()}
    if cfg["composite"] == "erase":
        for k in ("paste_objects_min", "paste_objects_max", "paste_images_per_split"):
            gen.pop(k, None)
    else:
        for k in ("occluders_min", "occluders_max", "occlusion_min"):
            gen.pop(k, None)
        gen["paste_images_per_split"] = {k: int(v) for k, v in dict(cfg["paste_images_per_split"]).items()}
    gen["generator_version"] = GENERATOR_VERSION
    gen["schema_version"] = SCHEMA_VERSION
    return gen


def _params(cfg: dict) -> CompositeParams:
    return CompositeParams.from_data_config(SimpleNamespace(**cfg))


def _splits(cfg: dict) -> list[str]:
    """The splits to build. data.objects_per_split.<split>: a positive n builds it from at most n
    objects (synth13: exactly n), -1 (ALL_OBJECTS) from every object of a real source (nmr,
    shapenet), 0 (or no entry) leaves it out."""
    per = dict(cfg["objects_per_split"])
    unknown = sorted(set(per) - set(SPLITS))
    if unknown:
        raise ConfigError(f"data.objects_per_split: unknown split(s) {unknown}; expected {', '.join(SPLITS)}")
    for s, n in per.items():
        key = f"data.objects_per_split.{s}"
        if int(n) < ALL_OBJECTS:
            raise ConfigError(f"{key}={n}: expected {ALL_OBJECTS} (every model of data.source=nmr|shapenet), "
                              "0 (the split is not built) or a positive count")
        if int(n) == ALL_OBJECTS and cfg.get("source") == "synth13":
            raise ConfigError(f"{key}={ALL_OBJECTS} (every model) needs a real source (data.source=nmr|shapenet); "
                              "synth13 generates its objects: give a positive count")
    out = [s for s in SPLITS if int(per.get(s, 0)) > 0 or int(per.get(s, 0)) == ALL_OBJECTS]
    if cfg["composite"] == "paste":
        out = [s for s in out if int(dict(cfg["paste_images_per_split"]).get(s, 0)) > 0]
    if not out:
        raise ConfigError("data config builds no split: every data.objects_per_split (or data.paste_images_per_split) "
                          "is 0; give at least one split a count")
    return out


def _default_load_objects() -> LoadObjects:
    try:
        from amodal3d.datamodules.sources import load_objects
    except ImportError as err:
        raise ImportError(f"datamodules.sources.load_objects is not available ({err})") from None
    return load_objects


# ----------------------------------------------------------------------------- units


def _objects_info(objs: ObjectRenders, offset: int) -> dict:
    info = {"offset": offset, "count": objs.num_objects, "views": objs.num_views, "ids": list(objs.object_ids)}
    if objs.skipped:  # only then: a source that skips nothing (synth13) keeps its manifest as it was
        info["skipped"] = objs.skipped_records()
    return info


def _erase_split(root, cfg, data_cfg, params, split, gen_hash, load, prog) -> tuple[list[dict], dict, dict]:
    size = int(cfg["shard_size"])
    records, skipped, objects = [], {}, {}
    offset = 0
    for cat in resolve_categories(cfg.get("categories")):
        first = load_done(root, f"{split}-{cat}-000", gen_hash)
        dones = None
        if first is not None:
            n_chunks = int(first["num_chunks"])
            dones = [load_done(root, f"{split}-{cat}-{k:03d}", gen_hash) for k in range(n_chunks)]
            info = first["objects"]
        if dones is None or any(d is None for d in dones):
            prog.log(f"{split}/{cat}: loading objects")
            objs = load(data_cfg, cat, split)
            if objs.category != cat or objs.split != split:
                raise ValueError(f"load_objects({cat!r}, {split!r}) returned {objs.category}/{objs.split}")
            info = _objects_info(objs, offset)
            n, v = objs.num_objects, objs.num_views
            prog.settle((split, cat), n * v)
            n_chunks = max(1, math.ceil(n * v / size))
            dones = dones if dones is not None and len(dones) == n_chunks else [None] * n_chunks
            for k in range(n_chunks):
                shard = f"{split}-{cat}-{k:03d}"
                if dones[k] is None:
                    dones[k] = load_done(root, shard, gen_hash)
                if dones[k] is not None:
                    prog.update(len(range(k * size, min((k + 1) * size, n * v))))
                    continue
                t0 = time.time()
                comps, skip = [], {}
                for idx in range(k * size, min((k + 1) * size, n * v)):
                    o, view = divmod(idx, v)
                    comp, reason = erase(
                        objs.rgba[o, view], objs.cameras[o, view], params=params, split=split, category=cat,
                        object_id=offset + o, view_id=view, index=idx, image_id=(offset + o) * v + view,
                    )
                    if comp is None:
                        skip[reason] = skip.get(reason, 0) + 1
                    else:
                        comps.append(comp)
                    prog.update(1)
                attrs = {"split": split, "category": cat, "unit": cat, "chunk": k, "composite": "erase"}
                extra = {"num_chunks": n_chunks, "objects": info, "skipped": skip}
                dones[k] = write_unit(root, shard, comps, attrs, extra, gen_hash)
                prog.log(f"{shard}: {len(comps)} images, skipped {sum(skip.values())} in {time.time() - t0:.1f}s")
            del objs
        else:
            prog.settle((split, cat), int(info["count"]) * int(info["views"]))
            prog.update(int(info["count"]) * int(info["views"]))
            prog.log(f"{split}/{cat}: {n_chunks} shard(s) already built")
        if info["offset"] != offset:
            raise BuildConfigError(f"{root}: shard sidecars of {split}/{cat} disagree on object ids; delete {root}")
        objects[cat] = info
        offset += int(info["count"])
        for d in dones:
            for r, c in d.get("skipped", {}).items():
                skipped[r] = skipped.get(r, 0) + c
            if d["record"] is not None:
                records.append(d["record"])
    return records, skipped, objects


def _paste_split(root, cfg, data_cfg, params, split, gen_hash, load, prog) -> tuple[list[dict], dict, dict]:
    per_shard = max(1, int(cfg["shard_size"]) // params.paste_objects_max)
    n_images = int(dict(cfg["paste_images_per_split"])[split])
    n_chunks = max(1, math.ceil(n_images / per_shard))
    names = [f"{split}-paste-{k:03d}" for k in range(n_chunks)]
    dones = [load_done(root, s, gen_hash) for s in names]
    pool, objects = None, None
    for k, shard in enumerate(names):
        lo, hi = k * per_shard, min((k + 1) * per_shard, n_images)
        if dones[k] is not None:
            objects = dones[k]["objects"]
            prog.update(hi - lo)
            continue
        if pool is None:
            renders = []
            for cat in resolve_categories(cfg.get("categories")):
                prog.log(f"{split}/{cat}: loading objects")
                renders.append(load(data_cfg, cat, split))
            pool = ObjectPool.from_renders(renders)
            objects = {r.category: _objects_info(r, off) for r, off in zip(pool.renders, pool.offsets)}
        t0 = time.time()
        comps = []
        for idx in range(lo, hi):
            comps.append(paste(pool, params=params, split=split, index=idx))
            prog.update(1)
        attrs = {"split": split, "category": "", "unit": "paste", "chunk": k, "composite": "paste"}
        dones[k] = write_unit(root, shard, comps, attrs, {"num_chunks": n_chunks, "objects": objects}, gen_hash)
        prog.log(f"{shard}: {len(comps)} images, {dones[k]['record']['instances']} instances in {time.time() - t0:.1f}s")
    return [d["record"] for d in dones if d["record"] is not None], {}, objects or {}


# ----------------------------------------------------------------------------- lock and entry points


def _expected_objects(data_cfg: Any, gen: dict, splits: list[str], load_objects: LoadObjects | None) -> dict:
    """(split, category) -> objects the progress total counts before anything is loaded.

    With the sources' own loader, the models each source finds (capped; see
    sources.base.count_objects; synth13: its count). With another loader, the cap
    (0 for -1: unknown until loaded). A unit's figure is corrected when its
    objects are read (models skipped then drop out of the total).
    """
    if load_objects is None:
        from amodal3d.datamodules.sources.base import count_objects

        return {(s, c): count_objects(data_cfg, c, s) for s in splits for c in gen["categories"]}
    return {(s, c): max(0, gen["objects_per_split"][s]) for s in splits for c in gen["categories"]}


def build_dataset(data_cfg: Any, progress: bool = True, load_objects: LoadObjects | None = None) -> dict:
    """Build (or finish building) the dataset of `data_cfg` under data.root.

    load_objects(data_cfg, category, split) -> ObjectRenders defaults to
    datamodules.sources.load_objects. Returns the manifest.
    """
    cfg = data_config_dict(data_cfg)
    if is_import(cfg):
        return import_dataset(cfg, progress)
    gen = generator_config(cfg)
    params = _params(cfg)
    splits = _splits(cfg)
    root = Path(cfg["root"])
    manifest = existing_manifest(root, gen)
    if manifest is not None:
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    if cfg["composite"] == "erase":
        views = int(cfg["views"])
        expected = {(s, c): views * n for (s, c), n in _expected_objects(data_cfg, gen, splits, load_objects).items()}
        total = sum(expected.values())
    else:
        total = sum(gen["paste_images_per_split"][s] for s in splits)
    prog = BuildProgress(total, progress, expected)
    try:
        with locked(root, prog):
            manifest = existing_manifest(root, gen)  # another builder may have finished meanwhile
            if manifest is not None:
                return manifest
            claim_folder(root, gen)
            try:
                return _build_locked(root, cfg, data_cfg, gen, params, splits, load_objects, prog)
            except BaseException:
                release_claim(root)  # nothing finished: a corrected config may claim the folder
                raise
    finally:
        prog.close()


def _build_locked(root: Path, cfg: dict, data_cfg: Any, gen: dict, params: CompositeParams, splits: list[str],
                  load_objects: LoadObjects | None, prog: BuildProgress) -> dict:
    """The build itself, under the lock, in a claimed folder; returns the manifest."""
    for p in root.glob("*.tmp"):
        p.unlink()
    load = load_objects or _default_load_objects()
    gen_hash = config_hash(gen)
    t0 = time.time()
    splits_info, objects = {}, {}
    for split in splits:
        fn = _erase_split if cfg["composite"] == "erase" else _paste_split
        records, skipped, objects[split] = fn(root, cfg, data_cfg, params, split, gen_hash, load, prog)
        splits_info[split] = {
            "images": sum(r["images"] for r in records),
            "instances": sum(r["instances"] for r in records),
            "skipped": skipped,
            "shards": records,
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": "amodal3d.composites",
        "generator": gen,
        "generator_hash": gen_hash,
        "composite": cfg["composite"],
        "image_size": int(cfg["image_size"]),
        "image_height": int(cfg["image_size"]),
        "image_width": int(cfg["image_size"]),
        "categories": gen["categories"],
        "category_ids": {c: category_index(c) for c in gen["categories"]},
        "all_categories": list(CATEGORIES),
        "splits": splits_info,
        "counts": {s: {k: v[k] for k in ("images", "instances", "skipped")} for s, v in splits_info.items()},
        "objects": objects,
    }
    return write_manifest(root, manifest, prog, t0)


def ensure_dataset(data_cfg: Any, load_objects: LoadObjects | None = None) -> dict:
    """The manifest of data.root, building the dataset first if it is missing."""
    return build_dataset(data_cfg, progress=True, load_objects=load_objects)

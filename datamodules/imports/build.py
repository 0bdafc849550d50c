"""Import an annotated amodal dataset (KINS, KINS2020, COCOA, COCO-style amodal files)
into shards: no compositing, the images and masks as annotated, under documented rules.

Everything the user can get wrong is checked before a shard is written: every
annotation file parses, the splits agree on the categories, every image file exists
and has the size its JSON says, every RLE has its image's size, every category id is
known. The rules applied while writing (docs/data.md, "Imported datasets"), each
counted in the manifest's `rules`:

- `visible_outside_amodal`: visible pixels outside the amodal mask (annotation noise)
  are added to the amodal mask.
- `fully_occluded`: an instance without a visible pixel is left out of the instance
  list (nothing to detect or to crop around).
- `occluder`: where no occluder mask is annotated, an instance's occluder is the
  union of the other instances' visible masks and its own hidden part (every pixel
  where something else is seen, or where it is known to be hidden), minus its
  visible mask. An annotated occluder polygon without geometry is not taken for
  "nothing in front": the instance is kept, its occluder follows the rule above,
  and it is counted (`occluder_degenerate`) and listed in `skipped_annotations`
  with `"kept": true` (an RLE without pixels is a valid empty occluder).
- annotations whose amodal mask has no geometry (every polygon under 3 points, no
  pixel) or whose visible polygons are degenerate are skipped and listed in the
  manifest's `skipped_annotations` (split, image id, annotation id, field, reason);
  crowd annotations likewise.

Units: chunk k of a split's images (in the file's order) -> `<split>-import-<k>.h5`,
with the resumable `.done.json` sidecars of datamodules/build.py.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from amodal3d.datamodules.build_progress import BuildProgress
from amodal3d.datamodules.build_units import (
    claim_folder, config_hash, existing_manifest, load_done, locked, release_claim, write_manifest, write_unit,
)
from amodal3d.datamodules.composites import INSTANCE_FIELDS, Composite, mask_box
from amodal3d.datamodules.imports.annotations import (
    AnnotationError, DegenerateMask, ParsedImage, ParsedSplit, check_segment, decode_segment,
)
from amodal3d.datamodules.imports.coco_amodal import parse_coco_amodal
from amodal3d.datamodules.imports.cocoa import parse_cocoa
from amodal3d.datamodules.imports.kins import parse_kins, parse_kins2020
from amodal3d.datamodules.shard_format import SCHEMA_VERSION
from amodal3d.datamodules.sources.base import SPLITS
from amodal3d.errors import ConfigError

#: data.source -> parser of one annotation file
IMPORTERS: dict[str, Callable[[Path], ParsedSplit]] = {
    "kins": parse_kins, "kins2020": parse_kins2020, "cocoa": parse_cocoa, "coco_amodal": parse_coco_amodal,
}
#: bump whenever the import rules change what a given annotation file produces
IMPORT_VERSION = 1
#: images per shard (data.shard_size counts instances; an imported image holds up to dozens)
IMAGES_PER_SHARD_DIVISOR = 16
RULES = ("visible_outside_amodal", "visible_outside_amodal_pixels", "fully_occluded", "occluder_from_rule",
         "occluder_given", "occluder_degenerate")


def is_import(cfg: dict) -> bool:
    return str(cfg.get("source")) in IMPORTERS


def annotation_files(cfg: dict) -> dict[str, Path]:
    """split -> annotation file, checked: known splits, at least one, val_fraction consistent."""
    given = {str(k): str(v) for k, v in dict(cfg.get("annotations") or {}).items() if v}
    unknown = sorted(set(given) - set(SPLITS))
    if unknown:
        raise ConfigError(f"data.annotations: unknown split(s) {unknown}; expected {', '.join(SPLITS)}")
    if not given:
        raise ConfigError(f"data.source={cfg['source']} imports annotation files: give at least one of "
                          "data.annotations.train=<json>, data.annotations.val=<json>, data.annotations.test=<json>")
    frac = float(cfg.get("val_fraction") or 0.0)
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"data.val_fraction={frac}: expected a share in [0, 1)")
    if frac > 0 and "val" in given:
        raise ConfigError(f"data.val_fraction={frac} carves val out of train, but data.annotations.val is given too; "
                          "set one of them")
    if frac > 0 and "train" not in given:
        raise ConfigError(f"data.val_fraction={frac} carves val out of train, but data.annotations.train is not given")
    return {s: Path(given[s]).absolute() for s in SPLITS if s in given}


def import_generator_config(cfg: dict) -> dict:
    """What determines an imported dataset's content (compared on every build, so a changed file
    name, size, image folder or rule version is never read as the dataset already built)."""
    files = annotation_files(cfg)
    if not str(cfg.get("source_path") or ""):
        raise ConfigError(f"data.source={cfg['source']}: data.source_path must name the folder the JSON's "
                          "file_name entries are relative to")
    return {
        "source": cfg["source"],
        "source_path": str(Path(cfg["source_path"]).absolute()),
        "annotations": {s: {"file": str(p), "bytes": p.stat().st_size if p.is_file() else -1} for s, p in files.items()},
        "val_fraction": float(cfg.get("val_fraction") or 0.0),
        "shard_size": int(cfg["shard_size"]),
        "seed": int(cfg.get("seed", 0)),
        "import_version": IMPORT_VERSION,
        "schema_version": SCHEMA_VERSION,
    }


def in_val(image_id: int, fraction: float, seed: int) -> bool:
    """The stable carve of val out of train: a hash of (seed, image id), never the file's order."""
    h = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def parse_splits(cfg: dict) -> dict[str, ParsedSplit]:
    """Every split's parsed annotations (val carved out of train when asked); one category table."""
    parse = IMPORTERS[str(cfg["source"])]
    files = annotation_files(cfg)
    parsed = {s: parse(p) for s, p in files.items()}
    for s, p in parsed.items():
        p.folder_split = s
    first = next(iter(parsed.values()))
    for s, p in parsed.items():
        if p.categories != first.categories:
            raise AnnotationError(f"{p.file}: categories {p.categories} differ from {first.file}'s {first.categories}; "
                                  "every split must share one category table")
    frac = float(cfg.get("val_fraction") or 0.0)
    if frac > 0:
        train = parsed["train"]
        seed = int(cfg.get("seed", 0))
        val_images = [im for im in train.images if in_val(im.image_id, frac, seed)]
        keep = [im for im in train.images if not in_val(im.image_id, frac, seed)]
        val_ids = {im.image_id for im in val_images}
        val_skipped = [r for r in train.skipped if r["image_id"] in val_ids]
        parsed["val"] = ParsedSplit(train.file, train.categories, val_images, val_skipped, {}, "train")
        parsed["train"] = ParsedSplit(train.file, train.categories, keep,
                                      [r for r in train.skipped if r["image_id"] not in val_ids], dict(train.counts),
                                      "train")
    return {s: parsed[s] for s in SPLITS if s in parsed}


def image_folder(source_path: str | Path, split: ParsedSplit) -> Path:
    """The folder of a split's images: data.source_path, `{split}` in it replaced by the split
    whose file lists them (KINS keeps training/ and testing/ images apart; our export, <split>/images)."""
    return Path(str(source_path).replace("{split}", split.folder_split)).absolute()


def check_split(split: ParsedSplit, source_path: str | Path) -> None:
    """Stop before writing on a missing or mis-sized image file or an RLE of the wrong size."""
    from PIL import Image

    folder = image_folder(source_path, split)
    if not folder.is_dir():
        raise AnnotationError(f"{split.file}: image folder {folder} not found; check data.source_path")
    for im in split.images:
        where = f"{split.file}: image {im.image_id} ({im.file_name})"
        path = folder / im.file_name
        if not path.is_file():
            raise AnnotationError(f"{where}: image file {path} not found; check data.source_path")
        try:
            with Image.open(path) as f:
                w, h = f.size
        except OSError as err:
            raise AnnotationError(f"{where}: cannot read the image {path} ({err})") from None
        if (h, w) != (im.height, im.width):
            raise AnnotationError(f"{where}: the file is {w}x{h}, the JSON says width {im.width}, height {im.height}")
        for inst in im.instances:
            iw = f"{split.file}: annotation {inst.ann_id} (image {im.image_id})"
            for name in ("amodal", "visible", "occluder"):
                seg = getattr(inst, name)
                if seg is not None:
                    check_segment(seg, im.height, im.width, f"{iw} {name} mask")


# ----------------------------------------------------------------------------- one image


def _skip(split: ParsedSplit, im: ParsedImage, inst, field: str, reason: str, kept: bool = False) -> None:
    """List a bad annotation (kept: the instance stays, only this field was replaced by a rule)."""
    entry = {"annotation_id": int(inst.ann_id), "image_id": int(im.image_id), "field": field, "reason": reason}
    if kept:
        entry["kept"] = True
    split.skipped.append(entry)


def image_composite(split: ParsedSplit, im: ParsedImage, folder: Path, rules: dict[str, int]) -> Composite:
    """One image (in `folder`) and its instances under the import rules (module doc)."""
    from PIL import Image

    with Image.open(folder / im.file_name) as f:
        pixels = np.asarray(f.convert("RGB"), np.uint8)
    h, w = im.height, im.width
    kept, amodal, visible, given = [], [], [], []
    for inst in im.instances:
        try:
            a = decode_segment(inst.amodal, h, w)
        except DegenerateMask as err:
            _skip(split, im, inst, "amodal", str(err))
            continue
        if inst.visible is None:
            v = a.copy()
        else:
            try:
                v = decode_segment(inst.visible, h, w)
            except DegenerateMask as err:
                if inst.visible[0] == "polygon":
                    _skip(split, im, inst, "visible", str(err))
                    continue
                v = np.zeros_like(a)  # an RLE without pixels: fully occluded
        outside = int((v & ~a).sum())
        if outside:
            rules["visible_outside_amodal"] += 1
            rules["visible_outside_amodal_pixels"] += outside
            a |= v
        if not v.any():
            rules["fully_occluded"] += 1
            continue
        occ = None
        if inst.occluder is not None:
            try:
                occ = decode_segment(inst.occluder, h, w)
            except DegenerateMask as err:
                if inst.occluder[0] == "polygon":  # no geometry: the rule decides, said in the manifest
                    rules["occluder_degenerate"] += 1
                    _skip(split, im, inst, "occluder", f"{err}; the occluder rule is used instead", kept=True)
                else:
                    occ = np.zeros_like(a)  # an RLE without pixels: nothing annotated in front
        kept.append(inst)
        amodal.append(a)
        visible.append(v)
        given.append(occ)
    m = len(kept)
    am = np.stack(amodal) if m else np.zeros((0, h, w), bool)
    vi = np.stack(visible) if m else np.zeros((0, h, w), bool)
    oc = np.zeros((m, h, w), bool)
    seen = vi.sum(axis=0) if m else np.zeros((h, w), np.int64)
    for j in range(m):
        if given[j] is not None:
            rules["occluder_given"] += 1
            oc[j] = given[j] & ~vi[j]
        else:
            rules["occluder_from_rule"] += 1
            others = (seen - vi[j]) > 0
            oc[j] = (others | (am[j] & ~vi[j])) & ~vi[j]
    area = am.reshape(m, -1).sum(1)
    fields = {
        "category": np.array([i.category for i in kept], np.int16),
        "object_id": np.array([i.ann_id if i.object_id is None else i.object_id for i in kept], np.int32),
        "view_id": np.array([i.view_id for i in kept], np.int16),
        "camera": np.full((m, 3), np.nan, np.float32),
        "amodal_box": np.array([mask_box(x) for x in am], np.float32).reshape(m, 4),
        "visible_box": np.array([mask_box(x) for x in vi], np.float32).reshape(m, 4),
        "depth_rank": np.array([i.depth_rank for i in kept], np.int16),
        "occlusion": (1.0 - vi.reshape(m, -1).sum(1) / np.maximum(area, 1)).astype(np.float32),
    }
    assert set(fields) == set(INSTANCE_FIELDS)
    return Composite(image=pixels, image_id=int(im.image_id), amodal=am, visible=vi, occluder=oc, fields=fields,
                     background="")


# ----------------------------------------------------------------------------- the build


def import_split(root: Path, cfg: dict, name: str, split: ParsedSplit, gen_hash: str,
                 prog: BuildProgress) -> tuple[list[dict], dict]:
    """Write one split's shards (resuming finished units); returns (records, rules counted)."""
    folder = image_folder(cfg["source_path"], split)
    per_shard = max(1, int(cfg["shard_size"]) // IMAGES_PER_SHARD_DIVISOR)
    n = len(split.images)
    n_chunks = max(1, math.ceil(n / per_shard))
    records, rules = [], {r: 0 for r in RULES}
    for k in range(n_chunks):
        shard = f"{name}-import-{k:03d}"
        lo, hi = k * per_shard, min((k + 1) * per_shard, n)
        done = load_done(root, shard, gen_hash)
        if done is None:
            t0 = time.time()
            unit_rules = {r: 0 for r in RULES}
            before = len(split.skipped)
            comps = []
            for im in split.images[lo:hi]:
                comps.append(image_composite(split, im, folder, unit_rules))
                prog.update(1)
            attrs = {"split": name, "category": "", "unit": "import", "chunk": k, "composite": "import"}
            extra = {"num_chunks": n_chunks, "rules": unit_rules, "skipped_annotations": split.skipped[before:]}
            done = write_unit(root, shard, comps, attrs, extra, gen_hash)
            prog.log(f"{shard}: {len(comps)} images, {done['record']['instances'] if done['record'] else 0} "
                     f"instances in {time.time() - t0:.1f}s")
        else:
            prog.update(hi - lo)
            split.skipped.extend(r for r in done.get("skipped_annotations", []) if r not in split.skipped)
        for r, c in done.get("rules", {}).items():
            rules[r] = rules.get(r, 0) + int(c)
        if done["record"] is not None:
            records.append(done["record"])
    for r, c in split.counts.items():
        rules[r] = rules.get(r, 0) + int(c)
    return records, rules


def imported_manifest_fields(parsed: dict[str, ParsedSplit], records: dict[str, list[dict]]) -> dict[str, Any]:
    """The manifest entries only an imported dataset has (the rest: datamodules/build.py)."""
    shards = [r for rs in records.values() for r in rs]
    return {
        "image_height": max((int(r["height"]) for r in shards), default=0),
        "image_width": max((int(r["width"]) for r in shards), default=0),
        "annotation_files": {s: str(p.file) for s, p in parsed.items()},
    }


def import_dataset(cfg: dict, progress: bool = True) -> dict:
    """build_dataset for an imported source: every annotation file parsed and every image and RLE
    checked before the first shard is written; then the units, resumable; the manifest last."""
    gen = import_generator_config(cfg)
    root = Path(cfg["root"])
    manifest = existing_manifest(root, gen)
    if manifest is not None:
        return manifest
    parsed = parse_splits(cfg)
    for split in parsed.values():
        check_split(split, cfg["source_path"])
    root.mkdir(parents=True, exist_ok=True)
    prog = BuildProgress(sum(len(p.images) for p in parsed.values()), progress)
    try:
        with locked(root, prog):
            manifest = existing_manifest(root, gen)
            if manifest is not None:
                return manifest
            claim_folder(root, gen)
            for p in root.glob("*.tmp"):
                p.unlink()
            gen_hash = config_hash(gen)
            t0 = time.time()
            records, rules, splits_info = {}, {}, {}
            for name, split in parsed.items():
                records[name], rules[name] = import_split(root, cfg, name, split, gen_hash, prog)
                skipped: dict[str, int] = {}
                for r in split.skipped:
                    if not r.get("kept"):  # instances left out, by reason
                        skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
                if rules[name].get("fully_occluded"):
                    skipped["fully occluded (no visible pixel)"] = rules[name]["fully_occluded"]
                splits_info[name] = {
                    "images": sum(r["images"] for r in records[name]),
                    "instances": sum(r["instances"] for r in records[name]),
                    "skipped": skipped,
                    "shards": records[name],
                }
            categories = next(iter(parsed.values())).categories
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "format": "amodal3d.import",
                "generator": gen,
                "generator_hash": gen_hash,
                "composite": "import",
                "source": cfg["source"],
                **imported_manifest_fields(parsed, records),
                "categories": list(categories),
                "category_ids": {c: k for k, c in enumerate(categories)},
                "all_categories": list(categories),
                "splits": splits_info,
                "counts": {s: {k: v[k] for k in ("images", "instances", "skipped")} for s, v in splits_info.items()},
                "rules": rules,
                "skipped_annotations": {s: p.skipped for s, p in parsed.items()},
            }
            return write_manifest(root, manifest, prog, t0)
    except BaseException:
        release_claim(root)
        raise
    finally:
        prog.close()

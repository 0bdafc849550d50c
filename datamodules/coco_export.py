"""Export a built dataset as PNG images + one COCO-style amodal JSON per split
(`python -m amodal3d export`; layout, field mapping and the occlusion rate: docs/data.md, "Export").

    <out>/<split>/images/<row>.png      the split's images, lossless (pixel-equal to the shards)
    <out>/annotations/<split>.json      images, categories, annotations (RLE masks)

The whole export is written into a hidden staging folder next to `<out>` (every file
through amodal3d.atomic) and renamed to `<out>` when every split is done, so a reader
finds either the previous `<out>`, none, or the finished export, never part of one. A
killed export leaves at most `.<out name>.export-<pid>.tmp` beside it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from amodal3d.atomic import save_png_atomic, write_json_atomic
from amodal3d.categories import CATEGORIES, SYNSETS
from amodal3d.datamodules.shard_format import MANIFEST, read_manifest
from amodal3d.errors import ConfigError, DatasetError, UserError

FORMATS = ("coco_amodal",)
SPLIT_ORDER = ("train", "val", "test")
#: |occlude_rate (from the masks) - the dataset's float32 `occlusion`| allowed
OCCLUSION_TOLERANCE = 1e-5


class MissingDatasetError(DatasetError, FileNotFoundError):
    """The dataset folder to export does not exist or holds no finished build."""


class ExportOutputError(UserError, FileExistsError):
    """The output folder cannot be used: not empty (without --force), a file, or holding the dataset."""


@dataclass
class ExportReport:
    root: Path
    out: Path
    format: str
    splits: dict[str, dict] = field(default_factory=dict)  # split -> {images, annotations, json, images_dir}

    def summary(self) -> str:
        parts = [f"{s} {r['images']} images / {r['annotations']} annotations" for s, r in self.splits.items()]
        return f"{self.root} -> {self.out} ({self.format}): " + ", ".join(parts)


# ----------------------------------------------------------------------------- helpers


def encode_rle(masks: np.ndarray) -> list[dict]:
    """COCO RLEs ({"size": [H, W], "counts": str}) of bool (M,H,W) masks (pycocotools `mask.encode`)."""
    from pycocotools import mask as mask_utils

    masks = np.asarray(masks, bool)
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def xyxy_to_xywh(box: np.ndarray) -> list[float]:
    """[x, y, w, h] of an xyxy box whose x2/y2 are exclusive (the dataset's convention). Not clipped
    to the image: an amodal box may leave it."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _mask_box_xyxy(mask: np.ndarray) -> np.ndarray:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return np.zeros(4, np.float32)
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def _resolve_root(root: str | os.PathLike, build_hint: str) -> tuple[Path, dict]:
    root = Path(root).absolute()
    if not (root / MANIFEST).is_file():
        why = "the folder does not exist" if not root.exists() else f"no {MANIFEST}: not a dataset, or its build did not finish"
        raise MissingDatasetError(
            f"{root}: no dataset to export ({why}); build it first with {build_hint} "
            f"(it writes the dataset to the config's data.root), then export again"
        )
    return root, read_manifest(root)


def _resolve_splits(manifest: dict, root: Path, splits: Iterable[str] | None) -> list[str]:
    have = list(manifest.get("splits", {}))
    if not splits:
        ordered = [s for s in SPLIT_ORDER if s in have] + [s for s in have if s not in SPLIT_ORDER]
        if not ordered:
            raise DatasetError(f"{root / MANIFEST}: the dataset has no split to export")
        return ordered
    wanted = list(dict.fromkeys(splits))
    missing = [s for s in wanted if s not in have]
    if missing:
        raise DatasetError(
            f"{root / MANIFEST}: no split {', '.join(map(repr, missing))} to export; "
            f"this dataset has {', '.join(have) or 'none'} (--splits)"
        )
    return wanted


def _check_out(out: Path, root: Path, force: bool) -> None:
    real_out, real_root = out.resolve(), root.resolve()
    if real_root.is_relative_to(real_out):
        raise ExportOutputError(f"--out {out} holds the dataset {root}; choose an output folder outside it")
    if real_out.is_relative_to(real_root):
        raise ExportOutputError(f"--out {out} is inside the dataset folder {root}; choose an output folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportOutputError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportOutputError(
            f"--out {out} exists and is not empty; pass --force to replace it (everything in it is deleted), "
            "or choose another --out"
        )


def categories_of(manifest: dict) -> list[dict]:
    """COCO categories of a dataset, by id: the categories it was built with (manifest
    `categories`), id = the shards' category index (manifest `category_ids`, an index into
    `all_categories`, the CATEGORIES table) + 1: 1-based, and the same in every dataset."""
    table = list(manifest.get("all_categories") or CATEGORIES)
    names = list(manifest.get("categories") or [])
    ids = dict(manifest.get("category_ids") or {})
    cats = []
    for name in names:
        index = int(ids[name]) if name in ids else (table.index(name) if name in table else -1)
        if not 0 <= index < len(table) or table[index] != name:
            raise DatasetError(f"manifest: category {name!r} has index {index}, which is not its place in "
                               f"all_categories; rebuild the dataset")
        cat = {"id": index + 1, "name": str(name)}
        if name in SYNSETS:
            cat["synset"] = SYNSETS[name]
        cats.append(cat)
    return sorted(cats, key=lambda c: c["id"])


# ----------------------------------------------------------------------------- one split


def _export_split(reader, manifest: dict, root: Path, split: str, stage: Path, cat_ids: set[int]) -> dict:
    from PIL import Image

    idx = reader.index
    objects = manifest.get("objects", {}).get(split, {})
    table = list(manifest.get("all_categories") or CATEGORIES)
    by_cat = {table.index(c): info for c, info in objects.items() if c in table}
    n = reader.num_images
    digits = max(6, len(str(max(n - 1, 0))))
    images_dir = stage / split / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        file_name = f"{i:0{digits}d}.png"
        pixels = reader.image(i)
        save_png_atomic(Image.fromarray(np.ascontiguousarray(pixels), "RGB"), images_dir / file_name)
        images.append({
            "id": i + 1, "file_name": file_name, "height": int(pixels.shape[0]), "width": int(pixels.shape[1]),
            "index": i, "dataset_image_id": int(idx["image_ids"][i]),
        })
        lo, hi = reader.instance_range(i)
        if hi == lo:
            continue
        masks = reader.image_masks(i)
        amodal, visible, occluder = masks["amodal"], masks["visible"], masks["occluder"]
        invisible = amodal & ~visible
        rles = {k: encode_rle(m) for k, m in
                (("amodal", amodal), ("visible", visible), ("invisible", invisible), ("occluder", occluder))}
        for j in range(hi - lo):
            row = lo + j
            where = f"{root} split {split} instance {row} (image {i})"
            cat = int(idx["category"][row])
            if cat + 1 not in cat_ids:
                raise DatasetError(f"{where}: category {cat} is not among the manifest's categories; rebuild the dataset")
            area, visible_area = int(amodal[j].sum()), int(visible[j].sum())
            if area == 0:
                raise DatasetError(f"{where}: empty amodal mask; run `make validate`, then rebuild the dataset")
            rate = 1.0 - visible_area / area
            if abs(rate - float(idx["occlusion"][row])) > OCCLUSION_TOLERANCE:
                raise DatasetError(
                    f"{where}: stored occlusion {float(idx['occlusion'][row]):.6f} but the masks give {rate:.6f}; "
                    "run `make validate`, then rebuild the dataset"
                )
            vbox = np.asarray(idx["visible_box"][row], np.float32)
            if not np.array_equal(vbox, _mask_box_xyxy(visible[j])):
                raise DatasetError(
                    f"{where}: stored visible box {vbox.tolist()} is not the visible mask's; "
                    "run `make validate`, then rebuild the dataset"
                )
            object_id = int(idx["object_id"][row])
            ann = {
                "id": row + 1, "image_id": i + 1, "category_id": cat + 1, "iscrowd": 0,
                "segmentation": rles["amodal"][j], "area": area,
                "bbox": xyxy_to_xywh(idx["amodal_box"][row]),
                "visible_mask": rles["visible"][j], "visible_area": visible_area,
                "visible_bbox": xyxy_to_xywh(vbox),
                "invisible_mask": rles["invisible"][j], "occluder_mask": rles["occluder"][j],
                "occlude_rate": rate,
                "instance_index": row, "object_id": object_id, "view_id": int(idx["view_id"][row]),
                "depth_rank": int(idx["depth_rank"][row]),
            }
            info = by_cat.get(cat)
            if info is not None:
                k = object_id - int(info.get("offset", 0))
                ids = info.get("ids") or []
                if 0 <= k < len(ids):
                    ann["source_object_id"] = str(ids[k])
            annotations.append(ann)
    return {"images": images, "annotations": annotations}


# ----------------------------------------------------------------------------- the export


def export_dataset(
    root: str | os.PathLike,
    out: str | os.PathLike,
    format: str = "coco_amodal",
    splits: Iterable[str] | None = None,
    force: bool = False,
    verify: bool = True,
    build_hint: str = "`make data` (python -m amodal3d data [--exp NAME])",
) -> ExportReport:
    """Write the dataset at `root` to `out` (module doc). splits: default every split it has.
    force: replace a non-empty `out`. verify: check the shards' sha256 against the manifest first.
    Everything the user can get wrong is checked before anything is written."""
    from amodal3d import __version__
    from amodal3d.datamodules.shard_reader import SplitReader

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: unknown export format; expected one of {', '.join(FORMATS)}")
    root, manifest = _resolve_root(root, build_hint)
    split_list = _resolve_splits(manifest, root, splits)
    out = Path(os.path.abspath(out))  # ".." and "." resolved: the staging folder is out's sibling
    _check_out(out, root, force)
    readers = {s: SplitReader(root, s, verify=verify) for s in split_list}  # bad shards fail here, before writing
    try:
        categories = categories_of(manifest)
    except DatasetError as err:
        raise DatasetError(f"{root / MANIFEST}: {err}") from None
    cat_ids = {c["id"] for c in categories}

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.export-{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    report = ExportReport(root=root, out=out, format=format)
    try:
        stage.mkdir()
        for split in split_list:
            doc = _export_split(readers[split], manifest, root, split, stage, cat_ids)
            doc.update(
                info={
                    "description": f"amodal3d {manifest.get('composite', '')} dataset, split {split}, "
                                   "COCO-style amodal annotations",
                    "format": format, "split": split, "dataset": str(root),
                    "generator_hash": manifest.get("generator_hash"),
                    "schema_version": manifest.get("schema_version"),
                    "version": __version__,
                },
                licenses=[], categories=categories,
            )
            json_path = stage / "annotations" / f"{split}.json"
            write_json_atomic(json_path, doc, indent=None)
            report.splits[split] = {
                "images": len(doc["images"]), "annotations": len(doc["annotations"]),
                "json": out / "annotations" / f"{split}.json", "images_dir": out / split / "images",
            }
        # swap into place: the old folder (empty, or replaced under --force) goes aside, then away
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
        try:
            os.rename(stage, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        for r in readers.values():
            r.close()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return report

"""What the annotation importers share: the parsed form of a split (images, their
instances, the category table), reading the JSON, and decoding COCO masks.

A parser (kins.py, cocoa.py, coco_amodal.py) only maps its format's fields onto
`ParsedImage`/`ParsedInstance`; masks stay in their annotated form (polygons or
RLE) until the builder decodes one image at a time (imports/build.py). Problems
that make the file unusable raise `AnnotationError` naming the file, the image or
annotation id and the field; an annotation that is only degenerate (a polygon of
fewer than 3 points, no pixel) is skipped and recorded by the builder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from amodal3d.errors import DatasetError

#: a mask as annotated: ("polygon", [[x, y, ...], ...]) or ("rle", {"size": [h, w], "counts": str | list})
Segment = tuple[str, Any]


class AnnotationError(DatasetError):
    """An annotation file that cannot be imported as it is (the message says where and why)."""


class DegenerateMask(ValueError):
    """A mask without usable geometry (every polygon under 3 points, or no pixel)."""


@dataclass
class ParsedInstance:
    ann_id: int
    category: int  # index into the split's category table
    amodal: Segment
    visible: Segment | None  # None: not occluded (visible = amodal)
    occluder: Segment | None = None  # None: the builder's rule (docs/data.md)
    depth_rank: int = -1  # -1: not annotated
    object_id: int | None = None  # None: the annotation id
    view_id: int = 0


@dataclass
class ParsedImage:
    image_id: int
    file_name: str
    height: int
    width: int
    instances: list[ParsedInstance] = field(default_factory=list)


@dataclass
class ParsedSplit:
    """One annotation file: its images, its category table and the annotations left out."""

    file: Path
    categories: list[str]
    images: list[ParsedImage]
    skipped: list[dict] = field(default_factory=list)  # {"annotation_id", "image_id", "field", "reason"}
    counts: dict[str, int] = field(default_factory=dict)  # rule name -> instances it applied to
    folder_split: str = ""  # the split whose image folder holds its images (`{split}` in data.source_path)


def read_json(path: str | os.PathLike, required: tuple[str, ...]) -> dict:
    """The annotation file as a dict holding `required` keys, or an AnnotationError naming it."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found; check data.annotations.<split>")
    try:
        text = path.read_text()
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read the annotation file ({err})") from None
    if not text.strip():
        raise AnnotationError(f"{path}: the annotation file is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise AnnotationError(f"{path}: expected a JSON object with {', '.join(required)}, got a {type(doc).__name__}")
    missing = [k for k in required if k not in doc]
    if missing:
        raise AnnotationError(f"{path}: no {', '.join(map(repr, missing))} at the top level; is this the right format "
                              "(data.source)?")
    return doc


def field_of(ann: dict, names: tuple[str, ...], where: str, required: bool = True) -> Any:
    """The first of `names` present in an annotation (formats name one field several ways)."""
    for n in names:
        if n in ann and ann[n] is not None:
            return ann[n]
    if required:
        raise AnnotationError(f"{where}: no field {' / '.join(map(repr, names))}")
    return None


def as_segment(value: Any, where: str) -> Segment:
    """A COCO segmentation value (polygon list, or RLE dict with str or list counts) as a Segment."""
    if isinstance(value, dict):
        if "counts" not in value or "size" not in value:
            raise AnnotationError(f"{where}: an RLE needs 'size' and 'counts' (got keys {sorted(value)})")
        return ("rle", value)
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) for v in value):  # one flat polygon (COCOA regions)
            value = [value]
        if not all(isinstance(p, list) for p in value):
            raise AnnotationError(f"{where}: a polygon segmentation must be a list of [x1, y1, x2, y2, ...] lists")
        return ("polygon", value)
    raise AnnotationError(f"{where}: expected polygons (list) or an RLE (dict), got {type(value).__name__}")


def check_segment(seg: Segment, height: int, width: int, where: str) -> None:
    """Stop on what cannot be decoded right (an RLE of another size than its image)."""
    kind, value = seg
    if kind == "rle":
        size = value.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2) or [int(s) for s in size] != [height, width]:
            raise AnnotationError(f"{where}: RLE size {size} is not the image's [height, width] = {[height, width]}")
        counts = value["counts"]
        if not isinstance(counts, (str, bytes, list)):
            raise AnnotationError(f"{where}: RLE counts must be a string or a list, got {type(counts).__name__}")


def decode_segment(seg: Segment, height: int, width: int) -> np.ndarray:
    """bool (height, width) mask of a Segment (pycocotools); DegenerateMask if it has no geometry."""
    from pycocotools import mask as mask_utils

    kind, value = seg
    if kind == "polygon":
        polys = [[float(v) for v in p] for p in value if len(p) >= 6]
        polys = [p[: len(p) // 2 * 2] for p in polys]
        if not polys:
            raise DegenerateMask("every polygon has fewer than 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    else:
        counts = value["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    mask = mask_utils.decode(rle).astype(bool)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    return mask


def category_table(categories: list, where: str) -> tuple[list[str], dict[int, int]]:
    """(names, annotated id -> index) of a COCO `categories` list, in id order (KINS's ids
    1, 2, 4-8 become 0..6). A file whose categories are the 13 ShapeNet ones at their
    amodal3d ids (our export) maps onto that table, so a round trip keeps every index."""
    from amodal3d.categories import CATEGORIES

    if not isinstance(categories, list) or not categories:
        raise AnnotationError(f"{where}: 'categories' must be a non-empty list of {{'id', 'name'}}")
    by_id: dict[int, str] = {}
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise AnnotationError(f"{where}: category {c!r} needs an 'id' and a 'name'")
        cid = int(c["id"])
        if cid in by_id:
            raise AnnotationError(f"{where}: category id {cid} appears twice")
        by_id[cid] = str(c["name"]).strip()
    if all(0 < i <= len(CATEGORIES) and CATEGORIES[i - 1] == n for i, n in by_id.items()):
        return list(CATEGORIES), {i: i - 1 for i in by_id}
    ids = sorted(by_id)
    names = [by_id[i] for i in ids]
    if len(set(names)) != len(names):
        raise AnnotationError(f"{where}: two categories share a name ({names})")
    return names, {i: k for k, i in enumerate(ids)}


def category_of(ann: dict, ids: dict[int, int], where: str) -> int:
    cid = field_of(ann, ("category_id",), where)
    try:
        return ids[int(cid)]
    except (KeyError, TypeError, ValueError):
        raise AnnotationError(f"{where}: category_id {cid!r} is not in the file's 'categories' "
                              f"(ids {sorted(ids)})") from None


def images_of(doc: dict, path: Path) -> dict[int, ParsedImage]:
    """The file's `images` by id (id, file_name, height, width each required)."""
    out: dict[int, ParsedImage] = {}
    if not isinstance(doc["images"], list):
        raise AnnotationError(f"{path}: 'images' must be a list")
    for k, im in enumerate(doc["images"]):
        where = f"{path}: image {im.get('id', f'#{k}') if isinstance(im, dict) else f'#{k}'}"
        if not isinstance(im, dict):
            raise AnnotationError(f"{where}: expected an object")
        for key in ("id", "file_name", "height", "width"):
            if key not in im:
                raise AnnotationError(f"{where}: no field {key!r}")
        iid = int(im["id"])
        if iid in out:
            raise AnnotationError(f"{where}: image id {iid} appears twice")
        image_id = int(im.get("dataset_image_id", iid))  # our export keeps the dataset's own id
        out[iid] = ParsedImage(image_id, str(im["file_name"]), int(im["height"]), int(im["width"]))
    return out


def annotations_of(doc: dict, path: Path, images: dict[int, ParsedImage]) -> Iterator[tuple[int, dict, str, ParsedImage]]:
    """(position, annotation, where, its image) of every entry of the file's `annotations`;
    `where` names the file and the annotation id for the parsers' errors."""
    if not isinstance(doc["annotations"], list):
        raise AnnotationError(f"{path}: 'annotations' must be a list")
    for k, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotation {ann.get('id', f'#{k}') if isinstance(ann, dict) else f'#{k}'}"
        if not isinstance(ann, dict):
            raise AnnotationError(f"{where}: expected an object")
        image = images.get(int(field_of(ann, ("image_id",), where)))
        if image is None:
            raise AnnotationError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        yield k, ann, where, image


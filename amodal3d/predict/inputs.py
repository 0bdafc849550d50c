"""Reading and checking predict's inputs (image files with mask folders, or a COCO
JSON; formats in amodal3d.predict): every bad entry is reported by name and skipped."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amodal3d.categories import CATEGORIES, category_index
from amodal3d.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class InstanceInput:
    name: str  # output file stem
    source: str  # what an error message names: a mask file or "annotation <id> of <json>"
    category: str | int  # category name (folder input) or input category id (COCO)
    mask_path: Path | None = None
    segmentation: object = None  # COCO segmentation (RLE dict or polygon list)
    ann_id: int | None = None
    amodal_bbox: list[float] | None = None  # xywh
    mask: np.ndarray | None = None  # the visible mask itself (a step-1 detection)
    score: float = 1.0  # a detection's score (1 for a given mask)


@dataclass
class ImageInput:
    path: Path
    image_id: int
    instances: list[InstanceInput] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (h, w) claimed by a COCO file
    key: str = ""  # output name (unique)
    detect: bool = False  # no mask folder: step 1 detects its instances


@dataclass
class InputSet:
    images: list[ImageInput]
    errors: list[dict]
    categories: list[dict]  # output categories: {"id", "name"}
    category_of: dict  # input COCO category id -> index in class_names (or an error string)
    coco_categories: list[dict] | None = None  # a COCO input's own 'categories', mapped by bind_categories
    class_names: tuple[str, ...] = CATEGORIES  # the model's category table (bind_categories)


def report_error(errors: list[dict], where: str, msg: str) -> None:
    """Record a skipped input; processing goes on (the CLI lists the skipped inputs at the end)."""
    errors.append({"input": where, "error": msg})


def _our_categories(names=CATEGORIES) -> list[dict]:
    return [{"id": i + 1, "name": c} for i, c in enumerate(names)]


def _norm(name) -> str:
    return str(name).strip().lower().replace(" ", "_")


def table_index(name, names=CATEGORIES) -> int:
    """Index of an input category in a model's category table: its name, case-insensitive, a
    space matching a '_' (the 13 ShapeNet categories also by synset id, as before). ValueError
    naming the unknown category and listing the table's."""
    names = tuple(names)
    if names == CATEGORIES:
        return category_index(str(name).strip().lower())
    key = _norm(name)
    for i, n in enumerate(names):
        if _norm(n) == key:
            return i
    raise ValueError(f"unknown category {str(name).strip()!r}: this model's categories are {', '.join(names)}")


def _file_category(stem: str, names: tuple[str, ...]) -> int:
    """Index of a mask file's category: the longest start of its stem, cut at a '_', that names a
    category of the table (a name may hold '_' itself: traffic_light_2.png); ValueError naming
    the part up to the first '_' otherwise."""
    parts = stem.split("_")
    for k in range(len(parts), 0, -1):
        try:
            return table_index("_".join(parts[:k]), names)
        except ValueError:
            continue
    return table_index(parts[0], names)  # raises, naming it


def bind_categories(inputs: InputSet, names) -> InputSet:
    """Map the inputs' categories onto the model's category table `names` (its checkpoint's
    class names): the output categories of a folder input are the table's (id = index + 1); a
    COCO input keeps its own ids, each mapped by name (an unknown one is an error string, reported
    on each instance that uses it)."""
    inputs.class_names = tuple(names)
    if inputs.coco_categories is None:
        inputs.categories = _our_categories(inputs.class_names)
        return inputs
    inputs.categories = [{"id": c.get("id"), "name": c.get("name")} for c in inputs.coco_categories]
    category_of = {}
    for c in inputs.coco_categories:
        try:
            category_of[c["id"]] = table_index(str(c["name"]).strip().lower(), inputs.class_names)
        except (KeyError, ValueError) as err:
            category_of[c.get("id")] = f"category {c.get('name')!r} (id {c.get('id')}): {err}"
    inputs.category_of = category_of
    return inputs


def _folder_instances(image: Path) -> list[InstanceInput]:
    folder = image.with_suffix("")
    if not folder.is_dir():
        raise InputError(f"no mask folder {folder}/ next to {image} (one PNG per instance, named "
                         "<category>[_<anything>].png)")
    masks = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not masks:
        raise InputError(f"mask folder {folder}/ holds no PNG files")
    return [InstanceInput(name=p.stem, source=str(p), category=p.stem.split("_", 1)[0], mask_path=p) for p in masks]


def read_folder_inputs(images: list[Path], errors: list[dict], first_id: int = 1) -> list[ImageInput]:
    """Images with their mask folders; an image without one is left to step 1 (detect=True)."""
    out = []
    for k, image in enumerate(images):
        if not image.with_suffix("").exists():
            out.append(ImageInput(path=image, image_id=first_id + k, detect=True))
            continue
        try:
            out.append(ImageInput(path=image, image_id=first_id + k, instances=_folder_instances(image)))
        except InputError as err:
            report_error(errors, str(image), str(err))
    return out


def read_coco_inputs(path: Path, errors: list[dict]) -> tuple[list[ImageInput], list[dict]]:
    """Images and the categories (output categories too) of a COCO-style JSON; the categories
    are mapped onto the model's table by bind_categories, once the model is known."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the COCO JSON: {err}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{path}: a COCO JSON needs a list under {key!r}")
    cats = list(data["categories"])
    images: dict = {}
    for im in data["images"]:
        if "id" not in im or "file_name" not in im:
            report_error(errors, f"{path}: image entry {im}", "needs 'id' and 'file_name'")
            continue
        size = (int(im["height"]), int(im["width"])) if "height" in im and "width" in im else None
        images[im["id"]] = ImageInput(path=path.parent / im["file_name"], image_id=im["id"], size=size)
    for k, ann in enumerate(data["annotations"]):
        aid = ann.get("id", k)
        where = f"annotation {aid} of {path}"
        img = images.get(ann.get("image_id"))
        if img is None:
            report_error(errors, where, f"image_id {ann.get('image_id')!r} is not in 'images'")
            continue
        if "segmentation" not in ann:
            report_error(errors, where, "has no 'segmentation' (the visible mask)")
            continue
        img.instances.append(InstanceInput(
            name=f"{aid}", source=where, category=ann.get("category_id"), segmentation=ann["segmentation"],
            ann_id=aid, amodal_bbox=ann.get("amodal_bbox")))
    return list(images.values()), cats


def collect_inputs(inputs, class_names=CATEGORIES) -> InputSet:
    """Every image and instance named by `inputs` (paths; formats: amodal3d.predict), their
    categories mapped onto `class_names` (the model's table; bind_categories maps them again
    once the model is loaded)."""
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    errors: list[dict] = []
    images: list[ImageInput] = []
    coco_categories = None
    coco_seen = False
    for p in paths:
        if not p.exists():
            report_error(errors, str(p), "no such file or folder")
        elif p.is_file() and p.suffix.lower() == ".json":
            if coco_seen:
                raise InputError(f"{p}: give at most one COCO JSON per call (their ids would collide)")
            coco_seen = True
            try:
                imgs, coco_categories = read_coco_inputs(p, errors)
            except InputError as err:
                report_error(errors, str(p), str(err))
                continue
            images += imgs
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            images += read_folder_inputs([p], errors, first_id=len(images) + 1)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                report_error(errors, str(p), f"the folder holds no {'/'.join(IMAGE_SUFFIXES)} image")
            images += read_folder_inputs(files, errors, first_id=len(images) + 1)
        else:
            report_error(errors, str(p), f"not an image ({', '.join(IMAGE_SUFFIXES)}), a folder or a COCO .json")
    if coco_seen and len(paths) > 1:
        raise InputError("a COCO JSON input cannot be mixed with other inputs in one call")
    used: set[str] = set()
    for im in images:
        key = im.path.stem
        if key in used:
            key = f"{key}_{im.image_id}"
        used.add(key)
        im.key = key
    return bind_categories(InputSet(images, errors, [], {}, coco_categories), class_names)


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None


def read_mask_png(path: Path) -> np.ndarray:
    """A visible-mask PNG as bool (H,W). A mask of one value, or of two values 0 and k (0/1 label masks, 0/255,
    palette indices 0/k, 16-bit 0/65535) is "non-zero = on"; a mask of more values (an
    anti-aliased or soft mask) is thresholded at half its range, and the rule is said."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as im:
            raw = np.asarray(im.convert("L") if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr") else im)
            mode = im.mode
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read mask {path}: {err}") from None
    if raw.ndim != 2:
        raise InputError(f"mask {path}: expected a single-channel image, got shape {raw.shape} (mode {mode})")
    values = np.unique(raw)
    if len(values) == 1 or (len(values) == 2 and values[0] == 0):  # one value (all off or all on), or 0/k
        return raw != 0
    half = (int(np.iinfo(raw.dtype).max) + 1) // 2 if raw.dtype.kind in "iu" else 0.5
    print(f"[predict] {path}: {len(values)} grey levels (mode {mode}); pixels >= {half} count as visible",
          file=sys.stderr)
    return raw >= half


def decode_segmentation(seg, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (RLE with counts as str or list, or polygons) -> bool (h,w)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        rh, rw = (int(v) for v in seg["size"])
        if (rh, rw) != (h, w):
            raise InputError(f"its RLE is {rh}x{rw} (h x w) but the image is {h}x{w}")
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        if isinstance(rle.get("counts"), str):
            rle = dict(rle, counts=rle["counts"].encode("ascii"))
        return mask_utils.decode(rle).astype(bool)
    raise InputError("'segmentation' must be an RLE dict (size, counts) or a list of polygons")


def instance_mask(inst: InstanceInput, h: int, w: int) -> np.ndarray:
    if inst.mask is not None:
        m = inst.mask
    elif inst.mask_path is not None:
        m = read_mask_png(inst.mask_path)
        if m.shape != (h, w):
            raise InputError(f"the mask is {m.shape[0]}x{m.shape[1]} (h x w) but its image is {h}x{w}")
    else:
        m = decode_segmentation(inst.segmentation, h, w)
    if not m.any():
        raise InputError("the visible mask is empty")
    return m


def resolve_category(inst: InstanceInput, inputs: InputSet) -> int:
    """Index in the model's table (inputs.class_names) of an instance: its file-name category (a
    detection's: step 1's class name), or its COCO category id."""
    if inst.ann_id is None:
        names = inputs.class_names
        by_prefix = inst.mask_path is not None and names != CATEGORIES
        try:
            if by_prefix:
                return _file_category(inst.mask_path.stem, names)
            return table_index(inst.category, names)
        except ValueError as err:
            rule = ("the longest start of the mask file name, cut at a '_', that names one" if by_prefix
                    else "the mask file name up to the first '_'")
            raise InputError(f"{err} (the category is {rule})") from None
    cat = inputs.category_of.get(inst.category)
    if cat is None:
        raise InputError(f"unknown category id {inst.category!r}: not in the JSON's 'categories'")
    if isinstance(cat, str):
        raise InputError(f"unknown {cat}")
    return cat


"""Inference on image files: visible masks in, amodal masks out (`make predict`).

Inputs (one or more paths):
  * an image file (PNG/JPEG) `<dir>/<name>.png`, its instances' visible masks in the
    folder `<dir>/<name>/`, one PNG per instance named `<category>[_<anything>].png`
    (category: one of amodal3d.categories.CATEGORIES or its ShapeNet synset id;
    a mask pixel is on when its grey value is >= 128);
  * a folder: every PNG/JPEG directly inside it, each with its mask folder as above;
  * a COCO-style JSON: `images` (id, file_name relative to the JSON's folder, optional
    width/height), `categories` (id, name) and `annotations` (image_id, category_id,
    `segmentation` = the visible mask as RLE or polygons, optional `amodal_bbox`
    [x, y, w, h]).
Each instance is cropped exactly like the DataModule crops it under the protocol the
model was trained for (datamodules.crops: square_crop_box, crop_to_box to
loader.crop_size of the model's config). gt-visible models: around the box of the
visible mask, enlarged by loader.visible_crop_margin (an `amodal_bbox` is not read).
gt-box models: around the amodal box when the input gives one (`amodal_bbox`), else
the box of the visible mask, enlarged by loader.crop_margin; then the object's hidden
part can only be found inside that crop. The occluder mask (pixels that may hide the
instance) is, with occluder="unknown", everything outside the instance's visible
mask; with occluder="others", the union of the other instances' visible masks of the
image (what gt-visible models were trained with); "auto" (default) picks "others"
for gt-visible models and "unknown" for gt-box ones.

Outputs under `out`: `masks/<image>/<instance>.png` (amodal masks, 0/255, the visible
mask included), `overlays/<image>.png` (visible part tinted, predicted hidden part
hatched, amodal outline, one colour per instance) and `amodal.json` (COCO style: the
amodal masks as RLE via pycocotools.mask.encode, plus an `errors` list). A bad input
(missing file, mask size different from its image, unknown category, empty mask)
is reported with its name and skipped; the other inputs are still processed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from amodal3d.categories import CATEGORIES, category_index

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OCCLUDER_MODES = ("unknown", "others")
JSON_NAME = "amodal.json"


# ----------------------------------------------------------------------------- inputs


@dataclass
class InstanceInput:
    name: str  # output file stem
    source: str  # what an error message names: a mask file or "annotation <id> of <json>"
    category: str | int  # category name (folder input) or input category id (COCO)
    mask_path: Path | None = None
    segmentation: object = None  # COCO segmentation (RLE dict or polygon list)
    ann_id: int | None = None
    amodal_bbox: list[float] | None = None  # xywh


@dataclass
class ImageInput:
    path: Path
    image_id: int
    instances: list[InstanceInput] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (h, w) claimed by a COCO file
    key: str = ""  # output name (unique)


@dataclass
class InputSet:
    images: list[ImageInput]
    errors: list[dict]
    categories: list[dict]  # output categories: {"id", "name"}
    category_of: dict  # input category (name or COCO id) -> CATEGORIES index (or an error string)


class InputError(ValueError):
    """A bad input file or entry; its message names it."""


def _error(errors: list[dict], where: str, msg: str) -> None:
    errors.append({"input": where, "error": msg})
    print(f"[predict] skipped {where}: {msg}", file=sys.stderr, flush=True)


def _our_categories() -> list[dict]:
    return [{"id": i + 1, "name": c} for i, c in enumerate(CATEGORIES)]


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
    out = []
    for k, image in enumerate(images):
        try:
            out.append(ImageInput(path=image, image_id=first_id + k, instances=_folder_instances(image)))
        except InputError as err:
            _error(errors, str(image), str(err))
    return out


def read_coco_inputs(path: Path, errors: list[dict]) -> tuple[list[ImageInput], list[dict], dict]:
    """Images, output categories and the category map of a COCO-style JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the COCO JSON: {err}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{path}: a COCO JSON needs a list under {key!r}")
    cats, category_of = [], {}
    for c in data["categories"]:
        try:
            category_of[c["id"]] = category_index(str(c["name"]).strip().lower())
        except (KeyError, ValueError) as err:
            category_of[c.get("id")] = f"category {c.get('name')!r} (id {c.get('id')}): {err}"
        cats.append({"id": c.get("id"), "name": c.get("name")})
    images: dict = {}
    for im in data["images"]:
        if "id" not in im or "file_name" not in im:
            _error(errors, f"{path}: image entry {im}", "needs 'id' and 'file_name'")
            continue
        size = (int(im["height"]), int(im["width"])) if "height" in im and "width" in im else None
        images[im["id"]] = ImageInput(path=path.parent / im["file_name"], image_id=im["id"], size=size)
    for k, ann in enumerate(data["annotations"]):
        aid = ann.get("id", k)
        where = f"annotation {aid} of {path}"
        img = images.get(ann.get("image_id"))
        if img is None:
            _error(errors, where, f"image_id {ann.get('image_id')!r} is not in 'images'")
            continue
        if "segmentation" not in ann:
            _error(errors, where, "has no 'segmentation' (the visible mask)")
            continue
        img.instances.append(InstanceInput(
            name=f"{aid}", source=where, category=ann.get("category_id"), segmentation=ann["segmentation"],
            ann_id=aid, amodal_bbox=ann.get("amodal_bbox")))
    return list(images.values()), cats, category_of


def collect_inputs(inputs) -> InputSet:
    """Every image and instance named by `inputs` (paths; see the module doc)."""
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    errors: list[dict] = []
    images: list[ImageInput] = []
    categories, category_of = _our_categories(), {}
    coco_seen = False
    for p in paths:
        if not p.exists():
            _error(errors, str(p), "no such file or folder")
        elif p.is_file() and p.suffix.lower() == ".json":
            if coco_seen:
                raise ValueError(f"{p}: give at most one COCO JSON per call (their ids would collide)")
            coco_seen = True
            try:
                imgs, categories, category_of = read_coco_inputs(p, errors)
            except InputError as err:
                _error(errors, str(p), str(err))
                continue
            images += imgs
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            images += read_folder_inputs([p], errors, first_id=len(images) + 1)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                _error(errors, str(p), f"the folder holds no {'/'.join(IMAGE_SUFFIXES)} image")
            images += read_folder_inputs(files, errors, first_id=len(images) + 1)
        else:
            _error(errors, str(p), f"not an image ({', '.join(IMAGE_SUFFIXES)}), a folder or a COCO .json")
    if coco_seen and len(paths) > 1:
        raise ValueError("a COCO JSON input cannot be mixed with other inputs in one call")
    used: set[str] = set()
    for im in images:
        key = im.path.stem
        if key in used:
            key = f"{key}_{im.image_id}"
        used.add(key)
        im.key = key
    return InputSet(images, errors, categories, category_of)


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
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) >= 128
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read mask {path}: {err}") from None


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
    if inst.mask_path is not None:
        m = read_mask_png(inst.mask_path)
        if m.shape != (h, w):
            raise InputError(f"the mask is {m.shape[0]}x{m.shape[1]} (h x w) but its image is {h}x{w}")
    else:
        m = decode_segmentation(inst.segmentation, h, w)
    if not m.any():
        raise InputError("the visible mask is empty")
    return m


# ----------------------------------------------------------------------------- crops and the model


def make_crops(
    image: np.ndarray, visible: np.ndarray, occluded: np.ndarray, boxes: np.ndarray, crop_size: int, margin: float
) -> dict[str, torch.Tensor]:
    """The DataModule's crops of n instances of one image: uint8 (H,W,3), bool (n,H,W)
    visible and occluder masks, (n,4) xyxy boxes -> rgb, visible, occluded, crop_box."""
    from datamodules.crops import crop_to_box, square_crop_box

    n = visible.shape[0]
    rgb = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255))
    crop_box = torch.from_numpy(square_crop_box(boxes.astype(np.float32), margin))
    chans = torch.cat([rgb[None].expand(n, -1, -1, -1), torch.from_numpy(visible[:, None].astype(np.float32)),
                       torch.from_numpy(occluded[:, None].astype(np.float32))], dim=1)
    out = crop_to_box(chans, crop_box, crop_size)
    return {"rgb": out[:, :3].contiguous(), "visible": (out[:, 3:4] > 0.5).float(),
            "occluded": (out[:, 4:5] > 0.5).float(), "crop_box": crop_box}


def occluder_masks(visible: np.ndarray, mode: str) -> np.ndarray:
    """(n,H,W) bool occluder mask of each instance of an image (see the module doc)."""
    if mode == "unknown":
        return ~visible
    if mode == "others":
        total = visible.sum(0)
        return (total[None] - visible.astype(np.int64)) > 0
    raise ValueError(f"occluder={mode!r}: expected one of {', '.join(OCCLUDER_MODES)}")


def checkpoint_stage(checkpoint: Path) -> str:
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False, mmap=True)
    stage = ((ckpt.get("hyper_parameters") or {}).get("cfg") or {}).get("stage")
    if not stage:
        raise ValueError(f"{checkpoint}: not an amodal3d stage checkpoint (no hyper_parameters.cfg.stage)")
    return str(stage)


def load_predictor(checkpoint: str | Path | None = None, experiment: str = "default", root: str = "runs",
                   device: str | torch.device = "cpu"):
    """(module, checkpoint): the given checkpoint's stage module, else the Ours model
    (joint, or refine where joint is not better on validation)."""
    from lightning_modules.common import AmodalStage
    from lightning_modules.refine import load_stage_module, ours_checkpoint

    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        stage = checkpoint_stage(path)
    else:
        stage, path = ours_checkpoint(experiment, root)
    module = load_stage_module(stage, path, device)
    if not isinstance(module, AmodalStage):
        raise TypeError(f"{path}: stage {stage!r} does not predict amodal masks")
    return module, path


# ----------------------------------------------------------------------------- outputs

_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0),
], np.float32)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_image(
    image: np.ndarray, visible: list[np.ndarray], amodal: list[np.ndarray], min_side: int = 256
) -> np.ndarray:
    """uint8 overlay: per instance its visible part tinted, the predicted hidden part
    hatched, the amodal outline drawn; small images are enlarged (nearest)."""
    k = max(1, math.ceil(min_side / max(image.shape[:2])))
    up = lambda a: np.repeat(np.repeat(a, k, 0), k, 1)  # noqa: E731
    out = up(image).astype(np.float32)
    hh, ww = out.shape[:2]
    yy, xx = np.mgrid[0:hh, 0:ww]
    hatch = ((xx + yy) // max(2, k)) % 3 == 0
    for i, (v, a) in enumerate(zip(visible, amodal)):
        c = _PALETTE[i % len(_PALETTE)]
        v, a = up(v), up(a)
        out[v] = 0.55 * out[v] + 0.45 * c
        hidden = a & ~v
        out[hidden] = 0.75 * out[hidden] + 0.25 * c
        out[hidden & hatch] = c
        out[mask_outline(a)] = c
    return out.clip(0, 255).astype(np.uint8)


def encode_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box_xywh(mask: np.ndarray) -> list[float]:
    from datamodules.composites import mask_box

    x1, y1, x2, y2 = (float(v) for v in mask_box(mask))
    return [x1, y1, x2 - x1, y2 - y1]


@dataclass
class PredictReport:
    images: int
    instances: int
    errors: list[dict]
    seconds: float
    json_path: Path
    checkpoint: str = ""

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else math.nan


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class _Prepared:
    image: ImageInput
    rgb: np.ndarray
    instances: list[InstanceInput]
    visible: np.ndarray  # (n,H,W) bool
    category: np.ndarray  # (n,) CATEGORIES index
    crops: dict


def _resolve_category(inst: InstanceInput, inputs: InputSet) -> int:
    """CATEGORIES index of an instance: its file-name category, or its COCO category id."""
    if inst.ann_id is None:
        try:
            return category_index(str(inst.category).strip().lower())
        except ValueError as err:
            raise InputError(f"{err} (the category is the mask file name up to the first '_')") from None
    cat = inputs.category_of.get(inst.category)
    if cat is None:
        raise InputError(f"unknown category id {inst.category!r}: not in the JSON's 'categories'")
    if isinstance(cat, str):
        raise InputError(f"unknown {cat}")
    return cat


def _prepare(img: ImageInput, inputs: InputSet, crop_size: int, margin: float, occluder: str,
             amodal_boxes: bool = True) -> _Prepared | None:
    try:
        rgb = read_rgb(img.path)
    except InputError as err:
        _error(inputs.errors, str(img.path), str(err))
        return None
    h, w = rgb.shape[:2]
    if img.size is not None and img.size != (h, w):
        _error(inputs.errors, str(img.path),
               f"the image is {h}x{w} (h x w) but the JSON says {img.size[0]}x{img.size[1]}")
        return None
    if not img.instances:
        _error(inputs.errors, str(img.path), "no instance (visible mask) given for this image")
        return None
    keep, masks, cats, boxes = [], [], [], []
    for inst in img.instances:
        try:
            cat = _resolve_category(inst, inputs)
            m = instance_mask(inst, h, w)
            if inst.amodal_bbox is not None and amodal_boxes:
                x, y, bw, bh = (float(v) for v in inst.amodal_bbox)
                if not (bw > 0 and bh > 0):
                    raise InputError(f"amodal_bbox {inst.amodal_bbox} has no area")
                box = np.array([x, y, x + bw, y + bh], np.float32)
            else:
                from datamodules.composites import mask_box

                box = mask_box(m)
        except InputError as err:
            _error(inputs.errors, inst.source, str(err))
            continue
        keep.append(inst)
        masks.append(m)
        cats.append(cat)
        boxes.append(box)
    if not keep:
        return None
    visible = np.stack(masks)
    crops = make_crops(rgb, visible, occluder_masks(visible, occluder), np.stack(boxes), crop_size, margin)
    if amodal_boxes:
        crops["amodal_box"] = torch.from_numpy(np.stack(boxes))
    return _Prepared(img, rgb, keep, visible, np.array(cats, np.int64), crops)


@torch.no_grad()
def _run_model(module, prepared: list[_Prepared], batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Amodal probabilities in the crop frame, one (n_i,1,S,S) tensor per prepared image."""
    keys = [k for k in ("rgb", "visible", "occluded", "crop_box", "amodal_box") if k in prepared[0].crops]
    allc = {k: torch.cat([p.crops[k] for p in prepared]) for k in keys}
    allc["category"] = torch.from_numpy(np.concatenate([p.category for p in prepared]))
    n = allc["category"].shape[0]
    allc["index"] = torch.arange(n)
    allc["object_id"] = torch.full((n,), -1, dtype=torch.long)
    probs = []
    for lo in range(0, n, batch_size):
        batch = {k: v[lo:lo + batch_size].to(device) for k, v in allc.items()}
        probs.append(module.predict_amodal(batch).float().cpu())
    prob = torch.cat(probs)
    return list(torch.split(prob, [len(p.instances) for p in prepared]))


def _finish(p: _Prepared, prob: torch.Tensor, out: Path, anns: list[dict], images: list[dict]) -> None:
    from datamodules.crops import paste_crop_to_image

    h, w = p.rgb.shape[:2]
    amodal = (paste_crop_to_image(prob, p.crops["crop_box"], h, w)[:, 0] > 0.5).numpy() | p.visible
    for inst, v, a, cat in zip(p.instances, p.visible, amodal, p.category):
        rel = Path("masks") / p.image.key / f"{inst.name}.png"
        _save_png(a.astype(np.uint8) * 255, out / rel)
        anns.append({
            "id": inst.ann_id if inst.ann_id is not None else len(anns) + 1,
            "image_id": p.image.image_id,
            "category_id": inst.category if inst.ann_id is not None else int(cat) + 1,
            "category": CATEGORIES[int(cat)],
            "segmentation": encode_rle(a), "area": int(a.sum()), "bbox": _box_xywh(a),
            "visible_area": int(v.sum()), "iscrowd": 0, "score": 1.0,
            "mask_file": str(rel), "input": inst.source,
        })
    _save_png(overlay_image(p.rgb, list(p.visible), list(amodal)), out / "overlays" / f"{p.image.key}.png")
    images.append({"id": p.image.image_id, "file_name": str(p.image.path), "height": h, "width": w,
                   "overlay": f"overlays/{p.image.key}.png"})


def predict_files(
    inputs,
    out_dir: str | Path,
    module=None,
    checkpoint: str | Path | None = None,
    experiment: str = "default",
    root: str = "runs",
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    occluder: str = "auto",
) -> PredictReport:
    """Amodal masks of every instance of `inputs` written under out_dir (module doc).

    module: an AmodalStage already loaded (else load_predictor(checkpoint, experiment)).
    The report's seconds cover reading, cropping, the model and writing (not the
    model load); its errors list every skipped input with the reason."""
    if occluder not in OCCLUDER_MODES + ("auto",):
        raise ValueError(f"occluder={occluder!r}: expected auto or one of {', '.join(OCCLUDER_MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    device = torch.device(device)
    ckpt_name = str(checkpoint or "")
    if module is None:
        module, path = load_predictor(checkpoint, experiment, root, device)
        ckpt_name = str(path)
    module = module.to(device).eval()
    from datamodules.protocols import gives_amodal_box, protocol_of

    protocol = protocol_of(module.cfg)
    box_protocol = gives_amodal_box(protocol)
    crop_size = int(module.cfg.loader.crop_size)
    margin = float(module.cfg.loader.crop_margin if box_protocol
                   else module.cfg.loader.get("visible_crop_margin", module.cfg.loader.crop_margin))
    if occluder == "auto":
        occluder = "unknown" if box_protocol else "others"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inputs = collect_inputs(inputs)
    anns: list[dict] = []
    images: list[dict] = []
    chunk: list[_Prepared] = []

    def flush() -> None:
        if chunk:
            for p, prob in zip(chunk, _run_model(module, chunk, batch_size, device)):
                _finish(p, prob, out, anns, images)
            chunk.clear()

    for img in inputs.images:
        p = _prepare(img, inputs, crop_size, margin, occluder, amodal_boxes=box_protocol)
        if p is not None:
            chunk.append(p)
        if sum(len(c.instances) for c in chunk) >= batch_size:
            flush()
    flush()
    doc = {
        "info": {"description": "amodal masks predicted by amodal3d", "checkpoint": ckpt_name,
                 "stage": str(module.cfg.stage), "occluder": occluder, "crop_size": crop_size, "crop_margin": margin,
                 "protocol": protocol,
                 "box": ("amodal_bbox when the input gives one, else the box of the visible mask" if box_protocol
                         else "the box of the visible mask")},
        "images": images, "categories": inputs.categories, "annotations": anns, "errors": inputs.errors,
    }
    json_path = out / JSON_NAME
    tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, json_path)
    seconds = time.perf_counter() - t0
    return PredictReport(len(images), len(anns), inputs.errors, seconds, json_path, ckpt_name)


# ----------------------------------------------------------------------------- benchmark helper


def export_folder_inputs(data_root: str | Path, split: str, out_dir: str | Path, max_images: int) -> int:
    """Write the first max_images images of a built dataset's split as folder inputs
    (image PNG + one visible-mask PNG per instance); returns the instance count."""
    from datamodules.shards import SplitReader

    reader = SplitReader(data_root, split, verify=False)
    out = Path(out_dir)
    cats = reader.index["category"]
    n = 0
    for i in range(min(max_images, reader.num_images)):
        _save_png(reader.image(i), out / f"img{i:05d}.png")
        lo, hi = reader.instance_range(i)
        for j in range(lo, hi):
            vis = reader.instance_masks(j, ("visible",))["visible"]
            _save_png(vis.astype(np.uint8) * 255, out / f"img{i:05d}" / f"{CATEGORIES[int(cats[j])]}_{j - lo}.png")
            n += 1
    return n


def predict_throughput(module, data_root: str | Path, split: str = "test", max_images: int = 64,
                       batch_size: int = 32, device: str | torch.device = "cpu") -> dict:
    """instances/s of predict_files end to end (files in, files out) on `max_images`
    images of a built dataset, exported to a temporary folder first (not timed)."""
    with tempfile.TemporaryDirectory(prefix="amodal3d-predict-") as tmp:
        n = export_folder_inputs(data_root, split, Path(tmp) / "in", max_images)
        rep = predict_files(Path(tmp) / "in", Path(tmp) / "out", module=module, device=device, batch_size=batch_size)
    return {"instances_per_s": rep.instances_per_s, "instances": rep.instances, "exported_instances": n,
            "images": rep.images, "seconds": rep.seconds, "errors": len(rep.errors), "device": str(device),
            "batch_size": batch_size, "torch_threads": torch.get_num_threads()}

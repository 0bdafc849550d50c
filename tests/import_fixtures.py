"""Small annotated datasets in the exact public formats (KINS, KINS2020, COCOA, COCO-style
amodal), written by the tests: non-square images of two sizes, real polygons, visible RLEs
with compressed (str) and uncompressed (list) counts, a fully occluded instance and a
degenerate annotation (a 2-point polygon).

Each scene: up to three shapes drawn back to front on a noisy background; the amodal
polygons are the shapes, visible = amodal minus the shapes in front. `expected` returns
the masks the importer must produce, so tests compare pixels, not just counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: (width, height) of the images: KITTI-like wide, and portrait
SIZES = ((96, 40), (48, 64))
KINS_CATEGORIES = [{"id": 1, "name": "cyclist"}, {"id": 2, "name": "pedestrian"}, {"id": 4, "name": "car"},
                   {"id": 5, "name": "tram"}, {"id": 6, "name": "truck"}, {"id": 7, "name": "van"},
                   {"id": 8, "name": "misc"}]
KINS2020_CATEGORIES = KINS_CATEGORIES[:2] + [{"id": 3, "name": "rider"}] + KINS_CATEGORIES[2:]


def polygon_mask(poly: list[float], h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)


def rle_str(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def rle_list(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.astype(np.uint8).ravel(order="F")
    counts, value, run = [], 0, 0
    for px in flat:
        if px == value:
            run += 1
        else:
            counts.append(run)
            value, run = px, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _scenes(n_images: int, seed: int) -> list[dict]:
    """Per image: size, pixels, and its shapes back to front (polygon, category position)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n_images):
        w, h = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        shapes = []
        for k in range(3):
            cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
            rx, ry = rng.uniform(0.12, 0.25) * w, rng.uniform(0.15, 0.3) * h
            if k % 2 == 0:  # a quadrilateral
                poly = [cx - rx, cy - ry, cx + rx, cy - ry * 0.8, cx + rx * 0.9, cy + ry, cx - rx, cy + ry * 0.9]
            else:  # a triangle
                poly = [cx, cy - ry, cx + rx, cy + ry, cx - rx, cy + ry]
            shapes.append({"poly": [round(float(v), 2) for v in poly], "cat": int(rng.integers(0, 3)),
                           "color": rng.integers(80, 255, 3)})
        for s in shapes:  # back to front
            pixels[polygon_mask(s["poly"], h, w)] = s["color"]
        scenes.append({"w": w, "h": h, "pixels": pixels, "shapes": shapes})
    return scenes


def _masks(scene: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(amodal, visible) of each shape, back to front."""
    h, w = scene["h"], scene["w"]
    amodal = [polygon_mask(s["poly"], h, w) for s in scene["shapes"]]
    out = []
    for k, a in enumerate(amodal):
        front = np.zeros_like(a)
        for b in amodal[k + 1:]:
            front |= b
        out.append((a, a & ~front))
    return out


def _write_images(scenes: list[dict], folder: Path, prefix: str) -> list[dict]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, sc in enumerate(scenes):
        name = f"{prefix}{i:04d}.png"
        Image.fromarray(sc["pixels"]).save(folder / name)
        images.append({"id": 100 + i, "file_name": name, "width": sc["w"], "height": sc["h"]})
    return images


def write_fixture(fmt: str, root: Path, splits=("train", "val"), n_images: int = 6, bad: bool = True) -> dict:
    """Write images under root/images and one annotation file per split; returns
    {"source_path", "annotations": {split: path}, "categories", "expected": {split: [per image
    [(category, amodal, visible), ...] in the JSON's image order, fully occluded left out]}}."""
    root = Path(root)
    out = {"source_path": str(root / "images"), "annotations": {}, "expected": {}}
    ann_id = 1
    for s_i, split in enumerate(splits):
        scenes = _scenes(n_images, seed=17 + s_i)
        images = _write_images(scenes, root / "images", f"{split}_")
        anns, expected = [], []
        for i, (sc, im) in enumerate(zip(scenes, images)):
            exp = []
            regions = []
            for k, ((a, v), shape) in enumerate(zip(_masks(sc), sc["shapes"])):
                fully = i == 1 and k == 0  # the back shape of image 1 is fully hidden
                if fully:
                    v = np.zeros_like(v)
                cat_pos = shape["cat"]
                vis_rle = rle_list(v) if (ann_id % 2) else rle_str(v)
                poly = shape["poly"]
                if fmt in ("kins", "kins2020"):
                    cats = KINS_CATEGORIES if fmt == "kins" else KINS2020_CATEGORIES
                    x, y = min(poly[0::2]), min(poly[1::2])
                    bbox = [x, y, max(poly[0::2]) - x, max(poly[1::2]) - y]
                    ann = {"id": ann_id, "image_id": im["id"], "category_id": cats[cat_pos]["id"], "iscrowd": 0,
                           "area": float(a.sum())}
                    if fmt == "kins":
                        ann.update(segmentation=[poly], bbox=bbox, inmodal_seg=vis_rle, inmodal_bbox=bbox)
                    else:
                        ann.update(a_segm=[poly], a_bbox=bbox, i_segm=vis_rle, i_bbox=bbox, oco_id=1,
                                   ico_id=len(sc["shapes"]) - k)
                    anns.append(ann)
                elif fmt == "coco_amodal":
                    ann = {"id": ann_id, "image_id": im["id"], "category_id": cat_pos + 1, "iscrowd": 0,
                           "segmentation": rle_str(a) if k == 1 else [poly], "bbox": [0, 0, 1, 1],
                           "area": float(a.sum()), "visible_mask": vis_rle,
                           "occlude_rate": float(1 - v.sum() / a.sum())}
                    anns.append(ann)
                else:  # cocoa
                    region = {"segmentation": poly, "area": float(a.sum()), "name": "thing",
                              "order": len(sc["shapes"]) - k, "occlude_rate": float(1 - v.sum() / a.sum()),
                              "isStuff": False}
                    if not (v == a).all():
                        region["visible_mask"] = vis_rle
                        region["invisible_mask"] = rle_str(a & ~v)
                    regions.append(region)
                    cat_pos = 0
                ann_id += 1
                if not fully:
                    exp.append((cat_pos, a, v))
            if fmt == "cocoa":
                if i == 0:  # a stuff region: left out
                    regions.append({"segmentation": [0, 0, 5, 0, 5, 5], "area": 25.0, "name": "sky", "order": 9,
                                    "isStuff": True, "occlude_rate": 0.0})
                anns.append({"id": 500 + i, "image_id": im["id"], "regions": regions, "size": len(regions),
                             "depth_constraint": "1-2,1-3"})
            expected.append(exp)
        if bad:  # a 2-point polygon: skipped and listed
            bad_ann = {"id": 9999, "image_id": images[0]["id"], "category_id": 1, "iscrowd": 0}
            if fmt == "kins":
                bad_ann.update(segmentation=[[1, 1, 5, 5]], inmodal_seg=[[1, 1, 5, 5]], bbox=[1, 1, 4, 4])
            elif fmt == "kins2020":
                bad_ann.update(a_segm=[[1, 1, 5, 5]], i_segm=[[1, 1, 5, 5]], a_bbox=[1, 1, 4, 4])
            elif fmt == "coco_amodal":
                bad_ann.update(segmentation=[[1, 1, 5, 5]], bbox=[1, 1, 4, 4])
            if fmt == "cocoa":
                anns[0]["regions"].append({"segmentation": [1, 1, 5, 5], "order": 5, "isStuff": False})
            else:
                anns.append(bad_ann)
        doc: dict = {"images": images, "annotations": anns}
        if fmt == "kins":
            doc["categories"] = KINS_CATEGORIES
        elif fmt == "kins2020":
            doc["categories"] = KINS2020_CATEGORIES
        elif fmt == "coco_amodal":
            doc["categories"] = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}, {"id": 3, "name": "dog"}]
        path = root / f"{fmt}_{split}.json"
        path.write_text(json.dumps(doc))
        out["annotations"][split] = str(path)
        out["expected"][split] = expected
    names = {"kins": [c["name"] for c in KINS_CATEGORIES], "kins2020": [c["name"] for c in KINS2020_CATEGORIES],
             "coco_amodal": ["car", "person", "dog"], "cocoa": ["object"]}
    out["categories"] = names[fmt]
    return out

"""`cocoa`: the original COCOA release (`COCO_amodal_{split}2014.json`).

One annotation per image holds `regions[]`: a flat amodal polygon `segmentation`, optional
`visible_mask` / `invisible_mask` RLEs (no `visible_mask`: not occluded), `order` (1 =
frontmost) and `isStuff`. COCOA has no classes: every thing region is category `object`;
stuff regions are left out (counted as `stuff`).
"""

from __future__ import annotations

from pathlib import Path

from amodal3d.datamodules.imports.annotations import (
    AnnotationError, ParsedInstance, ParsedSplit, annotations_of, as_segment, field_of, images_of, read_json,
)

CATEGORY = "object"


def parse_cocoa(path: str | Path) -> ParsedSplit:
    path = Path(path)
    doc = read_json(path, ("images", "annotations"))
    images = images_of(doc, path)
    split = ParsedSplit(path, [CATEGORY], list(images.values()), counts={"stuff": 0})
    next_id = 0
    for k, ann, where, image in annotations_of(doc, path, images):
        regions = field_of(ann, ("regions",), where)
        if not isinstance(regions, list):
            raise AnnotationError(f"{where}: 'regions' must be a list")
        aid = int(ann.get("id", k))
        for r, region in enumerate(regions):
            rwhere = f"{where} region {r}"
            if not isinstance(region, dict):
                raise AnnotationError(f"{rwhere}: expected an object")
            next_id += 1
            if region.get("isStuff"):
                split.counts["stuff"] += 1
                continue
            visible = region.get("visible_mask")
            order = region.get("order")
            image.instances.append(ParsedInstance(
                ann_id=aid * 1000 + r, category=0,
                amodal=as_segment(field_of(region, ("segmentation",), rwhere), f"{rwhere} field 'segmentation'"),
                visible=None if visible is None else as_segment(visible, f"{rwhere} field 'visible_mask'"),
                depth_rank=int(order) - 1 if order is not None else -1, object_id=next_id,
            ))
    return split

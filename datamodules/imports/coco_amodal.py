"""`coco_amodal`: the COCO-style amodal files of COCOA-cls (`*_with_classes.json`), COCOA
detectron (`*_detectron_no_stuff.json`), D2SA, and amodal3d's own export.

Per annotation: amodal `segmentation` (polygons or RLE, counts str or list), `visible_mask`
(RLE or polygons; absent: not occluded), optional `occluder_mask`; `object_id`, `view_id`,
`depth_rank` when present (our export writes them). Crowd annotations are skipped.
"""

from __future__ import annotations

from pathlib import Path

from amodal3d.datamodules.imports.annotations import (
    ParsedInstance, ParsedSplit, annotations_of, as_segment, category_of, category_table, field_of, images_of,
    read_json,
)


def parse_coco_amodal(path: str | Path) -> ParsedSplit:
    path = Path(path)
    doc = read_json(path, ("images", "annotations", "categories"))
    names, ids = category_table(doc["categories"], str(path))
    images = images_of(doc, path)
    split = ParsedSplit(path, names, list(images.values()))
    for _, ann, where, image in annotations_of(doc, path, images):
        aid = int(field_of(ann, ("id",), where))
        if int(ann.get("iscrowd", 0)):
            split.skipped.append({"annotation_id": aid, "image_id": image.image_id, "field": "iscrowd",
                                  "reason": "crowd annotation (no instance mask)"})
            continue
        visible = field_of(ann, ("visible_mask",), where, required=False)
        occluder = field_of(ann, ("occluder_mask",), where, required=False)
        image.instances.append(ParsedInstance(
            ann_id=aid, category=category_of(ann, ids, where),
            amodal=as_segment(field_of(ann, ("segmentation",), where), f"{where} field 'segmentation'"),
            visible=None if visible is None else as_segment(visible, f"{where} field 'visible_mask'"),
            occluder=None if occluder is None else as_segment(occluder, f"{where} field 'occluder_mask'"),
            depth_rank=int(ann.get("depth_rank", -1)),
            object_id=int(ann["object_id"]) if "object_id" in ann else None,
            view_id=int(ann.get("view_id", 0)),
        ))
    return split

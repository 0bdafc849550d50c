"""`kins` and `kins2020`: KITTI INStance amodal annotations (COCO-style, one file per split).

- `kins` (`instances_{train,val}.json`): amodal polygons in `segmentation`, the visible mask
  in `inmodal_seg` (RLE, or polygons); category ids 1, 2, 4-8 (7 classes).
- `kins2020` (`update_{train,test}_2020.json`): `a_segm` / `i_segm` (falling back to the
  original names, as the public evaluators do), 8 classes; `ico_id` (0: overlaps nothing,
  else 1, 2, ... each time the instance is occluded further) becomes the depth rank.
"""

from __future__ import annotations

from pathlib import Path

from amodal3d.datamodules.imports.annotations import (
    ParsedInstance, ParsedSplit, annotations_of, as_segment, category_of, category_table, field_of, images_of,
    read_json,
)

_FIELDS = {
    "kins": {"amodal": ("segmentation",), "visible": ("inmodal_seg",)},
    "kins2020": {"amodal": ("a_segm", "segmentation"), "visible": ("i_segm", "inmodal_seg")},
}


def _parse(path: str | Path, variant: str) -> ParsedSplit:
    path = Path(path)
    doc = read_json(path, ("images", "annotations", "categories"))
    names, ids = category_table(doc["categories"], str(path))
    images = images_of(doc, path)
    split = ParsedSplit(path, names, list(images.values()))
    fields = _FIELDS[variant]
    for k, ann, where, image in annotations_of(doc, path, images):
        amodal_key = next((n for n in fields["amodal"] if ann.get(n) is not None), fields["amodal"][0])
        visible_key = next((n for n in fields["visible"] if ann.get(n) is not None), fields["visible"][0])
        depth = -1
        if variant == "kins2020" and ann.get("ico_id") is not None:
            depth = max(int(ann["ico_id"]) - 1, 0)
        image.instances.append(ParsedInstance(
            ann_id=int(field_of(ann, ("id",), where)), category=category_of(ann, ids, where),
            amodal=as_segment(field_of(ann, (amodal_key,), where), f"{where} field {amodal_key!r}"),
            visible=as_segment(field_of(ann, (visible_key,), where), f"{where} field {visible_key!r}"),
            depth_rank=depth,
        ))
    return split


def parse_kins(path: str | Path) -> ParsedSplit:
    return _parse(path, "kins")


def parse_kins2020(path: str | Path) -> ParsedSplit:
    return _parse(path, "kins2020")

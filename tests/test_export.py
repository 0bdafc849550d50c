"""`amodal3d export --format coco_amodal`: a built dataset as PNG images + COCO-style amodal
JSON (docs/data.md, "Export"). Read back with pycocotools, every image, mask, box, category
and count equals the shards'; bad invocations get one clear error and write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from amodal3d.cli import main
from amodal3d.config import load_config
from amodal3d.datamodules import coco_export
from amodal3d.datamodules.build import build_dataset
from amodal3d.datamodules.coco_export import ExportOutputError, MissingDatasetError, export_dataset
from amodal3d.datamodules.shard_format import read_manifest
from amodal3d.datamodules.shard_reader import SplitReader
from amodal3d.errors import UserError
from fakes import build_fake_dataset, fake_objects, tiny_overrides

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two tiny fake datasets, exported: `erase` (one instance per image) through the function,
    `paste` (several overlapping instances per image, non-empty occluders) through the CLI."""
    tmp = tmp_path_factory.mktemp("export")
    build_fake_dataset(tmp / "erase")
    paste_cfg = load_config(None, debug="tiny", overrides=tiny_overrides(
        tmp / "paste", "data.composite=paste", "data.paste_images_per_split={train:6,val:4,test:4}"))
    build_dataset(paste_cfg.data, progress=False, load_objects=fake_objects)
    out = {"erase": tmp / "out_erase", "paste": tmp / "out_paste"}
    export_dataset(tmp / "erase" / "data", out["erase"])
    rc = main(["export", "--format", "coco_amodal", "--root", str(tmp / "paste" / "data"), "--out", str(out["paste"])])
    assert rc == 0
    return {"tmp": tmp, "root": {k: tmp / k / "data" for k in out}, "out": out}


def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


@pytest.mark.parametrize("kind", ["erase", "paste"])
@pytest.mark.parametrize("split", SPLITS)
def test_export_equals_the_shards(exported, kind, split):
    root, out = exported["root"][kind], exported["out"][kind]
    manifest = read_manifest(root)
    reader = SplitReader(root, split)
    idx = reader.index
    json_path = out / "annotations" / f"{split}.json"
    doc = json.loads(json_path.read_text())
    coco = COCO(str(json_path))

    # categories: the dataset's names, ids = CATEGORIES index + 1
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    assert cats == {manifest["category_ids"][n] + 1: n for n in manifest["categories"]}
    assert set(coco.getCatIds()) == set(cats)

    # counts
    assert len(doc["images"]) == reader.num_images == manifest["splits"][split]["images"] > 0
    assert len(doc["annotations"]) == reader.num_instances == manifest["splits"][split]["instances"] > 0
    assert len({a["id"] for a in doc["annotations"]}) == reader.num_instances

    n_occluded = n_occluder = n_multi = 0
    for i in range(reader.num_images):
        img = coco.loadImgs(i + 1)[0]
        assert img["index"] == i and img["dataset_image_id"] == int(idx["image_ids"][i])
        pixels = np.asarray(Image.open(out / split / "images" / img["file_name"]))
        expected = reader.image(i)
        assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
        assert np.array_equal(pixels, expected), f"image {i} differs from the shard's"
        assert (img["height"], img["width"]) == expected.shape[:2]

        lo, hi = reader.instance_range(i)
        masks = reader.image_masks(i)
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[i + 1])), key=lambda a: a["id"])
        assert [a["id"] for a in anns] == list(range(lo + 1, hi + 1))
        n_multi += len(anns) > 1
        for j, ann in enumerate(anns):
            row = lo + j
            amodal, visible, occluder = masks["amodal"][j], masks["visible"][j], masks["occluder"][j]
            assert ann["instance_index"] == row and ann["iscrowd"] == 0
            assert ann["category_id"] == int(idx["category"][row]) + 1 and ann["category_id"] in cats
            assert ann["object_id"] == int(idx["object_id"][row]) and ann["view_id"] == int(idx["view_id"][row])
            assert ann["depth_rank"] == int(idx["depth_rank"][row])
            for key in ("segmentation", "visible_mask", "invisible_mask", "occluder_mask"):
                assert isinstance(ann[key]["counts"], str) and ann[key]["size"] == list(expected.shape[:2])
            assert np.array_equal(coco.annToMask(ann).astype(bool), amodal)
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), amodal)
            assert np.array_equal(mask_utils.decode(ann["visible_mask"]).astype(bool), visible)
            assert np.array_equal(mask_utils.decode(ann["invisible_mask"]).astype(bool), amodal & ~visible)
            assert np.array_equal(mask_utils.decode(ann["occluder_mask"]).astype(bool), occluder)
            assert ann["area"] == int(amodal.sum()) == int(mask_utils.area(ann["segmentation"]))
            assert ann["visible_area"] == int(visible.sum())
            assert ann["bbox"] == _xywh(idx["amodal_box"][row])
            assert ann["visible_bbox"] == _xywh(idx["visible_box"][row])
            assert ann["visible_bbox"] == mask_utils.toBbox(ann["visible_mask"]).tolist()
            assert ann["occlude_rate"] == pytest.approx(float(idx["occlusion"][row]), abs=1e-6)
            assert ann["occlude_rate"] == 1.0 - visible.sum() / amodal.sum()
            cat_name = cats[ann["category_id"]]
            info = manifest["objects"][split][cat_name]
            assert ann["source_object_id"] == info["ids"][ann["object_id"] - info["offset"]]
            n_occluded += bool((amodal & ~visible).any())
            n_occluder += bool(occluder.any())
    assert n_occluded > 0 and n_occluder > 0  # the masks compared are not all empty
    if kind == "paste":
        assert n_multi > 0  # images with several instances, their annotations grouped right


def test_layout_and_nothing_but_the_export(exported):
    out = exported["out"]["erase"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("annotations/")] == [f"annotations/{s}.json" for s in sorted(SPLITS)]
    for s in SPLITS:
        n = read_manifest(exported["root"]["erase"])["splits"][s]["images"]
        assert sorted(f for f in files if f.startswith(f"{s}/")) == [f"{s}/images/{i:06d}.png" for i in range(n)]
    assert len(files) == len(SPLITS) + sum(len(list((out / s / "images").iterdir())) for s in SPLITS)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_cli_splits_and_config_root(exported, tmp_path, capsys):
    """--splits exports only those; without --root the config's data.root is exported."""
    out = tmp_path / "o"
    out.mkdir()  # an existing empty folder is fine
    root = exported["root"]["erase"]
    rc = main(["export", "--out", str(out), "--splits", "val", "test", "--debug", "tiny", f"data.root={root}"])
    assert rc == 0, capsys.readouterr().err
    assert "val 8 images / 8 annotations" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["test.json", "val.json"]
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "test", "val"]
    for s in ("val", "test"):  # the same split of the same dataset: byte-identical to the full export
        assert (out / "annotations" / f"{s}.json").read_bytes() == \
            (exported["out"]["erase"] / "annotations" / f"{s}.json").read_bytes()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_dataset_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AMODAL3D_TRACEBACK", raising=False)
    missing, out = tmp_path / "no_data_here", tmp_path / "out"
    with pytest.raises(MissingDatasetError) as info:
        export_dataset(missing, out)
    assert isinstance(info.value, UserError) and str(missing) in str(info.value) and "make data" in str(info.value)

    assert main(["export", "--root", str(missing), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(missing) in line and "make data" in line and "does not exist" in line

    half = tmp_path / "half_built"
    half.mkdir()  # a folder without manifest.json: a build that did not finish
    assert main(["export", "--out", str(out), f"data.root={half}"]) == 2
    line = _one_error_line(capsys)
    assert str(half) in line and "make data" in line and "manifest.json" in line
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_non_empty_out_is_refused_unless_force(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AMODAL3D_TRACEBACK", raising=False)
    root, out = exported["root"]["erase"], tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportOutputError):
        export_dataset(root, out)
    assert main(["export", "--root", str(root), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "not empty" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    assert main(["export", "--root", str(root), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists()
    assert (out / "annotations" / "train.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_out_holding_the_dataset_is_refused_even_with_force(exported, capsys, monkeypatch):
    monkeypatch.delenv("AMODAL3D_TRACEBACK", raising=False)
    root = exported["root"]["erase"]
    before = sorted(p.name for p in root.iterdir())
    assert main(["export", "--root", str(root), "--out", str(root.parent), "--force"]) == 2
    line = _one_error_line(capsys)
    assert str(root) in line and "holds the dataset" in line
    assert sorted(p.name for p in root.iterdir()) == before


def test_unknown_format_and_split_are_clear_errors(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AMODAL3D_TRACEBACK", raising=False)
    root, out = exported["root"]["erase"], tmp_path / "out"
    assert main(["export", "--format", "kins", "--root", str(root), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "--format 'kins'" in line and "coco_amodal" in line
    assert main(["export", "--root", str(root), "--out", str(out), "--splits", "holdout"]) == 2
    line = _one_error_line(capsys)
    assert "'holdout'" in line and "train" in line
    assert not out.exists()


@pytest.mark.parametrize("force", [False, True])
def test_a_failed_export_leaves_nothing_half_written(exported, tmp_path, monkeypatch, force):
    """An error after some images and one split's JSON are written: no <out> appears (or, under
    --force, the previous <out> is left as it was), and the staging folder is removed."""
    root, out = exported["root"]["erase"], tmp_path / "out"
    if force:
        out.mkdir()
        (out / "old.txt").write_text("previous export")
    real, calls = coco_export.save_png_atomic, {"n": 0}

    def failing_png(image, path):
        calls["n"] += 1
        if calls["n"] == 20:  # train has 16 images: val is half written
            raise OSError("disk full (simulated)")
        return real(image, path)

    monkeypatch.setattr(coco_export, "save_png_atomic", failing_png)
    with pytest.raises(OSError, match="simulated"):
        export_dataset(root, out, force=force)
    assert calls["n"] == 20
    if force:
        assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if force else [])


@pytest.mark.parametrize("kind", ["erase", "paste"])
def test_export_then_import_reads_back_identically(exported, kind, tmp_path):
    """`data.source=coco_amodal` reads an export back: the same images, masks, categories (the 13-name
    table, so every index is kept), boxes, occlusion, object/view ids and depth ranks; cameras are
    not exported (NaN)."""
    root, out = exported["root"][kind], exported["out"][kind]
    ovs = ["data.source=coco_amodal", f"data.source_path={out}/{{split}}/images", f"data.root={tmp_path / 'back'}"]
    ovs += [f"data.annotations.{s}={out}/annotations/{s}.json" for s in SPLITS]
    back = build_dataset(load_config(None, overrides=ovs).data, progress=False)
    assert back["all_categories"] == read_manifest(root)["all_categories"]
    for split in SPLITS:
        a, b = SplitReader(root, split), SplitReader(tmp_path / "back", split)
        assert (a.num_images, a.num_instances) == (b.num_images, b.num_instances)
        for name in ("category", "object_id", "view_id", "depth_rank", "amodal_box", "visible_box", "occlusion",
                     "image_ids", "inst_offsets"):
            np.testing.assert_array_equal(a.index[name], b.index[name], err_msg=f"{kind} {split} {name}")
        assert np.isnan(b.index["camera"]).all()
        for i in range(a.num_images):
            np.testing.assert_array_equal(a.image(i), b.image(i))
            ma, mb = a.image_masks(i), b.image_masks(i)
            for m in ("amodal", "visible", "occluder"):
                np.testing.assert_array_equal(ma[m], mb[m], err_msg=f"{kind} {split} image {i} {m}")

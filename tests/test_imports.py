"""Importing annotated amodal datasets (KINS, KINS2020, COCOA, COCO-style amodal) into shards
(datamodules/imports/; docs/data.md, "Imported datasets"), on fixtures written in each exact
public format by tests/import_fixtures.py: pixel-equal masks, the dataset's own categories,
images of their own (non-square) size, the documented rules counted, and bad input stopped
before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amodal3d.config import load_config
from amodal3d.datamodules.build import build_dataset
from amodal3d.datamodules.crops import CropDataset
from amodal3d.datamodules.images import ImageDataset
from amodal3d.datamodules.imports.annotations import AnnotationError
from amodal3d.datamodules.shard_format import MANIFEST, read_manifest
from amodal3d.datamodules.shard_reader import SplitReader
from amodal3d.datamodules.shard_validate import validate_dataset
from amodal3d.errors import ConfigError
from import_fixtures import rle_str, write_fixture

FORMATS = ("kins", "kins2020", "cocoa", "coco_amodal")


def import_config(fmt: str, fx: dict, root, *extra: str):
    ovs = [f"data.source={fmt}", f"data.source_path={fx['source_path']}", f"data.root={root}"]
    ovs += [f"data.annotations.{s}={p}" for s, p in fx["annotations"].items()]
    return load_config(None, overrides=ovs + list(extra))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = {}
    for fmt in FORMATS:
        tmp = tmp_path_factory.mktemp(fmt)
        fx = write_fixture(fmt, tmp / "src")
        cfg = import_config(fmt, fx, tmp / "data")
        out[fmt] = {"fx": fx, "root": tmp / "data", "manifest": build_dataset(cfg.data, progress=False), "cfg": cfg}
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_is_pixel_equal_to_the_annotations(imported, fmt):
    case = imported[fmt]
    fx, root, manifest = case["fx"], case["root"], case["manifest"]
    assert manifest["schema_version"] == 3 and manifest["all_categories"] == fx["categories"]
    assert validate_dataset(root)["ok"]
    for split, expected in fx["expected"].items():
        r = SplitReader(root, split)
        assert r.num_images == len(expected)
        for i, exp in enumerate(expected):
            lo, hi = r.instance_range(i)
            assert hi - lo == len(exp), f"{fmt} {split} image {i}"
            masks = r.image_masks(i)
            for j, (cat, amodal, visible) in enumerate(exp):
                assert r.image(i).shape == (*amodal.shape, 3)  # the image's own size, not a square
                assert int(r.index["category"][lo + j]) == cat
                np.testing.assert_array_equal(masks["amodal"][j], amodal)
                np.testing.assert_array_equal(masks["visible"][j], visible)
                one = r.instance_masks(lo + j)
                np.testing.assert_array_equal(one["visible"], visible)
                # the occluder rule: the others' visible pixels and its own hidden part, never its visible
                others = masks["visible"][np.arange(hi - lo) != j].any(axis=0)
                np.testing.assert_array_equal(masks["occluder"][j], (others | (amodal & ~visible)) & ~visible)
                assert np.isclose(r.index["occlusion"][lo + j], 1 - visible.sum() / amodal.sum(), atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rules_are_counted_and_bad_annotations_listed(imported, fmt):
    manifest = imported[fmt]["manifest"]
    for split in ("train", "val"):
        assert manifest["rules"][split]["fully_occluded"] == 1
        assert manifest["counts"][split]["skipped"]["fully occluded (no visible pixel)"] == 1
        listed = manifest["skipped_annotations"][split]
        assert len(listed) == 1 and listed[0]["field"] == "amodal"
        assert "fewer than 3 points" in listed[0]["reason"]
        if fmt != "cocoa":
            assert listed[0]["annotation_id"] == 9999
    if fmt == "cocoa":
        assert manifest["rules"]["train"]["stuff"] == 1


def test_kins2020_depth_rank_from_ico_id(imported):
    r = SplitReader(imported["kins2020"]["root"], "train")
    lo, hi = r.instance_range(0)  # three shapes, back to front: ico_id 3, 2, 1
    assert r.index["depth_rank"][lo:hi].tolist() == [2, 1, 0]
    assert np.isnan(r.index["camera"]).all()  # no camera in real data


def test_images_of_two_sizes_batch_as_crops_and_whole_images(imported):
    root = imported["kins"]["root"]
    crops = CropDataset(root, "train", crop_size=16)
    sizes = set()
    for i in range(len(crops)):
        item = crops[i]
        assert item["rgb"].shape == (3, 16, 16)
        assert item["image_visible"].shape == (1, 64, 96)  # padded to the split's largest (96x40 and 48x64)
        h, w = crops.reader.image_size(int(crops.reader.index["image"][i]))
        sizes.add((h, w))
        assert item["image_visible"][0, h:].sum() == 0 and item["image_visible"][0, :, w:].sum() == 0
    assert sizes == {(40, 96), (64, 48)}
    image, target = ImageDataset(root, "train")[1]
    assert image.shape == (3, 64, 48) and target["masks"].shape[1:] == (64, 48)
    assert (target["labels"] >= 1).all() and (target["labels"] <= 7).all()


def test_val_carved_from_train_by_image_id(tmp_path):
    fx = write_fixture("coco_amodal", tmp_path / "src", splits=("train",), n_images=12)
    cfg = import_config("coco_amodal", fx, tmp_path / "data", "data.val_fraction=0.4")
    m = build_dataset(cfg.data, progress=False)
    train, val = SplitReader(tmp_path / "data", "train"), SplitReader(tmp_path / "data", "val")
    assert train.num_images + val.num_images == 12 and val.num_images > 0 and train.num_images > 0
    assert not set(train.index["image_ids"].tolist()) & set(val.index["image_ids"].tolist())
    again = import_config("coco_amodal", fx, tmp_path / "data2", "data.val_fraction=0.4")
    build_dataset(again.data, progress=False)  # the same carve, whatever the run
    assert SplitReader(tmp_path / "data2", "val").index["image_ids"].tolist() == val.index["image_ids"].tolist()
    assert m["splits"]["val"]["images"] == val.num_images
    with pytest.raises(ConfigError, match="data.annotations.val is given too"):
        both = import_config("coco_amodal", {**fx, "annotations": {**fx["annotations"], "val": fx["annotations"]["train"]}},
                             tmp_path / "data3", "data.val_fraction=0.4")
        build_dataset(both.data, progress=False)


def test_visible_outside_amodal_and_a_given_occluder(tmp_path):
    fx = write_fixture("coco_amodal", tmp_path / "src", splits=("train",), bad=False)
    path = fx["annotations"]["train"]
    doc = json.loads(open(path).read())
    ann = doc["annotations"][0]
    im = next(i for i in doc["images"] if i["id"] == ann["image_id"])
    h, w = im["height"], im["width"]
    noisy = np.zeros((h, w), bool)
    noisy[0, 0] = True  # one visible pixel outside the amodal polygon
    first = fx["expected"]["train"][0][0]
    ann["visible_mask"] = rle_str(first[2] | noisy)
    occ = np.zeros((h, w), bool)
    occ[-3:, -3:] = True
    ann["occluder_mask"] = rle_str(occ)
    second = next(a for a in doc["annotations"][1:] if a["image_id"] != doc["images"][1]["id"])  # not the hidden one
    second["occluder_mask"] = [[1.0, 1.0, 2.0, 2.0]]  # a 2-point polygon: no geometry, not "nothing in front"
    open(path, "w").write(json.dumps(doc))
    cfg = import_config("coco_amodal", fx, tmp_path / "data")
    m = build_dataset(cfg.data, progress=False)
    assert m["rules"]["train"]["visible_outside_amodal"] == 1
    assert m["rules"]["train"]["visible_outside_amodal_pixels"] == 1
    assert m["rules"]["train"]["occluder_given"] == 1
    assert m["rules"]["train"]["occluder_degenerate"] == 1
    (listed,) = [r for r in m["skipped_annotations"]["train"] if r["field"] == "occluder"]
    assert listed["annotation_id"] == second["id"] and listed["kept"] is True
    assert not any("occluder rule" in reason for reason in m["counts"]["train"]["skipped"])  # still an instance
    masks = SplitReader(tmp_path / "data", "train").instance_masks(0)
    assert masks["amodal"][0, 0] and masks["visible"][0, 0]  # the amodal mask grew to hold it
    np.testing.assert_array_equal(masks["occluder"], occ & ~masks["visible"])
    assert validate_dataset(tmp_path / "data")["ok"]


def _break(fx: dict, how: str) -> str:
    path = fx["annotations"]["train"]
    doc = json.loads(open(path).read())
    if how == "empty":
        open(path, "w").write("")
        return "empty"
    if how == "image":
        doc["images"][2]["file_name"] = "missing.png"
        expect = r"image 102 \(missing.png\): image file .*missing.png not found"
    elif how == "rle":
        doc["annotations"][1]["visible_mask"] = {"size": [3, 3], "counts": "0"}
        expect = r"annotation 2 .*visible mask: RLE size \[3, 3\] is not the image's"
    elif how == "category":
        doc["annotations"][0]["category_id"] = 77
        expect = r"annotation 1: category_id 77 is not in the file's 'categories'"
    elif how == "size":
        doc["images"][0]["width"] += 1
        expect = r"image 100 .*the JSON says width 97"
    open(path, "w").write(json.dumps(doc))
    return expect


@pytest.mark.parametrize("how", ["empty", "image", "rle", "category", "size"])
def test_bad_input_stops_before_anything_is_written(tmp_path, how):
    fx = write_fixture("coco_amodal", tmp_path / "src", splits=("train", "val"))
    expect = _break(fx, how)
    cfg = import_config("coco_amodal", fx, tmp_path / "data")
    with pytest.raises(AnnotationError, match=expect) as err:
        build_dataset(cfg.data, progress=False)
    assert "coco_amodal_train.json" in str(err.value)  # names the file
    assert not (tmp_path / "data" / MANIFEST).exists()
    assert not list((tmp_path / "data").glob("*.h5")) if (tmp_path / "data").exists() else True


def test_per_split_image_folders_and_config_errors(tmp_path):
    fx = write_fixture("kins", tmp_path / "src", splits=("train",), bad=False)
    images = tmp_path / "src" / "images"
    (tmp_path / "src" / "training").mkdir()
    images.rename(tmp_path / "src" / "training" / "image_2")
    split_fx = {**fx, "source_path": str(tmp_path / "src" / "{split}ing" / "image_2")}
    m = build_dataset(import_config("kins", split_fx, tmp_path / "data").data, progress=False)
    assert m["splits"]["train"]["images"] == 6
    with pytest.raises(ConfigError, match="give at least one of data.annotations.train"):
        build_dataset(load_config(None, overrides=["data.source=kins", f"data.root={tmp_path}/x",
                                                   f"data.source_path={images}"]).data, progress=False)
    with pytest.raises(ConfigError, match="unknown split"):
        build_dataset(import_config("kins", {**fx, "annotations": {"dev": fx["annotations"]["train"]}},
                                    tmp_path / "y").data, progress=False)


def test_a_built_import_is_not_rebuilt_and_another_config_is_refused(imported, tmp_path):
    case = imported["kins"]
    before = read_manifest(case["root"])
    assert build_dataset(case["cfg"].data, progress=False) == before
    from amodal3d.datamodules.build import BuildConfigError

    other = import_config("kins", case["fx"], case["root"], "data.val_fraction=0.0", "data.seed=5")
    with pytest.raises(BuildConfigError, match="seed"):
        build_dataset(other.data, progress=False)


def test_make_data_and_validate_from_the_command_line(tmp_path, capsys):
    """`make data OVERRIDES="data.source=cocoa ..."` then `make validate`: the CLI entry points."""
    from amodal3d.cli import main

    fx = write_fixture("cocoa", tmp_path / "src", splits=("train", "test"))
    ovs = ["data.source=cocoa", f"data.source_path={fx['source_path']}", f"data.root={tmp_path / 'data'}"]
    ovs += [f"data.annotations.{s}={p}" for s, p in fx["annotations"].items()]
    assert main(["data", *ovs]) == 0
    assert main(["validate", "--root", str(tmp_path / "data")]) == 0
    assert read_manifest(tmp_path / "data")["counts"]["test"]["images"] == 6
    assert main(["data", "data.source=cocoa", f"data.root={tmp_path / 'none'}",
                 f"data.source_path={fx['source_path']}", f"data.annotations.train={tmp_path / 'nope.json'}"]) != 0
    assert "nope.json: annotation file not found" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["kins", "cocoa"])
def test_stages_train_and_the_bench_tables_the_datasets_categories(tmp_path, fmt, monkeypatch):
    """`make train STAGE=visible|recon|refine DEBUG=tiny` on a KINS- and a COCOA-format import, then
    `make bench-table`: the table's columns are the dataset's categories, and the true-camera row
    is listed as undefined (no true cameras in real data), not an error. Then `make predict` on the
    dataset's raw test images (two sizes): step 1 and the chain in the dataset's categories, each
    mask in its own image's frame."""
    from amodal3d.cli import main

    fx = write_fixture(fmt, tmp_path / "src", splits=("train", "val", "test"))
    ovs = [f"data.source={fmt}", f"data.source_path={fx['source_path']}", f"data.root={tmp_path / 'data'}",
           f"run.root={tmp_path / 'runs'}"]
    ovs += [f"data.annotations.{s}={p}" for s, p in fx["annotations"].items()]
    for stage in ("visible", "recon", "refine"):
        assert main(["train", "--stage", stage, "--debug", "tiny", *ovs]) == 0, stage
    from omegaconf import OmegaConf

    run_cfg = OmegaConf.load(next((tmp_path / "runs").glob("default/refine/*/config.yaml")))
    assert list(run_cfg.data.class_names) == fx["categories"]
    assert main(["bench", "table", "--protocol", "gt-visible", "--out", str(tmp_path / "bench"), *ovs]) == 0
    md = (tmp_path / "bench" / "results-gt-visible.md").read_text()
    from amodal3d.categories import display_name

    assert f"| method | {' | '.join(display_name(c) for c in fx['categories'])} | mIoU |" in md
    assert "Airplane" not in md and "this dataset has none" in md

    # predict: the tiny step 1 finds nothing, so a stand-in with its interface returns one
    # detection per image (a box in the middle, the dataset's last category)
    from PIL import Image

    from amodal3d.lightning_modules.visible import VisibleStage

    def one_detection(self, images):
        out = []
        for im in images:
            h, w = im.shape[-2:]
            mask = torch.zeros(1, 1, h, w)
            mask[..., h // 4:3 * h // 4, w // 4:3 * w // 4] = 1
            out.append({"boxes": torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]]),
                        "labels": torch.tensor([len(fx["categories"])]), "scores": torch.tensor([0.9]),
                        "masks": mask})
        return out

    monkeypatch.setattr(VisibleStage, "detect", one_detection)
    images = sorted(Path(fx["source_path"]).glob("test_*.png"))
    refine = next((tmp_path / "runs").glob("default/refine/*/checkpoints/best.ckpt"))
    out = tmp_path / "predicted"
    assert main(["predict", "--input", *map(str, images), "--out", str(out), "--ckpt", str(refine),
                 "--runs", str(tmp_path / "runs")]) == 0
    doc = json.loads((out / "amodal.json").read_text())
    assert len(doc["images"]) == len(images) == len(doc["annotations"])
    sizes = {(i["height"], i["width"]) for i in doc["images"]}
    assert len(sizes) == 2, sizes  # the fixture's two image sizes
    by_id = {i["id"]: i for i in doc["images"]}
    for ann in doc["annotations"]:
        assert ann["category"] == fx["categories"][-1]
        img = by_id[ann["image_id"]]
        assert tuple(ann["segmentation"]["size"]) == (img["height"], img["width"])
    for img in doc["images"]:
        h, w = np.asarray(Image.open(img["file_name"])).shape[:2]
        assert (h, w) == (img["height"], img["width"])
        oh, ow = np.asarray(Image.open(out / img["overlay"])).shape[:2]
        assert oh % h == 0 and oh // h == ow / w, (oh, ow, h, w)  # its frame, enlarged (nearest)

"""Inference on files: a round trip through `amodal3d predict` on PNG/JPEG images with
per-instance mask PNGs and on a COCO JSON, written by the test; bad inputs are
reported by name while the others are processed; crops match the DataModule's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from amodal3d.cli import main
from amodal3d.config import load_config
from amodal3d.dependencies import resolve_checkpoints
from amodal3d.predict.crops import make_crops, occluder_masks
from amodal3d.predict.outputs import boxes_xywh
from amodal3d.predict.overlay import _PALETTE, mask_outline, overlay_image
from amodal3d.predict.run import predict_files
from amodal3d.errors import InputError
from amodal3d.predict.throughput import predict_throughput
from fakes import build_fake_dataset
from amodal3d.lightning_modules.refine import RefineStage
from amodal3d.lightning_modules.refine_2d import Refine2DStage
from test_refine import RECON_SMALL, SMALL, data_ov, write_run

H, W = 48, 64


def _disc(cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Runs with a recon and a refine checkpoint (Ours), a refine_2d checkpoint, and inputs."""
    from amodal3d.lightning_modules.recon import ReconStage

    tmp = tmp_path_factory.mktemp("predict")
    build_fake_dataset(tmp)
    torch.manual_seed(0)
    runs = tmp / "runs"
    write_run(ReconStage(load_config("recon", overrides=data_ov(tmp) + RECON_SMALL)), runs, "recon")
    write_run(RefineStage(resolve_checkpoints(load_config("refine", overrides=data_ov(tmp) + SMALL))), runs, "refine")
    ckpt_2d = write_run(Refine2DStage(load_config("refine_2d", overrides=data_ov(tmp) + SMALL)), runs, "refine_2d")

    rng = np.random.default_rng(0)
    inp = tmp / "in"
    img = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    chair, car = _disc(24, 22, 12), _disc(26, 40, 10)
    chair_vis = chair & ~car  # the car is in front of the chair
    _png(inp / "a.png", img)
    _png(inp / "a" / "chair_0.png", chair_vis.astype(np.uint8) * 255)
    _png(inp / "a" / "car_1.png", car.astype(np.uint8) * 255)
    _png(inp / "a" / "sofa_bad.png", np.zeros((32, 32), np.uint8))  # wrong size
    _png(inp / "a" / "unicorn_2.png", car.astype(np.uint8) * 255)  # unknown category
    Image.fromarray(img).save(inp / "b.jpg", quality=95)
    _png(inp / "b" / "04379243_top.png", _disc(20, 30, 8).astype(np.uint8) * 255)  # table, by synset id
    _png(inp / "c.png", img)  # no mask folder

    rle = mask_utils.encode(np.asfortranarray(chair_vis.astype(np.uint8)))
    coco = {
        "images": [{"id": 10, "file_name": "a.png", "height": H, "width": W},
                   {"id": 11, "file_name": "missing.png", "height": H, "width": W}],
        "categories": [{"id": 5, "name": "Chair"}, {"id": 6, "name": "spaceship"}],
        "annotations": [
            {"id": 100, "image_id": 10, "category_id": 5,
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}, "amodal_bbox": [10, 12, 24, 24]},
            {"id": 101, "image_id": 10, "category_id": 6,
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
            {"id": 102, "image_id": 11, "category_id": 5, "segmentation": [[30, 10, 50, 10, 50, 30, 30, 30]]},
            {"id": 103, "image_id": 10, "category_id": 5, "segmentation": [[44, 20, 60, 20, 60, 40, 44, 40]]},
        ],
    }
    (inp / "coco.json").write_text(json.dumps(coco))
    return {"tmp": tmp, "runs": runs, "inp": inp, "ckpt_2d": ckpt_2d, "chair_vis": chair_vis, "car": car}


def _decode(ann: dict) -> np.ndarray:
    seg = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
    return mask_utils.decode(seg).astype(bool)


def test_round_trip_on_folders_with_bad_inputs_reported(setup, tmp_path, capsys):
    out = tmp_path / "out"
    inp = setup["inp"]
    rc = main(["predict", "--input", str(inp / "a.png"), str(inp / "b.jpg"), str(inp / "c.png"),
               "--out", str(out), "--runs", str(setup["runs"])])
    assert rc == 1  # some inputs were skipped...
    doc = json.loads((out / "amodal.json").read_text())
    assert Path(doc["info"]["checkpoint"]).parts[-4:-2] == ("refine", "r1")  # Ours = the refine run
    names = sorted(a["mask_file"] for a in doc["annotations"])
    assert names == ["masks/a/car_1.png", "masks/a/chair_0.png", "masks/b/04379243_top.png"]  # ...the rest was not
    errors = {Path(e["input"]).name: e["error"] for e in doc["errors"]}
    assert set(errors) == {"sofa_bad.png", "unicorn_2.png", "c.png"}
    assert "32x32" in errors["sofa_bad.png"] and f"{H}x{W}" in errors["sofa_bad.png"]
    assert "unknown category 'unicorn'" in errors["unicorn_2.png"] and "mask folder" in errors["c.png"]
    assert "sofa_bad.png" in capsys.readouterr().err
    by_file = {a["mask_file"]: a for a in doc["annotations"]}
    visible = {"masks/a/chair_0.png": setup["chair_vis"], "masks/a/car_1.png": setup["car"]}
    for rel, ann in by_file.items():
        png = np.asarray(Image.open(out / rel)) > 127
        assert png.shape == (H, W) and np.array_equal(png, _decode(ann))  # the RLE is the PNG
        assert ann["area"] == int(png.sum()) and ann["image_id"] in {i["id"] for i in doc["images"]}
        if rel in visible:
            assert not (visible[rel] & ~png).any()  # visible ⊆ amodal
    assert by_file["masks/b/04379243_top.png"]["category"] == "table"
    assert by_file["masks/a/car_1.png"]["category_id"] == 4  # our ids: CATEGORIES index + 1
    for key in ("a", "b"):
        ov = np.asarray(Image.open(out / "overlays" / f"{key}.png"))
        assert ov.shape[2] == 3 and ov.shape[1] >= 256  # enlarged to be seen
    assert not (out / "overlays" / "c.png").exists()


def test_coco_input_with_a_given_checkpoint(setup, tmp_path):
    out = tmp_path / "out"
    rep = predict_files(setup["inp"] / "coco.json", out, checkpoint=setup["ckpt_2d"])
    assert rep.checkpoint == str(setup["ckpt_2d"]) and rep.instances == 2 and rep.instances_per_s > 0
    doc = json.loads((out / "amodal.json").read_text())
    assert {a["id"] for a in doc["annotations"]} == {100, 103}
    assert all(a["category_id"] == 5 for a in doc["annotations"])  # the input's ids are kept
    assert [c["id"] for c in doc["categories"]] == [5, 6] and [i["id"] for i in doc["images"]] == [10]
    errs = " | ".join(f"{e['input']}: {e['error']}" for e in doc["errors"])
    assert "annotation 101" in errs and "spaceship" in errs and "missing.png" in errs
    ann = {a["id"]: a for a in doc["annotations"]}
    assert not (setup["chair_vis"] & ~_decode(ann[100])).any()


def test_crops_are_the_datamodules():
    from amodal3d.datamodules.crops import _CropSampler, crop_arrays, square_crop_box

    rng = np.random.default_rng(1)
    img = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    vis = np.stack([_disc(20, 20, 9), _disc(30, 44, 7)])
    occ = occluder_masks(vis, "others")
    assert np.array_equal(occ[0], vis[1]) and np.array_equal(occluder_masks(vis, "unknown"), ~vis)
    boxes = np.array([[11, 11, 29, 29], [37, 23, 51, 37]], np.float32)
    crops = make_crops(img, vis, occ, boxes, 32, 1.15)
    sampler = _CropSampler(32)
    for i in range(2):
        rgb, (v, o) = crop_arrays(img, [vis[i], occ[i]], square_crop_box(boxes[i], 1.15), sampler)
        assert np.allclose(crops["rgb"][i].numpy(), rgb, atol=1e-5)
        assert np.array_equal(crops["visible"][i].numpy(), v) and np.array_equal(crops["occluder"][i].numpy(), o)


def test_coco_boxes_are_those_of_the_masks():
    masks = np.stack([_disc(24, 22, 12), np.zeros((H, W), bool), np.zeros((H, W), bool)])
    masks[1, 5:9, 10:20] = True
    masks[2, H - 3:, :4] = True  # the bottom-left corner: touches two borders
    for m, box in zip(masks, boxes_xywh(masks)):
        ys, xs = np.nonzero(m)
        assert box == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_overlay_tints_hatches_and_outlines_only_the_masks():
    img = (np.random.default_rng(2).random((H, W, 3)) * 255).astype(np.uint8)
    amodal = [_disc(24, 22, 12), _disc(26, 40, 10)]
    visible = [amodal[0] & ~amodal[1], amodal[1]]
    ov = overlay_image(img, visible, amodal, min_side=W)  # no enlargement
    c0 = np.array(_PALETTE[0])
    outside = ~(amodal[0] | amodal[1])
    assert np.array_equal(ov[outside], img[outside])
    inner = visible[0] & ~mask_outline(amodal[0])
    assert np.abs(ov[inner].astype(float) - (0.55 * img[inner] + 0.45 * c0)).max() <= 1
    assert (ov[mask_outline(amodal[0]) & ~amodal[1]] == c0).all()  # the car is drawn over the chair
    assert (ov[mask_outline(amodal[1])] == _PALETTE[1]).all()


def test_throughput_helper_on_a_built_dataset(setup):
    module = Refine2DStage.load_from_checkpoint(str(setup["ckpt_2d"]))
    res = predict_throughput(module, setup["tmp"] / "data", "test", max_images=3, batch_size=4)
    assert res["instances"] == res["exported_instances"] == 3 and res["instances_per_s"] > 0 and res["errors"] == 0
    assert res["images"] == 3 and res["images_per_s"] > 0 and res["inputs"] == "visible-mask files"


def test_throughput_from_the_images_alone_goes_through_step_1(setup, tmp_path, monkeypatch):
    """The bench's second predict figure: the test images without mask files, step 1 (a
    stand-in finding one object per image) detecting, in images/s and instances/s."""
    from amodal3d.lightning_modules.visible import VisibleStage

    step1 = write_run(VisibleStage(load_config("visible", overrides=data_ov(setup["tmp"]) + [
        "model.fpn_channels=16", "model.mask_channels=16"])), tmp_path / "runs", "visible")

    def one_each(self, images):
        out = []
        for im in images:
            mask = torch.zeros(1, 1, *im.shape[-2:])
            mask[..., 10:38, 8:36] = 1
            out.append({"boxes": torch.tensor([[8.0, 10, 36, 38]]), "labels": torch.tensor([5]),
                        "scores": torch.tensor([0.9]), "masks": mask})
        return out

    monkeypatch.setattr(VisibleStage, "detect", one_each)
    module = Refine2DStage.load_from_checkpoint(str(setup["ckpt_2d"]))
    res = predict_throughput(module, setup["tmp"] / "data", "test", max_images=3, batch_size=4, step1_checkpoint=step1)
    assert res["inputs"] == "images (step 1)" and res["errors"] == 0
    assert res["images"] == 3 and res["instances"] == 3 and res["exported_instances"] == 3
    assert res["images_per_s"] > 0 and res["instances_per_s"] > 0


@pytest.mark.parametrize("kind", ["0/1", "0/255", "palette", "16-bit", "rgb", "grey levels"])
def test_mask_pngs_in_the_common_encodings(tmp_path, kind, capsys):
    """Label masks (0/1), palette and 16-bit PNGs are "non-zero = on"; a soft mask is
    thresholded at half its range and the rule is said."""
    from PIL import Image

    from amodal3d.predict.inputs import read_mask_png

    m = np.zeros((6, 7), np.uint8)
    m[2:4, 1:5] = 1
    path = tmp_path / "m.png"
    if kind == "0/1":
        Image.fromarray(m).save(path)
    elif kind == "0/255":
        Image.fromarray(m * 255).save(path)
    elif kind == "palette":
        im = Image.fromarray(m * 3, mode="P")
        im.putpalette([0, 0, 0] * 3 + [200, 10, 10])
        im.save(path)
    elif kind == "16-bit":
        Image.fromarray(m.astype(np.uint16) * 65535).save(path)
    elif kind == "rgb":
        Image.fromarray(np.repeat(m[..., None] * 255, 3, axis=2)).save(path)
    else:
        soft = (m * 200).astype(np.uint8)
        soft[0, 0], soft[0, 1] = 100, 140
        Image.fromarray(soft).save(path)
    expected = m.astype(bool)
    if kind == "grey levels":
        expected[0, 1] = True  # 140 >= 128; 100 is not
    assert np.array_equal(read_mask_png(path), expected)
    said = capsys.readouterr().err
    assert ("pixels >= 128 count as visible" in said) == (kind == "grey levels")


# -- raw images: step 1 detects the instances ---------------------------------------------------


def test_raw_images_go_through_step_1_and_an_empty_image_is_an_empty_result(setup, tmp_path, monkeypatch):
    """Images without mask folders: the step-1 checkpoint of the runs is loaded and its
    detections (a stand-in with fixed outputs: an untrained detector finds nothing) feed the
    amodal model; an image where nothing is detected is listed with no annotation."""
    import shutil

    from amodal3d.lightning_modules.visible import VisibleStage

    runs = tmp_path / "runs"
    shutil.copytree(setup["runs"], runs)
    write_run(VisibleStage(load_config("visible", overrides=data_ov(setup["tmp"]) + [
        "model.fpn_channels=16", "model.mask_channels=16"])), runs, "visible")
    inp = tmp_path / "raw"
    rng = np.random.default_rng(1)
    _png(inp / "scene.png", (rng.random((H, W, 3)) * 255).astype(np.uint8))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(inp / "empty.jpg")
    chair = torch.from_numpy(_disc(24, 22, 12))

    def fake_detect(self, images):
        out = []
        for im in images:
            found = bool(im.sum() > 0)  # the black image holds nothing
            n = 2 if found else 0
            masks = torch.stack([chair, torch.from_numpy(_disc(20, 48, 6))]).float()[:n, None]
            out.append({"boxes": torch.tensor([[8.0, 10, 36, 38], [40, 12, 56, 30]])[:n],
                        "labels": torch.tensor([5, 4])[:n], "scores": torch.tensor([0.9, 0.3])[:n], "masks": masks})
        return out

    monkeypatch.setattr(VisibleStage, "detect", fake_detect)
    out = tmp_path / "out"
    assert main(["predict", "--input", str(inp), "--out", str(out), "--runs", str(runs)]) == 0
    doc = json.loads((out / "amodal.json").read_text())
    assert sorted(i["file_name"].rsplit("/", 1)[-1] for i in doc["images"]) == ["empty.jpg", "scene.png"]
    (ann,) = doc["annotations"]  # the 0.3 detection is below predict's score floor
    assert ann["category"] == "chair" and ann["score"] == pytest.approx(0.9)
    assert ann["step1_amodal_bbox"] == [8.0, 10.0, 28.0, 28.0]
    vis = mask_utils.decode(dict(ann["visible_segmentation"], counts=ann["visible_segmentation"]["counts"].encode()))
    assert np.array_equal(vis.astype(bool), chair.numpy())
    assert not (chair.numpy() & ~_decode(ann)).any()  # visible ⊆ amodal
    assert (out / "overlays" / "empty.png").is_file() and doc["info"]["step1"].startswith("images without")
    # no step-1 run: the raw image is reported by name, with what to do
    assert main(["predict", "--input", str(inp / "scene.png"), "--out", str(tmp_path / "o2"),
                 "--runs", str(setup["runs"])]) == 2
    assert not (tmp_path / "o2").exists()


def test_meshes_are_written_as_obj_with_their_camera(setup, tmp_path):
    from pytorch3d.io import load_obj

    out = tmp_path / "out"
    inp = setup["inp"]
    rep = predict_files([inp / "a.png"], out, experiment="default", root=str(setup["runs"]), meshes=True)
    doc = json.loads((out / "amodal.json").read_text())
    assert rep.instances == len(doc["annotations"]) == 2
    for ann in doc["annotations"]:
        verts, faces, _ = load_obj(str(out / ann["mesh_file"]), load_textures=False)
        assert verts.shape[1] == 3 and faces.verts_idx.shape[1] == 3 and len(verts) > 100
        assert set(ann["camera"]) == {"azimuth", "elevation", "distance"}
    # a model without a 3D prior has no mesh to give
    with pytest.raises(InputError, match="--meshes needs a model with a 3D prior"):
        predict_files([inp / "a.png"], tmp_path / "o2", checkpoint=setup["ckpt_2d"], meshes=True)

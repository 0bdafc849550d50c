"""Crop and detection DataModules: item contract, crop geometry, k views, workers."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from fakes import blob_objects
from amodal3d.categories import category_index
from amodal3d.config import DataConfig, LoaderConfig
from amodal3d.datamodules.build import build_dataset
from amodal3d.datamodules.crops import (
    CropDataModule, CropDataset, collate_views, crop_to_box, paste_crop_to_image, square_crop_box,
)
from amodal3d.datamodules.images import DetectionDataModule, ImageDataset

#: gt-box items (training and validation); gt-visible ones lack amodal_box, and its test items unknown
CONTRACT = {
    "rgb", "visible", "occluder", "unknown", "category", "object_id", "crop_box", "amodal_box", "image_visible",
    "image_occluder", "index", "eval_amodal", "eval_image_amodal", "eval_camera", "eval_view_id",
    "eval_occlusion",
}
GT_VISIBLE_CONTRACT = CONTRACT - {"amodal_box"}


def fake_objects(data_cfg, category: str, split: str):
    """load_objects stand-in: off-centre ellipses/rectangles of random sizes."""
    n, views, size = int(data_cfg.objects_per_split[split]), int(data_cfg.views), int(data_cfg.render_size)
    return blob_objects(category, split, n, views, size, [category_index(category), len(split), n],
                        radius=(0.1, 0.3), shift=10.0)


@pytest.fixture(scope="module")
def erase_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("erase") / "d"
    cfg = DataConfig(root=str(root), categories=["chair", "car"], objects_per_split={"train": 4, "val": 2, "test": 2},
                     views=6, shard_size=20)
    build_dataset(cfg, progress=False, load_objects=fake_objects)
    return cfg


@pytest.fixture(scope="module")
def paste_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("paste") / "p"
    cfg = DataConfig(root=str(root), categories=["chair", "car", "sofa"], composite="paste", image_size=96,
                     objects_per_split={"train": 3, "val": 2, "test": 2}, views=4,
                     paste_images_per_split={"train": 12, "val": 4, "test": 4}, shard_size=20)
    build_dataset(cfg, progress=False, load_objects=fake_objects)
    return cfg


def test_item_contract_and_crop_geometry(erase_cfg):
    ds = CropDataset(erase_cfg.root, "val", crop_size=48, crop_margin=1.2, protocol="gt-box")
    it = ds[3]
    assert set(it) == CONTRACT
    assert torch.equal(it["unknown"], it["occluder"]), "gt-box hands out the occluded pixels"
    shapes = {"rgb": (3, 48, 48), "visible": (1, 48, 48), "occluder": (1, 48, 48), "category": (),
              "object_id": (), "crop_box": (4,), "amodal_box": (4,), "image_visible": (1, 64, 64),
              "image_occluder": (1, 64, 64), "index": (), "eval_amodal": (1, 48, 48),
              "eval_image_amodal": (1, 64, 64), "eval_camera": (3,), "eval_view_id": (), "eval_occlusion": ()}
    for k, s in shapes.items():
        assert tuple(it[k].shape) == s, k
    for k in ("category", "object_id", "index", "eval_view_id"):
        assert it[k].dtype == torch.int64
    for k in set(CONTRACT) - {"category", "object_id", "index", "eval_view_id"}:
        assert it[k].dtype == torch.float32, k
    assert 0 <= it["rgb"].min() and it["rgb"].max() <= 1
    for k in ("visible", "occluder", "eval_amodal", "image_visible", "image_occluder", "eval_image_amodal",
              "unknown"):
        assert set(torch.unique(it[k]).tolist()) <= {0.0, 1.0}, k
    x1, y1, x2, y2 = it["crop_box"].tolist()
    a = it["amodal_box"].tolist()
    assert x2 - x1 == pytest.approx(y2 - y1) == pytest.approx(max(a[2] - a[0], a[3] - a[1]) * 1.2)
    assert x1 <= a[0] and y1 <= a[1] and a[2] <= x2 and a[3] <= y2
    assert int(it["index"]) == 3
    # the crop of the image-frame masks is the crop's mask
    again = crop_to_box(it["eval_image_amodal"][None], it["crop_box"][None], 48)
    assert torch.equal((again > 0.5).float()[0], it["eval_amodal"])
    # hidden ground truth only under eval_*: the visible mask misses the hidden part
    occluded_items = [ds[i] for i in range(len(ds)) if float(ds[i]["eval_occlusion"]) > 0.2]
    assert occluded_items and all((x["eval_image_amodal"] > x["image_visible"]).any() for x in occluded_items)


def test_gt_visible_items_place_crops_on_the_visible_box_and_hide_the_answer(erase_cfg):
    from amodal3d.datamodules.composites import mask_box
    from amodal3d.datamodules.crops import protocol_crop_boxes

    val = CropDataset(erase_cfg.root, "val", crop_size=48, visible_crop_margin=2.0, protocol="gt-visible")
    test = CropDataset(erase_cfg.root, "test", crop_size=48, visible_crop_margin=2.0, protocol="gt-visible")
    assert set(val[3]) == GT_VISIBLE_CONTRACT
    assert set(test[3]) == GT_VISIBLE_CONTRACT - {"unknown"}, "a gt-visible test item says nothing of the eraser"
    for ds in (val, test):
        for i in (0, 3, len(ds) - 1):
            it = ds[i]
            v = mask_box(it["image_visible"][0].numpy() > 0.5)
            x1, y1, x2, y2 = it["crop_box"].tolist()
            assert x2 - x1 == pytest.approx(max(v[2] - v[0], v[3] - v[1]) * 2.0)
            assert (x1 + x2) / 2 == pytest.approx((v[0] + v[2]) / 2) and (y1 + y2) / 2 == pytest.approx((v[1] + v[3]) / 2)
            # one object per erase image: no other instance, so nothing is handed out as occluded
            assert it["occluder"].sum() == 0 and it["image_occluder"].sum() == 0
    it = val[3]
    eraser = CropDataset(erase_cfg.root, "val", crop_size=48, protocol="gt-box")[3]["image_occluder"]
    assert torch.equal(it["unknown"], (crop_to_box(eraser[None], it["crop_box"][None], 48) > 0.5).float()[0])
    # the placement reads no amodal field: it works on an index without one
    idx = {k: v for k, v in val.reader.index.items() if k != "amodal_box"}
    assert np.array_equal(protocol_crop_boxes(idx, "gt-visible", 1.15, 2.0), val._crop_boxes())


def test_gt_visible_occluded_is_the_other_instances_visible_masks(paste_cfg):
    ds = CropDataset(paste_cfg.root, "val", protocol="gt-visible", visible_crop_margin=2.0)
    r = ds.reader
    checked = 0
    for img in range(r.num_images):
        lo, hi = r.instance_range(img)
        vis = r.image_masks(img, ["visible"])["visible"]
        for i in range(lo, hi):
            others = np.delete(vis, i - lo, axis=0).any(axis=0)
            assert np.array_equal(ds[i]["image_occluder"][0].numpy() > 0.5, others)
            checked += int(hi - lo > 1)
    assert checked > 0


def test_crop_identity_and_paste_back_round_trip():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32)
    full = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)
    assert torch.allclose(crop_to_box(img, full, 32), img, atol=1e-6)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 10:40, 20:50] = 1
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    mask[1, 0] = (((xx - 30) / 18) ** 2 + ((yy - 34) / 11) ** 2 <= 1).float()
    boxes = square_crop_box(torch.tensor([[20.0, 10, 50, 40], [12, 23, 49, 46]]), 1.15)
    crop = (crop_to_box(mask, boxes, 64) > 0.5).float()
    back = (paste_crop_to_image(crop, boxes, 64, 64) > 0.5).float()
    inter = (back * mask).sum((1, 2, 3))
    union = ((back + mask) > 0).float().sum((1, 2, 3))
    assert (inter / union > 0.97).all(), "crop then paste back reproduces the mask up to resampling"
    # outside the crop window the pasted map is zero
    small = torch.tensor([[16.0, 16, 32, 32]])
    pasted = paste_crop_to_image(torch.ones(1, 1, 8, 8), small, 64, 64)
    assert pasted[0, 0, :15].sum() == 0 and pasted[0, 0, 20:30, 20:30].min() == 1


def test_views_per_item_pairs_share_the_object(erase_cfg):
    for train in (False, True):
        ds = CropDataset(erase_cfg.root, "train", views_per_item=2, train=train)
        batch = collate_views([ds[i] for i in range(8)])
        assert batch["rgb"].shape == (16, 3, 64, 64) and batch["index"].shape == (16,)
        oid, view = batch["object_id"].view(8, 2), batch["eval_view_id"].view(8, 2)
        assert torch.equal(oid[:, 0], oid[:, 1])
        assert (view[:, 0] != view[:, 1]).all(), "the two crops are different views"
        assert torch.equal(batch["index"].view(8, 2)[:, 0], torch.arange(8)), "the anchor comes first"
    det = CropDataset(erase_cfg.root, "train", views_per_item=3)
    assert det.views_of(5) == det.views_of(5)


def test_datamodule_full_epoch_with_two_workers(erase_cfg):
    loader = LoaderConfig(batch_size=7, num_workers=2, crop_size=32, persistent_workers=True)
    dm = CropDataModule(erase_cfg, loader, protocol="gt-box")
    dm.prepare_data()  # built already: returns at once
    dm.setup("fit")
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == CONTRACT
        assert batch["rgb"].shape[1:] == (3, 32, 32) and batch["image_visible"].shape[1:] == (1, 64, 64)
        seen.append(batch["index"])
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(len(dm.dataset("train"))))
    assert dm.dataset("train").reader._files == {}, "the parent process never opens HDF5"
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["index"], torch.arange(len(val["index"]))), "validation is not shuffled"
    dm2 = CropDataModule(erase_cfg, LoaderConfig(batch_size=4, num_workers=0), views_per_item=2)
    b = next(iter(dm2.train_dataloader()))
    assert b["rgb"].shape[0] == 8 and next(iter(dm2.val_dataloader()))["rgb"].shape[0] == 4


def test_distributed_sampler_splits_the_instances(erase_cfg):
    ds = CropDataset(erase_cfg.root, "train")
    got = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for b in DataLoader(ds, batch_size=5, sampler=sampler):
            got += b["index"].tolist()
    assert set(got) == set(range(len(ds)))


def test_paste_crops_and_detection_images(paste_cfg):
    ds = CropDataset(paste_cfg.root, "train", views_per_item=2, train=True)
    it = ds[0]
    assert it["image_visible"].shape == (2, 1, 96, 96) and torch.equal(it["object_id"][0], it["object_id"][1])
    dm = DetectionDataModule(paste_cfg, LoaderConfig(batch_size=3, num_workers=0))
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 3
    for img, t in zip(images, targets):
        assert img.shape == (3, 96, 96) and img.dtype == torch.float32
        m = len(t["labels"])
        assert m >= 1 and t["masks"].shape == (m, 96, 96) and t["masks"].dtype == torch.uint8
        assert torch.equal(t["labels"], t["category"] + 1) and t["labels"].min() >= 1
        assert t["boxes"].shape == (m, 4) and (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        assert not (t["masks"].bool() & ~t["eval_amodal_masks"].bool()).any()
        assert (t["masks"].sum(0) <= 1).all()
        assert not (t["masks"].bool() & t["occluder_masks"].bool()).any()
    ids = ImageDataset(paste_cfg.root, "test")
    img, t = ids[len(ids) - 1]
    crops = CropDataset(paste_cfg.root, "test")
    for row in t["instance_index"].tolist():
        assert crops[row]["object_id"] in t["object_id"]


def test_training_targets_only_in_a_supervised_stages_train_and_val_items(paste_cfg):
    """targets=("amodal",) adds the amodal mask under a training key (`amodal` for crops,
    `amodal_masks` for images) to train and val items only; without it no item has one."""
    for split in ("train", "val", "test"):
        plain = CropDataset(paste_cfg.root, split, crop_size=32)[0]
        supervised = CropDataset(paste_cfg.root, split, crop_size=32, targets=("amodal",))[0]
        assert "amodal" not in plain
        if split == "test":
            assert "amodal" not in supervised
        else:
            assert torch.equal(supervised["amodal"], supervised["eval_amodal"])
        _, t_plain = ImageDataset(paste_cfg.root, split)[0]
        _, t_sup = ImageDataset(paste_cfg.root, split, targets=("amodal",))[0]
        assert "amodal_masks" not in t_plain
        assert ("amodal_masks" in t_sup) == (split != "test")
    with pytest.raises(ValueError, match="training target 'camera'"):
        CropDataset(paste_cfg.root, "train", targets=("camera",))


def test_the_runner_gives_training_targets_to_the_supervised_stages_only(paste_cfg):
    """Each stage's data carries exactly what its StageSpec declares: the unsupervised
    and self-supervised stages (recon, viewpoint, render, pcnet_m) and step 1 get no
    amodal mask outside the evaluation-only keys."""
    from amodal3d.lightning_modules.registry import available_stages, get_stage
    from amodal3d.config import load_config
    from amodal3d.train import build_datamodule

    supervised = {s for s in available_stages() if get_stage(s).targets}
    assert supervised == {"refine", "refine_2d", "joint", "maskrcnn", "orcnn", "bcnet", "vrsp"}
    assert {"recon", "viewpoint", "render", "pcnet_m", "visible"} <= set(available_stages()) - supervised
    for name in ("recon", "refine", "visible", "maskrcnn"):
        cfg = load_config(name, overrides=[f"data.root={paste_cfg.root}", "loader.num_workers=0",
                                           "loader.batch_size=2", "trainer.devices=1", "trainer.accelerator=cpu"])
        dm = build_datamodule(cfg, get_stage(name))
        dm.setup("fit")
        item = dm.train_dataloader().dataset[0]
        keys = set(item[1]) if isinstance(item, tuple) else set(item)
        assert bool(keys & {"amodal", "amodal_masks"}) == (name in supervised), name


def test_missing_dataset_or_split_is_a_clear_error(tmp_path, erase_cfg):
    with pytest.raises(Exception, match="make data"):
        CropDataset(tmp_path / "nothing", "train")
    with pytest.raises(Exception, match="no split 'bogus'.*test, train, val"):
        CropDataset(erase_cfg.root, "bogus")


def test_collate_packs_one_buffer_and_matches_default_collate(erase_cfg):
    import pickle

    from torch.utils.data import default_collate

    from amodal3d.datamodules.crops import collate_crops

    ds = CropDataset(erase_cfg.root, "test")
    items = [ds[i] for i in range(5)]
    packed, ref = collate_crops(items), default_collate(items)
    assert packed.keys() == ref.keys()
    for k in ref:
        assert packed[k].dtype == ref[k].dtype and torch.equal(packed[k], ref[k]), k
    storages = {v.untyped_storage().data_ptr() for v in packed.values()}
    assert len(storages) == 1, "one buffer per batch: one shared-memory handle per worker batch"
    again = pickle.loads(pickle.dumps(packed))
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    packed["rgb"] = packed["rgb"] * 2  # edited batches pickle as plain dicts, edits kept
    assert torch.equal(pickle.loads(pickle.dumps(packed))["rgb"], ref["rgb"] * 2)


def test_split_datamodule_needs_its_dataset_and_loader_makers():
    """A DataModule that forgets make_dataset/make_loader fails when built, not with a
    None dataset at the first batch."""
    from amodal3d.datamodules.split_datamodule import SplitDataModule

    class Half(SplitDataModule):
        def make_dataset(self, split):
            return [split]

    with pytest.raises(TypeError, match="make_loader"):
        Half(DataConfig(), LoaderConfig())


def test_crop_coverage_grows_with_the_margin(erase_cfg):
    from amodal3d.bench.coverage import coverage

    shares = coverage(erase_cfg.root, "val", [1.0, 2.0, 4.0])
    assert 0 <= shares[1.0] <= shares[2.0] <= shares[4.0] == 1.0


def test_crop_ops_bench_compares_our_crop_and_paste_with_torchvisions(erase_cfg):
    """`make bench-crops`: inside the image our crop samples exactly where roi_align(aligned=True,
    sampling_ratio=1) does, and our paste undoes our crop (round trip close to the amodal mask)."""
    from amodal3d.bench.crop_ops import crop_ops_markdown, crop_ops_report

    r = crop_ops_report(erase_cfg.root, "val", 48, "gt-box", max_instances=16)
    assert r["instances"] == 16 and r["windows_inside_image"] >= 1
    assert r["crop_pixels_differing_inside"] == 0.0
    assert r["round_trip_iou_ours"] > 0.9
    assert 0.0 < r["round_trip_iou_torchvision"] <= 1.0
    assert "| round trip IoU vs the amodal mask (%) |" in crop_ops_markdown(r)

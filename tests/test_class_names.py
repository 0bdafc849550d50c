"""The category table comes from the dataset (cfg.data.class_names, filled from the manifest's
`all_categories`), not from the 13 ShapeNet categories: the bench's columns, a module's metric
and head sizes and its saved hparams follow it, a checkpoint is refused on a dataset of
another table, and the runner resolves the table before it builds anything."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from amodal3d.bench.table import MethodResult, csv_text, markdown_table, results_markdown
from amodal3d.categories import CATEGORIES, DISPLAY_NAMES, class_names
from amodal3d.config import load_config
from amodal3d.errors import ConfigError

KINS3 = ("car", "pedestrian", "cyclist")
REFINE_SMALL = ["model.base_channels=4", "model.depth=2", "model.prior_render_size=16"]
DETECTOR_SMALL = ["model.fpn_channels=16", "model.mask_channels=16"]


def _save(module: L.LightningModule, path: Path, drop_class_names: bool = False) -> Path:
    """A checkpoint file as Lightning writes one (optionally as written before data.class_names existed)."""
    hparams = dict(module.hparams)
    if drop_class_names:
        hparams["cfg"] = dict(hparams["cfg"], data={k: v for k, v in hparams["cfg"]["data"].items()
                                                    if k != "class_names"})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, path)
    return path


def _refine_2d(tmp_path: Path, names: list[str] | None):
    from amodal3d.lightning_modules.refine_2d import Refine2DStage

    ov = [f"run.root={tmp_path / 'runs'}", *REFINE_SMALL]
    if names is not None:
        ov.append(f"data.class_names=[{','.join(names)}]")
    return Refine2DStage(load_config("refine_2d", overrides=ov))


# -- (a) the bench table --------------------------------------------------------------------------


def test_bench_table_columns_are_the_datasets_categories():
    row = MethodResult(name="X", stage="s", per_category=[0.5, 0.25, math.nan], per_category_occ=[0.1, 0.2, 0.3],
                       miou=0.375, miou_occ=0.2, iou_dataset=0.4, count=[4, 2, 0])
    rows = [row, MethodResult(name="Y", stage="s", status="not trained")]
    lines = markdown_table(rows, categories=KINS3).splitlines()
    assert lines[0] == "| method | Car | Pedestrian | Cyclist | mIoU |"
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| X | 50.0 | 25.0 | — | 37.5 |"
    assert lines[3] == "| Y (not trained) | — | — | — | — |"  # a row without figures: one cell per category
    text = results_markdown(rows, {"protocol": "gt-visible"}, categories=KINS3)
    assert not any(DISPLAY_NAMES[c] in text for c in CATEGORIES if c != "car")  # no ShapeNet column anywhere
    assert "No test instances of Cyclist" in text and "Car 4, Pedestrian 2, Cyclist 0" in text
    header = next(csv.reader(io.StringIO(csv_text(rows, categories=KINS3))))
    assert header[4:8] == ["Car", "Pedestrian", "Cyclist", "mIoU"]
    assert header[8:11] == ["occ_Car", "occ_Pedestrian", "occ_Cyclist"]
    assert all(len(r) == len(header) for r in csv.reader(io.StringIO(csv_text(rows, categories=KINS3))))
    # a row scored on another table is a bug of its scorer, not blank cells
    with pytest.raises(ValueError, match="13 per-category figures for a table of 3"):
        markdown_table([MethodResult(name="Z", per_category=[0.5] * 13)], categories=KINS3)


# -- (b) a module sized by its config's table -----------------------------------------------------


def test_modules_size_metrics_and_heads_by_the_class_names_and_save_them(tmp_path):
    from amodal3d.lightning_modules.baselines.maskrcnn import MaskRCNNStage

    refine = _refine_2d(tmp_path, ["car", "pedestrian"])
    assert refine.class_names == ("car", "pedestrian")
    assert refine.val_metric.num_categories == refine.test_metric.num_categories == 2
    assert all(m["coarse_miou"].num_categories == 2 for m in refine.eval_metrics.values())
    assert refine.true_camera_map.shape == (2, 4)
    assert refine.hparams["cfg"]["data"]["class_names"] == ["car", "pedestrian"]

    det = MaskRCNNStage(load_config("maskrcnn", overrides=[*DETECTOR_SMALL, "data.class_names=[car,pedestrian]"]))
    assert det.num_classes == 3  # two categories and the background
    assert det.net.roi_heads.box_predictor.cls_score.out_features == 3
    assert det.net.roi_heads.box_predictor.bbox_pred.out_features == 3 * 4
    for split in det.eval_metrics.values():
        assert split["amodal_mask"].num_categories == 2 and split["detect"].num_categories == 2
    assert det.hparams["cfg"]["data"]["class_names"] == ["car", "pedestrian"]

    default = _refine_2d(tmp_path, None)  # no names: the 13, and the saved config says [] as before
    assert default.class_names == CATEGORIES and default.val_metric.num_categories == 13
    assert default.hparams["cfg"]["data"]["class_names"] == []


def test_a_checkpoint_from_before_the_key_loads_with_the_13_categories(tmp_path):
    from amodal3d.lightning_modules.refine_2d import Refine2DStage

    old = _save(_refine_2d(tmp_path, None), tmp_path / "old.ckpt", drop_class_names=True)
    module = Refine2DStage.load_from_checkpoint(str(old), map_location="cpu")
    assert module.class_names == CATEGORIES and module.val_metric.num_categories == 13


# -- (c) a checkpoint scored on a dataset of another table ----------------------------------------


def test_a_checkpoint_is_refused_on_a_dataset_of_another_category_table(tmp_path, monkeypatch):
    import amodal3d.datamodules.build as build
    from amodal3d.bench.evaluate import MethodEntry, load_method
    from amodal3d.lightning_modules.checkpoints import check_checkpoint_classes, checkpoint_class_names

    ckpt = _save(_refine_2d(tmp_path, ["car", "pedestrian"]), tmp_path / "kins.ckpt")
    assert checkpoint_class_names(ckpt) == ("car", "pedestrian")
    manifest = {"all_categories": ["car", "van", "cyclist"]}
    monkeypatch.setattr(build, "ensure_dataset", lambda data_cfg, *a, **k: manifest)
    bench_cfg = load_config(None, overrides=[f"data.root={tmp_path / 'other'}"])
    entry = MethodEntry(name="2D-only", stage="refine_2d", checkpoint=ckpt)
    with pytest.raises(ConfigError) as err:
        load_method(entry, torch.device("cpu"), bench_cfg)
    msg = str(err.value)
    assert str(ckpt) in msg and "[car, pedestrian]" in msg and "[car, van, cyclist]" in msg
    assert str(tmp_path / "other") in msg and "dataset it was trained on" in msg and "retrain" in msg
    assert list(bench_cfg.data.class_names) == ["car", "van", "cyclist"]  # the bench resolved its dataset's table

    manifest["all_categories"] = ["car", "pedestrian"]  # the dataset it was trained on: scored
    assert load_method(entry, torch.device("cpu"), bench_cfg).class_names == ("car", "pedestrian")
    with pytest.raises(ConfigError, match=r"2 categories \[car, pedestrian\], but the dataset has 13 \[airplane, bench"):
        check_checkpoint_classes(ckpt, CATEGORIES)


# -- (d) the runner resolves the table before building anything ----------------------------------


def test_train_resolves_the_class_names_from_the_manifest_before_building(tmp_path, monkeypatch):
    import amodal3d.datamodules.build as build
    from amodal3d import train as train_mod

    seen = {}

    def fake_fit(cfg, spec, out, ckpt_path, phase=None, hand_off=False):
        seen["names"] = list(cfg.data.class_names)
        seen["hparams"] = spec.module(cfg).hparams["cfg"]["data"]["class_names"]  # what _fit builds and saves
        return {}

    monkeypatch.setattr(train_mod, "_fit", fake_fit)
    ov = [f"run.root={tmp_path / 'runs'}", *REFINE_SMALL]
    for manifest, expected in (({"all_categories": ["car", "van"]}, ["car", "van"]),
                               ({"all_categories": list(CATEGORIES)}, []), ({}, [])):
        monkeypatch.setattr(build, "ensure_dataset", lambda data_cfg, *a, _m=manifest, **k: _m)
        train_mod.train(load_config("refine_2d", overrides=ov))
        assert seen["names"] == expected and seen["hparams"] == expected

    cfg = load_config("refine_2d", overrides=ov)
    assert train_mod.resolve_dataset_classes(cfg, {"all_categories": ["car", "van"]}) == ("car", "van")
    assert list(cfg.data.class_names) == ["car", "van"] and class_names(cfg) == ("car", "van")
    assert train_mod.resolve_dataset_classes(cfg, {"all_categories": list(CATEGORIES)}) == CATEGORIES
    assert list(cfg.data.class_names) == []


def test_train_refuses_a_dependency_trained_on_another_table(tmp_path):
    from amodal3d import train as train_mod

    ckpt = _save(_refine_2d(tmp_path, None), tmp_path / "shapenet.ckpt")
    cfg = load_config("refine_2d", overrides=[f"run.root={tmp_path / 'runs'}", *REFINE_SMALL,
                                              f"run.checkpoints.recon={ckpt}"])
    with pytest.raises(ConfigError, match=r"shapenet.ckpt: trained on 13 categories .* has 2 \[car, van\]"):
        train_mod.resolve_dataset_classes(cfg, {"all_categories": ["car", "van"]})
    with pytest.raises(ConfigError, match="shapenet.ckpt"):  # the checkpoint a run resumes from, too
        train_mod.resolve_dataset_classes(load_config("refine_2d", overrides=REFINE_SMALL),
                                          {"all_categories": ["car", "van"]}, resume_from=str(ckpt))


# -- predict: inputs mapped onto the checkpoint's table -------------------------------------------


def test_predict_maps_input_categories_onto_the_models_table(tmp_path):
    from amodal3d.predict.inputs import InputError, InstanceInput, InputSet, bind_categories, resolve_category

    inputs = bind_categories(InputSet([], [], [], {}), ("car", "traffic light", "pedestrian"))
    assert inputs.categories == [{"id": 1, "name": "car"}, {"id": 2, "name": "traffic light"},
                                 {"id": 3, "name": "pedestrian"}]

    def file_inst(stem):
        return InstanceInput(name=stem, source=stem, category=stem.split("_", 1)[0], mask_path=tmp_path / f"{stem}.png")

    assert resolve_category(file_inst("Pedestrian_2"), inputs) == 2
    assert resolve_category(file_inst("traffic_light_0"), inputs) == 1
    assert resolve_category(InstanceInput(name="0_car", source="d", category="car"), inputs) == 0  # a detection
    with pytest.raises(InputError, match="unknown category 'airplane': this model's categories are car, traffic "
                                         "light, pedestrian"):
        resolve_category(file_inst("airplane_1"), inputs)

    coco = bind_categories(InputSet([], [], [], {}, coco_categories=[{"id": 7, "name": "Car"},
                                                                      {"id": 9, "name": "chair"}]), KINS3)
    assert coco.categories == [{"id": 7, "name": "Car"}, {"id": 9, "name": "chair"}]  # the JSON's own ids stay
    ann = InstanceInput(name="1", source="annotation 1", category=7, ann_id=1)
    assert resolve_category(ann, coco) == 0
    with pytest.raises(InputError, match="unknown category 'chair' .*car, pedestrian, cyclist"):
        resolve_category(InstanceInput(name="2", source="annotation 2", category=9, ann_id=2), coco)

"""The detect protocol of the bench (amodal3d/bench/detect.py): with a perfect step 1
(the GT visible masks and amodal boxes as detections) every row fed by step 1 scores
exactly what it scores under gt-visible; detectors are scored as their own detectors;
a missing step 1 is said, not hidden; the detections sheet draws."""

from __future__ import annotations

import math

import pytest
import torch

from amodal3d.bench.detect import evaluate_detect
from amodal3d.bench.evaluate import discover_methods, evaluate_all
from amodal3d.config import load_config
from amodal3d.lightning_modules.visible import VisibleStage
from fakes import build_fake_dataset, tiny_overrides, write_run

DET = ["model.fpn_channels=16", "model.mask_channels=16", "model.mask_layers=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from amodal3d.lightning_modules.baselines.maskrcnn import MaskRCNNStage
    from amodal3d.lightning_modules.baselines.pcnet_m import PCNetMModule

    tmp = tmp_path_factory.mktemp("detbench")
    build_fake_dataset(tmp)
    torch.manual_seed(0)
    ov = _ov(tmp)
    write_run(PCNetMModule(load_config("pcnet_m", overrides=ov + ["model.base_channels=4", "model.depth=2"])),
              tmp / "runs", "pcnet_m")
    write_run(MaskRCNNStage(load_config("maskrcnn", overrides=ov + DET)), tmp / "runs", "maskrcnn")
    return tmp


def _ov(tmp):
    return tiny_overrides(tmp, "data.categories=[chair,car]", "loader.batch_size=4")


def _perfect_step1(monkeypatch):
    """step 1 replaced by the ground truth of each image (found through its pixels)."""
    from amodal3d.datamodules.images import ImageDataset

    truth = {}

    def remember(root):
        ds = ImageDataset(root, "test")
        for i in range(len(ds)):
            img, t = ds[i]
            truth[img.numpy().tobytes()] = t

    def detect(self, images):
        out = []
        for im in images:
            t = truth[im.cpu().numpy().tobytes()]
            n = len(t["labels"])
            out.append({"boxes": t["amodal_boxes"], "labels": t["labels"], "scores": torch.ones(n),
                        "masks": t["masks"].float()[:, None]})
        return out

    monkeypatch.setattr(VisibleStage, "detect", detect)
    return remember


def test_a_perfect_step_1_gives_the_gt_visible_figures(tiny, tmp_path, monkeypatch):
    runs = tiny / "runs"
    write_run(VisibleStage(load_config("visible", overrides=_ov(tiny) + DET)), tmp_path / "runs", "visible")
    import shutil

    for stage in ("pcnet_m", "maskrcnn"):
        shutil.copytree(runs / "default" / stage, tmp_path / "runs" / "default" / stage)
    _perfect_step1(monkeypatch)(tiny / "data")
    cfg = load_config(None, overrides=_ov(tiny) + [f"run.root={tmp_path / 'runs'}"])
    report = evaluate_detect(cfg, torch.device("cpu"))
    scored, unscored = report.scored, report.unscored
    rows = {r.row.name: r for r in scored}
    gt_visible = {r.name: r for r in evaluate_all(cfg, discover_methods("default", str(tmp_path / "runs")),
                                                  torch.device("cpu"))}
    for name in ("visible", "convex hull of visible", "Deocclusion"):
        assert rows[name].row.miou == pytest.approx(gt_visible[name].miou, abs=1e-9), name
        assert rows[name].row.count == gt_visible[name].count
    # every GT instance found with score 1: the floor's AP is that of the visible masks as amodal masks
    assert 0 <= rows["visible"].ap["AP"] <= 1
    assert "Mask R-CNN" in rows and math.isfinite(rows["Mask R-CNN"].row.miou)  # its own detector
    # the rows no detect run can score say why: not trained, or trained under another protocol
    assert {r.name for r in unscored} >= {"Ours", "render"}
    # step 1's own test APs: the perfect detections have every visible mask and amodal box right
    assert report.step1["visible_mask_AP"] == pytest.approx(1.0) and report.step1["amodal_box_AP"] == pytest.approx(1.0)
    from amodal3d.bench.detect import ap_markdown

    md = ap_markdown(report)
    assert "| visible-mask AP | 100.0 | 100.0 | 100.0 |" in md and "| Mask R-CNN |" in md
    from amodal3d.datamodules.images import ImageDataset

    assert report.images == len(ImageDataset(tiny / "data", "test")) and "images/s" in md


def test_rows_sharing_a_checkpoint_are_inferred_once(tiny, tmp_path, monkeypatch):
    """Ours is the row of another run (joint or refine): one inference per batch feeds both rows."""
    import dataclasses
    import shutil

    from amodal3d.lightning_modules.baselines.pcnet_m import PCNetMModule

    write_run(VisibleStage(load_config("visible", overrides=_ov(tiny) + DET)), tmp_path / "runs", "visible")
    shutil.copytree(tiny / "runs" / "default" / "pcnet_m", tmp_path / "runs" / "default" / "pcnet_m")
    _perfect_step1(monkeypatch)(tiny / "data")
    cfg = load_config(None, overrides=_ov(tiny) + [f"run.root={tmp_path / 'runs'}"])
    (entry,) = [e for e in discover_methods("default", str(tmp_path / "runs")) if e.name == "Deocclusion"]
    calls = []
    infer = PCNetMModule.image_prediction
    monkeypatch.setattr(PCNetMModule, "image_prediction", lambda self, b: calls.append(1) or infer(self, b))
    report = evaluate_detect(cfg, torch.device("cpu"), max_batches=1,
                             entries=[entry, dataclasses.replace(entry, name="Deocclusion again")])
    rows = {r.row.name: r for r in report.scored}
    assert len(calls) == 1
    assert rows["Deocclusion again"].row.miou == rows["Deocclusion"].row.miou
    assert rows["Deocclusion again"].ap == rows["Deocclusion"].ap


def test_without_step_1_the_fed_rows_say_so_and_the_detectors_still_run(tiny):
    cfg = load_config(None, overrides=_ov(tiny) + [f"run.root={tiny / 'runs'}"])
    report = evaluate_detect(cfg, torch.device("cpu"), max_batches=1)
    scored, unscored = report.scored, report.unscored
    assert report.step1 == {}
    assert [r.row.name for r in scored] == ["Mask R-CNN"]
    why = {r.name: r.status for r in unscored}
    assert "needs step 1" in why["visible floor (step 1)"] and "make train STAGE=visible" in why["Deocclusion"]


def test_the_detections_sheet_draws_step_1_and_the_truth(tiny, tmp_path, monkeypatch):
    from PIL import Image

    from amodal3d.bench.detections import detection_sheet

    write_run(VisibleStage(load_config("visible", overrides=_ov(tiny) + DET)), tmp_path / "runs", "visible")
    _perfect_step1(monkeypatch)(tiny / "data")
    cfg = load_config(None, overrides=_ov(tiny) + [f"run.root={tmp_path / 'runs'}"])
    png, note = detection_sheet(cfg, torch.device("cpu"), tmp_path / "sheet.png", images=3)
    w, h = Image.open(png).size
    assert w > 4 * 256 and h > 3 * 256 and "Ours: not trained" in note


class _AllOn(torch.nn.Module):
    """A mask branch that says 'object' everywhere in its box."""

    uses_labels = False

    def forward(self, features):
        return {"masks": features.new_full((len(features), 1, 28, 28), 20.0)}


def test_gt_box_feeds_the_detectors_the_gt_amodal_boxes(tiny, monkeypatch):
    """Under gt-box a Mask R-CNN-family row is its RoI heads on the GT amodal boxes: with a
    head that fills its box, each instance's mask is its (clipped) amodal box; a run of the
    default experiment serves the gt_box one."""
    from amodal3d.bench.detect import detect_loader
    from amodal3d.bench.gt_box_detectors import gt_box_detector_rows
    from amodal3d.categories import CATEGORIES
    from amodal3d.bench.table import NEEDS_DETECT
    from amodal3d.lightning_modules.baselines.maskrcnn import MaskRCNNStage
    from amodal3d.metrics.amodal_iou import AmodalMIoU
    from amodal3d.models.maskrcnn import boxes_in_image

    cfg = load_config(None, "gt_box", overrides=_ov(tiny) + [f"run.root={tiny / 'runs'}"])
    entries = discover_methods("gt_box", str(tiny / "runs"))
    assert {e.name: e.status for e in entries}["Mask R-CNN"] == NEEDS_DETECT
    real = MaskRCNNStage.load_from_checkpoint
    seen = []

    def load(path, **kw):
        module = real(path, **kw)
        module.net.roi_heads.mask_branch = _AllOn()
        seen.append(str(path))
        return module

    monkeypatch.setattr(MaskRCNNStage, "load_from_checkpoint", load)
    rows = gt_box_detector_rows(cfg, entries, torch.device("cpu"))
    row = rows["Mask R-CNN"]
    assert row.ok and "default" in seen[0]  # the default experiment's run
    assert rows["ORCNN"].status == "not trained"
    expected = AmodalMIoU(len(CATEGORIES))
    for images, targets in detect_loader(cfg):
        for im, t in zip(images, targets):
            h, w = im.shape[-2:]
            boxes = boxes_in_image(t["amodal_boxes"], h, w).round().long()
            fill = torch.zeros((len(boxes), 1, h, w), dtype=torch.bool)
            for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                fill[k, 0, y0:y1, x0:x1] = True
            expected.update(fill, t["eval_amodal_masks"][:, None].bool(), t["masks"][:, None].bool(), t["category"])
    want = expected.compute()
    assert sum(row.count) == int(want["count"].sum()) > 0
    assert row.miou == pytest.approx(float(want["miou"]), abs=0.03)  # box edges: paste interpolation

"""`make bench`: the seed-table layout, method discovery, the files it writes, and the
end-to-end table (visible floor + a trained Deocclusion run) on a tiny built dataset."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from amodal3d.bench import run as bench_run
from amodal3d.bench.evaluate import discover_methods, named_methods
from amodal3d.bench.table import MethodResult, csv_text, markdown_table, write_results
from amodal3d.categories import CATEGORIES

SEED_HEADER = ("| method | Airplane | Bench | Dresser | Car | Chair | Display | Lamp | Speaker | Rifle | Sofa "
               "| Table | Phone | Vessel | mIoU |")


def _result(name="A", per=None, miou=None, **kw):
    per = per if per is not None else [0.5] * 13
    miou = float(np.nanmean(per)) if miou is None else miou
    return MethodResult(name=name, stage="s", per_category=per, per_category_occ=[0.25] * 13,
                        miou=miou, miou_occ=0.25, iou_dataset=0.4, count=[3] * 13, **kw)


def test_markdown_table_has_the_exact_seed_layout():
    per = [0.249, 0.674, 0.4534, 0.5875, 0.837, 0.784, 0.779, 0.152, 0.487, 0.481, 0.395, 0.238, 0.719]
    rows = [_result("Deocclusion", per, miou=0.5224), MethodResult(name="A3D", stage="refine", status="not trained")]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == SEED_HEADER
    assert lines[1] == "|" + "---|" * 15
    assert lines[2] == ("| Deocclusion | 24.9 | 67.4 | 45.3 | 58.8 | 83.7 | 78.4 | 77.9 | 15.2 | 48.7 | 48.1 "
                        "| 39.5 | 23.8 | 71.9 | 52.2 |")
    assert lines[3].startswith("| A3D (not trained) | — |") and lines[3].count("—") == 14
    occ = markdown_table(rows, occluded=True).splitlines()
    assert occ[0].endswith("| Vessel | mIoU_occ |") and "| 25.0 |" in occ[2]


def test_absent_category_is_a_dash_not_zero():
    per = [math.nan] * 13
    per[CATEGORIES.index("chair")] = 0.8
    per[CATEGORIES.index("car")] = 0.6
    line = markdown_table([_result("X", per)]).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1 + CATEGORIES.index("chair")] == "80.0" and cells[1 + CATEGORIES.index("car")] == "60.0"
    assert cells.count("—") == 11 and cells[-1] == "70.0"


def test_csv_and_tensorboard_outputs(tmp_path):
    rows = [_result("visible"), MethodResult(name="Deocclusion", stage="pcnet_m", status="not trained")]
    paths = write_results(tmp_path, rows, {"command": "python -m amodal3d bench table"})
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["method"] for r in table] == ["visible", "Deocclusion"]
    assert table[0]["Airplane"] == "50.000" and table[0]["mIoU_occ"] == "25.000" and table[0]["instances"] == "39"
    assert table[1]["status"] == "not trained" and table[1]["mIoU"] == ""
    md = paths["markdown"].read_text()
    assert SEED_HEADER in md and "make train STAGE=pcnet_m" in md and "python -m amodal3d bench table" in md
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(paths["tensorboard"]), size_guidance={"tensors": 0})
    ea.Reload()
    assert any(t.startswith("bench/results") for t in ea.Tags()["tensors"])
    assert csv_text([]).startswith("method,stage,status,checkpoint,Airplane")


def _fake_run(root: Path, stage: str, run_id: str) -> Path:
    run = root / "default" / stage / run_id
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml({"stage": stage}))
    (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
    (run / "summary.json").write_text("{}")  # a finished run
    return run


def test_discovery_lists_untrained_methods_and_picks_the_latest_run(tmp_path):
    found = discover_methods("default", str(tmp_path))
    entries = {e.stage: e for e in found}
    assert entries["pcnet_m"].status == "not trained" and entries["pcnet_m"].name == "Deocclusion"
    by_name = {e.name: e for e in found}  # the Ours rows the bench adds (amodal3d.bench.ours)
    assert by_name["Ours"].status == "not trained" and by_name["2D-only (no 3D prior)"].status == "not trained"
    order = [e.name for e in found]  # baselines, then the pipeline in order, then the added rows
    assert order.index("Deocclusion") < order.index("recon-render") < order.index("2D-only (no 3D prior)") \
        < order.index("joint (end-to-end fine-tuning)") < order.index("Ours")
    old = _fake_run(tmp_path, "pcnet_m", "20240101-000000")
    time.sleep(0.01)
    new = _fake_run(tmp_path, "pcnet_m", "20240102-000000")
    import os

    os.utime(old, (time.time() - 100, time.time() - 100))
    training = _fake_run(tmp_path, "pcnet_m", "20240103-000000")
    (training / "summary.json").unlink()  # still training: the bench never scores it
    os.utime(training, (time.time() + 100, time.time() + 100))
    entries = {e.stage: e for e in discover_methods("default", str(tmp_path))}
    assert entries["pcnet_m"].status == "ok"
    assert entries["pcnet_m"].checkpoint == new / "checkpoints" / "best.ckpt"
    named = named_methods([str(old)])
    assert named[0].stage == "pcnet_m" and named[0].checkpoint == old / "checkpoints" / "best.ckpt"
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        named_methods([str(tmp_path / "nope")])


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny built dataset and a short pcnet_m run on it."""
    from test_pcnet_m import build_fake_dataset, tiny_config

    from amodal3d.train import train

    tmp = tmp_path_factory.mktemp("bench")
    cfg = tiny_config(tmp, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                      "trainer.enable_progress_bar=false")
    build_fake_dataset(cfg)
    summary = train(cfg)
    args = ["--debug", "tiny", "--device", "cpu", f"data.root={tmp / 'data'}", f"run.root={tmp / 'runs'}",
            "data.views=4", "data.objects_per_split.train=2", "data.objects_per_split.val=1",
            "data.objects_per_split.test=1", "loader.num_workers=0"]
    return tmp, cfg, summary, args


def _test_arrays(cfg):
    """(visible, amodal, occluder (H,W) bool stacks, amodal boxes, categories) of the test
    instances, read from the shards without the crop pipeline."""
    from amodal3d.datamodules.shard_reader import SplitReader

    r = SplitReader(cfg.data.root, "test")
    masks = [r.instance_masks(i) for i in range(r.num_instances)]
    stack = {k: np.stack([m[k] for m in masks]) for k in ("visible", "amodal", "occluder")}
    return stack, r.index["amodal_box"], r.index["category"].astype(np.int64)


def _floor_reference(cfg):
    """IoU of the visible mask taken as the amodal mask, in the image frame, scored by the
    independent numpy reference."""
    from test_metrics import reference

    m, _, cat = _test_arrays(cfg)
    return reference(m["visible"], m["amodal"], m["visible"], cat)


def test_box_rule_matches_an_independent_numpy_computation(trained):
    """gt-box reference row: visible ∪ (occluder ∩ amodal box), per instance, in numpy."""
    from amodal3d.bench.evaluate import eval_loader, evaluate_module
    from amodal3d.bench.reference import BoxRule
    from test_metrics import reference

    tmp, cfg, summary, args = trained
    box_cfg = OmegaConf.merge(cfg, {"protocol": "gt-box"})
    m, boxes, cat = _test_arrays(cfg)
    h, w = m["visible"].shape[1:]
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.stack([(xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1) for x0, y0, x1, y1 in boxes])
    want = reference(m["visible"] | (m["occluder"] & inside), m["amodal"], m["visible"], cat)
    got = evaluate_module(BoxRule(OmegaConf.merge(box_cfg, {"stage": "box"})), eval_loader(box_cfg),
                          torch.device("cpu"))
    assert float(got["miou"]) == pytest.approx(want["miou"], abs=1e-9)
    assert float(got["miou_occ"]) == pytest.approx(want["miou_occ"], abs=1e-9)
    assert float(got["miou"]) > float(_floor_reference(cfg)["miou"])


def test_convex_hull_rule_contains_the_mask_and_fills_its_concavities():
    from amodal3d.bench.reference import convex_hull_mask

    m = np.zeros((16, 16), bool)
    m[2:12, 2:5] = m[2:5, 2:12] = True  # an L: its hull is the triangle closing the corner
    hull = convex_hull_mask(m)
    assert (hull >= m).all() and hull[6, 6] and not hull[11, 11] and not hull[0, 0]
    rect = np.zeros((8, 8), bool)
    rect[2:5, 1:7] = True
    assert np.array_equal(convex_hull_mask(rect), rect), "a convex mask is its own hull"
    assert not convex_hull_mask(np.zeros((4, 4), bool)).any()


def test_convex_hull_from_row_ends_is_the_hull_of_every_pixel_square():
    """The hull is built from each row's first and last pixel only: the same mask as the
    hull of all pixel corners, on random blobs."""
    from amodal3d.bench.reference import _hull, convex_hull_mask

    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((20, 24)) < rng.uniform(0.02, 0.3)
        ys, xs = np.nonzero(m)
        corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
        hull = _hull(corners)
        gy, gx = np.mgrid[0:20, 0:24]
        c = np.stack([gx.ravel() + 0.5, gy.ravel() + 0.5], 1)
        inside = np.ones(len(c), bool)
        for a, b in zip(hull, np.roll(hull, -1, axis=0)):
            inside &= (b[0] - a[0]) * (c[:, 1] - a[1]) - (b[1] - a[1]) * (c[:, 0] - a[0]) >= -1e-9
        assert np.array_equal(convex_hull_mask(m), inside.reshape(20, 24) | m)


def test_bench_table_end_to_end(trained, capsys):
    tmp, cfg, summary, args = trained
    out = tmp / "bench_out"
    assert bench_run.main(["table", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert SEED_HEADER in printed
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "results-gt-visible.csv").read_text()))}
    assert rows["Deocclusion"]["status"] == "ok" and rows["Deocclusion"]["mIoU"] != ""
    assert Path(summary["best_checkpoint"]).name in rows["Deocclusion"]["checkpoint"]
    ref = _floor_reference(cfg)
    assert float(rows["visible"]["mIoU"]) == pytest.approx(100 * ref["miou"], abs=1e-3)
    assert float(rows["visible"]["mIoU_occ"]) == pytest.approx(100 * ref["miou_occ"], abs=1e-3)
    assert float(rows["visible"]["mIoU_occ"]) < 5  # it predicts (almost) no hidden pixel
    assert float(rows["visible"]["Chair"]) == pytest.approx(100 * ref["per_category"][CATEGORIES.index("chair")], abs=1e-3)
    assert rows["visible"]["Airplane"] == ""  # absent from the tiny test split: not a 0
    md_lines = (out / "results.md").read_text().splitlines()
    row = next(ln for ln in md_lines if ln.startswith("| Deocclusion |"))
    assert len(row.strip("|").split("|")) == 15
    assert (out / "tb").is_dir()
    # one table per protocol, gt-visible first, each with its reference rows
    text = (out / "results.md").read_text()
    assert text.index("gt-visible protocol") < text.index("gt-box protocol")
    assert "| convex hull of visible |" in text and "| box rule: visible ∪ (occluder ∩ amodal box) |" in text
    box_rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "results-gt-box.csv").read_text()))}
    assert box_rows["Deocclusion"]["status"] == "not trained", "gt-box scores the runs trained under gt-box only"
    assert "reaches outside the crop" in text


def test_a_named_run_is_scored_under_its_own_protocol_only(trained, capsys):
    tmp, cfg, summary, args = trained
    out = tmp / "bench_named"
    assert bench_run.main(["table", "--run", summary["run_dir"], "--out", str(out), *args]) == 0
    text = (out / "results.md").read_text()
    assert "gt-visible protocol" in text and "gt-box protocol" not in text
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "results-gt-visible.csv").read_text()))}
    named = next(name for name in rows if name.startswith("Deocclusion ["))
    assert rows[named]["status"] == "ok"


def test_a_method_that_fails_to_evaluate_fails_the_table(trained, monkeypatch):
    from amodal3d.bench import evaluate

    tmp, cfg, summary, args = trained
    real = evaluate.load_method

    def broken(entry, device, cfg=None):
        if entry.stage == "pcnet_m":
            raise RuntimeError("corrupt checkpoint")
        return real(entry, device, cfg)

    monkeypatch.setattr(evaluate, "load_method", broken)
    with pytest.raises(RuntimeError, match="gt-visible: Deocclusion .*corrupt checkpoint"):
        bench_run.main(["table", "--protocol", "gt-visible", "--out", str(tmp / "bench_broken"), *args])
    assert "Deocclusion (error" in (tmp / "bench_broken" / "results-gt-visible.md").read_text()


def test_bench_speed_and_all_record_failures(trained, monkeypatch, capsys):
    tmp, cfg, summary, args = trained
    out = tmp / "bench_all"
    from amodal3d.bench import speed

    monkeypatch.setattr(speed, "run_loader_bench",
                        lambda cfg: ({"workers_0": 123.0}, "| loader | crops/s |\n|---|---|\n| workers 0 | 123 |"))

    def broken_raster(device):
        raise RuntimeError("no rasteriser here")

    monkeypatch.setattr(speed, "run_raster_bench", broken_raster)
    rc = bench_run.main(["all", "--out", str(out), "--speed-batches", "1", *args])
    assert rc == 1  # one part failed: reported, not hidden
    text = (out / "bench.md").read_text()
    assert SEED_HEADER in text and "| workers 0 | 123 |" in text
    assert "raster: RuntimeError('no rasteriser here')" in text
    speed_md = (out / "speed.md").read_text()
    row = next(ln for ln in speed_md.splitlines() if ln.startswith("| Deocclusion |"))
    assert float(row.split("|")[2]) > 0
    assert "command: `python -m amodal3d bench all --out" in speed_md and "device: `cpu`" in speed_md
    assert "`predict` with the Ours model: not trained" in speed_md


def test_cli_hands_bench_its_own_help(capsys):
    from amodal3d.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "--speed-batches" in capsys.readouterr().out


def test_hardest_cases_are_the_lowest_iou_instances_per_category(trained):
    from amodal3d.bench.evaluate import eval_loader, floor_module
    from amodal3d.bench.hardest import hardest_instances, hardest_sheet
    from amodal3d.datamodules.crops import CropDataset

    tmp, cfg, summary, args = trained
    cases = hardest_instances(floor_module(cfg, torch.device("cpu")), eval_loader(cfg), torch.device("cpu"), 2)
    ds = CropDataset(cfg.data.root, "test", crop_size=cfg.loader.crop_size, crop_margin=cfg.loader.crop_margin)
    expected: dict[str, list[float]] = {}
    for it in (ds[i] for i in range(len(ds))):
        pred = it["image_visible"][0].numpy() > 0.5  # the floor is scored in the image frame: no paste
        gt = it["eval_image_amodal"][0].numpy() > 0.5
        expected.setdefault(CATEGORIES[int(it["category"])], []).append((pred & gt).sum() / max((pred | gt).sum(), 1))
    assert set(cases) == set(expected)
    for cat, items in cases.items():
        assert [c["iou"] for c in items] == pytest.approx(sorted(expected[cat])[:2], abs=1e-9)
    png = hardest_sheet(cases, tmp / "hardest.png", "visible")
    assert png.stat().st_size > 0
    out = tmp / "bench_hardest"
    assert bench_run.main(["hardest", "--hardest-method", "Deocclusion", "--out", str(out), *args]) == 0
    assert (out / "hardest.png").is_file() and "| chair |" in (out / "hardest.md").read_text()


def test_opposite_view_similarity_tells_a_turn_invariant_object_from_one_with_a_front():
    from amodal3d.metrics.view_symmetry import opposite_view_similarity

    v, s = 4, 16
    rgba = np.zeros((2, v, s, s, 4), np.uint8)
    rgba[0, :, 4:12, 4:12] = 200  # object 0 looks the same from every side
    for k in range(v):  # object 1: a bar on the left when seen from the front half, right from the back
        cols = slice(2, 6) if k < v // 2 else slice(10, 14)
        rgba[1, k, 4:12, cols] = 200
    iou, colour = opposite_view_similarity(rgba[:1])
    assert iou == 1.0 and colour == 0.0
    iou, _ = opposite_view_similarity(rgba[1:])
    assert iou == 0.0
    with pytest.raises(ValueError, match="even number"):
        opposite_view_similarity(rgba[:, :3])


def test_same_picture_pairs_a_table_view_with_its_opposite_and_no_chair_view():
    """The symmetry-aware azimuth error forgives exactly the views no method can tell
    apart: a synth13 table's view and the view half-way round, none of a chair's."""
    from amodal3d.datamodules.sources.base import nmr_cameras
    from amodal3d.datamodules.sources.synth13 import render_synth_objects, synth_object
    from amodal3d.metrics.view_symmetry import same_picture

    objs = [synth_object("table", "test", 0, 0), synth_object("chair", "test", 0, 0)]
    same = same_picture(render_synth_objects(objs, nmr_cameras(24), 64))
    k = np.arange(24)
    assert same.shape == (2, 24, 24) and same[:, k, k].all()
    assert same[0, k, (k + 12) % 24].all() and not same[1, k, (k + 12) % 24].any()
    assert same[1].sum() == 24  # each chair view is only itself


def test_visible_lost_counts_the_visible_pixels_a_prediction_drops(trained):
    from amodal3d.bench.evaluate import eval_loader, floor_module
    from amodal3d.bench.visible_kept import visible_lost

    tmp, cfg, summary, args = trained
    floor = floor_module(cfg, torch.device("cpu"))
    keeps = visible_lost(floor, eval_loader(cfg), torch.device("cpu"))
    assert keeps["count"] > 0 and keeps["pixels"] == 0  # the visible mask itself, in the image frame

    class Empty(type(floor)):
        def rule(self, visible, occluded, box):
            return torch.zeros_like(visible)

    empty = Empty(floor.cfg)
    assert visible_lost(empty, eval_loader(cfg), torch.device("cpu")) == {"pixels": 1.0, "instances": 1.0,
                                                                          "count": keeps["count"]}


def test_paired_ratio_times_two_rows_in_alternation():
    """`bench speed`'s Ours / 2D-only figure: both rows timed in turn on the same batches;
    a row doing four times the work comes out well below 1, the rounds are all kept."""
    from amodal3d.bench.speed import paired_markdown, paired_ratio

    class Row(torch.nn.Module):
        def __init__(self, repeats: int):
            super().__init__()
            self.repeats, self.lin = repeats, torch.nn.Linear(256, 256)

        def predict_amodal(self, batch):
            x = batch["visible"].flatten(1)[:, :256]
            for _ in range(self.repeats):
                for _ in range(20):
                    x = self.lin(x)
            return x

    batches = [{"visible": torch.rand(64, 1, 16, 16)}] * 4
    r = paired_ratio(Row(4), Row(1), batches, torch.device("cpu"), rounds=3)
    assert r["rounds"] == 3 and len(r["instances_per_s"]) == 3
    assert r["min"] <= r["median"] <= r["max"] < 0.8
    assert "Ours / 2D-only throughput, timed in alternation (3 rounds" in paired_markdown("Ours", "2D-only", r)
    assert paired_markdown("Ours", "2D-only", None) == ""
    with pytest.raises(ValueError, match="rounds=0"):
        paired_ratio(Row(1), Row(1), batches, torch.device("cpu"), rounds=0)

"""Amodal mIoU and the detect-protocol metrics against independent references."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from amodal3d.metrics.amodal_iou import AmodalMIoU, amodal_iou_stats, instance_iou, summarize
from amodal3d.metrics.detection import (
    DetectionAP,
    DetectionAmodalMIoU,
    coco_ap,
    match_detections,
    pairwise_mask_iou,
)

C = 13


def reference(pred, amodal, visible, category, num_categories=C):
    """Plain numpy/python loops over instances: the independent reference."""
    ious = {c: [] for c in range(num_categories)}
    occ = {c: [] for c in range(num_categories)}
    inter_total = union_total = 0
    for p, a, v, c in zip(pred, amodal, visible, category):
        p, a, v = (np.asarray(x, dtype=bool).ravel() for x in (p, a, v))
        inter, union = np.logical_and(p, a).sum(), np.logical_or(p, a).sum()
        inter_total += inter
        union_total += union
        ious[int(c)].append(1.0 if union == 0 else inter / union)
        h = a & ~v
        if h.any():
            ph = p & ~v
            occ[int(c)].append(np.logical_and(ph, h).sum() / np.logical_or(ph, h).sum())
    per = np.array([np.mean(ious[c]) if ious[c] else np.nan for c in range(num_categories)])
    per_occ = np.array([np.mean(occ[c]) if occ[c] else np.nan for c in range(num_categories)])
    return {
        "per_category": per,
        "per_category_occ": per_occ,
        "miou": np.nanmean(per) if np.isfinite(per).any() else np.nan,
        "miou_occ": np.nanmean(per_occ) if np.isfinite(per_occ).any() else np.nan,
        "iou_dataset": inter_total / union_total,
        "count": np.array([len(ious[c]) for c in range(num_categories)]),
    }


def random_batch(n, size=16, seed=0, categories=C):
    """Random amodal masks, visible ⊂ amodal, predictions that overlap them partly."""
    g = torch.Generator().manual_seed(seed)
    amodal = torch.rand(n, 1, size, size, generator=g) < torch.rand(n, 1, 1, 1, generator=g)
    visible = amodal & (torch.rand(n, 1, size, size, generator=g) < 0.6)
    flip = torch.rand(n, 1, size, size, generator=g) < 0.25
    pred = amodal ^ flip
    category = torch.randint(0, categories, (n,), generator=g)
    return pred, amodal, visible, category


def assert_matches_reference(res, ref):
    for key in ("per_category", "per_category_occ"):
        got = res[key].numpy()
        assert np.array_equal(np.isnan(got), np.isnan(ref[key])), key
        np.testing.assert_allclose(got[~np.isnan(got)], ref[key][~np.isnan(ref[key])], atol=1e-6, rtol=0)
    for key in ("miou", "miou_occ", "iou_dataset"):
        assert abs(float(res[key]) - float(ref[key])) < 1e-6, key
    assert np.array_equal(res["count"].numpy(), ref["count"])


def test_matches_numpy_reference_on_random_masks():
    metric = AmodalMIoU(num_categories=C)
    batches = [random_batch(37, seed=s) for s in range(4)]
    for b in batches:
        metric.update(*b)
    res = metric.compute()
    cat = [torch.cat(x) for x in zip(*batches)]
    ref = reference(*(x.numpy() for x in cat))
    assert_matches_reference(res, ref)
    assert set(res) >= {"miou", "miou_occ", "iou_dataset", "per_category", "per_category_occ", "count"}
    # dataset-level ΣI/ΣU differs from the category mean on random data: distinct figures
    assert abs(float(res["iou_dataset"]) - float(res["miou"])) > 1e-4


def test_accepts_b_h_w_masks_and_rejects_non_bool():
    pred, amodal, visible, cat = random_batch(8, seed=3)
    m1, m2 = AmodalMIoU(), AmodalMIoU()
    m1.update(pred, amodal, visible, cat)
    m2.update(pred[:, 0], amodal[:, 0], visible[:, 0], cat)
    assert torch.equal(m1.compute()["per_category"].nan_to_num(-1), m2.compute()["per_category"].nan_to_num(-1))
    with pytest.raises(TypeError, match="bool"):
        AmodalMIoU().update(pred.float(), amodal, visible, cat)
    with pytest.raises(ValueError, match="category"):
        AmodalMIoU().update(pred, amodal, visible, torch.full((8,), 13))


def test_merge_state_equals_single_pass():
    a, b = random_batch(20, seed=1), random_batch(30, seed=2)
    m_a, m_b, m_all = AmodalMIoU(), AmodalMIoU(), AmodalMIoU()
    m_a.update(*a)
    m_b.update(*b)
    m_all.update(*a)
    m_all.update(*b)
    m_a.merge_state(m_b)
    r1, r2 = m_a.compute(), m_all.compute()
    for k in r1:
        assert torch.allclose(r1[k].double(), r2[k].double(), equal_nan=True, atol=1e-12), k


def test_edge_cases_empty_prediction_empty_gt_no_hidden_absent_category():
    s = 8
    amodal = torch.zeros(4, 1, s, s, dtype=torch.bool)
    amodal[:, :, 2:6, 2:6] = True  # 16 pixels
    visible = amodal.clone()
    visible[0, :, 2:6, 4:6] = False  # instance 0: 8 hidden pixels
    visible[1, :, 2:6, 5:6] = False  # instance 1: 4 hidden pixels
    pred = amodal.clone()
    pred[0] = False  # empty prediction: IoU 0, occluded IoU 0
    # instance 2: no hidden part (visible == amodal); instance 3: empty GT and empty prediction
    amodal[3] = visible[3] = pred[3] = False
    category = torch.tensor([0, 0, 1, 2])
    m = AmodalMIoU()
    m.update(pred, amodal, visible, category)
    r = m.compute()
    assert r["per_category"][0] == pytest.approx(0.5)  # (0 + 1) / 2
    assert r["per_category"][1] == pytest.approx(1.0)
    assert r["per_category"][2] == pytest.approx(1.0)  # empty vs empty scores 1 (documented)
    assert torch.isnan(r["per_category"][3:]).all()  # absent categories are NaN, not 0
    assert float(r["miou"]) == pytest.approx((0.5 + 1 + 1) / 3)  # mean over present categories only
    # occluded part: only instances 0 and 1 have one (both category 0)
    assert r["per_category_occ"][0] == pytest.approx(0.5)
    assert torch.isnan(r["per_category_occ"][1:]).all()
    assert float(r["miou_occ"]) == pytest.approx(0.5)
    assert r["count"].tolist()[:4] == [2, 1, 1, 0]
    assert r["occ_count"].tolist()[:2] == [2, 0]
    # ΣI/ΣU: intersections 0+16+16+0, unions 16+16+16+0
    assert float(r["iou_dataset"]) == pytest.approx(32 / 48)


def test_nothing_seen_reports_nan_not_zero():
    m = AmodalMIoU()
    r = summarize({k: getattr(m, k) for k in ("iou_sum", "count", "occ_iou_sum", "occ_count", "inter", "union")})
    assert math.isnan(float(r["miou"])) and math.isnan(float(r["miou_occ"])) and math.isnan(float(r["iou_dataset"]))


def test_functional_core_matches_metric():
    b = random_batch(25, seed=9)
    stats = amodal_iou_stats(*b, num_categories=C)
    m = AmodalMIoU()
    m.update(*b)
    r1, r2 = summarize(stats), m.compute()
    assert torch.allclose(r1["per_category"], r2["per_category"], equal_nan=True)
    iou = instance_iou(b[0], b[1])
    ref = reference(*(x.numpy() for x in b))
    assert float(iou.sum()) == pytest.approx(
        sum(np.nan_to_num(ref["per_category"]) * ref["count"]), abs=1e-9
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = AmodalMIoU()
        # uneven work per rank: rank 0 two batches, rank 1 one batch
        for s in ([10, 11] if rank == 0 else [12]):
            m.update(*random_batch(15, seed=s))
        res = m.compute()
        torch.save({k: v.cpu() for k, v in res.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync(tmp_path):
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = AmodalMIoU()
    for s in (10, 11, 12):
        single.update(*random_batch(15, seed=s))
    want = single.compute()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k in want:
            assert torch.allclose(got[k].double(), want[k].double(), equal_nan=True, atol=1e-12), (rank, k)


# ---- detect protocol ---------------------------------------------------------------


def _box_mask(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_pairwise_mask_iou():
    gt = torch.stack([_box_mask(16, 16, 0, 8, 0, 8), _box_mask(16, 16, 8, 16, 8, 16)])
    pred = torch.stack([_box_mask(16, 16, 0, 8, 0, 7), _box_mask(16, 16, 8, 16, 8, 12)])
    iou = pairwise_mask_iou(pred, gt)
    assert iou[0, 0] == pytest.approx(56 / 64) and iou[1, 1] == pytest.approx(0.5) and iou[0, 1] == 0


def test_one_to_one_matching_by_amodal_box_highest_score_first():
    """A hand-built case of COCO's greedy rule on amodal boxes (xyxy)."""
    gt = torch.tensor([[0.0, 0, 8, 8], [8, 8, 16, 16], [12, 0, 16, 4]])
    pred = torch.tensor([
        [0.0, 0, 7, 8],    # IoU 56/64 with gt0, score 0.9: the first to choose, takes gt0
        [0.0, 0, 8, 8],    # IoU 1 with gt0, score 0.1: gt0 is taken, nothing else overlaps
        [8.0, 8, 12, 16],  # IoU 0.5 with gt1: matched at the threshold
        [0.0, 12, 4, 16],  # overlaps nothing (the highest score)
    ])
    match = match_detections(pred, gt, scores=torch.tensor([0.9, 0.1, 0.5, 0.99]))
    assert match.tolist() == [0, 2, -1]
    # with the scores swapped the better-placed box chooses first
    assert match_detections(pred, gt, scores=torch.tensor([0.1, 0.9, 0.5, 0.99])).tolist() == [1, 2, -1]
    assert match_detections(pred[:0], gt).tolist() == [-1, -1, -1]
    below = torch.tensor([[8.0, 8, 11.9, 16]])  # IoU < 0.5
    assert match_detections(below, gt).tolist() == [-1, -1, -1]


def test_unmatched_gt_scores_zero_in_detection_miou():
    gt_vis = torch.stack([_box_mask(16, 16, 0, 8, 0, 8), _box_mask(16, 16, 8, 16, 8, 16)])
    gt_amo = torch.stack([_box_mask(16, 16, 0, 10, 0, 10), _box_mask(16, 16, 8, 16, 8, 16)])
    gt_box = torch.tensor([[0.0, 0, 10, 10], [8, 8, 16, 16]])
    pred_box = torch.tensor([[0.0, 0, 10, 10]])
    pred_amo = torch.stack([_box_mask(16, 16, 0, 10, 0, 10)])
    m = DetectionAmodalMIoU()
    match = m.update_detections(pred_box, pred_amo, gt_box, gt_amo, gt_vis, torch.tensor([0, 1]))
    assert match.tolist() == [0, -1]
    r = m.compute()
    assert float(r["per_category"][0]) == pytest.approx(1.0)
    assert float(r["per_category"][1]) == 0.0  # missed instance: 0, not absent
    assert float(r["miou"]) == pytest.approx(0.5)


def test_coco_ap():
    h = w = 32
    masks = [_box_mask(h, w, 0, 10, 0, 10).numpy(), _box_mask(h, w, 12, 30, 12, 30).numpy()]
    gt = [{"image_id": 1, "category_id": 3, "mask": masks[0]}, {"image_id": 2, "category_id": 4, "mask": masks[1]}]
    perfect = [dict(g, score=0.9) for g in gt]
    assert coco_ap(gt, perfect, list(range(C)))["AP"] == pytest.approx(1.0)
    # a half-overlapping detection (IoU 50/150 < 0.5) is a false positive everywhere
    wrong = [{"image_id": 1, "category_id": 3, "mask": _box_mask(h, w, 0, 10, 5, 15).numpy(), "score": 0.9}]
    res = coco_ap(gt[:1], wrong, list(range(C)))
    assert res["AP"] == pytest.approx(0.0) and res["AP50"] == pytest.approx(0.0)
    assert coco_ap(gt, [], list(range(C)))["AP"] == 0.0


def test_amodal_mask_ap_metric_accumulates_images():
    h = w = 32
    m0, m1 = _box_mask(h, w, 0, 10, 0, 10), _box_mask(h, w, 12, 30, 12, 30)
    metric = DetectionAP()
    metric.update(
        [{"masks": m0[None], "scores": torch.tensor([0.8]), "labels": torch.tensor([2])}],
        [{"masks": m0[None], "labels": torch.tensor([2]), "image_id": 0}],
    )
    metric.update(
        [{"masks": m1[None], "scores": torch.tensor([0.7]), "labels": torch.tensor([5])}],
        [{"masks": m1[None], "labels": torch.tensor([5]), "image_id": 1}],
    )
    assert float(metric.compute()["AP"]) == pytest.approx(1.0)
    # a detection with the wrong category turns one category's AP to 0: mean 0.5
    bad = DetectionAP()
    bad.update(
        [{"masks": torch.stack([m0, m1]), "scores": torch.tensor([0.8, 0.7]), "labels": torch.tensor([2, 6])}],
        [{"masks": torch.stack([m0, m1]), "labels": torch.tensor([2, 5]), "image_id": 0}],
    )
    assert float(bad.compute()["AP"]) == pytest.approx(0.5)
    with pytest.raises(KeyError, match="image_id"):
        bad.update([{"masks": m0[None], "scores": torch.ones(1), "labels": torch.ones(1)}], [{"masks": m0[None], "labels": torch.ones(1)}])


def test_coco_box_ap_and_the_box_metric():
    gt = [{"image_id": 1, "category_id": 3, "box": [0.0, 0, 10, 10]}, {"image_id": 2, "category_id": 4, "box": [12.0, 12, 30, 30]}]
    assert coco_ap(gt, [dict(g, score=0.9) for g in gt], list(range(C)), iou_type="bbox")["AP"] == pytest.approx(1.0)
    shifted = [{"image_id": 1, "category_id": 3, "box": [5.0, 0, 15, 10], "score": 0.9}]  # IoU 1/3
    assert coco_ap(gt[:1], shifted, list(range(C)), iou_type="bbox")["AP50"] == pytest.approx(0.0)
    metric = DetectionAP(iou_type="bbox")
    metric.update([{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([2])}],
                  [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2]), "image_id": 0}])
    metric.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}],
                  [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([2]), "image_id": 1}])
    assert float(metric.compute()["AP50"]) == pytest.approx(0.5, abs=0.02)  # one of two found, at full precision
    with pytest.raises(KeyError, match="boxes"):
        metric.update([{"masks": torch.zeros(1, 4, 4, dtype=torch.bool)}], [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1), "image_id": 2}])

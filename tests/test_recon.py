"""The recon stage: symmetric meshes, cameras, crop-frame rendering, label-free
training, evaluation helpers, and a run through the runner on a tiny dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import GT_VISIBLE_TEST_HIDDEN, GT_VISIBLE_TRAIN_HIDDEN, LabelGuard
from amodal3d.config import load_config
from amodal3d.datamodules.true_meshes import TrueMeshes
from amodal3d.lightning_modules.recon import ReconStage, load_recon
from amodal3d.metrics.camera import camera_errors
from amodal3d.metrics.chamfer import view_frame_chamfer
from amodal3d.models.camera_head import CameraHead
from amodal3d.models.mesh_decoder import SymmetricMeshDecoder
from amodal3d.models.mesh_renderer import (
    CropRenderer,
    box_in_crop,
    fit_placement,
    make_cameras,
    pixel_box_to_ndc,
    project,
)
from amodal3d.models.recon_losses import (
    azimuth_difference,
    azimuth_uniformity,
    masked_iou_loss,
    view_pairs,
    visible_iou,
)
from amodal3d.models.recon_net import ReconNet

S = 64


def _cfg(tmp_path: Path | None = None, overrides: list[str] | None = None, protocol: str = "gt-box"):
    """A small recon config; gt-box by default (the synthetic batches carry their amodal box)."""
    ov = ["model.backbone=resnet10t", "model.feat_dim=32", "model.render_size=16", "loader.num_workers=0",
          f"protocol={protocol}"]
    if tmp_path is not None:
        ov += [f"data.root={tmp_path / 'data'}", f"run.root={tmp_path / 'runs'}"]
    return load_config("recon", overrides=ov + (overrides or []))


def _ellipsoid(scale) -> tuple[torch.Tensor, torch.Tensor]:
    from pytorch3d.utils import ico_sphere

    m = ico_sphere(2)
    return m.verts_packed() * torch.tensor(scale) * 0.5, m.faces_packed()


def synthetic_batch(objects: int = 2, views: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Crops in the loader's keys: ellipsoids seen from random azimuths, cut by an eraser."""
    g = torch.Generator().manual_seed(seed)
    renderer = CropRenderer(backend="pytorch3d")
    rows: dict[str, list] = {k: [] for k in (
        "rgb", "visible", "occluder", "unknown", "category", "object_id", "crop_box", "amodal_box",
        "eval_amodal", "eval_camera")}
    for o in range(objects):
        verts, faces = _ellipsoid((1.0, 0.5 + 0.3 * o, 0.35))
        for _ in range(views):
            cam = torch.tensor([[float(torch.rand(1, generator=g)) * 360, 30.0, 2.732]])
            box_ndc = pixel_box_to_ndc(torch.tensor([[8.0, 8.0, 56.0, 56.0]]), S)
            with torch.no_grad():
                sil = renderer(verts[None], faces, cam, fit_placement(verts[None], cam, box_ndc), S)[0] > 0.5
            ys, xs = torch.nonzero(sil, as_tuple=True)
            amodal_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            occ = torch.zeros(S, S, dtype=torch.bool)
            x0 = int(xs.float().mean())
            occ[:, x0:x0 + 10] = True
            rows["rgb"].append(sil.float()[None].repeat(3, 1, 1) * torch.tensor([0.8, 0.3, 0.2]).view(3, 1, 1))
            rows["visible"].append((sil & ~occ).float()[None])
            rows["occluder"].append(occ.float()[None])
            rows["unknown"].append(occ.float()[None])
            rows["category"].append(torch.tensor(o % 2))
            rows["object_id"].append(torch.tensor(o))
            rows["crop_box"].append(torch.tensor([0.0, 0.0, S, S]))
            rows["amodal_box"].append(amodal_box)
            rows["eval_amodal"].append(sil.float()[None])
            rows["eval_camera"].append(cam[0])
    return {k: torch.stack(v) for k, v in rows.items()}




# -- models -------------------------------------------------------------------------------


def test_mesh_decoder_is_symmetric_bounded_and_normalised():
    dec = SymmetricMeshDecoder(feat_dim=8, num_categories=3, level=3, max_offset=0.1)
    assert dec.num_verts == 642
    with torch.no_grad():
        dec.head.weight.normal_(0, 5.0)
        dec.template.normal_(0, 0.1)
    out = dec(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    v = out["verts"]
    mirrored = v[:, dec.mirror] * torch.tensor([-1.0, 1.0, 1.0])
    assert torch.allclose(mirrored, v, atol=1e-6)
    assert out["offsets"].abs().max() <= 0.1 + 1e-6
    assert out["offsets"].abs().max() > 0.09  # the bound is reached, not a smaller scale
    rms = v.pow(2).sum(-1).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full((4,), 0.5), atol=1e-5)
    # different categories use different templates
    assert not torch.allclose(dec.template_verts(torch.tensor([0])), dec.template_verts(torch.tensor([1])))


def test_camera_head_ranges_full_circle_and_multiplex():
    feat = torch.randn(256, 16, requires_grad=True)
    single = CameraHead(16, hypotheses=1)(feat)
    az = single["camera"][:, 0]
    assert ((az >= 0) & (az < 360)).all()
    # a single camera starts spread over the whole circle (a collapsed start would
    # leave the azimuth prior without a gradient)
    assert azimuth_uniformity(az).item() < 1.5  # 2 = all azimuths equal
    head = CameraHead(16, hypotheses=4, elevation_range=(0.0, 60.0), distance_range=(2.2, 3.2))
    out = head(feat)
    hyp = out["hypotheses"]
    assert hyp.shape == (256, 4, 3) and out["logits"].shape == (256, 4)
    assert ((hyp[..., 1] >= 0) & (hyp[..., 1] <= 60)).all()
    assert ((hyp[..., 2] >= 2.2) & (hyp[..., 2] <= 3.2)).all()
    assert torch.equal(out["camera"], hyp[torch.arange(256), out["logits"].argmax(1)])
    out["hypotheses"][..., 0].sum().backward()
    assert feat.grad.abs().sum() > 0
    # hypothesis k stays in its sector 90k +- 45 whatever the features
    with torch.no_grad():
        head.out.weight.normal_(0, 10.0)
    wild = head(feat)["hypotheses"][..., 0]
    centre = torch.arange(4) * 90.0
    assert (azimuth_difference(wild, centre) <= 45.0 + 1e-3).all()
    with pytest.raises(ValueError, match="elevation_range"):
        CameraHead(16, elevation_range=(10.0, 5.0))


def test_multiplex_picks_the_hypothesis_that_explains_the_silhouette():
    torch.manual_seed(0)
    stage = ReconStage(_cfg(overrides=["model.camera_hypotheses=4", "model.select_size=32"])).eval()
    batch = synthetic_batch(objects=1, views=1)
    net = stage.net
    with torch.no_grad():
        out = net.encode(net.inputs(batch), batch["category"])
        # the mesh is the true ellipsoid; hypothesis 2 holds the true camera
        verts, faces = _ellipsoid((1.0, 0.5, 0.35))
        net.decoder.register_buffer("faces", faces, persistent=False)  # the ellipsoid's topology
        out["verts"] = net.decoder.normalise(verts[None])
        true = batch["eval_camera"][0]
        hyp = torch.stack([true + torch.tensor([d, 0.0, 0.0]) for d in (60.0, 100.0, 0.0, 270.0)])[None]
        out["hypotheses"] = hyp
        camera, best = net.select_camera(out, batch, net.target_box(batch))
    assert best.tolist() == [2] and torch.equal(camera[0], hyp[0, 2])


def test_tie_margin_lets_the_score_decide_only_among_near_ties():
    torch.manual_seed(0)
    over = ["model.camera_hypotheses=4", "model.select_size=32", "model.select_tie_margin=0.02"]
    stage = ReconStage(_cfg(overrides=over)).eval()
    batch = synthetic_batch(objects=1, views=1)
    net = stage.net
    assert net.break_ties
    with torch.no_grad():
        out = net.encode(net.inputs(batch), batch["category"])
        # an ellipsoid looks the same from opposite sides: hypotheses 1 and 2 tie exactly
        verts, faces = _ellipsoid((1.0, 0.5, 0.35))
        net.decoder.register_buffer("faces", faces, persistent=False)
        out["verts"] = net.decoder.normalise(verts[None])
        true = batch["eval_camera"][0]
        out["hypotheses"] = torch.stack([true + torch.tensor([d, 0.0, 0.0]) for d in (60.0, 180.0, 0.0, 270.0)])[None]
        out["logits"] = torch.tensor([[5.0, 1.0, 0.0, 4.0]])  # the clear losers score highest
        _, best = net.select_camera(out, batch, net.target_box(batch))
        assert best.tolist() == [1]
        out["logits"] = torch.tensor([[5.0, 0.0, 1.0, 4.0]])
        assert net.select_camera(out, batch, net.target_box(batch))[1].tolist() == [2]
    with pytest.raises(ValueError, match="select_tie_margin"):
        ReconStage(_cfg(overrides=["model.select_tie_margin=-0.1"]))


def test_a_checkpoint_config_from_before_a_model_key_existed_still_builds():
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(_cfg(overrides=["model.camera_hypotheses=4"]))
    del old["model"]["select_tie_margin"], old["model"]["select_tie_start_step"]
    stage = ReconStage(old)  # what load_from_checkpoint passes: the stored plain dict
    assert stage.m.select_tie_margin == 0.0 and not stage.net.break_ties


def test_fit_placement_puts_the_projection_on_the_box():
    verts, faces = _ellipsoid((1.0, 0.6, 0.4))
    verts = verts[None].repeat(3, 1, 1)
    cam = torch.tensor([[20.0, 30.0, 2.7], [200.0, 10.0, 2.4], [300.0, 50.0, 3.0]])
    box = torch.tensor([[10.0, 20.0, 50.0, 44.0], [4.0, 4.0, 60.0, 60.0], [20.0, 8.0, 44.0, 56.0]])
    target = pixel_box_to_ndc(box, S)
    place = fit_placement(verts, cam, target)
    p = make_cameras(cam, place).transform_points(verts)[..., :2]
    assert torch.allclose(p, place[:, None, :1] * project(verts, cam) + place[:, None, 1:], atol=1e-5)
    lo, hi = p.min(1).values, p.max(1).values
    centre, size = 0.5 * (lo + hi), hi - lo
    assert torch.allclose(centre, target[:, :2], atol=1e-5)
    # one uniform scale: the geometric mean of the box sides is matched exactly
    assert torch.allclose(size.prod(1), target[:, 2:].prod(1), rtol=1e-4)
    # and the rendered silhouette lands on the box in pixels (+x of NDC is the image's left)
    sil = CropRenderer(backend="pytorch3d")(verts, faces, cam, place, S) > 0.5
    for i in range(3):
        ys, xs = torch.nonzero(sil[i], as_tuple=True)
        cx, cy = (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0
        assert abs(cx - (box[i, 0] + box[i, 2]) / 2) <= 1.0 and abs(cy - (box[i, 1] + box[i, 3]) / 2) <= 1.0


def test_box_in_crop_maps_image_boxes_to_crop_pixels():
    crop = torch.tensor([[10.0, 20.0, 42.0, 52.0]])  # 32 px window -> 64 px crop
    box = torch.tensor([[18.0, 28.0, 34.0, 44.0]])
    assert torch.allclose(box_in_crop(box, crop, 64), torch.tensor([[16.0, 16.0, 48.0, 48.0]]))


# -- losses and metrics ---------------------------------------------------------------------


def test_masked_losses_ignore_occluded_pixels():
    target = torch.zeros(1, 8, 8)
    target[:, 2:6, 2:6] = 1
    occluded = torch.zeros(1, 8, 8)
    occluded[:, :, 5:] = 1
    pred = target.clone()
    pred[:, 2:6, 5:8] = 1.0  # wrong only where the pixels are occluded
    assert masked_iou_loss(pred, target, 1 - occluded).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_iou_loss(pred, target, torch.ones_like(occluded)).item() > 0.1
    assert visible_iou(pred, target, occluded).item() == pytest.approx(1.0)
    pred[:, 0, 0] = 1.0  # an observed false positive counts
    assert visible_iou(pred, target, occluded).item() < 1.0


def test_view_pairs_and_azimuth_prior():
    a, b = view_pairs(torch.tensor([3, 3, 5, 5, 7, 8]))
    assert a.tolist() == [0, 2] and b.tolist() == [1, 3]
    spread = torch.arange(0, 360, 15.0)
    assert azimuth_uniformity(spread).item() == pytest.approx(0.0, abs=1e-6)
    assert azimuth_uniformity(torch.full((8,), 40.0)).item() == pytest.approx(2.0, abs=1e-5)


def test_camera_errors_align_one_offset_per_category():
    true = torch.arange(0, 360, 15.0).repeat(2)
    cat = torch.tensor([0] * 24 + [1] * 24).float()
    pred = torch.remainder(torch.cat([true[:24] + 77.0, true[24:] - 140.0]), 360)
    rows = torch.stack(
        [cat, pred, torch.full_like(pred, 35.0), torch.full_like(pred, 2.5), true,
         torch.full_like(pred, 30.0), torch.full_like(pred, 2.732), torch.full_like(pred, float("nan"))], 1
    )
    err = camera_errors(rows, num_categories=13)
    assert err["az_err_raw"].item() == pytest.approx((77 * 24 + 140 * 24) / 48, abs=1e-3)
    assert err["az_err_aligned"].item() == pytest.approx(0.0, abs=1e-3)
    assert err["el_err"].item() == pytest.approx(5.0)
    assert "chamfer" not in err
    assert err["az_flip_share"].item() == 0.0 and err["az_quarter_share"].item() == 0.0


def test_camera_errors_count_front_back_flips_and_quarter_turns():
    true = torch.arange(0, 360, 15.0)  # 24 instances of one category
    # after the best offset (0): 14 right, 5 flipped (180), 5 turned by 90
    pred = torch.remainder(true + torch.tensor([0.0] * 14 + [180.0] * 5 + [90.0] * 5), 360)
    rows = torch.stack(
        [torch.zeros_like(pred), pred, torch.full_like(pred, 30.0), torch.full_like(pred, 2.7), true,
         torch.full_like(pred, 30.0), torch.full_like(pred, 2.7), torch.full_like(pred, float("nan"))], 1
    )
    err = camera_errors(rows, num_categories=13)
    assert err["az_flip_share"].item() == pytest.approx(5 / 24)
    assert err["az_quarter_share"].item() == pytest.approx(5 / 24)
    assert err["az_err_aligned"].item() == pytest.approx((5 * 180 + 5 * 90) / 24, abs=1e-3)


def test_symmetry_aware_azimuth_counts_the_error_to_the_nearest_view_of_the_same_picture():
    v = 24
    true = torch.arange(0, 360, 15.0).repeat(3)
    cat = torch.tensor([0] * v + [1] * v + [2] * v).float()
    flip = (torch.arange(3 * v) % 2 == 1).float() * 180.0  # every other instance seen as from behind
    pred = torch.remainder(true + 30.0 + flip, 360)
    k = torch.arange(v)
    same = torch.zeros(3 * v, v)
    same[k, k] = same[k, (k + v // 2) % v] = 1  # category 0: each view and its opposite are one picture
    same[v + k, k] = 1  # category 1: every view is its own picture
    same[2 * v:] = 1  # category 2: the same picture from every side (a turned lamp)
    fill = torch.full_like(pred, 1.0)
    rows = torch.cat([torch.stack([cat, pred, 30 * fill, 2.7 * fill, true, 30 * fill, 2.7 * fill,
                                   fill * float("nan")], 1), same], 1)
    err = camera_errors(rows, num_categories=13)
    assert err["az_err_aligned"].item() == pytest.approx(90.0, abs=1e-3)  # half the instances off by 180
    # category 0 is forgiven its flips (0 deg), category 1 is not (90), category 2 everything (0)
    assert err["az_err_symaware"].item() == pytest.approx(30.0, abs=1e-3)
    assert err["views_with_twin"].item() == pytest.approx(2 / 3)
    rows[:v, 8:] = float("nan")  # unknown: category 0 counts its flips again
    assert camera_errors(rows, num_categories=13)["az_err_symaware"].item() == pytest.approx(60.0, abs=1e-3)
    assert "az_err_symaware" not in camera_errors(rows[:, :8], num_categories=13)


def test_view_frame_chamfer_is_zero_for_the_true_mesh_and_view():
    verts, faces = _ellipsoid((1.0, 0.5, 0.3))
    cams = torch.tensor([[30.0, 30.0, 2.732], [100.0, 30.0, 2.732]])
    true = [(verts, faces), (verts, faces)]
    same = view_frame_chamfer(verts[None].repeat(2, 1, 1), faces, cams, true, cams, num_points=3000)
    # a quarter turn off: the view-centred shapes differ
    off = view_frame_chamfer(verts[None].repeat(2, 1, 1), faces, cams + torch.tensor([90.0, 0, 0]), true, cams,
                             num_points=3000)
    assert (same < 2e-3).all() and (off > 5 * same).all()


# -- the stage --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["gt-box", "gt-visible"])
def test_training_step_reads_no_hidden_labels_and_trains_everything(protocol):
    torch.manual_seed(0)
    cfg = _cfg(overrides=["model.cycle_start_step=0", "model.offset_warmup_steps=0", "model.camera_hypotheses=2",
                          "model.rgb_dropout=0.5"], protocol=protocol)
    stage = ReconStage(cfg)
    hidden = GT_VISIBLE_TRAIN_HIDDEN if protocol == "gt-visible" else ()
    batch = LabelGuard(synthetic_batch(objects=2, views=2), hidden=hidden)
    loss = stage.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    nets = {
        "encoder": stage.net.encoder, "mesh head": stage.net.decoder.head,
        "camera head": stage.net.camera_head,
    }
    if protocol == "gt-visible":  # the mesh's box is predicted, and learned by the silhouette losses
        nets["box head"] = stage.net.box_head
    else:
        assert stage.net.box_head is None
    for name, mod in nets.items():
        grads = [p.grad for p in mod.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, f"no gradient reaches the {name}"
    assert stage.net.decoder.template.grad.abs().sum() > 0


def test_gt_visible_prediction_reads_only_the_protocols_inputs():
    """Under gt-visible the mesh is placed on a box predicted from the crop: at test
    time neither the amodal box nor the unknown pixels are read, and an untrained box
    head places it on the visible box."""
    from amodal3d.models.mesh_renderer import mask_boxes, pixel_box_to_ndc

    stage = ReconStage(_cfg(overrides=["model.camera_hypotheses=2"], protocol="gt-visible")).eval()
    batch = LabelGuard(synthetic_batch(objects=1, views=2), hidden=GT_VISIBLE_TEST_HIDDEN)
    with torch.no_grad():
        sil = stage.predict_amodal(batch)
        out = stage.net(batch)
    assert sil.shape == (2, 1, S, S) and torch.isfinite(sil).all()
    vis_box = pixel_box_to_ndc(mask_boxes(synthetic_batch(objects=1, views=2)["visible"]), S)
    assert torch.allclose(out["box"], vis_box, atol=1e-6)


def test_training_step_uses_the_swap_and_cycle_terms(monkeypatch):
    torch.manual_seed(0)
    stage = ReconStage(_cfg(overrides=["model.cycle_start_step=0", "model.offset_warmup_steps=0"]))
    seen = {}
    monkeypatch.setattr(stage, "log", lambda name, value, **kw: seen.__setitem__(name, float(value)))
    stage.training_step(LabelGuard(synthetic_batch(objects=2, views=2)), 0)
    for key in ("train/swap", "train/shape_consistency", "train/cycle_camera", "train/cycle_shape",
                "train/laplacian", "train/normal", "train/edge", "train/silhouette"):
        assert key in seen and math.isfinite(seen[key]), key


def test_predict_amodal_is_a_crop_frame_silhouette():
    stage = ReconStage(_cfg()).eval()
    batch = synthetic_batch(objects=1, views=3)
    with torch.no_grad():
        prob = stage.predict_amodal(batch)
    assert prob.shape == (3, 1, S, S)
    assert float(prob.min()) >= 0 and float(prob.max()) <= 1
    # the untrained sphere is placed on the amodal box
    for i in range(3):
        ys, xs = torch.nonzero(prob[i, 0] > 0.5, as_tuple=True)
        box = batch["amodal_box"][i]
        assert abs((xs.min() + xs.max() + 1) / 2.0 - (box[0] + box[2]) / 2) <= 1.5


def test_stage_config_monitors_a_label_free_metric():
    cfg = load_config("recon")
    assert cfg.run.monitor == "val/visible_iou" and cfg.run.monitor_mode == "max"
    from amodal3d.lightning_modules.registry import get_stage

    spec = get_stage("recon")
    assert spec.method == "recon-render" and spec.module is ReconStage


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from amodal3d.datamodules.build import ensure_dataset

    root = tmp_path_factory.mktemp("recon") / "data"
    cfg = load_config("recon", debug="tiny", overrides=[f"data.root={root}"])
    ensure_dataset(cfg.data)
    return root


def _tiny_overrides(tmp_path: Path, root: Path) -> list[str]:
    return ["model.backbone=resnet10t", "model.feat_dim=32", "model.render_size=16",
            f"data.root={root}", "data.categories=[chair,car]", "data.views=6",
            "data.objects_per_split={train: 3, val: 1, test: 1}", f"run.root={tmp_path / 'runs'}"]


def test_fast_dev_run_through_the_runner(tiny_root, tmp_path):
    from amodal3d.train import train_from_args

    summary = train_from_args("recon", None, _tiny_overrides(tmp_path, tiny_root), None, debug="fdr")
    assert summary["global_step"] == 1
    assert math.isfinite(summary["metrics"]["train/loss"])
    for key in ("val/miou", "val/visible_iou", "val/az_err_raw", "val/az_err_aligned", "val/chamfer",
                "val/az_err_symaware"):
        assert key in summary["metrics"] and math.isfinite(summary["metrics"][key]), key


def test_short_run_checkpoints_logs_pictures_and_reloads(tiny_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from amodal3d.train import train_from_args

    ov = _tiny_overrides(tmp_path, tiny_root) + [
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "model.mesh_log_every_n_epochs=1", "loader.num_workers=0", "trainer.check_val_every_n_epoch=1",
    ]
    summary = train_from_args("recon", None, ov, None)
    run = Path(summary["run_dir"])
    assert json.loads((run / "summary.json").read_text())["best_checkpoint"].endswith("best.ckpt")
    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "val/overlays" in events.Tags()["images"]
    assert any(t.startswith("val/meshes") for t in events.Tags()["tensors"])
    net = load_recon(summary["best_checkpoint"])
    assert isinstance(net, ReconNet) and not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        sil = net.silhouette(synthetic_batch(objects=1, views=2))
    assert sil.shape == (2, 1, S, S)
    # the bench's recon part on this run: test-split camera errors and the mesh sheet
    from amodal3d.bench import run as bench_run

    out = tmp_path / "bench"
    data_ov = [o for o in ov if o.startswith("data.")]
    assert bench_run.main(["recon", "--run", str(run), "--out", str(out), "--device", "cpu", *data_ov]) == 0
    errors = json.loads((out / "recon.json").read_text())["errors"]
    assert errors["instances"] == 12 and sorted(errors["per_category"]) == ["car", "chair"]
    assert (out / "meshes.png").is_file() and "| chair |" in (out / "recon.md").read_text()


def test_mesh_sheet_shows_every_category_with_its_true_mesh(tiny_root, tmp_path):
    from amodal3d.bench.evaluate import eval_loader
    from amodal3d.bench.meshes import camera_report, mesh_sheet

    cfg = load_config("recon", overrides=_tiny_overrides(tmp_path, tiny_root))
    stage = ReconStage(cfg)
    cases, errors = camera_report(stage, eval_loader(cfg, "val"), eval_loader(cfg), torch.device("cpu"),
                                  true_meshes=TrueMeshes(tiny_root))
    cases = {c: v[:1] for c, v in cases.items()}
    assert sorted(cases) == ["car", "chair"] and all(len(v) == 1 for v in cases.values())
    assert errors["offsets_fitted_on"] == "val" and 0 <= errors["constant"]["az_err_aligned"] <= 180
    assert errors["instances"] == 12 and 0 <= errors["az_err_aligned"] <= 180 and errors["chamfer"] > 0
    assert 0 <= errors["views_with_twin"] <= 1 and errors["az_err_symaware"] <= errors["az_err_aligned"] + 1e-6
    assert sorted(errors["per_category"]) == ["car", "chair"]
    assert cases["car"][0]["verts"].shape == (stage.net.decoder.num_verts, 3)
    png = mesh_sheet(cases, TrueMeshes(tiny_root), tmp_path / "meshes.png", size=48)
    sheet = np.asarray(Image.open(png).convert("L"))
    true_tile = sheet[18:18 + 48, 84 + 4 * 50: 84 + 4 * 50 + 48]  # row 1, the fifth tile: the true mesh
    assert (true_tile < 200).mean() > 0.05  # the true object is drawn, not a blank tile


def test_training_step_under_bf16_autocast_keeps_geometry_in_float32():
    """trainer.precision=bf16-mixed: the sparse Laplacian has no bf16 backward and the
    renderer needs float32, so geometry runs outside autocast (models.precision)."""
    cfg = load_config("recon", overrides=["model.feat_dim=32", "model.render_size=16", "model.cycle_start_step=0",
                                          "protocol=gt-box"])
    stage = ReconStage(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = stage.training_step(synthetic_batch(objects=2, views=2), 0)
        sil = stage.net.silhouette(synthetic_batch(objects=1, views=2), size=16)
    loss.backward()
    assert sil.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in stage.net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bf16_mixed_run_through_the_runner(tiny_root, tmp_path):
    from amodal3d.train import train_from_args

    summary = train_from_args("recon", None, _tiny_overrides(tmp_path, tiny_root) + ["trainer.precision=bf16-mixed"],
                              None, debug="fdr")
    assert summary["global_step"] == 1 and math.isfinite(summary["metrics"]["val/chamfer"])


def test_camera_errors_apply_offsets_fitted_on_another_split():
    """bench-recon fits the per-category azimuth offset on validation and applies it to
    test: the scored split must not choose its own offset."""
    from amodal3d.metrics.camera import camera_errors, camera_offsets

    true = torch.tensor([0.0, 90.0, 180.0, 270.0])
    rows = torch.zeros(4, 8)
    rows[:, 1], rows[:, 4] = (true + 40.0) % 360, true  # predicted azimuth = true + 40: a constant offset
    rows[:, 7] = float("nan")
    fitted = camera_offsets(rows, 2)
    assert fitted["aligned"][0] == 320 and fitted["aligned"][1] == 0  # absent category: 0
    assert float(camera_errors(rows, 2)["az_err_aligned"]) == pytest.approx(0.0, abs=1e-4)
    other = {"aligned": [0, 0], "symaware": [0, 0]}  # offsets from a split where the frames agreed
    assert float(camera_errors(rows, 2, other)["az_err_aligned"]) == pytest.approx(40.0, abs=1e-4)


def test_recon_step_bench_times_both_camera_choice_paths(tiny_root, tmp_path):
    """`python -m amodal3d.bench.recon_step`: the same batches and weights stepped with soft
    and with hard camera-choice renders; both timed, the choices and gradients compared."""
    from amodal3d.bench.recon_step import bench_recon_step, markdown
    from amodal3d.bench.evaluate import dataset_class_names

    cfg = load_config("recon", debug="tiny", overrides=_tiny_overrides(tmp_path, tiny_root) + [
        "model.camera_hypotheses=4", "model.select_size=16", "model.offset_warmup_steps=0",
        "model.cycle_start_step=0", "loader.num_workers=0", "loader.batch_size=4"])
    dataset_class_names(cfg)
    r = bench_recon_step(cfg, batches=2, repeats=1)
    assert r["batches"] == 2 and all(r[m]["seconds_per_step"] > 0 for m in ("soft", "hard"))
    h = r["hard"]
    assert 0.0 <= h["same_choice"] <= 1.0 and h["grad_rel_diff_max"] >= 0.0 and h["speedup"] > 0
    if h["same_choice"] == 1.0:  # the same cameras: the same step, bar float noise
        assert h["loss_rel_diff_max"] < 1e-4
    assert "| hard |" in markdown(r) and "| soft | " in markdown(r)
    with pytest.raises(ValueError, match="expected some of"):
        bench_recon_step(cfg, batches=1, repeats=1, modes=("soft", "fast"))
    # the native kernel renders the camera choice with the tensor path's values: the same step
    r = bench_recon_step(cfg, batches=2, repeats=1, modes=("soft", "native", "compiled+native+channels_last"))
    n = r["native"]
    assert n["same_choice"] == 1.0 and n["loss_rel_diff_max"] < 1e-5 and n["grad_rel_diff_max"] < 1e-4, n
    # the channels-last encoder: the same step up to float rounding (its choices may flip only on a near-tie)
    cl = r["compiled+native+channels_last"]
    assert cl["same_choice"] == 1.0 and cl["loss_rel_diff_max"] < 1e-4 and cl["grad_rel_diff_max"] < 1e-3, cl

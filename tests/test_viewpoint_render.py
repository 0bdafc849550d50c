"""The viewpoint and render stages: self-generated occluded renders, the estimator, the
camera-source choice, per-axis placement, the coarse-mask API for refine, label
guards, and fast_dev_runs through the runner on a tiny dataset.

Dependencies are real checkpoints of untrained stages written into run folders
under tmp_path, so the stages find them exactly as `make train` does."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from fakes import LabelGuard
from amodal3d.config import load_config, save_config
from amodal3d.dependencies import resolve_checkpoints
from amodal3d.runs import SUMMARY
from amodal3d.lightning_modules.recon import ReconStage
from amodal3d.lightning_modules.render import RenderStage, choose_camera_source, shape_prior_from_checkpoint
from amodal3d.lightning_modules.viewpoint import ViewpointStage, synthesise
from amodal3d.models.shape_prior import ShapePrior, recon_net_from_spec
from amodal3d.models.mesh_renderer import fit_placement, make_cameras, make_silhouette_renderer, pixel_box_to_ndc, project
from amodal3d.models.occlusion_synth import OccluderParams, occlusion_ratio, synth_occluders
from amodal3d.models.placement import PlacementHead, adjust_box, box_placement, placed_cameras, placed_extent

S = 64
# the data of experiments/debug/tiny.yaml, as overrides so the runner can combine them with DEBUG=fdr
TINY_DATA = ["data.categories=[chair,car]", "data.objects_per_split={train: 3, val: 1, test: 1}", "data.views=6"]
TINY = ["loader.num_workers=0", "loader.batch_size=8", *TINY_DATA]
SMALL_MODEL = {
    "recon": ["model.backbone=resnet10t", "model.feat_dim=32", "model.render_size=16", "model.camera_hypotheses=1"],
    "viewpoint": ["model.backbone=resnet10t", "model.feat_dim=32"],
    "render": ["model.render_size=16"],
}




def _ellipses(b: int = 6) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    out = []
    for i in range(b):
        a, c = 12 + 3 * i, 20 - 2 * i
        out.append((((xx - 32) / a) ** 2 + ((yy - 30) / c) ** 2 < 1).float())
    return torch.stack(out)[:, None]


# -- dependencies as run folders ------------------------------------------------------------------


def _save_run(module: L.LightningModule, root: Path, stage: str, run_id: str) -> Path:
    """A run folder holding the module's config and checkpoints/best.ckpt."""
    run = root / "default" / stage / run_id
    save_config(module.cfg, run / "config.yaml")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(module)
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(ckpt))
    (run / SUMMARY).write_text("{}")  # a finished run: dependencies are only resolved to finished runs
    return ckpt


def _cfg(stage: str, root: Path, runs: Path, extra: list[str] | None = None):
    """The stage's config with its dependencies resolved in `runs`, as the runner does."""
    ov = TINY + SMALL_MODEL[stage] + [f"data.root={root}", f"run.root={runs}"]
    return resolve_checkpoints(load_config(stage, overrides=ov + (extra or [])))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from amodal3d.datamodules.build import ensure_dataset

    root = tmp_path_factory.mktemp("vr") / "data"
    cfg = load_config("recon", overrides=[f"data.root={root}", *TINY_DATA])
    ensure_dataset(cfg.data)
    return root


@pytest.fixture(scope="module")
def recon_runs(tiny_root, tmp_path_factory):
    """A runs root with one (untrained) recon checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    ckpt = _save_run(ReconStage(_cfg("recon", tiny_root, runs)), runs, "recon", "r1")
    return runs, ckpt


@pytest.fixture(scope="module")
def batch(tiny_root):
    from amodal3d.datamodules.crops import CropDataset, collate_crops

    ds = CropDataset(tiny_root, "train", crop_size=S)
    return collate_crops([ds[i] for i in range(6)])


def _viewpoint_run(recon_runs, tiny_root, run_id: str, errors: dict | None) -> Path:
    runs, _ = recon_runs
    stage = ViewpointStage(_cfg("viewpoint", tiny_root, runs))
    if errors is not None:
        stage.camera_summary = errors
    return _save_run(stage, runs, "viewpoint", run_id)


# -- self-generated occlusion -----------------------------------------------------------------------


def test_synth_occluders_hide_the_requested_share_reproducibly():
    amodal = _ellipses()
    params = OccluderParams(count_min=1, count_max=2, ratio_min=0.2, ratio_max=0.5, tries=16)
    occ = synth_occluders(amodal, params, torch.Generator().manual_seed(3))
    ratio = occlusion_ratio(amodal, occ)
    assert ((ratio >= 0.2) & (ratio <= 0.5)).all(), ratio
    assert torch.equal(occ, synth_occluders(amodal, params, torch.Generator().manual_seed(3)))
    assert not torch.equal(occ, synth_occluders(amodal, params, torch.Generator().manual_seed(4)))
    # the occluder is the whole erased region, like the dataset's: it also covers background
    assert float((occ * (1 - amodal)).sum()) > 0
    big = synth_occluders(amodal.repeat(8, 1, 1, 1), OccluderParams(ratio_min=0.0, ratio_max=1.0, tries=1),
                          torch.Generator().manual_seed(0))
    touches_border = (big[..., 0, :].amax(-1) + big[..., -1, :].amax(-1) + big[..., :, 0].amax(-1)
                      + big[..., :, -1].amax(-1)) > 0
    assert 0 < int(touches_border.sum()) < 48  # some erasers reach a border, some float
    empty = synth_occluders(torch.zeros(2, 1, S, S), params)  # no silhouette: still a mask, no error
    assert empty.shape == (2, 1, S, S)
    with pytest.raises(ValueError, match="ratio range"):
        synth_occluders(amodal, OccluderParams(ratio_min=0.8, ratio_max=0.2))


def test_synthesised_samples_look_like_loader_crops():
    recon = recon_net_from_spec({"model": {"feat_dim": 32}, "crop_size": S})
    verts = recon.decoder.template_verts(torch.zeros(4, dtype=torch.long)) * torch.tensor([1.6, 0.7, 1.0])
    params = OccluderParams(ratio_min=0.1, ratio_max=0.6)
    s = synthesise(recon, verts, torch.zeros(4, dtype=torch.long), params, crop_margin=1.15,
                   generator=torch.Generator().manual_seed(0))
    amo, vis, occ = s["amodal"], s["visible"], s["occluder"]
    assert torch.equal(vis, amo * (1 - occ))
    assert ((s["camera"][:, 1] >= 0) & (s["camera"][:, 1] <= 60)).all()
    assert ((s["camera"][:, 2] >= 2.2) & (s["camera"][:, 2] <= 3.2)).all()
    ratio = occlusion_ratio(amo, occ)
    assert ((ratio >= 0.1) & (ratio <= 0.6)).all()
    for i in range(4):  # centred, longer side S / margin, as CropDataset frames an amodal box
        ys, xs = torch.nonzero(amo[i, 0] > 0.5, as_tuple=True)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert abs(max(w, h) - S / 1.15) <= 2.5
        assert abs((xs.min() + xs.max() + 1) / 2 - S / 2) <= 1.5 and abs((ys.min() + ys.max() + 1) / 2 - S / 2) <= 1.5
    # the label is the camera that made the picture: another camera, another silhouette
    cam2 = s["camera"] + torch.tensor([90.0, 0.0, 0.0])
    box = pixel_box_to_ndc(torch.tensor([[4.0, 4.0, 60.0, 60.0]]).repeat(4, 1), S)
    assert not torch.equal(recon.render(verts, s["camera"], box, S) > 0.5, recon.render(verts, cam2, box, S) > 0.5)


def test_gt_visible_samples_are_framed_on_their_visible_part():
    """Under gt-visible the self-generated samples are framed as the loader frames real
    crops: on the visible box, 2.5x its side, with nothing handed out as occluded."""
    recon = recon_net_from_spec({"model": {"feat_dim": 32}, "crop_size": S, "protocol": "gt-visible"})
    verts = recon.decoder.template_verts(torch.zeros(4, dtype=torch.long)) * torch.tensor([1.6, 0.7, 1.0])
    params = OccluderParams(ratio_min=0.3, ratio_max=0.6)
    s = synthesise(recon, verts, torch.zeros(4, dtype=torch.long), params, crop_margin=1.15,
                   generator=torch.Generator().manual_seed(0), visible_margin=2.5)
    assert s["occluder"].sum() == 0 and s["unknown"].sum() > 0
    assert ((s["visible"] <= s["amodal"]) & (s["visible"] * s["unknown"] == 0)).all()
    for i in range(4):
        ys, xs = torch.nonzero(s["visible"][i, 0] > 0.5, as_tuple=True)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert abs(max(w, h) - S / 2.5) <= 2.5
        assert abs((xs.min() + xs.max() + 1) / 2 - S / 2) <= 1.5 and abs((ys.min() + ys.max() + 1) / 2 - S / 2) <= 1.5


# -- the viewpoint stage ---------------------------------------------------------------------------


def test_viewpoint_needs_a_recon_checkpoint(tiny_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="make train STAGE=recon"):
        ViewpointStage(_cfg("viewpoint", tiny_root, tmp_path / "empty"))


def test_viewpoint_starts_from_recon(recon_runs, tiny_root):
    runs, _ = recon_runs
    same = ViewpointStage(_cfg("viewpoint", tiny_root, runs))
    assert same.deps["initialised_from_recon"] == ["encoder", "camera_head"]
    for a, b in zip(same.net.encoder.state_dict().values(), same.recon.encoder.state_dict().values()):
        assert torch.equal(a, b)
    multi = ViewpointStage(_cfg("viewpoint", tiny_root, runs, ["model.hypotheses=3"]))
    assert multi.deps["initialised_from_recon"] == ["encoder"] and multi.net.camera_head.k == 3
    with pytest.raises(ValueError, match="init_from_recon"):
        ViewpointStage(_cfg("viewpoint", tiny_root, runs, ["model.feat_dim=48"]))


def test_viewpoint_training_step_reads_no_hidden_labels_and_keeps_recon_frozen(recon_runs, tiny_root, batch):
    runs, _ = recon_runs
    torch.manual_seed(0)
    stage = ViewpointStage(_cfg("viewpoint", tiny_root, runs, ["model.hypotheses=2"])).train()
    bn = [m for m in stage.recon.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    stats = bn.running_mean.clone()
    loss = stage.training_step(LabelGuard(batch), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert not stage.recon.training and torch.equal(bn.running_mean, stats)
    assert all(p.grad is None and not p.requires_grad for p in stage.recon.parameters())
    for name, mod in (("encoder", stage.net.encoder), ("camera head", stage.net.camera_head)):
        assert sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None) > 0, name


def test_estimator_camera_uses_recons_selection_rule(batch):
    from amodal3d.models.viewpoint_net import estimator_camera

    torch.manual_seed(0)
    recon = recon_net_from_spec({"model": {"feat_dim": 32, "camera_hypotheses": 3, "select_size": 16},
                                 "crop_size": S, "protocol": "gt-visible"}).eval()
    with torch.no_grad():
        out = recon.encode(recon.inputs(batch), batch["category"])
        box = recon.target_box(batch, out["feat"])
        hyp = torch.tensor([[30.0, 30.0, 2.7], [150.0, 30.0, 2.7], [270.0, 30.0, 2.7]]).repeat(6, 1, 1)
        est = {"hypotheses": hyp, "camera": torch.tensor([[0.0, 0.0, 3.0]]).repeat(6, 1)}  # not the pick
        got = estimator_camera(recon, est, out["verts"], batch, box)
        want, _ = recon.select_camera({"hypotheses": hyp, "verts": out["verts"]}, batch, box)
        assert torch.equal(got, want)
        single = {"hypotheses": hyp[:, 1:2], "camera": hyp[:, 1]}
        assert torch.equal(estimator_camera(recon, single, out["verts"], batch, box), hyp[:, 1])


def test_viewpoint_fast_dev_run_through_the_runner(recon_runs, tiny_root):
    from amodal3d.train import train_from_args

    runs, _ = recon_runs
    ov = TINY + SMALL_MODEL["viewpoint"] + [f"data.root={tiny_root}", f"run.root={runs}"]
    summary = train_from_args("viewpoint", None, ov, None, debug="fdr")
    assert summary["global_step"] == 1
    metrics = summary["metrics"]
    for key in ("train/loss", "val/miou", "val/synth_camera_loss", "val/visible_iou", "val/az_err_viewpoint",
                "val/az_err_recon", "val/az_err_raw_viewpoint", "val/el_err_recon"):
        assert key in metrics and math.isfinite(metrics[key]), key


# -- camera source ----------------------------------------------------------------------------------


def test_camera_source_choice(tmp_path):
    recon = tmp_path / "recon.ckpt"
    other = tmp_path / "other.ckpt"
    # label-free: the visible-mask IoUs decide; the true-camera errors (recorded for
    # evaluation) point the other way and are not read
    vp = {"checkpoint": "vp.ckpt", "recon_checkpoint": str(recon),
          "camera_errors": {"visible_iou_viewpoint": 0.8, "visible_iou_recon": 0.7,
                            "az_err_viewpoint": 40.0, "az_err_recon": 20.0}}
    assert choose_camera_source("auto", recon, vp)[0] == "viewpoint"
    assert choose_camera_source("auto", recon, dict(vp, camera_errors={"visible_iou_viewpoint": 0.6,
                                                                        "visible_iou_recon": 0.7,
                                                                        "az_err_viewpoint": 10.0,
                                                                        "az_err_recon": 35.0}))[0] == "recon"
    only_truth = dict(vp, camera_errors={"az_err_viewpoint": 10.0, "az_err_recon": 35.0})
    assert choose_camera_source("auto", recon, only_truth)[0] == "recon"  # no label-free score: no switch
    assert choose_camera_source("auto", recon, None) == ("recon", "auto: no viewpoint checkpoint")
    source, why = choose_camera_source("auto", other, vp)  # trained on another recon: stale
    assert source == "recon" and "another recon" in why
    assert choose_camera_source("auto", recon, dict(vp, camera_errors={}))[0] == "recon"
    assert choose_camera_source("recon", recon, vp)[0] == "recon"
    assert choose_camera_source("viewpoint", other, vp)[0] == "viewpoint"
    with pytest.raises(FileNotFoundError):
        choose_camera_source("viewpoint", recon, None)
    with pytest.raises(ValueError, match="camera_source"):
        choose_camera_source("best", recon, vp)


# -- placement --------------------------------------------------------------------------------------


def test_axes_placement_puts_the_silhouette_on_both_sides_of_the_box():
    from pytorch3d.structures import Meshes
    from pytorch3d.utils import ico_sphere

    sphere = ico_sphere(2)
    verts = (sphere.verts_packed() * torch.tensor([0.5, 0.25, 0.2]))[None].repeat(2, 1, 1)
    faces = sphere.faces_packed()
    cam = torch.tensor([[30.0, 20.0, 2.7], [250.0, 40.0, 2.5]])
    box_px = torch.tensor([[10.0, 14.0, 54.0, 40.0], [20.0, 6.0, 44.0, 58.0]])
    target = pixel_box_to_ndc(box_px, S)
    place = box_placement(verts, cam, target, "axes")
    assert torch.allclose(placed_extent(verts, cam, place), target, atol=1e-4)
    # the uniform mode is recon's placement
    uni = box_placement(verts, cam, target, "uniform")
    ref = fit_placement(verts, cam, target)
    assert torch.allclose(uni, torch.cat([ref[:, :1], ref], dim=1), atol=1e-5)
    # the cameras carry the placement: rendered silhouettes fill the box in pixels
    meshes = Meshes(verts=verts, faces=faces[None].expand(2, -1, -1))
    sil = make_silhouette_renderer(S, backend="pytorch3d")(meshes, placed_cameras(cam, place)) > 0.5
    for i in range(2):
        ys, xs = torch.nonzero(sil[i], as_tuple=True)
        got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert (got - box_px[i]).abs().max() <= 1.5, (got, box_px[i])
    # identity placement = the plain camera
    ident = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).repeat(2, 1)
    p = placed_cameras(cam, ident).transform_points(verts)[..., :2]
    assert torch.allclose(p, make_cameras(cam).transform_points(verts)[..., :2], atol=1e-5)
    assert torch.allclose(p, project(verts, cam), atol=1e-5)


def test_placement_head_starts_at_the_plain_fit_and_stays_bounded():
    head = PlacementHead(8, 3, geometry_dim=2, max_log_scale=0.2, max_shift=0.1)
    feat, cat, geo = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]), torch.randn(5, 2)
    assert torch.equal(head(feat, cat, geo), torch.zeros(5, 4))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 10.0)
    res = head(feat, cat, geo)
    assert (res[:, :2].abs() <= 0.2 + 1e-6).all() and (res[:, 2:].abs() <= 0.1 + 1e-6).all()
    assert res.abs().max() > 0.09
    box = torch.tensor([[0.1, -0.2, 1.0, 0.5]])
    moved = adjust_box(box, torch.tensor([[math.log(2.0), 0.0, 0.1, -0.2]]))
    assert torch.allclose(moved, torch.tensor([[0.2, -0.3, 2.0, 0.5]]), atol=1e-6)


# -- the render stage --------------------------------------------------------------------------------


def test_render_training_step_reads_no_hidden_labels_and_trains_only_the_placement(recon_runs, tiny_root, batch):
    runs, _ = recon_runs
    torch.manual_seed(0)
    stage = RenderStage(_cfg("render", tiny_root, runs, ["model.camera_source=recon"]))
    stage.train()
    assert not stage.prior.recon.training
    loss = stage.training_step(LabelGuard(batch), 0)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prior.placement.") for n in trainable)
    head = stage.prior.placement.mlp[-1]
    assert float(head.weight.grad.abs().sum()) > 0  # the silhouette loss reaches the residual


def test_untrained_render_with_recon_camera_and_uniform_fit_is_recon_render(recon_runs, tiny_root, batch):
    runs, recon_ckpt = recon_runs
    stage = RenderStage(_cfg("render", tiny_root, runs, ["model.camera_source=recon", "model.fit=uniform"])).eval()
    recon = ReconStage.load_from_checkpoint(str(recon_ckpt)).eval()
    with torch.no_grad():
        ours, theirs = stage.predict_amodal(batch), recon.predict_amodal(batch)
        assert torch.allclose(ours, theirs, atol=1e-4)
        axes = RenderStage(_cfg("render", tiny_root, runs, ["model.camera_source=recon"])).eval().predict_amodal(batch)
    assert not torch.allclose(axes, theirs, atol=1e-2)  # the per-axis fit changes the mask


def test_render_auto_uses_the_better_camera(recon_runs, tiny_root, tmp_path):
    runs, recon_ckpt = recon_runs
    vp_runs = tmp_path / "runs"
    (vp_runs / "default").mkdir(parents=True)
    (vp_runs / "default" / "recon").symlink_to(runs / "default" / "recon", target_is_directory=True)
    vp_stage = ViewpointStage(_cfg("viewpoint", tiny_root, vp_runs))
    vp_stage.camera_summary = {"visible_iou_viewpoint": 0.9, "visible_iou_recon": 0.6}
    _save_run(vp_stage, vp_runs, "viewpoint", "v1")
    good = RenderStage(_cfg("render", tiny_root, vp_runs))
    assert good.deps["spec"]["camera_source"] == "viewpoint" and good.prior.viewpoint is not None
    for a, b in zip(good.prior.viewpoint.state_dict().values(), vp_stage.net.state_dict().values()):
        assert torch.equal(a, b)
    vp_stage.camera_summary = {"visible_iou_viewpoint": 0.5, "visible_iou_recon": 0.6}
    _save_run(vp_stage, vp_runs, "viewpoint", "v2")  # the latest run wins
    worse = RenderStage(_cfg("render", tiny_root, vp_runs))
    assert worse.deps["spec"]["camera_source"] == "recon" and worse.prior.viewpoint is None
    assert "0.600" in worse.deps["camera_choice"]
    with pytest.raises(FileNotFoundError, match="make train STAGE=viewpoint"):
        RenderStage(_cfg("render", tiny_root, runs, ["model.camera_source=viewpoint"]))


def test_render_fast_dev_run_through_the_runner(recon_runs, tiny_root):
    from amodal3d.train import train_from_args

    runs, _ = recon_runs
    ov = TINY + SMALL_MODEL["render"] + [f"data.root={tiny_root}", f"run.root={runs}"]
    summary = train_from_args("render", None, ov, None, debug="fdr")
    assert summary["global_step"] == 1
    for key in ("train/loss", "train/box", "val/miou", "val/miou_recon_render", "val/visible_iou"):
        assert key in summary["metrics"] and math.isfinite(summary["metrics"][key]), key


def test_shape_prior_from_checkpoint_gives_the_frozen_coarse_mask(recon_runs, tiny_root, batch):
    runs, _ = recon_runs
    cfg = _cfg("render", tiny_root, runs, ["model.camera_source=recon"])
    torch.manual_seed(0)
    stage = RenderStage(cfg)
    with torch.no_grad():
        for p in stage.prior.placement.parameters():
            p.normal_(0, 0.5)  # a trained-looking, non-zero residual
    ckpt = _save_run(stage, runs, "render", "p1")
    prior = shape_prior_from_checkpoint(ckpt)
    assert isinstance(prior, ShapePrior) and not prior.training
    assert not any(p.requires_grad for p in prior.parameters())
    stage.eval()
    with torch.no_grad():
        mask = prior.coarse_mask(batch)
        expected = stage.predict_amodal(batch)
        assert mask.shape == (6, 1, S, S) and 0 <= float(mask.min()) and float(mask.max()) <= 1
        assert torch.allclose(mask, expected, atol=1e-6)
        assert prior(batch)["residual"].abs().max() > 0
        # a holder rebuilds it from the spec and its own state_dict (how refine restores it)
        rebuilt = ShapePrior(prior.spec)
        rebuilt.load_state_dict(prior.state_dict())
        assert torch.allclose(rebuilt.eval().coarse_mask(batch), mask, atol=1e-6)
        assert shape_prior_from_checkpoint(ckpt).coarse_mask(batch, size=32).shape == (6, 1, 32, 32)
    prior.train()  # a holder in training mode must not wake the frozen networks
    assert not prior.recon.training


# -- label-free model selection -------------------------------------------------------------------


def _scrambled(batch: dict) -> dict:
    """The batch with every evaluation-only entry (amodal masks, true cameras) replaced by noise."""
    g = torch.Generator().manual_seed(0)
    out = dict(batch)
    for k, v in batch.items():
        if k.startswith("eval_"):
            out[k] = (torch.rand(v.shape, generator=g) * (360.0 if k == "eval_camera" else 1.0)).to(v.dtype)
    return out


def test_label_free_monitors_ignore_the_hidden_labels(recon_runs, tiny_root, batch):
    """What recon, viewpoint and render choose checkpoints and camera sources by does not
    change when the amodal masks and true cameras of the batch are replaced by noise."""
    runs, _ = recon_runs
    stages = {
        ReconStage(_cfg("recon", tiny_root, runs)): ("visible_iou",),
        ViewpointStage(_cfg("viewpoint", tiny_root, runs)): ("synth_camera_loss", "visible_iou", "visible_iou_recon"),
        RenderStage(_cfg("render", tiny_root, runs, ["model.camera_source=recon"])): ("visible_iou",),
    }
    for stage, names in stages.items():
        stage.eval()
        values = []
        for b in (batch, _scrambled(batch)):
            with torch.no_grad():
                stage.validation_step(b, 0)
            values.append([float(stage.eval_metrics["val"][n].compute()) for n in names])
            for n in names:
                stage.eval_metrics["val"][n].reset()
        assert values[0] == values[1] and all(math.isfinite(v) for v in values[0]), type(stage).__name__
    assert load_config("recon").run.monitor == "val/visible_iou"
    assert load_config("render").run.monitor == "val/visible_iou"
    assert load_config("viewpoint").run.monitor == "val/synth_camera_loss"

"""The refine stage: the region-specific network and losses, the injectable 3D prior
(recon and render fallbacks, caching, reload without the prior's checkpoints), the
evaluation-only true-camera variant, the 2D-only ablation, the bench rows, and
runs through the runner on a tiny dataset."""

from __future__ import annotations


import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from amodal3d.config import load_config
from amodal3d.bench.ours import OURS, OURS_TRUE_CAMERA, ours_checkpoint, ours_rows
from amodal3d.bench.true_camera import fit_camera_map
from amodal3d.dependencies import resolve_checkpoints
from amodal3d.lightning_modules.refine import RefineStage, build_prior, map_true_camera
from amodal3d.models.mesh_renderer import set_silhouettes_without_grad
from amodal3d.lightning_modules.refine_2d import Refine2DStage
from amodal3d.models.refine_net import RefineNet, loss_regions, region_losses, soft_edges
from amodal3d.models.shape_prior import ReconShapePrior, RenderShapePrior
from fakes import GT_VISIBLE_TRAIN_HIDDEN, LabelGuard, build_fake_dataset, tiny_overrides, write_run

S = 32
SMALL = ["model.base_channels=4", "model.depth=2", "model.prior_render_size=16", "loader.batch_size=8"]
RECON_SMALL = ["model.backbone=resnet10t", "model.feat_dim=16", "model.render_size=16", "model.ico_level=2"]


class BlurPrior(torch.nn.Module):
    """A stand-in 3D prior: the blurred visible mask; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.rows = 0
        self.cameras: list[torch.Tensor] = []
        self.w = torch.nn.Parameter(torch.ones(()))

    def coarse_mask(self, batch, camera=None):
        self.calls += 1
        self.rows += batch["visible"].shape[0]
        if camera is not None:
            self.cameras.append(camera)
        return (F.avg_pool2d(batch["visible"].float(), 5, 1, 2) * self.w).clamp(0, 1)

    def camera(self, batch):
        return torch.zeros(batch["visible"].shape[0], 3)




def crop_batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Crops in the loader's keys: a disc cut by a vertical band occluder."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    amodal, occ = [], []
    for i in range(b):
        r = 8 + 4 * float(torch.rand(1, generator=g))
        amodal.append((((yy - S / 2) ** 2 + (xx - S / 2) ** 2) <= r * r).float())
        o = torch.zeros(S, S)
        x0 = 12 + i
        o[:, x0:x0 + 8] = 1
        occ.append(o)
    amodal, occ = torch.stack(amodal)[:, None], torch.stack(occ)[:, None]
    return {
        "rgb": torch.rand(b, 3, S, S, generator=g), "visible": amodal * (1 - occ), "occluder": occ,
        "category": torch.arange(b) % 2, "object_id": torch.arange(b), "index": torch.arange(b),
        "crop_box": torch.tensor([[0.0, 0.0, S, S]]).repeat(b, 1),
        "amodal_box": torch.tensor([[4.0, 4.0, 28.0, 28.0]]).repeat(b, 1),
        "image_visible": amodal * (1 - occ), "image_occluder": occ, "amodal": amodal, "eval_amodal": amodal,
        "eval_image_amodal": amodal, "eval_camera": torch.tensor([[30.0, 30.0, 2.732]]).repeat(b, 1),
    }


def refine_cfg(*extra: str, stage: str = "refine"):
    return load_config(stage, overrides=SMALL + ["loader.crop_size=32", *extra])


# -- the network and its losses ---------------------------------------------------------------


def test_soft_edges_peak_on_the_outline_only():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 1
    e = soft_edges(m)
    assert e.shape == m.shape and float(e.max()) == pytest.approx(1.0)
    assert float(e[..., 7, 7]) < 1e-5 and float(e[..., 0, 0]) < 1e-5  # inside and far outside: flat
    assert float(e[..., 7, 4]) > 0.4 and float(e[..., 7, 3]) > 0.4  # on both sides of the step


def test_region_specific_output_keeps_the_visible_mask_and_the_gate():
    torch.manual_seed(0)
    batch = crop_batch()
    net = RefineNet(4, 2, gate="occluded")
    with torch.no_grad():
        net.unet.head.bias.fill_(-50.0)  # a net that wants to predict nothing...
        lo = net(batch["rgb"], batch["visible"], batch["occluder"], torch.zeros_like(batch["visible"]))["prob"]
        net.unet.head.bias.fill_(50.0)  # ...and one that wants everything
        hi = net(batch["rgb"], batch["visible"], batch["occluder"], torch.zeros_like(batch["visible"]))["prob"]
    vis, occ = batch["visible"] > 0.5, batch["occluder"] > 0.5
    assert bool((lo[vis] > 0.5).all()) and bool((hi[vis] > 0.5).all())  # visible ⊆ output
    assert bool((hi[~vis & ~occ] < 0.5).all())  # never grows where nothing can hide it
    assert bool((hi[~vis & occ] > 0.5).all()) and bool((lo[~vis] < 0.5).all())  # the occluded region is free
    free = RefineNet(4, 2, gate="outside_visible")
    with torch.no_grad():
        free.unet.head.bias.fill_(50.0)
        everywhere = free(batch["rgb"], batch["visible"], batch["occluder"], torch.zeros_like(batch["visible"]))["prob"]
    assert bool((everywhere > 0.5).all())
    plain = RefineNet(4, 2, region_specific=False)
    with torch.no_grad():
        plain.unet.head.bias.fill_(-50.0)
        p = plain(batch["rgb"], batch["visible"], batch["occluder"], torch.zeros_like(batch["visible"]))["prob"]
    assert bool((p[vis] < 0.5).all())  # the plain ablation has no such guarantee


def test_loss_regions_and_separately_weighted_terms():
    batch = crop_batch(b=2)
    amodal, vis, occ = batch["eval_amodal"], batch["visible"], batch["occluder"]
    free = occ * (1 - vis)
    reg = loss_regions(amodal, vis, free, band_width=1, hidden_dilate=1)
    hidden_gt = (amodal * (1 - vis)) > 0.5
    assert bool((reg["hidden"][hidden_gt] == 1).all()) and bool((reg["hidden"] <= free).all())
    assert bool((reg["band"] <= free).all()) and bool((reg["other"] * reg["hidden"] == 0).all())
    assert torch.equal(reg["visible"], vis)
    # logits perfect everywhere except a wrong hidden part: only the hidden term (and Dice) grows
    t = amodal
    logits = torch.where(t > 0.5, torch.full_like(t, 12.0), torch.full_like(t, -12.0))
    wrong = torch.where(hidden_gt & (reg["band"] == 0), torch.full_like(t, -12.0), logits)
    out = {"logits": wrong, "prob": torch.sigmoid(wrong), "free": free}
    w = {"hidden": 2.0, "band": 2.0, "visible": 1.0, "other": 0.5, "dice": 1.0}
    terms = region_losses(out, amodal, vis, w, band_width=1, hidden_dilate=1)
    assert float(terms["hidden"]) > 1.0 and float(terms["dice"]) > 0.3
    assert float(terms["band"]) < 1e-3 and float(terms["other"]) < 1e-3 and float(terms["visible"]) < 1e-3
    expected = sum(w[k] * terms[k] for k in ("hidden", "band", "visible", "other", "dice"))
    assert float(terms["loss"]) == pytest.approx(float(expected))


# -- the stage, with an injected prior -----------------------------------------------------------


def test_training_step_reads_only_the_amodal_target_and_keeps_the_prior_frozen():
    torch.manual_seed(0)
    prior = BlurPrior()
    stage = RefineStage(refine_cfg(), prior_factory=lambda cfg: prior)
    assert stage.prior_source == {"kind": "custom"}
    stage.train()
    loss = stage.training_step(LabelGuard(crop_batch(), allowed={"amodal"}, hidden=GT_VISIBLE_TRAIN_HIDDEN), 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in stage.net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert prior.w.grad is None and not prior.w.requires_grad and prior.calls == 1
    # the coarse mask is a residual prior: the true amodal mask as coarse input lowers the loss
    stage.eval()
    batch = crop_batch()
    with torch.no_grad():
        good = stage.refine_terms(batch, batch["eval_amodal"])["loss"]
        bad = stage.refine_terms(batch, torch.zeros_like(batch["visible"]))["loss"]
    assert float(good) < 0.5 * float(bad)
    stage.train()
    with pytest.raises(AssertionError, match="label key .amodal."):
        stage.training_step(LabelGuard(crop_batch()), 0)


def test_training_step_with_the_recon_prior_reads_no_other_hidden_label():
    from amodal3d.models.recon_net import ReconNet

    torch.manual_seed(0)
    # an untrained mesh is near the template sphere: only soft edges tell two cameras apart
    rcfg = load_config("recon", overrides=RECON_SMALL + ["loader.crop_size=32", "model.silhouette_without_grad=soft"])
    net = ReconNet(rcfg.model, crop_size=32, protocol="gt-visible")
    stage = RefineStage(refine_cfg(), prior_factory=lambda cfg: ReconShapePrior(net, 16))
    assert not any(p.requires_grad for p in stage.prior.parameters())
    stage.train()
    assert not stage.prior.training  # frozen: BatchNorm statistics stay the checkpoint's
    loss = stage.training_step(LabelGuard(crop_batch(), allowed={"amodal"}, hidden=GT_VISIBLE_TRAIN_HIDDEN), 0)
    loss.backward()
    assert all(p.grad is None for p in stage.prior.parameters())
    with torch.no_grad():
        coarse = stage.prior.coarse_mask(crop_batch())
        turned = stage.prior.coarse_mask(crop_batch(), camera=torch.tensor([[120.0, 10.0, 2.5]]).repeat(4, 1))
    assert coarse.shape == (4, 1, S, S) and float(coarse.max()) > 0.5
    assert not torch.allclose(coarse, turned)  # rendering from another camera changes the mask


def test_frozen_prior_runs_once_per_instance_during_fit():
    prior = BlurPrior()
    stage = RefineStage(refine_cfg(), prior_factory=lambda cfg: prior)
    stage._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    batch = crop_batch(b=4)
    stage.train()
    first = stage.coarse_mask(batch)
    again = stage.coarse_mask(batch)
    assert prior.rows == 4 and torch.equal(first, again)
    more = dict(batch, index=torch.tensor([2, 3, 4, 5]))  # two cached rows, two new ones
    stage.coarse_mask(more)
    assert prior.rows == 6
    stage.eval()  # validation has its own cache (other split, same indices)
    stage.coarse_mask(batch)
    assert prior.rows == 10
    stage._trainer = SimpleNamespace(state=SimpleNamespace(fn="test"))  # outside fit: no cache
    stage.coarse_mask(batch)
    assert prior.rows == 14


def test_true_camera_is_evaluation_only_and_mapped_into_the_learned_frame():
    prior = BlurPrior()
    stage = RefineStage(refine_cfg(), prior_factory=lambda cfg: prior)
    cmap = stage.true_camera_map.clone()
    cmap[1] = torch.tensor([-1.0, 40.0, 5.0, 0.1])
    stage.true_camera_map = cmap
    stage.camera_source = "true"
    batch = crop_batch(b=2)
    with torch.no_grad():
        stage.predict_amodal(batch)
    cam = prior.cameras[-1]
    assert torch.allclose(cam[0], torch.tensor([30.0, 30.0, 2.732]))  # category 0: identity
    assert torch.allclose(cam[1], torch.tensor([10.0, 35.0, 2.832]), atol=1e-4)  # -30 + 40
    with pytest.raises(RuntimeError, match="evaluation only"):
        stage.training_step(crop_batch(), 0)


def test_fit_camera_map_recovers_offsets_and_mirroring():
    true = torch.stack([torch.arange(0, 360, 15.0), torch.full((24,), 30.0), torch.full((24,), 2.732)], 1)
    true = true.repeat(2, 1)
    cat = torch.tensor([0] * 24 + [3] * 24)
    pred = true.clone()
    pred[:24, 0] = torch.remainder(true[:24, 0] + 100.0, 360)
    pred[24:, 0] = torch.remainder(-true[24:, 0] + 50.0, 360)
    pred[:, 1] += 4.0
    cmap = fit_camera_map(cat, pred, true)
    assert cmap[0].tolist() == pytest.approx([1.0, 100.0, 4.0, 0.0], abs=1e-4)
    assert cmap[3].tolist() == pytest.approx([-1.0, 50.0, 4.0, 0.0], abs=1e-4)
    assert cmap[5].tolist() == [1.0, 0.0, 0.0, 0.0]
    mapped = map_true_camera(true, cat, cmap)
    assert torch.allclose(mapped[:, 0], pred[:, 0], atol=1e-4)


def test_refine_2d_mirrors_refine_without_the_prior():
    a, b = load_config("refine"), load_config("refine_2d")
    assert b.model.prior == "none" and a.model.prior != "none"
    ma, mb = dict(a.model), dict(b.model)
    ma.pop("prior"), mb.pop("prior")
    assert ma == mb
    for section in ("trainer", "optim", "run", "loader"):
        assert a[section] == b[section], section
    stage = Refine2DStage(refine_cfg(stage="refine_2d"), prior_factory=lambda cfg: BlurPrior())
    assert stage.prior is None
    batch = crop_batch()
    assert torch.equal(stage.coarse_mask(batch), torch.zeros_like(batch["visible"]))
    with pytest.raises(ValueError, match="model.prior must be 'none'"):
        Refine2DStage(refine_cfg("model.prior=recon", stage="refine_2d"))
    from amodal3d.lightning_modules.registry import get_stage

    assert get_stage("refine_2d").method == "2D-only (no 3D prior)"


def test_a_missing_prior_names_the_command(tmp_path):
    cfg = refine_cfg(f"run.root={tmp_path / 'runs'}")
    with pytest.raises(FileNotFoundError, match="make train STAGE=recon"):
        resolve_checkpoints(cfg)  # the runner
    with pytest.raises(FileNotFoundError, match="needs a recon checkpoint.*run.checkpoints.recon"):
        build_prior(cfg)  # a module given no checkpoint does not search runs/
    with pytest.raises(FileNotFoundError, match="make train STAGE=render"):
        resolve_checkpoints(refine_cfg(f"run.root={tmp_path / 'runs'}", "model.prior=render"))
    with pytest.raises(FileNotFoundError, match="make train STAGE=refine"):
        ours_checkpoint("default", str(tmp_path / "runs"))
    rows = ours_rows("default", str(tmp_path / "runs"))
    assert [r.name for r in rows] == [OURS, OURS_TRUE_CAMERA] and all(r.status == "not trained" for r in rows)


# -- with checkpoints and the runner on a tiny dataset --------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny fake dataset and a recon checkpoint (untrained) in a runs folder."""
    from amodal3d.lightning_modules.recon import ReconStage

    tmp = tmp_path_factory.mktemp("refine")
    build_fake_dataset(tmp)
    torch.manual_seed(0)
    recon = ReconStage(load_config("recon", overrides=data_ov(tmp) + RECON_SMALL))
    write_run(recon, tmp / "runs", "recon")
    return tmp


def data_ov(tmp: Path) -> list[str]:
    """The fake dataset's config (built with the `tiny` preset's categories)."""
    return tiny_overrides(tmp) + ["data.categories=[chair,car]"]


def _ov(tmp: Path, *extra: str) -> list[str]:
    return data_ov(tmp) + SMALL + list(extra)


def test_fast_dev_run_of_refine_and_refine_2d(tiny):
    from amodal3d.train import train_from_args

    summary = train_from_args("refine", None, _ov(tiny), None, debug="fdr")
    assert summary["global_step"] == 1 and math.isfinite(summary["metrics"]["train/loss"])
    saved = OmegaConf.load(Path(summary["run_dir"]) / "config.yaml")  # the runner records what it resolved
    assert saved.run.checkpoints.recon == str((tiny / "runs/default/recon/r1/checkpoints/best.ckpt").resolve())
    for key in ("val/miou", "val/miou_occ", "val/coarse_miou", "train/hidden", "train/band"):
        assert key in summary["metrics"] and math.isfinite(summary["metrics"][key]), key
    summary = train_from_args("refine_2d", None, _ov(tiny), None, debug="fdr")
    assert summary["global_step"] == 1 and "val/coarse_miou" not in summary["metrics"]


def test_checkpoint_reloads_without_the_recon_run_and_feeds_the_bench_rows(tiny, tmp_path):
    from amodal3d.train import train_from_args
    from amodal3d.datamodules.crops import CropDataset, collate_crops

    runs = tmp_path / "runs"
    shutil.copytree(tiny / "runs", runs)
    ov = _ov(tiny, f"run.root={runs}", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
             "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false")
    summary = train_from_args("refine", None, ov, None)
    ckpt = Path(summary["best_checkpoint"])
    assert ckpt.is_file()
    stage, found = ours_checkpoint("default", str(runs))
    assert (stage, found) == ("refine", ckpt)
    shutil.rmtree(runs / "default" / "recon")  # the refine checkpoint holds its prior
    module = RefineStage.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    assert module.prior_source["kind"] == "recon" and isinstance(module.prior, ReconShapePrior)
    batch = collate_crops([CropDataset(tiny / "data", "test", crop_size=64)[i] for i in range(3)])
    with torch.no_grad():
        p1 = module.predict_amodal(batch)
        p2 = RefineStage.load_from_checkpoint(str(ckpt), map_location="cpu").eval().predict_amodal(batch)
    assert torch.equal(p1, p2) and bool(((p1 > 0.5) >= (batch["visible"] > 0.5)).all())
    # the bench rows: Ours is this refine run; the true-camera row calibrates on the val split
    rows = {r.name: r for r in ours_rows("default", str(runs))}
    assert rows[OURS].status == "ok" and rows[OURS].checkpoint == ckpt
    cfg = load_config(None, overrides=data_ov(tiny) + [f"run.root={runs}"])
    truecam = rows[OURS_TRUE_CAMERA].load(cfg, torch.device("cpu"))
    assert truecam.camera_source == "true"
    set_silhouettes_without_grad(truecam, "soft")  # a tiny run's mesh is near a sphere: see soft edges move
    set_silhouettes_without_grad(module, "soft")
    with torch.no_grad():
        p1 = module.predict_amodal(batch)
        p3 = truecam.predict_amodal(batch)
    assert p3.shape == p1.shape and not torch.equal(p3, p1)
    from amodal3d.bench.evaluate import eval_loader, evaluate_module  # what the bench does with a row

    res = evaluate_module(truecam, eval_loader(cfg), torch.device("cpu"), max_batches=1)
    assert math.isfinite(float(res["miou"]))


def test_auto_prior_uses_the_render_checkpoint_and_reloads_from_its_spec(tiny, tmp_path):
    from amodal3d.lightning_modules.render import RenderStage

    runs = tmp_path / "runs"
    shutil.copytree(tiny / "runs", runs)
    render = RenderStage(resolve_checkpoints(load_config("render", overrides=data_ov(tiny) + [
        f"run.root={runs}", "model.camera_source=recon"])))
    write_run(render, runs, "render")
    stage = RefineStage(resolve_checkpoints(load_config("refine", overrides=_ov(tiny, f"run.root={runs}"))))
    assert isinstance(stage.prior, RenderShapePrior) and stage.prior_source["kind"] == "render"
    assert set(stage.prior_stage_modules()) == {"recon", "render"}
    ckpt = write_run(stage, runs, "refine")
    shutil.rmtree(runs / "default" / "render")
    shutil.rmtree(runs / "default" / "recon")
    again = RefineStage.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    batch = crop_batch()
    batch["crop_box"] = torch.tensor([[0.0, 0.0, 64.0, 64.0]]).repeat(4, 1)
    batch = {k: (F.interpolate(v, size=64) if v.ndim == 4 else v) for k, v in batch.items()}
    with torch.no_grad():
        assert torch.equal(stage.eval().predict_amodal(batch), again.predict_amodal(batch))
        set_silhouettes_without_grad(again, "soft")  # a tiny run's mesh is near a sphere: see soft edges move
        coarse = again.prior.coarse_mask(batch)
        turned = again.prior.coarse_mask(batch, camera=torch.tensor([[120.0, 10.0, 2.5]]).repeat(4, 1))
    assert coarse.shape == (4, 1, 64, 64) and not torch.allclose(coarse, turned)

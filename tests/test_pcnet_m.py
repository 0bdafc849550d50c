"""The Deocclusion (PCNet-M) baseline: self-supervision without amodal labels,
the eraser protocol, inference at the known occluder, and the real runner."""

from __future__ import annotations

from pathlib import Path

import math

import pytest
import torch
import torch.nn.functional as F

from amodal3d.config import ConfigError, load_config
from fakes import LabelGuard, fake_objects, tiny_overrides
from amodal3d.lightning_modules.baselines.pcnet_m import STAGE, PCNetMModule
from amodal3d.lightning_modules.registry import get_stage
from amodal3d.models.unet import UNet


# ---------------------------------------------------------------- shared tiny dataset helpers


def tiny_config(tmp_path: Path, *extra: str, stage: str = "pcnet_m", debug: str = "tiny"):
    return load_config(stage, debug=debug, overrides=tiny_overrides(tmp_path, "model.base_channels=4", "model.depth=2", *extra))


def build_fake_dataset(cfg) -> dict:
    """Build cfg.data with the stand-in source; ensure_dataset later finds it built."""
    from amodal3d.datamodules.build import build_dataset

    return build_dataset(cfg.data, progress=False, load_objects=fake_objects)


# ---------------------------------------------------------------- unit tests




def disk_batch(b: int, s: int = 32, seed: int = 0) -> dict:
    """Disks (amodal) partly hidden by another disk in front (occluded); visible = disk ∖ occluder."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")

    def disks(cy, cx, r):
        return ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= r[:, None, None] ** 2)[:, None]

    r = torch.rand(b, generator=g) * s * 0.12 + s * 0.2
    cy, cx = (torch.rand(2, b, generator=g) - 0.5) * s * 0.2 + s / 2
    angle = torch.rand(b, generator=g) * 2 * torch.pi
    dist = r * (0.9 + 0.6 * torch.rand(b, generator=g))
    r_occ = r * (0.8 + 0.4 * torch.rand(b, generator=g))
    amodal = disks(cy, cx, r)
    occ = disks(cy + dist * torch.sin(angle), cx + dist * torch.cos(angle), r_occ)
    visible = amodal & ~occ
    rgb = torch.rand(b, 3, 1, 1, generator=g).expand(b, 3, s, s) * visible
    return {"rgb": rgb.float(), "visible": visible.float(), "occluder": occ.float(),
            "category": torch.zeros(b, dtype=torch.long), "eval_amodal": amodal.float()}


def small_module(protocol: str = "gt-box", **model) -> PCNetMModule:
    overrides = [f"model.{k}={v}" for k, v in {"base_channels": 4, "depth": 2, **model}.items()]
    return PCNetMModule(load_config("pcnet_m", overrides=overrides + [f"protocol={protocol}"]))


def test_stage_is_registered_as_deocclusion():
    spec = get_stage("pcnet_m")
    assert spec is STAGE and spec.method == "Deocclusion" and spec.data == "crops"
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("pcnet_m", overrides=["model.eraser_prob=0.5"])
    with pytest.raises(ValueError, match="eraser_front_prob"):
        small_module(eraser_front_prob=1.5)


def test_unet_keeps_any_input_size():
    net = UNet(5, 1, base_channels=4, depth=3)
    assert net(torch.rand(2, 5, 37, 45)).shape == (2, 1, 37, 45)


def test_training_step_reads_no_evaluation_key():
    m = small_module()
    b = disk_batch(6)
    batch = LabelGuard({k: v for k, v in b.items()})  # eval_amodal present, but raises on access
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.net.parameters() if p.requires_grad)
    # the labels do not matter: the same batch with a different amodal mask gives the same loss
    torch.manual_seed(0)
    l1 = m.pcnet_loss(b["visible"], b["rgb"])
    torch.manual_seed(0)
    l2 = m.training_step({"visible": b["visible"], "rgb": b["rgb"]}, 0)
    assert torch.equal(l1, l2)


def test_erasers_are_other_instances_in_front_with_probability_08():
    m = small_module(eraser_shift=0.0, eraser_scale_min=1.0, eraser_scale_max=1.0)
    b = 4000
    visible = torch.zeros(b, 1, 8, 8)
    visible.view(b, -1)[torch.arange(b), torch.arange(b) % 64] = 1  # instance i: pixel i % 64
    torch.manual_seed(1)
    eraser, front = m.sample_erasers(visible)
    assert abs(front.float().mean().item() - 0.8) < 0.03
    src = eraser.view(b, -1).argmax(1)
    assert torch.equal(eraser.view(b, -1).sum(1), torch.ones(b))  # an unshifted copy of one mask
    assert (src != torch.arange(b) % 64).float().mean() > 0.95  # of another instance, not itself


def test_loss_is_weighted_inside_the_eraser_and_handles_behind():
    m = small_module(inmask_weight=5.0, outmask_weight=1.0)
    b = disk_batch(4, seed=3)
    target = b["visible"]
    eraser = torch.zeros_like(target)
    eraser[:, :, 8:20, 8:20] = 1
    front = torch.tensor([True, True, False, False])
    m.sample_erasers = lambda v, generator=None: (eraser, front)
    torch.manual_seed(0)
    loss = m.pcnet_loss(target, b["rgb"])
    # the independent computation: behind erasers lose the target's pixels, inputs are modal ∖ eraser
    e = torch.where(front[:, None, None, None], eraser, eraser * (1 - target))
    logits = m.net(torch.cat([target * (1 - e), e, b["rgb"] * (1 - e)], 1))
    w = 5.0 * e + 1.0 * (1 - e)
    want = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).sum() / w.sum()
    assert torch.allclose(loss, want, atol=1e-6)
    m.cfg.model.inmask_weight = 1.0
    assert not torch.allclose(m.pcnet_loss(target, b["rgb"]), loss)


def test_predict_amodal_completes_only_inside_the_occluder():
    m = small_module().eval()
    b = disk_batch(5, seed=4)
    with torch.no_grad():
        p = m.predict_amodal(b)
    assert p.shape == (5, 1, 32, 32) and float(p.min()) >= 0 and float(p.max()) <= 1
    outside = b["occluder"] < 0.5
    assert torch.equal(p[outside], b["visible"][outside])


def test_gt_visible_prediction_erases_everything_outside_the_visible_mask():
    """No eraser is handed out under gt-visible: PCNet-M may complete anywhere outside
    the visible mask, keeps the visible mask, and never reads the occluded channel."""
    m = small_module("gt-visible").eval()
    b = disk_batch(5, seed=4)
    guarded = LabelGuard({k: v for k, v in b.items() if k != "occluder"}, hidden=("amodal_box", "unknown"))
    with torch.no_grad():
        p = m.predict_amodal(guarded)
        logits = m(b["visible"], 1 - b["visible"], b["rgb"])
    vis = b["visible"] > 0.5
    assert torch.equal(p[vis], torch.ones_like(p[vis]))
    assert torch.allclose(p[~vis], torch.sigmoid(logits)[~vis])


def test_the_label_free_monitor_is_the_completion_loss_with_fixed_erasers():
    m = small_module("gt-visible").eval()
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    m.evaluate_batch = lambda batch, metric: None  # the amodal score is logged, not monitored
    b = disk_batch(6, seed=5)
    runs = []
    for _ in range(2):
        with torch.no_grad():
            m.validation_step(LabelGuard(b), 0)
        completion = m.eval_metrics["val"]["completion_loss"]
        runs.append(float(completion.compute()))
        completion.reset()
    assert runs[0] == runs[1] and math.isfinite(runs[0]) and runs[0] > 0  # same erasers, no amodal label
    cfg = load_config("pcnet_m")
    assert cfg.run.monitor == "val/completion_loss" and cfg.run.monitor_mode == "min"


def _iou(pred, gt):
    inter = (pred & gt).flatten(1).sum(1).float()
    return (inter / (pred | gt).flatten(1).sum(1).clamp_min(1)).mean().item()


def test_self_supervised_training_beats_the_visible_floor():
    """Trained on visible masks only, PCNet-M completes disks hidden behind other disks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady timing on a shared CPU
    try:
        torch.manual_seed(0)
        m = small_module(base_channels=8, use_rgb="false")
        test = disk_batch(64, seed=7)
        amodal = test["eval_amodal"] > 0.5
        floor = _iou(test["visible"] > 0.5, amodal)
        m.eval()
        with torch.no_grad():
            untrained = _iou(m.predict_amodal(test) > 0.5, amodal)
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        m.train()
        for step in range(100):
            b = disk_batch(16, seed=100 + step)
            # self-supervised: the visible masks are the only input and target
            loss = m.pcnet_loss(b["visible"], None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            got = _iou(m.predict_amodal(test) > 0.5, amodal)
    finally:
        torch.set_num_threads(threads)
    assert untrained < floor + 0.05 < floor + 0.1 < got, (untrained, floor, got)


# ---------------------------------------------------------------- through the real runner


def test_short_run_checkpoint_reloads_for_the_bench(tmp_path):
    """`make train STAGE=pcnet_m` path on a tiny built dataset: checkpoint, reload, same outputs."""
    from amodal3d.train import train
    from amodal3d.datamodules.crops import CropDataModule

    cfg = tiny_config(tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                      "trainer.enable_progress_bar=false")
    build_fake_dataset(cfg)
    summary = train(cfg)
    assert summary["stage"] == "pcnet_m" and Path(summary["best_checkpoint"]).is_file()
    assert "val/miou" in summary["metrics"] and 0 <= summary["metrics"]["val/miou"] <= 1
    loaded = PCNetMModule.load_from_checkpoint(summary["best_checkpoint"], map_location="cpu").eval()
    dm = CropDataModule(cfg.data, cfg.loader)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    state = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    fresh = PCNetMModule(cfg)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(loaded.predict_amodal(batch), fresh.eval().predict_amodal(batch))


def test_fast_dev_run_on_real_synth13(tmp_path):
    """fast_dev_run through the runner on the real default source."""
    from amodal3d.train import train

    cfg = tiny_config(tmp_path, "data.categories=[chair,car]", debug="fdr")
    summary = train(cfg)
    assert summary["stage"] == "pcnet_m" and summary["global_step"] == 1

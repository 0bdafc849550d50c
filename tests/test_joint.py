"""The joint stage: starts from the stage checkpoints (clear errors naming the
command when one is missing), per-stage learning rates and freezing, end-to-end
gradients into the 3D prior, checkpoints that load like refine's, the Ours choice,
and a fast_dev_run through the runner."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from amodal3d.config import load_config
from fakes import GT_VISIBLE_TRAIN_HIDDEN, LabelGuard, build_fake_dataset
from amodal3d.lightning_modules.joint import JointStage
from amodal3d.bench.ours import load_stage_module, ours_checkpoint
from amodal3d.dependencies import resolve_checkpoints
from amodal3d.lightning_modules.refine import RefineStage
from amodal3d.models.shape_prior import ReconShapePrior
from fakes import write_run
from test_refine import RECON_SMALL, SMALL, data_ov


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny fake dataset, a recon checkpoint and a refine checkpoint built on it (untrained)."""
    from amodal3d.lightning_modules.recon import ReconStage

    tmp = tmp_path_factory.mktemp("joint")
    build_fake_dataset(tmp)
    torch.manual_seed(0)
    write_run(ReconStage(load_config("recon", overrides=data_ov(tmp) + RECON_SMALL)), tmp / "runs", "recon")
    refine_cfg = load_config("refine", overrides=data_ov(tmp) + [f"run.root={tmp / 'runs'}", *SMALL])
    refine = RefineStage(resolve_checkpoints(refine_cfg))
    with torch.no_grad():
        for p in refine.net.parameters():
            p.add_(0.01)  # distinguishable from a fresh init
    write_run(refine, tmp / "runs", "refine")
    return tmp


def _cfg(tmp: Path, runs: Path | None = None, *extra: str):
    """joint's config with its dependencies resolved, as the runner does."""
    ov = data_ov(tmp) + [f"run.root={runs or tmp / 'runs'}", "loader.batch_size=8", *extra]
    return resolve_checkpoints(load_config("joint", overrides=ov))


def _batch(tmp: Path, n: int = 4) -> dict:
    from amodal3d.datamodules.crops import CropDataset, collate_crops

    ds = CropDataset(tmp / "data", "train", crop_size=64, targets=("amodal",))  # joint trains on amodal masks
    return collate_crops([ds[i] for i in range(n)])


def test_missing_stage_checkpoints_name_the_command(tiny, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny / "runs", runs)
    shutil.rmtree(runs / "default" / "refine")
    with pytest.raises(FileNotFoundError, match=r"make train STAGE=refine`"):
        JointStage(_cfg(tiny, runs))
    shutil.copytree(tiny / "runs" / "default" / "refine", runs / "default" / "refine")
    shutil.rmtree(runs / "default" / "recon")
    with pytest.raises(FileNotFoundError, match=r"make train STAGE=recon`"):
        JointStage(_cfg(tiny, runs))
    with pytest.raises(ValueError, match="refine_2d"):
        JointStage(_cfg(tiny, runs, "model.prior=none"))


def test_a_seeded_experiment_starts_from_its_own_refine(tiny, tmp_path):
    """seed k shares the default 3D chain (prior_experiment) but joint starts from seed k's refine."""
    runs = tmp_path / "runs"
    shutil.copytree(tiny / "runs", runs)
    own = RefineStage(resolve_checkpoints(load_config("refine", overrides=data_ov(tiny) + [f"run.root={runs}", *SMALL])))
    with torch.no_grad():
        for p in own.net.parameters():
            p.sub_(0.02)
    write_run(own, runs, "refine", experiment="seedx")
    joint = JointStage(_cfg(tiny, runs, "experiment=seedx", "model.prior_experiment=default"))
    assert Path(joint.refine_checkpoint).parts[-5] == "seedx"
    for k, v in joint.net.state_dict().items():
        assert torch.equal(v, own.net.state_dict()[k]), k
    assert isinstance(joint.prior, ReconShapePrior)  # the 3D chain still comes from the default experiment


def test_starts_from_the_checkpoints_with_per_stage_lr_and_freezing(tiny):
    joint = JointStage(_cfg(tiny, None, "model.stages.recon.lr=3e-5", "model.stages.refine.lr=7e-4"))
    refine_state = torch.load(str(tiny / "runs/default/refine/r1/checkpoints/best.ckpt"), weights_only=False)
    for k, v in joint.net.state_dict().items():
        assert torch.equal(v, refine_state["state_dict"][f"net.{k}"]), k
    assert isinstance(joint.prior, ReconShapePrior)
    # architecture settings come from the refine checkpoint, not joint.yaml
    assert joint.cfg.model.base_channels == 4 and joint.cfg.model.depth == 2
    groups = {g["name"]: g for g in joint.stage_parameter_groups()}
    assert set(groups) == {"recon", "refine"}  # no viewpoint/render in a recon-only chain
    assert groups["recon"]["lr"] == pytest.approx(3e-5) and groups["refine"]["lr"] == pytest.approx(7e-4)
    assert sum(p.numel() for p in groups["recon"]["params"]) == sum(p.numel() for p in joint.prior.parameters())
    frozen = JointStage(_cfg(tiny, None, "model.stages.recon.freeze=true"))
    assert not any(p.requires_grad for p in frozen.prior.parameters())
    assert {g["name"] for g in frozen.stage_parameter_groups()} == {"refine"}
    with pytest.raises(ValueError, match="unknown config key 'model.stages.detector'"):
        _cfg(tiny, None, "model.stages.detector.lr=1e-3")


def test_training_step_trains_the_prior_end_to_end_without_hidden_labels(tiny, monkeypatch):
    torch.manual_seed(0)
    joint = JointStage(_cfg(tiny))
    seen = {}
    monkeypatch.setattr(joint, "log", lambda name, value, **kw: seen.__setitem__(name, float(value)))
    joint.train()
    loss = joint.training_step(LabelGuard(_batch(tiny), allowed={"amodal"}, hidden=GT_VISIBLE_TRAIN_HIDDEN), 0)
    loss.backward()
    enc = [p.grad for p in joint.prior.net.encoder.parameters() if p.grad is not None]
    assert enc and sum(float(g.abs().sum()) for g in enc) > 0, "no gradient reaches the recon encoder"
    assert joint.net.unet.head.weight.grad.abs().sum() > 0
    for key in ("train/refine_loss", "train/recon_silhouette", "train/recon_laplacian", "train/hidden"):
        assert key in seen and math.isfinite(seen[key]), key
    assert seen["train/loss"] > seen["train/refine_loss"]
    # refine's loss alone also reaches the prior (through the differentiable render)
    joint.zero_grad()
    joint2 = JointStage(_cfg(tiny, None, "model.w_recon=0"))
    joint2.train()
    joint2.training_step(_batch(tiny), 0).backward()
    assert sum(float(p.grad.abs().sum()) for p in joint2.prior.parameters() if p.grad is not None) > 0


def test_checkpoint_loads_alone_and_ours_prefers_the_better_validation_score(tiny, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny / "runs", runs)
    joint = JointStage(_cfg(tiny, runs))
    ckpt = write_run(joint, runs, "joint")
    refine_ckpt = runs / "default/refine/r1/checkpoints/best.ckpt"
    for path, score in ((ckpt, 0.6), (refine_ckpt, 0.5)):
        (path.parent.parent / "summary.json").write_text(json.dumps({"best_score": score}))
    assert ours_checkpoint("default", str(runs)) == ("joint", ckpt)
    (refine_ckpt.parent.parent / "summary.json").write_text(json.dumps({"best_score": 0.6}))
    assert ours_checkpoint("default", str(runs)) == ("refine", refine_ckpt)  # joint must be better
    shutil.rmtree(runs / "default" / "recon")
    shutil.rmtree(runs / "default" / "refine")
    module = load_stage_module("joint", ckpt)
    assert isinstance(module, JointStage) and not module.training
    batch = _batch(tiny, 2)
    with torch.no_grad():
        assert torch.equal(module.predict_amodal(batch), joint.eval().predict_amodal(batch))


def test_fast_dev_run_through_the_runner(tiny):
    from amodal3d.train import train_from_args

    ov = data_ov(tiny) + ["loader.batch_size=8"]
    summary = train_from_args("joint", None, ov, None, debug="fdr")
    assert summary["global_step"] == 1
    for key in ("train/loss", "train/recon_silhouette", "val/miou", "val/coarse_miou"):
        assert key in summary["metrics"] and math.isfinite(summary["metrics"][key]), key

"""Every stage builds from a config that names its checkpoints explicitly, with no runs/
folder anywhere: a LightningModule never searches the disk layout (the runner resolves
dependencies before building it, amodal3d.dependencies)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from amodal3d.config import load_config
from fakes import build_fake_dataset
from amodal3d.lightning_modules.registry import available_stages, get_stage
from test_refine import RECON_SMALL, SMALL, data_ov

MODEL = {
    "recon": RECON_SMALL,
    "viewpoint": ["model.backbone=resnet10t", "model.feat_dim=16"],
    "render": ["model.render_size=16", "model.camera_source=viewpoint"],
    "refine": SMALL, "refine_2d": SMALL, "joint": [],
    "pcnet_m": ["model.base_channels=4", "model.depth=2"],
    "visible": ["model.fpn_channels=16", "model.mask_channels=16"],
    "maskrcnn": ["model.fpn_channels=16", "model.mask_channels=16"],
    "orcnn": ["model.fpn_channels=16", "model.mask_channels=16"],
    "bcnet": ["model.fpn_channels=16", "model.mask_channels=16"],
    "vrsp": ["model.fpn_channels=16", "model.mask_channels=16"],
}
CONSUMES = {"viewpoint": ["recon"], "render": ["recon", "viewpoint"], "refine": ["recon", "viewpoint", "render"],
            "joint": ["recon", "viewpoint", "render", "refine"]}


def _save(module: L.LightningModule, path: Path) -> str:
    """A checkpoint file anywhere (not inside a run folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return str(path)


def test_every_stage_builds_from_explicit_checkpoints_without_runs(tmp_path):
    build_fake_dataset(tmp_path)
    nowhere = tmp_path / "no-runs"
    store = tmp_path / "elsewhere"
    ckpts: dict[str, str] = {}
    built = {}
    torch.manual_seed(0)
    for stage in ("recon", "viewpoint", "render", "refine", "refine_2d", "joint", "pcnet_m", "visible", "maskrcnn", "orcnn",
                  "bcnet", "vrsp"):
        ov = data_ov(tmp_path) + [f"run.root={nowhere}", *MODEL[stage]]
        ov += [f"run.checkpoints.{dep}={ckpts[dep]}" for dep in CONSUMES.get(stage, [])]
        module = get_stage(stage).module(load_config(stage, overrides=ov))
        built[stage] = module
        ckpts[stage] = _save(module, store / f"{stage}.ckpt")
    assert set(built) >= set(available_stages()), "a new stage must be added to this test"
    assert not nowhere.exists()
    assert built["render"].deps["spec"]["camera_source"] == "viewpoint"
    assert built["refine"].prior_source["kind"] == "render"
    assert built["refine"].prior_source["checkpoints"]["render"] == ckpts["render"]
    assert built["joint"].refine_checkpoint == ckpts["refine"]
    assert built["refine_2d"].prior is None


def test_a_module_given_no_checkpoint_says_how_to_get_one(tmp_path):
    cfg = load_config("viewpoint", overrides=[f"run.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"stage viewpoint needs a recon checkpoint: set run.checkpoints.recon"):
        get_stage("viewpoint").module(cfg)
    cfg = load_config("viewpoint", overrides=[f"run.root={tmp_path}", f"run.checkpoints.recon={tmp_path / 'x.ckpt'}"])
    with pytest.raises(FileNotFoundError, match="x.ckpt"):
        get_stage("viewpoint").module(cfg)

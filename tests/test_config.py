"""Config loading: schema first, precedence of the layers, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from amodal3d.config import ConfigError, load_config, save_config


def test_layers_and_overrides_take_precedence():
    cfg = load_config(None, None, ["trainer.max_epochs=3", "data.categories=[chair,car]"])
    assert cfg.trainer.max_epochs == 3
    assert list(cfg.data.categories) == ["chair", "car"]
    # base.yaml sets these; the schema default would differ for none of them
    assert cfg.data.root == "data/synth13-erase"


def test_debug_preset_merges_after_base():
    cfg = load_config(None, None, ["trainer.max_epochs=5"], debug="tiny")
    assert list(cfg.data.categories) == ["chair", "car"]
    assert cfg.trainer.max_epochs == 5  # command line wins over the preset
    cfg = load_config(None, None, [], debug="fdr")
    assert cfg.trainer.fast_dev_run is True


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, None, ["data.veiws=3"])
    msg = str(e.value)
    assert "data.veiws" in msg and "views" in msg


def test_unknown_top_level_section_fails():
    with pytest.raises(ConfigError, match="trainr"):
        load_config(None, None, ["trainr.max_epochs=3"])


def test_mistyped_value_names_key():
    with pytest.raises(ConfigError, match="loader.batch_size"):
        load_config(None, None, ["loader.batch_size=lots"])


def test_missing_experiment_lists_available():
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, "no-such-experiment", [])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, None, ["trainer.max_epochs"])


def test_experiment_file_path_and_unknown_key_in_file(tmp_path: Path):
    exp = tmp_path / "mine.yaml"
    exp.write_text("trainer:\n  max_epochs: 7\n")
    cfg = load_config(None, str(exp), [])
    assert cfg.trainer.max_epochs == 7 and cfg.experiment == "mine"
    bad = tmp_path / "bad.yaml"
    bad.write_text("loader:\n  batchsize: 7\n")
    with pytest.raises(ConfigError) as e:
        load_config(None, str(bad), [])
    assert str(bad) in str(e.value) and "batch_size" in str(e.value)


def test_stage_less_commands_ignore_an_experiments_model_section(tmp_path: Path):
    exp = tmp_path / "ablation.yaml"
    exp.write_text("model:\n  region_specific: false\nloader:\n  batch_size: 8\n")
    cfg = load_config(None, str(exp), [])  # what `bench --exp` and `data --exp` load
    assert cfg.loader.batch_size == 8 and "region_specific" not in cfg.model
    assert load_config("refine", str(exp), []).model.region_specific is False
    with pytest.raises(ConfigError, match="region_specifc"):
        load_config("refine", str(exp), ["model.region_specifc=true"])


def test_saved_config_round_trips(tmp_path: Path):
    cfg = load_config(None, None, ["seed=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert again.seed == 7 and again.data == cfg.data
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_stage_checkpoint_can_be_named_on_the_command_line():
    """run.checkpoints.<stage>=<ckpt> (what the error for a missing dependency suggests) is accepted."""
    cfg = load_config("joint", None, ["run.checkpoints.refine=/some/refine.ckpt", "run.checkpoints.recon=/r.ckpt"])
    assert dict(cfg.run.checkpoints) == {"refine": "/some/refine.ckpt", "recon": "/r.ckpt"}
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("joint", None, ["run.checkpont.refine=/x.ckpt"])


def test_the_protocol_is_checked_and_gt_box_has_its_experiment():
    assert load_config(None).protocol == "gt-visible"
    assert load_config(None, "gt_box").protocol == "gt-box"
    with pytest.raises(ConfigError, match="protocol='gt-vis'"):
        load_config(None, None, ["protocol=gt-vis"])


def test_dict_and_list_overrides_pass_through_make_whole():
    """The Makefile's shell does no brace expansion: a dict override is one argument."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    show = 'show-args: ; @python3 -c "import sys; print(sys.argv[1:])" $(OVERRIDES)'
    ov = "data.objects_per_split={train:1,val:0} data.categories=[chair,car] loader.batch_size=4"
    out = subprocess.run(["make", "-s", "-C", str(repo), "--eval", show, "show-args", f"OVERRIDES={ov}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ov.split(" "))
    cfg = load_config(None, overrides=ov.split(" "))
    assert dict(cfg.data.objects_per_split)["val"] == 0 and list(cfg.data.categories) == ["chair", "car"]


def test_an_experiments_stages_section_changes_only_that_stage(tmp_path: Path):
    exp = tmp_path / "e.yaml"
    exp.write_text("optim:\n  lr: 0.5\nstages:\n  visible:\n    trainer:\n      max_epochs: 11\n    optim:\n      lr: 0.25\n")
    vis = load_config("visible", str(exp))
    assert vis.trainer.max_epochs == 11 and vis.optim.lr == 0.25  # the stage's section wins over the shared part
    other = load_config("maskrcnn", str(exp))
    assert other.optim.lr == 0.5 and other.trainer.max_epochs == load_config("maskrcnn").trainer.max_epochs
    assert load_config("visible", str(exp), ["optim.lr=1.0"]).optim.lr == 1.0  # the command line still wins
    assert load_config("visible", "paste").trainer.max_epochs == 7  # the paste detectors' budget
    exp.write_text("stages:\n  visible:\n    trainer:\n      max_epoch: 3\n")
    with pytest.raises(ConfigError, match="max_epoch"):
        load_config("visible", str(exp))
    exp.write_text("stages:\n  visibel:\n    trainer:\n      max_epochs: 3\n")
    with pytest.raises(ConfigError, match="stages.visibel is not a stage"):
        load_config("maskrcnn", str(exp))
    exp.write_text("stages: 3\n")
    with pytest.raises(ConfigError, match="stages"):
        load_config("visible", str(exp))


def test_real_source_experiments_import_every_model_and_the_split_file_is_a_config_key():
    """-1 (every model) passes the command-line check; EXP=nmr / EXP=shapenet set it for each
    split; data.split_file is a schema key, left out of the dataset hash while empty."""
    from amodal3d.datamodules.build import generator_config

    for exp in ("nmr", "shapenet"):
        cfg = load_config(None, exp, ["data.split_file=split.csv"])
        assert dict(cfg.data.objects_per_split) == {"train": -1, "val": -1, "test": -1}
        assert cfg.data.source == exp and cfg.data.split_file == "split.csv"
        assert generator_config(cfg.data)["split_file"] == "split.csv"
    assert "split_file" not in generator_config(load_config(None).data)
    with pytest.raises(ConfigError, match="objects_per_split.train=-2"):
        load_config(None, overrides=["data.objects_per_split.train=-2"])


def test_the_paper_sized_detector_experiment_reaches_every_detector_stage_and_builds():
    from amodal3d.lightning_modules.baselines.bcnet import BCNetStage

    for stage in ("visible", "maskrcnn", "orcnn", "bcnet", "vrsp"):
        cfg = load_config(stage, "detector_paper")
        assert cfg.model.backbone == "resnet50" and cfg.model.fpn_channels == 256 and cfg.model.max_train_minutes == 0
    assert load_config("vrsp", "detector_paper").model.prior_train_minutes == 0
    assert "backbone" not in load_config("refine", "detector_paper").model  # crop stages are untouched
    net = BCNetStage(load_config("bcnet", "detector_paper")).net  # its channel rule holds at paper size
    assert net.backbone.out_channels == 256

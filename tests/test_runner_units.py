"""Runner rules that need no training: batch split, precision, resume, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amodal3d.config import ConfigError, load_config
from amodal3d.runs import find_stage_checkpoint, list_runs
from amodal3d.train import check_precision, per_rank_batch_size, prepare_run, world_size


def _cfg(*ov):
    return load_config(None, None, list(ov))


def test_global_batch_is_split_across_processes():
    cfg = _cfg("loader.batch_size=32", "trainer.devices=4", "trainer.num_nodes=2", "trainer.accelerator=cpu")
    assert world_size(cfg) == 8
    assert per_rank_batch_size(cfg) == 4


def test_batch_that_does_not_divide_is_refused():
    cfg = _cfg("loader.batch_size=30", "trainer.devices=4", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError, match="loader.batch_size=30"):
        per_rank_batch_size(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_refused_on_cpu_with_advice():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_precision(_cfg("trainer.precision=16-mixed", "trainer.accelerator=cpu"))
    check_precision(_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=cpu"))


def test_resume_of_unknown_run_names_the_missing_checkpoint(tmp_path: Path):
    cfg = _cfg(f"run.root={tmp_path}", "run.resume=nope")
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        prepare_run(cfg)


def test_resume_picks_last_ckpt_of_that_run(tmp_path: Path):
    run = tmp_path / "default" / "recon" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg = _cfg(f"run.root={tmp_path}", "run.resume=r1")
    cfg.stage = "recon"
    out, ckpt = prepare_run(cfg)
    assert out == run and ckpt == str(run / "checkpoints" / "last.ckpt")


def test_slurm_job_id_is_the_run_id(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    cfg = _cfg(f"run.root={tmp_path}")
    cfg.stage = "recon"
    out, ckpt = prepare_run(cfg)
    assert out.name == "777" and ckpt is None


def test_missing_dependency_checkpoint_names_the_command(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="make train STAGE=recon EXP=e1"):
        find_stage_checkpoint("recon", "e1", root=str(tmp_path))


def test_latest_finished_run_is_used_and_an_unfinished_one_never(tmp_path: Path):
    """Only runs with summary.json (the runner writes it after fit returns) are dependencies."""
    import os
    import time

    for i, name in enumerate(["a", "b", "c", "d"]):
        run = tmp_path / "default" / "recon" / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("x: 1\n")
        if name != "c":  # c finished without a best checkpoint
            (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
        if name != "d":  # d is still training (its best.ckpt is there, its summary.json not yet)
            (run / "summary.json").write_text("{}")
        t = time.time() - 100 + i
        os.utime(run, (t, t))
    assert [p.name for p in list_runs(tmp_path, "default", "recon")] == ["a", "b", "c", "d"]
    assert find_stage_checkpoint("recon", "default", root=str(tmp_path)).parent.parent.name == "b"
    for name in ("a", "b"):
        (tmp_path / "default" / "recon" / name / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"run\(s\) a, b, d have no summary.json"):
        find_stage_checkpoint("recon", "default", root=str(tmp_path))




def test_a_resumed_run_keeps_the_checkpoints_it_started_with(tmp_path: Path):
    """Resolution takes the recorded path over a newer finished run; the command line wins over both."""
    from amodal3d.config import save_config
    from amodal3d.dependencies import keep_recorded_checkpoints, resolve_checkpoints

    def finished(name: str) -> Path:
        run = tmp_path / "runs" / "default" / "recon" / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("x: 1\n")
        (run / "summary.json").write_text("{}")
        (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
        return run / "checkpoints" / "best.ckpt"

    old = finished("a")
    cfg = _cfg(f"run.root={tmp_path / 'runs'}")
    cfg.stage = "viewpoint"
    resolve_checkpoints(cfg)
    run_folder = tmp_path / "runs" / "default" / "viewpoint" / "v1"
    save_config(cfg, run_folder / "config.yaml")
    import os
    import time

    new = finished("b")
    os.utime(new.parent.parent, (time.time() + 10, time.time() + 10))
    again = _cfg(f"run.root={tmp_path / 'runs'}")
    again.stage = "viewpoint"
    assert resolve_checkpoints(keep_recorded_checkpoints(again, run_folder)).run.checkpoints.recon == str(old.resolve())
    fresh = _cfg(f"run.root={tmp_path / 'runs'}")
    fresh.stage = "viewpoint"
    assert resolve_checkpoints(fresh).run.checkpoints.recon == str(new.resolve())
    given = _cfg(f"run.root={tmp_path / 'runs'}", f"run.checkpoints.recon={new}")
    given.stage = "viewpoint"
    assert keep_recorded_checkpoints(given, run_folder).run.checkpoints.recon == str(new)


def test_the_cli_prints_a_user_error_as_one_line_and_keeps_other_tracebacks(tmp_path: Path, capsys, monkeypatch):
    from amodal3d import cli
    from amodal3d.errors import ConfigError, MissingCheckpointError, UserError

    assert issubclass(ConfigError, ValueError) and issubclass(MissingCheckpointError, FileNotFoundError)
    assert cli.main(["train", "--stage", "recon", "model.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no_such_key" in err and "\n" not in err
    with pytest.raises(FileNotFoundError, match="no finished run of stage 'recon'"):
        find_stage_checkpoint("recon", "default", root=str(tmp_path))

    def broken(args):
        raise ValueError("a bug deep inside")

    with pytest.raises(UserError):
        cli.main(["--traceback", "train", "--stage", "recon", "model.no_such_key=1"])

    class Parser:  # a command whose code has a bug
        def parse_args(self, argv):
            import argparse

            return argparse.Namespace(func=broken)

    monkeypatch.setattr(cli, "build_parser", Parser)
    with pytest.raises(ValueError, match="a bug deep inside"):  # not a user error: its traceback stays
        cli.main(["stages"])


def test_relative_data_and_run_roots_follow_the_current_directory(tmp_path: Path, monkeypatch):
    """One rule for both: a relative data.root and run.root are taken from the current directory."""
    from amodal3d.runs import runs_root

    monkeypatch.chdir(tmp_path)
    assert runs_root("runs") == tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "runs" / "default" / "recon")):
        find_stage_checkpoint("recon", "default", root="runs")
    from amodal3d.datamodules.shard_format import read_manifest

    with pytest.raises(Exception, match=str(tmp_path / "data" / "x")):
        read_manifest("data/x")

"""Bad input, end to end through the CLI: every mistake a user can make in a config, an
object source, a built dataset, a predict input, a run or a SLURM request gets exit code 2
and ONE line `error: ...` on stderr naming the culprit (file, key, value or annotation),
and leaves nothing half-written behind (no manifest, shard, summary, output JSON or
script). docs/bad_input.md lists the cases.

Each case is a function `(tmp_path, shared) -> Case`; the fixtures are written by the
test under tmp_path (a fresh folder per case) or come from the module-scoped `shared`
(a tiny fake dataset and a refine_2d checkpoint, built once).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from amodal3d.categories import SYNSETS
from amodal3d.cli import main
from amodal3d.config import load_config
from amodal3d.datamodules.shard_format import MANIFEST, read_manifest, sha256_file
from amodal3d.datamodules.sources.shapenet import shapenet_split
from fakes import build_fake_dataset, fake_objects, tiny_overrides, write_run
from test_refine import SMALL, data_ov

H, W = 48, 64
ALLOWED_NEW = {".lock"}  # the builder's lock file may be left (empty, never read as data)


@dataclass
class Case:
    argv: list[str]
    culprits: list[str]  # what the one error line must name
    absent: list[Path] = field(default_factory=list)  # what must not exist afterwards (globs allowed)


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny fake dataset (data/) and a finished refine_2d run (runs/) with its checkpoint."""
    import torch

    from amodal3d.lightning_modules.refine_2d import Refine2DStage

    tmp = tmp_path_factory.mktemp("bad_input")
    build_fake_dataset(tmp)
    torch.manual_seed(0)
    ckpt = write_run(Refine2DStage(load_config("refine_2d", overrides=data_ov(tmp) + SMALL)), tmp / "runs", "refine_2d")
    return {"tmp": tmp, "data": tmp / "data", "ckpt": ckpt}


@pytest.fixture()
def real_stderr_logs(capsys):
    """Log handlers that write to the process's stderr (Lightning's "Seed set to 0", say) write
    where capsys sees them, as they would on a terminal: a log line before the error is a
    second line too."""
    import logging
    import sys

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    class CurrentStderr:  # whatever sys.stderr is when a record is written (capsys's in the test)
        def write(self, text):
            return sys.stderr.write(text)

        def flush(self):
            sys.stderr.flush()

    moved = []
    for logger in loggers:
        for h in logger.handlers:
            if type(h) is logging.StreamHandler and h.stream is not sys.stdout:
                moved.append((h, h.stream))
                h.stream = CurrentStderr()
    yield
    for h, stream in moved:  # capsys's stream may be closed by now: swap back without flushing it
        h.stream = stream


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _absent(path: Path) -> list[Path]:
    return list(path.parent.glob(path.name)) if "*" in path.name else ([path] if path.exists() else [])


# ----------------------------------------------------------------------------- config


def _cfg_case(*args: str, culprits: list[str]):
    def make(tmp: Path, shared) -> Case:
        ov = [f"data.root={tmp / 'data'}", f"run.root={tmp / 'runs'}"]
        return Case(["train", *args, *ov], culprits, [tmp / "data", tmp / "runs"])
    return make


CONFIG = {
    "config-unknown-key": _cfg_case("--stage", "recon", "model.no_such_key=1", culprits=["model.no_such_key"]),
    "config-wrong-type": _cfg_case("--stage", "recon", "trainer.max_epochs=lots",
                                   culprits=["trainer.max_epochs", "lots"]),
    "config-nan": _cfg_case("--stage", "recon", "optim.lr=nan", culprits=["optim.lr=nan", "finite"]),
    "config-negative-count": _cfg_case("--stage", "recon", "data.objects_per_split.train=-2",
                                       culprits=["data.objects_per_split.train=-2"]),
    "config-zero-batch": _cfg_case("--stage", "recon", "loader.batch_size=0", culprits=["loader.batch_size=0"]),
    "config-unknown-experiment": _cfg_case("--stage", "recon", "--exp", "no_such_exp", culprits=["no_such_exp"]),
    "config-unknown-debug-preset": _cfg_case("--stage", "recon", "--debug", "no_such_preset",
                                             culprits=["no_such_preset"]),
    "config-unknown-protocol": _cfg_case("--stage", "recon", "protocol=no_such_protocol",
                                         culprits=["protocol", "no_such_protocol"]),
    "config-override-without-equals": _cfg_case("--stage", "recon", "trainer.max_epochs",
                                                culprits=["trainer.max_epochs", "key.path=value"]),
    "config-unknown-stage": _cfg_case("--stage", "no_such_stage", culprits=["no_such_stage", "recon"]),
}


# ----------------------------------------------------------------------------- object sources (`data`)


def _data_argv(tmp: Path, source: str, folder: Path, category: str) -> list[str]:
    ov = [f"data.root={tmp / 'data'}", f"data.source={source}", f"data.source_path={folder}",
          f"data.categories=[{category}]", "data.objects_per_split={train:1,val:0,test:0}"]
    if source == "nmr":
        ov += ["data.views=24", "data.render_size=64"]
    return ["data", *ov]


def _nothing_built(tmp: Path) -> list[Path]:
    d = tmp / "data"
    return [d / MANIFEST, d / "*.h5", d / "*.done.json", d / "generator.json", d / "*.tmp"]


def _nmr_npz(tmp: Path, shape=(24, 4, 64, 64)) -> Path:
    folder = tmp / "nmr"
    folder.mkdir()
    path = folder / f"{SYNSETS['car']}_train_images.npz"
    np.savez(path, np.zeros(shape, np.float32))
    return path


def nmr_missing_folder(tmp, shared):
    return Case(_data_argv(tmp, "nmr", tmp / "no_nmr_here", "car"), [str(tmp / "no_nmr_here"), "data.source_path"],
                _nothing_built(tmp))


def nmr_truncated_npz(tmp, shared):
    path = _nmr_npz(tmp)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Case(_data_argv(tmp, "nmr", path.parent, "car"), [str(path), "truncated"], _nothing_built(tmp))


def nmr_wrong_shape(tmp, shared):
    path = _nmr_npz(tmp, shape=(25, 4, 64, 64))
    return Case(_data_argv(tmp, "nmr", path.parent, "car"), [str(path), "(25, 4, 64, 64)", "(N*24, 4, 64, 64)"],
                _nothing_built(tmp))


def _shapenet_model(tmp: Path, obj_text: str) -> tuple[Path, Path]:
    """A ShapeNetCore folder with one bench model (in the train split) whose OBJ is obj_text."""
    mid = next(f"m{i:04d}" for i in range(1000) if shapenet_split(f"m{i:04d}") == "train")
    obj = tmp / "shapenet" / SYNSETS["bench"] / mid / "model.obj"
    obj.parent.mkdir(parents=True)
    obj.write_text(obj_text)
    return tmp / "shapenet", obj


def shapenet_obj_without_faces(tmp, shared):
    root, obj = _shapenet_model(tmp, "v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    return Case(_data_argv(tmp, "shapenet", root, "bench"), [str(obj), "no faces"], _nothing_built(tmp))


def shapenet_garbage_obj(tmp, shared):
    root, obj = _shapenet_model(tmp, "not an obj\nv 1 2\nf x y z\n")
    return Case(_data_argv(tmp, "shapenet", root, "bench"), [str(obj), "cannot parse OBJ"], _nothing_built(tmp))


# ----------------------------------------------------------------------------- built datasets (`validate`, `data`)


def _copy_dataset(tmp: Path, shared) -> tuple[Path, Path, dict]:
    root = tmp / "data"
    shutil.copytree(shared["data"], root, ignore=shutil.ignore_patterns(".lock"))
    rec = read_manifest(root)["splits"]["train"]["shards"][0]
    return root, root / rec["file"], rec


def _rehash(root: Path, shard: Path) -> None:
    """Make the manifest agree with a shard's damaged bytes (so a deeper check must catch it)."""
    m = json.loads((root / MANIFEST).read_text())
    for rec in m["splits"]["train"]["shards"]:
        if rec["file"] == shard.name:
            rec["bytes"], rec["sha256"] = shard.stat().st_size, sha256_file(shard)
    (root / MANIFEST).write_text(json.dumps(m))


def shard_truncated(tmp, shared):
    root, shard, _ = _copy_dataset(tmp, shared)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return Case(["validate", "--root", str(root)], [str(shard), "truncated"], [root / "*.tmp"])


def shard_checksum_mismatch(tmp, shared):
    root, shard, _ = _copy_dataset(tmp, shared)
    data = bytearray(shard.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 16):
        data[k] ^= 0xFF
    shard.write_bytes(bytes(data))
    return Case(["validate", "--root", str(root)], [str(shard), "sha256"], [root / "*.tmp"])


def shard_schema_from_the_future(tmp, shared):
    root, _, _ = _copy_dataset(tmp, shared)
    m = json.loads((root / MANIFEST).read_text())
    m["schema_version"] = 99
    (root / MANIFEST).write_text(json.dumps(m))
    return Case(["validate", "--root", str(root)], [str(root / MANIFEST), "version 99", "newer"], [root / "*.tmp"])


def shard_missing_dataset_key(tmp, shared):
    root, shard, _ = _copy_dataset(tmp, shared)
    with h5py.File(shard, "r+") as f:
        del f["occlusion"]
    _rehash(root, shard)
    return Case(["validate", "--root", str(root)], [str(shard), "'occlusion' missing"], [root / "*.tmp"])


def partial_build_of_another_config(tmp, shared):
    from amodal3d.datamodules.build import build_dataset

    calls = []

    def crashes_on_the_second_unit(data_cfg, category, split):
        calls.append(category)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the user stopped the build
        return fake_objects(data_cfg, category, split)

    other = load_config(None, debug="tiny", overrides=tiny_overrides(tmp, "data.seed=5"))
    with pytest.raises(KeyboardInterrupt):
        build_dataset(other.data, progress=False, load_objects=crashes_on_the_second_unit)
    root = tmp / "data"
    assert list(root.glob("*.done.json")) and not (root / MANIFEST).exists()
    return Case(["data", "--debug", "tiny", *tiny_overrides(tmp)], [str(root), "partial build", "seed: 5 -> 0"],
                [root / MANIFEST])


# ----------------------------------------------------------------------------- predict


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _disc(cy=24, cx=30, r=10) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _image(tmp: Path) -> Path:
    return _png(tmp / "in" / "a.png", (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8))


def _predict(inputs: list[Path], tmp: Path, shared) -> list[str]:
    return ["predict", "--input", *map(str, inputs), "--out", str(tmp / "out"), "--ckpt", str(shared["ckpt"])]


def _no_output(tmp: Path) -> list[Path]:
    return [tmp / "out" / "amodal.json", tmp / "out"]


def predict_missing_input(tmp, shared):
    return Case(_predict([tmp / "in" / "nope.png"], tmp, shared), [str(tmp / "in" / "nope.png"), "no such file"],
                _no_output(tmp))


def predict_undecodable_image(tmp, shared):
    img = tmp / "in" / "a.png"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"\x89PNG\r\n\x1a\n but not really a PNG")
    _png(tmp / "in" / "a" / "chair_0.png", _disc().astype(np.uint8) * 255)
    return Case(_predict([img], tmp, shared), [str(img), "cannot read image"], _no_output(tmp))


def predict_mask_size_mismatch(tmp, shared):
    img = _image(tmp)
    mask = _png(tmp / "in" / "a" / "chair_0.png", np.full((32, 32), 255, np.uint8))
    return Case(_predict([img], tmp, shared), [str(mask), "32x32", f"{H}x{W}"], _no_output(tmp))


def _coco(tmp: Path, doc: dict) -> Path:
    path = tmp / "in" / "coco.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def predict_coco_without_images(tmp, shared):
    path = _coco(tmp, {"annotations": [], "categories": [{"id": 1, "name": "chair"}]})
    return Case(_predict([path], tmp, shared), [str(path), "'images'"], _no_output(tmp))


def predict_rle_of_the_wrong_size(tmp, shared):
    _image(tmp)
    rle = mask_utils.encode(np.asfortranarray(np.ones((20, 20), np.uint8)))
    path = _coco(tmp, {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "categories": [{"id": 1, "name": "chair"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1,
                         "segmentation": {"size": [20, 20], "counts": rle["counts"].decode()}}],
    })
    return Case(_predict([path], tmp, shared), ["annotation 7", str(path), "20x20", f"{H}x{W}"], _no_output(tmp))


def predict_missing_checkpoint(tmp, shared):
    img = _image(tmp)
    _png(tmp / "in" / "a" / "chair_0.png", _disc().astype(np.uint8) * 255)
    argv = _predict([img], tmp, shared)
    argv[-1] = str(tmp / "no.ckpt")
    return Case(argv, [str(tmp / "no.ckpt"), "--ckpt"], _no_output(tmp))


# ----------------------------------------------------------------------------- runs (`train`)


def _train(tmp: Path, shared, stage: str, *extra: str) -> list[str]:
    return ["train", "--stage", stage, *data_ov(shared["tmp"]), f"run.root={tmp / 'runs'}", *SMALL[-1:], *extra]


def resume_unknown_run(tmp, shared):
    return Case(_train(tmp, shared, "refine_2d") + ["--resume", "no_such_run"], ["'no_such_run'", "refine_2d"],
                [tmp / "runs"])


def checkpoint_of_another_stage(tmp, shared):
    ckpt = shared["ckpt"]
    return Case(_train(tmp, shared, "viewpoint", f"run.checkpoints.recon={ckpt}"),
                [f"run.checkpoints.recon={ckpt}", "'refine_2d'", "not 'recon'"], [tmp / "runs"])


def dependency_still_training(tmp, shared):
    run = tmp / "runs" / "default" / "recon" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("stage: recon\n")
    shutil.copy(shared["ckpt"], run / "checkpoints" / "best.ckpt")  # a best.ckpt, but no summary.json yet
    return Case(_train(tmp, shared, "viewpoint"), ["no finished run", "'recon'", "r1", "summary.json"],
                [tmp / "runs" / "default" / "viewpoint", run / "summary.json"])


def truncated_checkpoint(tmp, shared):
    ckpt = tmp / "recon.ckpt"
    data = shared["ckpt"].read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    return Case(_train(tmp, shared, "viewpoint", f"run.checkpoints.recon={ckpt}"),
                [str(ckpt), "not a readable checkpoint"], [tmp / "runs"])


# ----------------------------------------------------------------------------- slurm


def slurm_gpus_do_not_divide_the_batch(tmp, shared):
    return Case(["slurm", "--stage", "recon", "--gpus", "3", "--dry-run", "loader.batch_size=32",
                 f"run.root={tmp / 'runs'}"], ["loader.batch_size=32", "GPUS=3"], [tmp / "runs"])


CASES = {
    **CONFIG,
    "source-nmr-missing-folder": nmr_missing_folder,
    "source-nmr-truncated-npz": nmr_truncated_npz,
    "source-nmr-wrong-array-shape": nmr_wrong_shape,
    "source-shapenet-obj-without-faces": shapenet_obj_without_faces,
    "source-shapenet-garbage-obj": shapenet_garbage_obj,
    "shard-truncated": shard_truncated,
    "shard-checksum-mismatch": shard_checksum_mismatch,
    "shard-schema-from-the-future": shard_schema_from_the_future,
    "shard-missing-dataset-key": shard_missing_dataset_key,
    "data-partial-build-of-another-config": partial_build_of_another_config,
    "predict-missing-input": predict_missing_input,
    "predict-undecodable-image": predict_undecodable_image,
    "predict-mask-size-mismatch": predict_mask_size_mismatch,
    "predict-coco-without-images": predict_coco_without_images,
    "predict-rle-of-the-wrong-size": predict_rle_of_the_wrong_size,
    "predict-missing-checkpoint": predict_missing_checkpoint,
    "run-resume-unknown-run-id": resume_unknown_run,
    "run-checkpoint-of-another-stage": checkpoint_of_another_stage,
    "run-dependency-still-training": dependency_still_training,
    "run-truncated-checkpoint": truncated_checkpoint,
    "slurm-gpus-do-not-divide-the-batch": slurm_gpus_do_not_divide_the_batch,
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_naming_it_and_leaves_nothing_behind(name, tmp_path, shared, capsys, monkeypatch,
                                                                     real_stderr_logs):
    monkeypatch.chdir(tmp_path)  # anything written relative to the current directory lands here
    monkeypatch.delenv("AMODAL3D_TRACEBACK", raising=False)
    case = CASES[name](tmp_path, shared)
    before = _tree(tmp_path)
    capsys.readouterr()
    rc = main(case.argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, f"exit code {rc}; stderr:\n{err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: "):].strip(), line
    for culprit in case.culprits:
        assert culprit in line, f"{culprit!r} is not named in: {line}"
    left = [p for path in case.absent for p in _absent(path)]
    assert not left, f"left behind after the failure: {left}"
    after = _tree(tmp_path)
    new = sorted(p for p in set(after) - set(before) if Path(p).name not in ALLOWED_NEW)
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
    assert not new and not changed, f"files written by a failed command: new {new}, changed {changed}"


def test_a_0_1_label_mask_png_is_read_as_non_zero_on(tmp_path, shared, capsys):
    """Not an error: a mask PNG of 0/1 values reads as "non-zero = on"."""
    img = _image(tmp_path)
    mask = _disc()
    _png(tmp_path / "in" / "a" / "chair_0.png", mask.astype(np.uint8))  # values 0 and 1
    rc = main(_predict([img], tmp_path, shared))
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "out" / "amodal.json").read_text())
    assert not doc["errors"] and len(doc["annotations"]) == 1
    ann = doc["annotations"][0]
    assert ann["visible_area"] == int(mask.sum()) and ann["category"] == "chair"
    amodal = np.asarray(Image.open(tmp_path / "out" / ann["mask_file"])) > 127
    assert not (mask & ~amodal).any()  # the visible pixels are inside the amodal mask


def test_the_cases_cover_every_surface_and_are_listed_in_the_docs():
    surfaces = {name.split("-")[0] for name in CASES}
    assert surfaces == {"config", "source", "shard", "data", "predict", "run", "slurm"}
    assert len(CASES) >= 28
    doc = (Path(__file__).resolve().parent.parent / "docs" / "bad_input.md").read_text()
    missing = [name for name in CASES if f"`{name}`" not in doc]
    assert not missing, f"docs/bad_input.md does not list {missing}"
    assert f"{len(CASES) + 1} cases" in doc  # the parametrised ones and the 0/1-mask positive case

"""Shards and the dataset build: round trip, determinism, atomic/resumable builds,
corruption and schema-version detection, the builder lock."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from fakes import blob_objects
from amodal3d.categories import category_index
from amodal3d.config import DataConfig
from amodal3d import atomic
from amodal3d.datamodules.build import BuildConfigError, build_dataset, ensure_dataset
from amodal3d.datamodules.composites import mask_box, mask_boxes
from amodal3d.datamodules.shard_format import MANIFEST, DatasetError, SchemaVersionError, ShardError, read_manifest, sha256_file
from amodal3d.datamodules.shard_reader import SplitReader
from amodal3d.datamodules.shard_validate import validate_dataset

ROOT = Path(__file__).resolve().parent.parent
CATS = ["chair", "car", "lamp"]


def fake_objects(data_cfg, category: str, split: str):
    """load_objects stand-in: ellipses/rectangles of random sizes, no renderer."""
    n, views, size = int(data_cfg.objects_per_split[split]), int(data_cfg.views), int(data_cfg.render_size)
    return blob_objects(category, split, n, views, size, [category_index(category), len(split), n])


def cfg_for(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), categories=CATS, objects_per_split={"train": 3, "val": 1, "test": 2},
                views=4, shard_size=5)
    base.update(kw)
    return DataConfig(**base)


def shard_hashes(root: Path) -> dict[str, str]:
    m = read_manifest(root)
    return {r["file"]: r["sha256"] for s in m["splits"].values() for r in s["shards"]}


# ----------------------------------------------------------------------------- round trip


def test_round_trip_and_lazy_open(tmp_path):
    cfg = cfg_for(tmp_path / "d")
    m = build_dataset(cfg, progress=False, load_objects=fake_objects)
    assert m["counts"]["train"]["images"] + sum(m["counts"]["train"]["skipped"].values()) == 3 * 3 * 4
    assert m["objects"]["train"]["car"]["offset"] == 3 and m["objects"]["train"]["lamp"]["ids"][0] == "lamp-0"
    r = SplitReader(cfg.root, "train")
    assert r._files == {} and r._index is None, "the constructor must not open HDF5"
    idx = r.index
    assert len(idx["object_id"]) == r.num_instances == m["counts"]["train"]["instances"]
    assert set(np.unique(idx["object_id"])) <= set(range(9))
    # an instance's masks and image agree with the per-instance arrays
    for i in (0, r.num_instances - 1):
        masks = r.instance_masks(i)
        assert not (masks["visible"] & ~masks["amodal"]).any()
        assert np.array_equal(masks["visible"], masks["amodal"] & ~masks["occluder"])
        assert r.image(int(idx["image"][i])).shape == (64, 64, 3)
        lo, hi = r.instance_range(int(idx["image"][i]))
        assert lo <= i < hi
    # pickling (spawned workers) drops handles and loaded arrays
    clone = pickle.loads(pickle.dumps(r))
    assert clone._files == {} and clone._index is None
    assert np.array_equal(clone.index["category"], idx["category"])
    validate_dataset(cfg.root)


def test_same_config_and_seed_give_byte_identical_shards(tmp_path):
    a = build_dataset(cfg_for(tmp_path / "a"), progress=False, load_objects=fake_objects)
    b = build_dataset(cfg_for(tmp_path / "b"), progress=False, load_objects=fake_objects)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    for rec in a["splits"]["train"]["shards"]:
        with h5py.File(tmp_path / "a" / rec["file"]) as fa, h5py.File(tmp_path / "b" / rec["file"]) as fb:
            for name in fa:
                assert np.array_equal(fa[name][()], fb[name][()]), name
    c = build_dataset(cfg_for(tmp_path / "c", seed=1), progress=False, load_objects=fake_objects)
    assert shard_hashes(tmp_path / "c") != shard_hashes(tmp_path / "a")
    assert b["generator"] == a["generator"] != c["generator"]


def test_second_build_does_nothing_and_other_config_is_refused(tmp_path):
    cfg = cfg_for(tmp_path / "d")
    build_dataset(cfg, progress=False, load_objects=fake_objects)
    mtime = (tmp_path / "d" / MANIFEST).stat().st_mtime_ns

    def must_not_load(*a):
        raise AssertionError("a built dataset must not be rebuilt")

    ensure_dataset(cfg, load_objects=must_not_load)
    build_dataset(replace(cfg, root=str(tmp_path / "d")), progress=False, load_objects=must_not_load)
    assert (tmp_path / "d" / MANIFEST).stat().st_mtime_ns == mtime
    with pytest.raises(BuildConfigError, match=r"occlusion_max.*data\.root"):
        build_dataset(cfg_for(tmp_path / "d", occlusion_max=0.5), progress=False, load_objects=fake_objects)


# ----------------------------------------------------------------------------- interruption and resume


def test_interrupted_build_resumes_to_the_same_result(tmp_path):
    ref = build_dataset(cfg_for(tmp_path / "ref"), progress=False, load_objects=fake_objects)
    cfg = cfg_for(tmp_path / "d")
    calls = []

    def crashes_on_lamp(data_cfg, category, split):
        calls.append((category, split))
        if category == "lamp":
            raise RuntimeError("boom")
        return fake_objects(data_cfg, category, split)

    with pytest.raises(RuntimeError, match="boom"):
        build_dataset(cfg, progress=False, load_objects=crashes_on_lamp)
    root = Path(cfg.root)
    assert not (root / MANIFEST).exists()
    with pytest.raises(DatasetError, match="manifest.json not found"):
        SplitReader(root, "train")
    done = sorted(p.name for p in root.glob("*.done.json"))
    assert done and all(p.startswith("train-chair") or p.startswith("train-car") for p in done)
    # a different config is refused even before any manifest exists
    with pytest.raises(BuildConfigError, match="partial build"):
        build_dataset(cfg_for(root, seed=5), progress=False, load_objects=fake_objects)
    calls.clear()

    def tracked(data_cfg, category, split):
        calls.append((category, split))
        return fake_objects(data_cfg, category, split)

    build_dataset(cfg, progress=False, load_objects=tracked)
    assert ("chair", "train") not in calls and ("car", "train") not in calls, "finished units are not rebuilt"
    assert shard_hashes(root) == shard_hashes(tmp_path / "ref")
    assert read_manifest(root)["counts"] == ref["counts"]


def test_a_failed_shard_write_leaves_nothing_and_a_killed_ones_tmp_is_cleaned(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path / "d")
    real_replace = os.replace
    state = {"n": 0}

    def flaky_replace(src, dst):
        if str(dst).endswith(".h5"):
            state["n"] += 1
            if state["n"] == 2:
                raise OSError("disk vanished")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk vanished"):
        build_dataset(cfg, progress=False, load_objects=fake_objects)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    root = Path(cfg.root)
    assert not list(root.glob("*.tmp")), "a failed write removes its temporary file"
    assert len(list(root.glob("*.h5"))) == 1 == len(list(root.glob("*.done.json"))), "the partial shard never lands"
    (root / ".test-000.h5.4242.tmp").write_bytes(b"half a shard")  # what a killed writer leaves
    build_dataset(cfg, progress=False, load_objects=fake_objects)
    assert not list(root.glob("*.tmp"))
    assert validate_dataset(root)["ok"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_shards import cfg_for, fake_objects
    from amodal3d.datamodules.build import build_dataset
    from pathlib import Path

    def slow(d, c, s):
        time.sleep(0.4)
        return fake_objects(d, c, s)

    build_dataset(cfg_for(Path({out!r})), progress=False, load_objects=slow)
""")


def test_build_killed_mid_way_then_rerun_equals_uninterrupted(tmp_path):
    out = tmp_path / "d"
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*.done.json")):
        if proc.poll() is not None:
            pytest.fail(f"builder exited early: {proc.stderr.read().decode()}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists()
    with pytest.raises(DatasetError):
        validate_dataset(out)
    build_dataset(cfg_for(out), progress=False, load_objects=fake_objects)
    build_dataset(cfg_for(tmp_path / "ref"), progress=False, load_objects=fake_objects)
    assert shard_hashes(out) == shard_hashes(tmp_path / "ref")
    assert validate_dataset(out)["ok"]


def test_concurrent_builder_waits_for_the_lock(tmp_path):
    cfg = cfg_for(tmp_path / "d")
    root = Path(cfg.root)
    root.mkdir(parents=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    errors = []
    t = threading.Thread(target=lambda: _run(errors, cfg))
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and not list(root.glob("*.h5")), "a second builder must wait for the lock"
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    t.join(30)
    assert not errors and (root / MANIFEST).exists()


def _run(errors, cfg):
    try:
        build_dataset(cfg, progress=False, load_objects=fake_objects)
    except Exception as err:  # pragma: no cover - reported by the test
        errors.append(err)


# ----------------------------------------------------------------------------- corruption and versions


@pytest.fixture()
def built(tmp_path):
    cfg = cfg_for(tmp_path / "d")
    build_dataset(cfg, progress=False, load_objects=fake_objects)
    return Path(cfg.root)


def _first_train_shard(root: Path) -> Path:
    return root / read_manifest(root)["splits"]["train"]["shards"][0]["file"]


def test_flipped_bytes_are_detected_and_the_shard_named(built):
    shard = _first_train_shard(built)
    data = bytearray(shard.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 16):
        data[k] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name + ".*sha256"):
        SplitReader(built, "train")
    report = validate_dataset(built, raise_on_error=False)
    assert not report["ok"] and any(shard.name in p for p in report["problems"])
    with pytest.raises(DatasetError, match=shard.name):
        validate_dataset(built)


def test_truncated_shard_is_named(built):
    shard = _first_train_shard(built)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(ShardError, match=shard.name + ".*truncated"):
        SplitReader(built, "train", verify=False)
    # a manifest that agrees with the damaged bytes: opening it is what fails, naming the shard
    m = json.loads((built / MANIFEST).read_text())
    rec = m["splits"]["train"]["shards"][0]
    rec["bytes"], rec["sha256"] = shard.stat().st_size, sha256_file(shard)
    (built / MANIFEST).write_text(json.dumps(m))
    r = SplitReader(built, "train")
    with pytest.raises(ShardError, match=shard.name):
        r.image(0)
    with pytest.raises(DatasetError, match=shard.name):
        validate_dataset(built)


def test_schema_version_mismatch_names_manifest_and_versions(built):
    m = json.loads((built / MANIFEST).read_text())
    m["schema_version"] = 1
    (built / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SchemaVersionError, match=r"manifest\.json.*version 1.*versions 2, 3"):
        SplitReader(built, "train")
    with pytest.raises(SchemaVersionError):
        validate_dataset(built)


def test_validate_catches_broken_invariants(built):
    shard = _first_train_shard(built)
    with h5py.File(shard, "r+") as f:
        bits = f["visible_bits"][0]
        f["visible_bits"][0] = np.full_like(bits, 0xFF)  # visible everywhere: not inside amodal
        f["amodal_box"][1] = f["amodal_box"][1] + 1  # a box that no longer fits its mask
    m = json.loads((built / MANIFEST).read_text())
    rec = m["splits"]["train"]["shards"][0]
    rec["bytes"], rec["sha256"] = shard.stat().st_size, sha256_file(shard)
    (built / MANIFEST).write_text(json.dumps(m))
    report = validate_dataset(built, raise_on_error=False)
    assert any("visible not inside amodal" in p and shard.name in p for p in report["problems"])
    assert any("amodal_box does not match" in p and shard.name in p for p in report["problems"])


def test_mask_boxes_are_exclusive_boxes_from_numpy():
    masks = np.zeros((6, 7, 9), bool)
    masks[0, 2:5, 3:6] = True
    masks[1, 0, 0] = True  # one pixel in the top-left corner
    masks[2, 4:, 6:] = True  # touches the bottom and right borders
    masks[3] = True  # the whole image
    masks[4, 1, 2] = masks[4, 6, 8] = True  # two pixels far apart
    # masks[5] is empty: box all zeros
    expect = []
    for m in masks:
        ys, xs = np.nonzero(m)
        expect.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if ys.size else [0, 0, 0, 0])
    boxes = mask_boxes(masks)
    assert boxes.dtype == np.float32 and np.array_equal(boxes, np.array(expect, np.float32))
    assert np.array_equal(boxes, np.stack([mask_box(m) for m in masks]))
    assert mask_boxes(masks[:0]).shape == (0, 4)


def test_paste_build_and_validate(tmp_path):
    cfg = cfg_for(tmp_path / "p", composite="paste", image_size=96,
                  paste_images_per_split={"train": 9, "val": 2, "test": 3}, shard_size=16)
    m = build_dataset(cfg, progress=False, load_objects=fake_objects)
    assert m["counts"]["train"]["images"] == 9 and len(m["splits"]["train"]["shards"]) == 3  # 16 // 4 per shard
    assert m["counts"]["train"]["instances"] >= 2 * 9 - 3
    r = SplitReader(cfg.root, "train")
    for i in range(r.num_images):
        masks = r.image_masks(i)
        v = masks["visible"]
        assert v.shape[0] == r.instance_range(i)[1] - r.instance_range(i)[0]
        assert (v.sum(0) <= 1).all(), "visible masks of one image are disjoint"
    assert validate_dataset(cfg.root)["ok"]


def _downgrade_to_schema_2(root: Path) -> None:
    """Rewrite a built dataset in the layout of schema 2 (square images, full-frame packed masks),
    as datasets built before schema 3 lie on users' disks."""
    from amodal3d.datamodules.shard_format import pack_masks

    m = read_manifest(root)
    for split in m["splits"]:
        r = SplitReader(root, split, verify=False)
        for k, rec in enumerate(m["splits"][split]["shards"]):
            path = root / rec["file"]
            with h5py.File(path, "r") as f:
                keep = {n: f[n][()] for n in f if n not in ("image_hw", "mask_window", "mask_offsets")
                        and not n.endswith("_bits")}
                attrs = dict(f.attrs)
            s = r.shards[k]
            rows = range(s.inst_start, s.inst_start + int(rec["instances"]))
            bits = {n: pack_masks(np.stack([r.instance_masks(i)[n] for i in rows])) for n in ("amodal", "visible", "occluder")}
            r.close()
            path.unlink()
            with h5py.File(path, "w") as f:
                for n, v in keep.items():
                    f.create_dataset(n, data=v)
                for n, v in bits.items():
                    f.create_dataset(f"{n}_bits", data=v)
                for a, v in attrs.items():
                    f.attrs[a] = v
                f.attrs["schema_version"] = 2
            rec.update(bytes=path.stat().st_size, sha256=sha256_file(path))
            rec.pop("height", None), rec.pop("width", None)
    m["schema_version"] = 2
    m["generator"]["schema_version"] = 2
    m.pop("image_height"), m.pop("image_width")
    (root / MANIFEST).write_text(json.dumps(m))


def test_a_schema_2_dataset_keeps_loading_and_is_not_rebuilt(tmp_path):
    cfg = cfg_for(tmp_path / "v3")
    build_dataset(cfg, progress=False, load_objects=fake_objects)
    old = cfg_for(tmp_path / "v2")
    build_dataset(old, progress=False, load_objects=fake_objects)
    _downgrade_to_schema_2(tmp_path / "v2")
    assert read_manifest(tmp_path / "v2")["schema_version"] == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "v2").glob("*.h5")}
    # the same config: the schema-2 dataset counts as built (no rebuild), and reads as before
    assert build_dataset(old, progress=False, load_objects=fake_objects)["schema_version"] == 2
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "v2").glob("*.h5")}
    assert validate_dataset(tmp_path / "v2")["ok"]
    for split in ("train", "val", "test"):
        a, b = SplitReader(tmp_path / "v3", split), SplitReader(tmp_path / "v2", split)
        assert a.version == 3 and b.version == 2
        for i in range(a.num_images):
            np.testing.assert_array_equal(a.image(i), b.image(i))
            ma, mb = a.image_masks(i), b.image_masks(i)
            for n in ma:
                np.testing.assert_array_equal(ma[n], mb[n])
        for i in range(a.num_instances):
            ma, mb = a.instance_masks(i), b.instance_masks(i)
            for n in ma:
                np.testing.assert_array_equal(ma[n], mb[n])

"""Stand-in object sources for tests: ellipses and rectangles instead of rendered meshes.

Fast, deterministic and renderer-free, so runner/DDP/fault tests spend their
time on what they test. Build a dataset with it once (`build_fake_dataset`);
`ensure_dataset` in later runs, subprocesses included, then finds it built.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from amodal3d.config import load_config


def fake_objects(data_cfg, category: str, split: str):
    """ObjectRenders of ellipses whose width changes with the view."""
    from amodal3d.datamodules.sources.base import ObjectRenders, nmr_cameras

    n, v, s = int(data_cfg.objects_per_split[split]), int(data_cfg.views), int(data_cfg.render_size)
    rng = np.random.default_rng(zlib.crc32(f"{category}/{split}".encode()))
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    rgba = np.zeros((n, v, s, s, 4), np.uint8)
    for o in range(n):
        ry, rx = rng.uniform(0.2, 0.4, 2) * s
        color = rng.integers(40, 255, 3)
        for k in range(v):
            rxk = rx * (0.6 + 0.4 * abs(np.cos(2 * np.pi * k / v)))
            m = ((yy - s / 2) / ry) ** 2 + ((xx - s / 2) / rxk) ** 2 <= 1
            rgba[o, k][m] = [*color, 255]
    cams = np.broadcast_to(nmr_cameras(v), (n, v, 3)).copy()
    return ObjectRenders(category, split, [f"{category}-{split}-{i}" for i in range(n)], rgba, cams)


def blob_objects(category: str, split: str, n: int, views: int, size: int, rng_key: list[int],
                 radius: tuple[float, float] = (0.12, 0.4), shift: float = 3.0):
    """ObjectRenders of n objects x views: ellipses and rectangles (alternating) of random
    half-sizes radius x size around the centre +- shift pixels, one random colour each."""
    from amodal3d.datamodules.sources.base import ObjectRenders, nmr_cameras

    rng = np.random.default_rng(rng_key)
    rgba = np.zeros((n, views, size, size, 4), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        for v in range(views):
            a, b = rng.uniform(*radius, 2) * size
            cx, cy = size / 2 + rng.uniform(-shift, shift, 2)
            if (i + v) % 2:
                m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
            else:
                m = (np.abs(xx - cx) <= a) & (np.abs(yy - cy) <= b)
            rgba[i, v, m, :3] = rng.integers(0, 255, 3)
            rgba[i, v, m, 3] = 255
    cams = np.repeat(nmr_cameras(views)[None], n, 0)
    return ObjectRenders(category, split, [f"{category}-{i}" for i in range(n)], rgba, cams)


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """Dot-overrides of a tiny dataset and run folder under tmp_path."""
    return [
        f"data.root={tmp_path / 'data'}", f"run.root={tmp_path / 'runs'}", "data.views=4",
        "data.objects_per_split.train=2", "data.objects_per_split.val=1", "data.objects_per_split.test=1",
        "loader.num_workers=0", *extra,
    ]


def build_fake_dataset(tmp_path: Path) -> None:
    from amodal3d.datamodules.build import build_dataset

    cfg = load_config(None, debug="tiny", overrides=tiny_overrides(tmp_path))
    build_dataset(cfg.data, progress=False, load_objects=fake_objects)


#: the training-target keys of a supervised stage's batches (StageSpec.targets): labels too
TARGET_KEYS = ("amodal", "amodal_masks")


class LabelGuard(dict):
    """A batch whose label entries (`eval_*`, the hidden ground truth, and the training
    targets `amodal` / `amodal_masks`) and the `hidden` keys (what the protocol hides:
    the amodal box under gt-visible, or the unknown pixels of a gt-visible test batch)
    raise when read, except the `allowed` keys (a supervised stage's amodal target):
    the proof that a step does not see them. Iterating over every entry raises too."""

    def __init__(self, data, allowed=(), hidden=()):
        super().__init__(data)
        self.allowed = set(allowed)
        self.hidden = set(hidden)

    def __getitem__(self, key):
        if str(key).startswith("eval_") and key not in self.allowed:
            raise AssertionError(f"the training step read the evaluation-only key {key!r}")
        if key in TARGET_KEYS and key not in self.allowed:
            raise AssertionError(f"the training step read the label key {key!r}")
        if key in self.hidden:
            raise AssertionError(f"the step read {key!r}, which the protocol hides")
        return super().__getitem__(key)

    def __contains__(self, key):
        return key not in self.hidden and super().__contains__(key)

    def get(self, key, default=None):  # a hidden key is absent
        if key in self.hidden:
            return default
        return self[key] if key in self else default

    def items(self):
        raise AssertionError("the training step iterated over every batch entry")

    def values(self):
        raise AssertionError("the training step iterated over every batch entry")


#: what a gt-visible batch must never be read for (training: the amodal box; test: also the unknown pixels)
GT_VISIBLE_TRAIN_HIDDEN = ("amodal_box",)
GT_VISIBLE_TEST_HIDDEN = ("amodal_box", "unknown")


def write_run(module, root: Path, stage: str, run_id: str = "r1", experiment: str = "default") -> Path:
    """A finished run folder as the runner leaves it: config.yaml, checkpoints/best.ckpt and
    summary.json, for a module built (untrained) in the test."""
    import json

    import lightning as L
    import torch

    from amodal3d.config import save_config

    run = root / experiment / stage / run_id
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, run / "checkpoints" / "best.ckpt")
    save_config(module.cfg, run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"stage": stage, "run_id": run_id}))
    return run / "checkpoints" / "best.ckpt"

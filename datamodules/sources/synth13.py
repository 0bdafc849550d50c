"""synth13: procedural objects of the 13 categories rendered like the NMR set.

Each object is fully determined by (seed, category, split, index): its numpy
Generator is seeded from that tuple, so splits hold different objects and any
subset can be regenerated alone. The true (normalised) meshes are kept in
`ObjectRenders.meshes` for evaluation-only 3D diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from amodal3d.categories import CATEGORIES, category_index
from amodal3d.datamodules.sources.base import resolve_request
from amodal3d.datamodules.sources.base import SPLITS, ObjectRenders, nmr_cameras
from amodal3d.datamodules.sources.render import normalize_vertices, render_objects
from amodal3d.datamodules.sources.synth13_shapes import build_shape
from amodal3d.errors import ConfigError


@dataclass
class SynthObject:
    """One generated object: normalised mesh, per-vertex colours, shape parameters."""

    object_id: str
    verts: np.ndarray  # float32 (Nv,3), bbox centred, diagonal 1
    faces: np.ndarray  # int64 (Nf,3)
    colors: np.ndarray  # float32 (Nv,3) in [0,1]
    params: dict[str, float]


def synth_object(category: str, split: str, index: int, seed: int = 0) -> SynthObject:
    """The index-th object of a category and split for a given seed."""
    cat = category_index(category)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([int(seed), cat, SPLITS.index(split), int(index)])
    name = CATEGORIES[cat]
    verts, faces, colors, params = build_shape(name, rng)
    return SynthObject(f"synth-{name}-{split}-{index}", normalize_vertices(verts), faces, colors, params)


def render_synth_objects(objects: list[SynthObject], cameras: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, V, size, size, 4): the objects at the (V,3) cameras, as the dataset renders them."""
    # synth13 primitives are closed and wound outward, so back faces can be culled
    return render_objects([(o.verts, o.faces, o.colors) for o in objects], cameras, size, cull_backfaces=True)


def load_synth13(data_cfg: Any, category: str, split: str) -> ObjectRenders:
    """Generate and render data_cfg.objects_per_split[split] objects of a category."""
    name, count = resolve_request(data_cfg, category, split)
    if count <= 0:
        raise ValueError(
            f"synth13 needs a positive object count: data.objects_per_split.{split}={count}"
        )
    views, size = int(data_cfg.views), int(data_cfg.render_size)
    if views <= 0 or size <= 0:
        raise ConfigError(f"data.views ({views}) and data.render_size ({size}) must be positive")
    objects = [synth_object(name, split, k, int(data_cfg.seed)) for k in range(count)]
    cams = nmr_cameras(views)
    rgba = render_synth_objects(objects, cams, size)
    return ObjectRenders(
        category=name,
        split=split,
        object_ids=[o.object_id for o in objects],
        rgba=rgba,
        cameras=np.repeat(cams[None], count, 0),
        meshes=[(o.verts, o.faces) for o in objects],
    )

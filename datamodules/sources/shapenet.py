"""shapenet: render ShapeNetCore OBJ models under the NMR camera conventions.

Both directory layouts are read: v1 `<synset>/<id>/model.obj` and v2
`<synset>/<id>/models/model_normalized.obj`. Models are assigned to
train/val/test by a hash of their id (80/10/10), so a split never changes when
models are added or removed. A model whose OBJ is missing, unparsable or has
no faces is skipped with a warning and listed in `ObjectRenders.skipped`.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from amodal3d.categories import SYNSETS
from amodal3d.datamodules.sources.base import MissingSourceError, SourceError, resolve_request, source_folder
from amodal3d.datamodules.sources.base import ObjectRenders, nmr_cameras
from amodal3d.datamodules.sources.render import cluster_vertices, normalize_vertices, render_objects

#: split of a model by its hash in [0, 100)
SPLIT_BOUNDS = (("train", 80), ("val", 90), ("test", 100))
OBJ_NAMES = ("models/model_normalized.obj", "model.obj")  # v2 first, then v1
#: vertex clustering cell for rendering, in pixels (one 64 px pixel spans ~0.0229
#: world units at the NMR camera distance)
RENDER_CELL_PX = 0.25


def _hash(model_id: str) -> int:
    return int(hashlib.sha1(model_id.encode("utf-8")).hexdigest()[:12], 16)


def shapenet_split(model_id: str) -> str:
    """train / val / test of a model, from a stable hash of its id."""
    h = _hash(model_id) % 100
    for split, bound in SPLIT_BOUNDS:
        if h < bound:
            return split
    raise AssertionError("unreachable: hash bucket outside [0, 100)")


def model_obj(model_dir: Path) -> Path | None:
    """The model's OBJ file in the v2 or v1 layout, or None."""
    for rel in OBJ_NAMES:
        p = model_dir / rel
        if p.is_file():
            return p
    return None


def read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(verts float32 (Nv,3), faces int64 (Nf,3)) of an OBJ, or ValueError why not."""
    from pytorch3d.io import load_obj

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing .mtl files are irrelevant here
            verts, faces, _ = load_obj(str(path), load_textures=False)
    except Exception as err:  # pytorch3d raises several types on malformed lines
        raise ValueError(f"cannot parse OBJ ({type(err).__name__}: {err})") from None
    v = verts.numpy().astype(np.float32)
    f = faces.verts_idx.numpy().astype(np.int64)
    if len(f) == 0:
        raise ValueError("OBJ has no faces")
    if len(v) == 0 or f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"OBJ face indices out of range for {len(v)} vertices")
    if not np.isfinite(v).all():
        raise ValueError("OBJ has non-finite vertex coordinates")
    return v, f


def _object_color(seed: int, model_id: str) -> np.ndarray:
    rng = np.random.default_rng([int(seed), _hash(model_id)])
    return rng.uniform(0.25, 0.9, 3).astype(np.float32)


def load_shapenet(data_cfg: Any, category: str, split: str) -> ObjectRenders:
    """Render up to objects_per_split[split] models (<= 0: all) of a category."""
    name, cap = resolve_request(data_cfg, category, split)
    root = source_folder(
        data_cfg, "ShapeNetCore", "set data.source_path to the ShapeNetCore root (the folder holding the synset folders)"
    )
    synset_dir = root / SYNSETS[name]
    if not synset_dir.is_dir():
        raise MissingSourceError(f"ShapeNetCore synset folder for {name} not found: expected {synset_dir}")
    model_ids = sorted(p.name for p in synset_dir.iterdir() if p.is_dir() and shapenet_split(p.name) == split)
    ids: list[str] = []
    meshes: list[tuple[np.ndarray, np.ndarray]] = []
    skipped: list[str] = []
    why: list[str] = []  # per skipped model: its file and what is wrong with it
    for mid in model_ids:
        if 0 < cap <= len(ids):
            break
        obj = model_obj(synset_dir / mid)
        try:
            if obj is None:
                raise ValueError(f"no {' or '.join(OBJ_NAMES)}")
            verts, faces = read_obj(obj)
            verts = normalize_vertices(verts)
        except ValueError as err:
            skipped.append(mid)
            why.append(f"{obj or synset_dir / mid}: {err}")
            continue
        ids.append(mid)
        meshes.append((verts, faces))
    if skipped and not ids:  # nothing usable: one error naming the first bad file, no warnings before it
        more = f" (and {len(why) - 1} more)" if len(why) > 1 else ""
        raise SourceError(f"shapenet {name}/{split}: no model under {synset_dir} could be read: {why[0]}{more}; "
                          "fix or remove the bad models")
    for mid, reason in zip(skipped, why):
        warnings.warn(f"shapenet {name}/{split}: skipping model {mid}: {reason}", stacklevel=2)
    seed = int(data_cfg.seed)
    cams = nmr_cameras(int(data_cfg.views))
    cell = RENDER_CELL_PX * 0.0229 * 64 / int(data_cfg.render_size)
    to_render = [(*cluster_vertices(v, f, cell), _object_color(seed, mid)) for mid, (v, f) in zip(ids, meshes)]
    rgba = render_objects(to_render, cams, int(data_cfg.render_size))
    return ObjectRenders(
        category=name,
        split=split,
        object_ids=ids,
        rgba=rgba,
        cameras=np.repeat(cams[None], len(ids), 0),
        meshes=meshes,
        skipped=skipped,
    )

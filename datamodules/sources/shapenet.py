"""shapenet: render ShapeNetCore OBJ models under the NMR camera conventions.

Both directory layouts are read: v1 `<synset>/<id>/model.obj` and v2
`<synset>/<id>/models/model_normalized.obj`. Models are assigned to
train/val/test by a hash of their id (80/10/10), so a split never changes when
models are added or removed; with `data.split_file` set, by ShapeNet's split CSV
instead (columns id,synsetId,subSynsetId,modelId,split; split train/val/test),
and a model folder the file does not list belongs to no split. A model whose OBJ
is missing, unparsable or has no faces is skipped with a warning and listed in
`ObjectRenders.skipped` with its reason (`skip_reasons`); the builder records
both in the manifest. The models are rendered (and recorded) at `nmr_cameras`.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from amodal3d.categories import SYNSETS
from amodal3d.datamodules.sources.base import SPLITS, MissingSourceError, SourceError, object_cap, source_folder
from amodal3d.datamodules.sources.base import ObjectRenders, nmr_cameras, split_file_of
from amodal3d.datamodules.sources.render import cluster_vertices, normalize_vertices, render_objects

#: split of a model by its hash in [0, 100)
SPLIT_BOUNDS = (("train", 80), ("val", 90), ("test", 100))
OBJ_NAMES = ("models/model_normalized.obj", "model.obj")  # v2 first, then v1
#: vertex clustering cell for rendering, in pixels (one 64 px pixel spans ~0.0229
#: world units at the NMR camera distance)
RENDER_CELL_PX = 0.25
#: the columns of ShapeNet's split CSV (more columns are allowed; these must be there)
SPLIT_COLUMNS = ("id", "synsetId", "subSynsetId", "modelId", "split")
#: model ids named in a warning about model folders the split file does not list
_UNLISTED_SHOWN = 3


def _hash(model_id: str) -> int:
    return int(hashlib.sha1(model_id.encode("utf-8")).hexdigest()[:12], 16)


def shapenet_split(model_id: str) -> str:
    """train / val / test of a model, from a stable hash of its id."""
    h = _hash(model_id) % 100
    for split, bound in SPLIT_BOUNDS:
        if h < bound:
            return split
    raise AssertionError("unreachable: hash bucket outside [0, 100)")


def _split_file_error(path: Path, row: int, what: str) -> SourceError:
    return SourceError(f"{path}: row {row}: {what}; fix the row or set data.split_file to ShapeNet's split CSV "
                       f"(columns {','.join(SPLIT_COLUMNS)})")


@lru_cache(maxsize=4)
def _read_split_file_cached(path: str, mtime_ns: int, size: int) -> dict[str, dict[str, str]]:
    p = Path(path)
    table: dict[str, dict[str, str]] = {}
    first_row: dict[tuple[str, str], int] = {}
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{p}: empty file; data.split_file must be ShapeNet's split CSV "
                                  f"(header {','.join(SPLIT_COLUMNS)})")
            names = [h.strip() for h in header]
            missing = [c for c in SPLIT_COLUMNS if c not in names]
            if missing:
                raise _split_file_error(p, 1, f"the header lacks column(s) {', '.join(missing)} (found "
                                              f"{','.join(names) or 'nothing'})")
            col = {c: names.index(c) for c in SPLIT_COLUMNS}
            for row in reader:
                line = reader.line_num
                if not row or all(not f.strip() for f in row):
                    continue  # blank line
                if len(row) < len(names):
                    raise _split_file_error(p, line, f"expected {len(names)} fields, found {len(row)}")
                synset = row[col["synsetId"]].strip()
                if not synset.isdigit() or len(synset) > 8:
                    raise _split_file_error(p, line, f"synsetId {synset!r} is not a ShapeNet synset id (8 digits)")
                synset = synset.zfill(8)  # the official CSV drops the leading zero of 0xxxxxxx synsets
                mid = row[col["modelId"]].strip()
                if not mid or any(c in mid for c in "/\\") or mid in (".", ".."):
                    raise _split_file_error(p, line, f"modelId {mid!r} is not a model folder name")
                split = row[col["split"]].strip()
                if split not in SPLITS:
                    raise _split_file_error(p, line, f"split {split!r} is not one of {', '.join(SPLITS)}")
                models = table.setdefault(synset, {})
                if mid in models and models[mid] != split:
                    raise _split_file_error(
                        p, line, f"model {synset}/{mid} is listed again with split {split!r} (row "
                                 f"{first_row[(synset, mid)]}: {models[mid]!r}); a model belongs to one split"
                    )
                if mid not in models:
                    models[mid] = split
                    first_row[(synset, mid)] = line
    except UnicodeDecodeError as err:
        raise SourceError(f"{p}: not a UTF-8 text file ({err}); data.split_file must be ShapeNet's split CSV") from None
    except csv.Error as err:
        raise SourceError(f"{p}: row {reader.line_num}: cannot parse as CSV ({err}); data.split_file must be "
                          "ShapeNet's split CSV") from None
    except IsADirectoryError:
        raise MissingSourceError(f"data.split_file={p} is a folder; set it to ShapeNet's split CSV file") from None
    except OSError as err:
        raise SourceError(f"{p}: cannot read data.split_file ({err})") from None
    return table


def read_split_file(path: str | Path) -> dict[str, dict[str, str]]:
    """ShapeNet's split CSV as {synset: {model id: split}}, or an error naming the file and the row.

    Columns (by header name, any order, extra columns allowed): id, synsetId,
    subSynsetId, modelId, split; split is train, val or test. A synsetId written
    without its leading zero (as the official file does) is accepted. A model
    listed twice with different splits is an error. Parsed once per file version.
    """
    p = Path(path)
    if not p.exists():
        raise MissingSourceError(f"data.split_file not found: {p}; set it to ShapeNet's split CSV or leave it empty "
                                 "to split by the model-id hash")
    st = p.stat()
    return _read_split_file_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def _split_models(data_cfg: Any, category: str, split: str) -> tuple[str, int | None, Path, list[str]]:
    """Category name, cap (None: all), synset folder and the sorted model ids of one split."""
    name, cap = object_cap(data_cfg, category, split, "shapenet")
    root = source_folder(
        data_cfg, "ShapeNetCore", "set data.source_path to the ShapeNetCore root (the folder holding the synset folders)"
    )
    synset = SYNSETS[name]
    synset_dir = root / synset
    if not synset_dir.is_dir():
        raise MissingSourceError(f"ShapeNetCore synset folder for {name} not found: expected {synset_dir}")
    folders = sorted(p.name for p in synset_dir.iterdir() if p.is_dir())
    split_file = split_file_of(data_cfg)
    if split_file is None:
        return name, cap, synset_dir, [m for m in folders if shapenet_split(m) == split]
    listed = read_split_file(split_file).get(synset)
    if not listed:
        raise SourceError(f"{split_file}: no row has synsetId {synset} ({name}); is data.split_file ShapeNet's "
                          "split CSV for this ShapeNetCore release?")
    unlisted = [m for m in folders if m not in listed]
    if unlisted:
        shown = ", ".join(unlisted[:_UNLISTED_SHOWN]) + (", ..." if len(unlisted) > _UNLISTED_SHOWN else "")
        warnings.warn(f"shapenet {name}/{split}: {len(unlisted)} model folder(s) under {synset_dir} are not listed in "
                      f"{split_file} and belong to no split ({shown})", stacklevel=3)
    return name, cap, synset_dir, [m for m in folders if listed.get(m) == split]


def count_shapenet(data_cfg: Any, category: str, split: str) -> int:
    """Model folders found for (category, split), capped: what `load_shapenet` will try to read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_shapenet warns about the same folders
        _, cap, _, model_ids = _split_models(data_cfg, category, split)
    return len(model_ids) if cap is None else min(len(model_ids), cap)


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
    """Render up to objects_per_split[split] models (-1: all) of a category."""
    name, cap, synset_dir, model_ids = _split_models(data_cfg, category, split)
    root = synset_dir.parent
    ids: list[str] = []
    meshes: list[tuple[np.ndarray, np.ndarray]] = []
    skipped: list[str] = []
    bad: list[tuple[Path, str]] = []  # per skipped model: its file and what is wrong with it
    for mid in model_ids:
        if cap is not None and len(ids) >= cap:
            break
        obj = model_obj(synset_dir / mid)
        try:
            if obj is None:
                raise ValueError(f"no {' or '.join(OBJ_NAMES)}")
            verts, faces = read_obj(obj)
            verts = normalize_vertices(verts)
        except ValueError as err:
            skipped.append(mid)
            bad.append((obj or synset_dir / mid, str(err)))
            continue
        ids.append(mid)
        meshes.append((verts, faces))
    if skipped and not ids:  # nothing usable: one error naming the first bad file, no warnings before it
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SourceError(f"shapenet {name}/{split}: no model under {synset_dir} could be read: "
                          f"{bad[0][0]}: {bad[0][1]}{more}; fix or remove the bad models")
    for mid, (path, err) in zip(skipped, bad):
        warnings.warn(f"shapenet {name}/{split}: skipping model {mid}: {path}: {err}", stacklevel=2)
    # the manifest's reason names the file relative to data.source_path, so it reads the same on every machine
    why = [f"{path.relative_to(root).as_posix()}: {err}" for path, err in bad]
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
        skip_reasons=why,
    )

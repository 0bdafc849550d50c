"""nmr: import the NMR/SoftRas ShapeNet renders (`<synset>_<split>_images.npz`).

Each file holds one array `arr_0` of shape (N*24, 4, 64, 64): N objects x 24
views, RGBA channels first, uint8 or float in [0, 1]. Only the objects that
the `objects_per_split` cap asks for are read (-1: all of them): the .npy
member is streamed from the zip (compressed or not), so a cap of a few objects
does not load a multi-gigabyte category into memory.

The split is the file's: these files come split already, so `data.split_file`
does not apply to this source. View k of every object is recorded with
`softras_cameras()[k]`, the camera SoftRas uses for view k (azimuth -15k deg in
SoftRas's convention, pytorch3d azimuth 180 + 15k).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from amodal3d.categories import SYNSETS
from amodal3d.datamodules.sources.base import MissingSourceError, SourceError, object_cap, source_folder, split_file_of
from amodal3d.errors import ConfigError
from amodal3d.datamodules.sources.base import NMR_IMAGE_SIZE, NMR_NUM_VIEWS, ObjectRenders, softras_cameras

ARRAY_KEY = "arr_0"
#: objects converted per read (bounds the float temporary to ~100 MB)
_CHUNK_OBJECTS = 64


def nmr_file(source_path: str | Path, category: str, split: str) -> Path:
    """Where the NMR renders of a category and split are expected."""
    return Path(source_path) / f"{SYNSETS[category]}_{split}_images.npz"


def _to_uint8(block: np.ndarray, path: Path) -> np.ndarray:
    if block.dtype == np.uint8:
        return block
    if not np.issubdtype(block.dtype, np.floating):
        raise SourceError(f"{path}: {ARRAY_KEY} has dtype {block.dtype}; expected uint8 or float in [0, 1]")
    lo, hi = float(block.min()), float(block.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise SourceError(f"{path}: float {ARRAY_KEY} values must lie in [0, 1], found [{lo:.3g}, {hi:.3g}]")
    return (np.clip(block, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def _check_shape(shape: tuple, path: Path) -> int:
    """Number of objects in an (N*24, 4, 64, 64) array, or a clear error.

    The object-major (N, 24, 4, 64, 64) form has the same memory layout and
    is accepted too (readers of the original files reshape either way).
    """
    s, v = NMR_IMAGE_SIZE, NMR_NUM_VIEWS
    if len(shape) == 5 and shape[1:] == (v, 4, s, s) and shape[0] > 0:
        return shape[0]
    if len(shape) == 4 and shape[1:] == (4, s, s) and shape[0] % v == 0 and shape[0] > 0:
        return shape[0] // v
    raise SourceError(f"{path}: {ARRAY_KEY} must have shape (N*{v}, 4, {s}, {s}), got {tuple(shape)}")


def _read_header(fh, path: Path) -> tuple[int, np.dtype]:
    """Object count and dtype from the .npy header of `arr_0` (the stream is left at the data)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise SourceError(f"{path}: unsupported .npy format version {version}")
    total = _check_shape(tuple(shape), path)
    if fortran:
        raise SourceError(f"{path}: {ARRAY_KEY} is stored in Fortran order; re-save it C-contiguous")
    if dtype.hasobject:
        raise SourceError(f"{path}: {ARRAY_KEY} holds Python objects; expected uint8 or float")
    return total, dtype


def _read_member(path: Path, max_objects: int, header_only: bool) -> tuple[int, np.ndarray | None]:
    """(objects in the file, uint8 (n, 24, 64, 64, 4) of the first max_objects (<= 0: all), or None)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise SourceError(f"{path}: not a readable .npz file ({err}); it is truncated or corrupt: copy it again") from None
    with zf:
        try:
            member = ARRAY_KEY + ".npy"
            if member not in zf.namelist():
                keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                raise SourceError(f"{path}: no array {ARRAY_KEY!r} (found {', '.join(keys) or 'none'})")
            with zf.open(member) as fh:
                total, dtype = _read_header(fh, path)
                if header_only:
                    return total, None
                n = total if max_objects <= 0 else min(total, max_objects)
                per_obj = NMR_NUM_VIEWS * 4 * NMR_IMAGE_SIZE * NMR_IMAGE_SIZE
                out = np.empty((n, NMR_NUM_VIEWS, NMR_IMAGE_SIZE, NMR_IMAGE_SIZE, 4), np.uint8)
                for start in range(0, n, _CHUNK_OBJECTS):
                    m = min(_CHUNK_OBJECTS, n - start)
                    raw = fh.read(m * per_obj * dtype.itemsize)
                    if len(raw) != m * per_obj * dtype.itemsize:
                        raise SourceError(f"{path}: {ARRAY_KEY} is truncated (header says {total} objects)")
                    block = np.frombuffer(raw, dtype=dtype).reshape(m, NMR_NUM_VIEWS, 4, NMR_IMAGE_SIZE, NMR_IMAGE_SIZE)
                    out[start:start + m] = _to_uint8(block, path).transpose(0, 1, 3, 4, 2)
        except SourceError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
            raise SourceError(f"{path}: cannot read {ARRAY_KEY} ({type(err).__name__}: {err}); the file is "
                              "truncated or corrupt: copy it again") from None
    return total, out


def read_nmr_images(path: Path, max_objects: int = 0) -> np.ndarray:
    """uint8 (N, 24, 64, 64, 4) RGBA of the first max_objects objects (<= 0: all)."""
    return _read_member(path, max_objects, header_only=False)[1]


def nmr_object_count(path: Path) -> int:
    """Objects in an NMR file, from its header alone (nothing but the header is read)."""
    return _read_member(path, 0, header_only=True)[0]


def _request(data_cfg: Any, category: str, split: str) -> tuple[str, int | None, Path]:
    """Category name, cap (None: all) and the file of one category and split, or a clear error."""
    name, cap = object_cap(data_cfg, category, split, "nmr")
    folder = source_folder(data_cfg, "NMR", "set data.source_path to the folder with the <synset>_<split>_images.npz files")
    if split_file_of(data_cfg) is not None:
        raise ConfigError(
            f"data.split_file={split_file_of(data_cfg)} does not apply to data.source=nmr: the NMR renders "
            "come split already (<synset>_<split>_images.npz); unset data.split_file"
        )
    if int(data_cfg.views) != NMR_NUM_VIEWS or int(data_cfg.render_size) != NMR_IMAGE_SIZE:
        raise ConfigError(
            f"the NMR renders have {NMR_NUM_VIEWS} views of {NMR_IMAGE_SIZE}x{NMR_IMAGE_SIZE}; set "
            f"data.views={NMR_NUM_VIEWS} and data.render_size={NMR_IMAGE_SIZE} "
            f"(got {data_cfg.views} and {data_cfg.render_size})"
        )
    path = nmr_file(folder, name, split)
    if not path.is_file():
        raise MissingSourceError(f"NMR file for {name}/{split} not found: expected {path}")
    return name, cap, path


def count_nmr(data_cfg: Any, category: str, split: str) -> int:
    """Objects `load_nmr` returns for (category, split): the file's count, capped."""
    _, cap, path = _request(data_cfg, category, split)
    total = nmr_object_count(path)
    return total if cap is None else min(total, cap)


def load_nmr(data_cfg: Any, category: str, split: str) -> ObjectRenders:
    """Objects of one category and split from the NMR npz files in data_cfg.source_path."""
    name, cap, path = _request(data_cfg, category, split)
    rgba = read_nmr_images(path, cap or 0)
    n = len(rgba)
    synset = SYNSETS[name]
    return ObjectRenders(
        category=name,
        split=split,
        object_ids=[f"nmr-{synset}-{split}-{k}" for k in range(n)],
        rgba=rgba,
        cameras=np.repeat(softras_cameras()[None], n, 0),
        meshes=None,
    )

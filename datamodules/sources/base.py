"""The "object renders" format every object source produces.

It mirrors the NMR/SoftRas ShapeNet renders: per category and split, N objects
seen from V views as RGBA images, plus the camera of every view. Sources that
know the true geometry (synth13, shapenet) keep the meshes for 3D diagnostics;
those are evaluation-only data.

Cameras are (azimuth deg, elevation deg, distance) rows in pytorch3d's
`look_at_view_transform` convention: the eye sits at
(d cos e sin a, d sin e, d cos e cos a), looking at the origin, y up.
Two view lists exist:

* `nmr_cameras(V)`: azimuth 360k/V. synth13 and the shapenet importer render
  (and record) these; every synth13 dataset rests on them, so they never change.
* `softras_cameras()`: the 24 views of the NMR files as SoftRas reads them.
  SoftRas places view k at azimuth -15k deg with its eye at
  (d cos e sin a, d sin e, -d cos e cos a); that is pytorch3d azimuth 180 + 15k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amodal3d.categories import CATEGORIES, category_index
from amodal3d.errors import ConfigError, DatasetError

#: the NMR render conventions
NMR_IMAGE_SIZE = 64
NMR_NUM_VIEWS = 24
NMR_ELEVATION = 30.0
NMR_DISTANCE = 2.732
#: the azimuths of `nmr_cameras(24)` (synth13, shapenet); NOT the order of the NMR files' views
NMR_AZIMUTHS = tuple(15.0 * k for k in range(NMR_NUM_VIEWS))
#: SoftRas's azimuth step between consecutive views of an NMR file (degrees, SoftRas's sign)
SOFTRAS_AZIMUTH_STEP = -15.0

#: data.objects_per_split.<split> value meaning "every object the source has" (nmr, shapenet);
#: 0 means the split is not built, a positive n at most n objects (synth13: exactly n)
ALL_OBJECTS = -1

SPLITS = ("train", "val", "test")


class SourceError(DatasetError, ValueError):
    """An object-source file that cannot be read (bad npz, wrong array shape, unusable OBJ)."""


class MissingSourceError(DatasetError, FileNotFoundError):
    """An object-source folder or file that does not exist."""


def nmr_cameras(num_views: int = NMR_NUM_VIEWS) -> np.ndarray:
    """(V,3) float32 azimuth/elevation (degrees) and distance: azimuth 360k/V, elevation 30, distance 2.732.

    The views synth13 and the shapenet importer render and record (pytorch3d
    convention). The published synth13 datasets rest on these exact values:
    do not change them. The views of the NMR files are `softras_cameras`.
    """
    az = np.arange(num_views, dtype=np.float32) * (360.0 / num_views)
    cams = np.stack([az, np.full_like(az, NMR_ELEVATION), np.full_like(az, NMR_DISTANCE)], 1)
    return cams.astype(np.float32)


def softras_eye(distance: float, elevation: float, azimuth: float) -> np.ndarray:
    """(3,) float64 eye position by SoftRas's formula (degrees; SoftRas's own azimuth sign):
    (d cos e sin a, d sin e, -d cos e cos a)."""
    e, a = np.radians(elevation), np.radians(azimuth)
    return np.array([distance * np.cos(e) * np.sin(a), distance * np.sin(e), -distance * np.cos(e) * np.cos(a)])


def camera_eyes(cameras: np.ndarray) -> np.ndarray:
    """(..., 3) float64 eye positions of (..., 3) azimuth/elevation/distance rows under
    pytorch3d's convention (the one every renderer here uses):
    (d cos e sin a, d sin e, d cos e cos a)."""
    c = np.asarray(cameras, dtype=np.float64)
    a, e, d = np.radians(c[..., 0]), np.radians(c[..., 1]), c[..., 2]
    return np.stack([d * np.cos(e) * np.sin(a), d * np.sin(e), d * np.cos(e) * np.cos(a)], -1)


def softras_cameras() -> np.ndarray:
    """(24,3) float32 cameras of the 24 views of an NMR file, in file order, as pytorch3d rows.

    SoftRas renders view k from azimuth a_k = -15k deg at SoftRas's eye
    (d cos e sin a_k, d sin e, -d cos e cos a_k). The pytorch3d azimuth with the
    same eye has sin a = sin a_k and cos a = -cos a_k, i.e. a = 180 - a_k = 180 + 15k
    (taken in [0, 360)).
    """
    k = np.arange(NMR_NUM_VIEWS, dtype=np.float64)
    az = np.mod(180.0 - SOFTRAS_AZIMUTH_STEP * k, 360.0)
    cams = np.stack([az, np.full_like(az, NMR_ELEVATION), np.full_like(az, NMR_DISTANCE)], 1)
    return cams.astype(np.float32)


@dataclass
class ObjectRenders:
    """N objects x V views of one category and split.

    rgba: uint8 (N, V, H, W, 4); alpha > 127 is the object's silhouette.
    cameras: float32 (N, V, 3) azimuth deg, elevation deg, distance.
    object_ids: N strings (ShapeNet model ids or synthetic ids).
    meshes: per object (verts float32 (Nv,3), faces int64 (Nf,3)) or None.
    skipped, skip_reasons: ids of the source's objects that could not be used, and why
    (one reason per id; the builder records both in the manifest).
    """

    category: str
    split: str
    object_ids: list[str]
    rgba: np.ndarray
    cameras: np.ndarray
    meshes: list[tuple[np.ndarray, np.ndarray]] | None = None
    skipped: list[str] = field(default_factory=list)
    skip_reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.object_ids)
        if len(self.skip_reasons) != len(self.skipped):
            raise ValueError(
                f"{self.category}/{self.split}: skip_reasons must give one reason per skipped object "
                f"({len(self.skipped)} skipped, {len(self.skip_reasons)} reasons)"
            )
        if self.rgba.ndim != 5 or self.rgba.shape[0] != n or self.rgba.shape[-1] != 4:
            raise ValueError(
                f"{self.category}/{self.split}: rgba must be (N={n}, V, H, W, 4), got {self.rgba.shape}"
            )
        if self.cameras.shape != (n, self.rgba.shape[1], 3):
            raise ValueError(
                f"{self.category}/{self.split}: cameras must be (N, V, 3) = "
                f"{(n, self.rgba.shape[1], 3)}, got {self.cameras.shape}"
            )

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def num_views(self) -> int:
        return int(self.rgba.shape[1])

    def silhouettes(self) -> np.ndarray:
        """bool (N, V, H, W) object masks from the alpha channel."""
        return self.rgba[..., 3] > 127

    def skipped_records(self) -> list[dict[str, str]]:
        """[{"id", "reason"}] of the skipped objects, as the manifest records them."""
        return [{"id": i, "reason": r} for i, r in zip(self.skipped, self.skip_reasons)]


def resolve_request(data_cfg: Any, category: str, split: str) -> tuple[str, int]:
    """Canonical category name and the raw data.objects_per_split[split] count.

    The sources read it through their own rule: synth13 needs a positive count,
    nmr and shapenet go through `object_cap`.

    data_cfg may be a `DataConfig` dataclass or an OmegaConf node of it.
    """
    name = CATEGORIES[category_index(category)]
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    counts = data_cfg.objects_per_split
    if split not in counts:
        raise ConfigError(
            f"data.objects_per_split has no entry for split {split!r} "
            f"(has {', '.join(map(str, counts.keys())) or 'none'}); add e.g. {split}: 8"
        )
    return name, int(counts[split])


def object_cap(data_cfg: Any, category: str, split: str, source: str) -> tuple[str, int | None]:
    """Canonical category name and the object cap of a real source (nmr, shapenet) for `split`.

    data.objects_per_split.<split>: -1 (`ALL_OBJECTS`) -> None (every object), n > 0 -> n.
    0 means the split is not built: a source asked for it anyway (not by the builder,
    which leaves such splits out) gets a ConfigError, as does any other negative value.
    """
    name, n = resolve_request(data_cfg, category, split)
    if n == ALL_OBJECTS:
        return name, None
    if n > 0:
        return name, n
    key = f"data.objects_per_split.{split}"
    if n == 0:
        raise ConfigError(
            f"{key}=0 means the {split} split is not built, yet the {source} source was asked for it; "
            f"set {key}={ALL_OBJECTS} for every model or a positive cap"
        )
    raise ConfigError(
        f"{key}={n}: expected {ALL_OBJECTS} (every model), 0 (the split is not built) or a positive cap"
    )


def config_value(data_cfg: Any, key: str, default: Any = None) -> Any:
    """data_cfg.<key> of a DataConfig, an OmegaConf node or a mapping; `default` where it has no such key."""
    if isinstance(data_cfg, dict):
        return data_cfg.get(key, default)
    try:
        value = getattr(data_cfg, key)
    except (AttributeError, KeyError):  # omegaconf's struct nodes raise a subclass of AttributeError
        return default
    return default if value is None else value


def split_file_of(data_cfg: Any) -> Path | None:
    """data.split_file as a path, or None when it is unset or empty."""
    value = config_value(data_cfg, "split_file", "")
    text = str(value).strip()
    return Path(text) if text else None


def source_folder(data_cfg: Any, what: str, hint: str) -> Path:
    """data.source_path as an existing folder, or MissingSourceError naming it and `hint`."""
    folder = Path(str(data_cfg.source_path)) if str(data_cfg.source_path) else None
    if folder is None or not folder.is_dir():
        raise MissingSourceError(
            f"{what} folder not found: {str(folder) if folder else '(data.source_path is empty)'}; {hint}"
        )
    return folder


#: source -> "module:function" giving, without rendering anything, how many objects the
#: source has for (category, split) within its cap; the builder's progress total uses it
OBJECT_COUNTERS: dict[str, str] = {
    "nmr": "amodal3d.datamodules.sources.nmr:count_nmr",
    "shapenet": "amodal3d.datamodules.sources.shapenet:count_shapenet",
}


def count_objects(data_cfg: Any, category: str, split: str) -> int:
    """Objects that `load_objects` will be asked to return for (category, split).

    The real sources count the models they find (capped), before anything is
    read or rendered; one that later turns out unusable is skipped at load time.
    Sources that generate their objects (synth13) return their requested count.
    """
    import importlib

    from amodal3d.datamodules.sources import SOURCES

    source = config_value(data_cfg, "source", "")
    if source not in SOURCES:
        raise ValueError(f"unknown object source data.source={source!r}; valid sources: {', '.join(SOURCES)} "
                         "(objects, composited) or kins, kins2020, cocoa, coco_amodal (annotated datasets, imported)")
    if source not in OBJECT_COUNTERS:
        return resolve_request(data_cfg, category, split)[1]
    module, func = OBJECT_COUNTERS[source].split(":")
    return int(getattr(importlib.import_module(module), func)(data_cfg, category, split))

"""The "object renders" format every object source produces.

It mirrors the NMR/SoftRas ShapeNet renders: per category and split, N objects
seen from V views as RGBA images, plus the camera of every view. Sources that
know the true geometry (synth13, shapenet) keep the meshes for 3D diagnostics;
those are evaluation-only data.
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
NMR_AZIMUTHS = tuple(15.0 * k for k in range(NMR_NUM_VIEWS))

SPLITS = ("train", "val", "test")


class SourceError(DatasetError, ValueError):
    """An object-source file that cannot be read (bad npz, wrong array shape, unusable OBJ)."""


class MissingSourceError(DatasetError, FileNotFoundError):
    """An object-source folder or file that does not exist."""


def nmr_cameras(num_views: int = NMR_NUM_VIEWS) -> np.ndarray:
    """(V,3) float32 azimuth/elevation (degrees) and distance of the NMR views."""
    az = np.arange(num_views, dtype=np.float32) * (360.0 / num_views)
    cams = np.stack([az, np.full_like(az, NMR_ELEVATION), np.full_like(az, NMR_DISTANCE)], 1)
    return cams.astype(np.float32)


@dataclass
class ObjectRenders:
    """N objects x V views of one category and split.

    rgba: uint8 (N, V, H, W, 4); alpha > 127 is the object's silhouette.
    cameras: float32 (N, V, 3) azimuth deg, elevation deg, distance.
    object_ids: N strings (ShapeNet model ids or synthetic ids).
    meshes: per object (verts float32 (Nv,3), faces int64 (Nf,3)) or None.
    """

    category: str
    split: str
    object_ids: list[str]
    rgba: np.ndarray
    cameras: np.ndarray
    meshes: list[tuple[np.ndarray, np.ndarray]] | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.object_ids)
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


def resolve_request(data_cfg: Any, category: str, split: str) -> tuple[str, int]:
    """Canonical category name and the object cap for `split` (<= 0: no cap).

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


def source_folder(data_cfg: Any, what: str, hint: str) -> Path:
    """data.source_path as an existing folder, or MissingSourceError naming it and `hint`."""
    folder = Path(str(data_cfg.source_path)) if str(data_cfg.source_path) else None
    if folder is None or not folder.is_dir():
        raise MissingSourceError(
            f"{what} folder not found: {str(folder) if folder else '(data.source_path is empty)'}; {hint}"
        )
    return folder

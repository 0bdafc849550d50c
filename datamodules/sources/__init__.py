"""Object sources: every source yields `ObjectRenders` for (category, split).

`load_objects` dispatches on `data_cfg.source` (synth13 | nmr | shapenet).
`resolve_request` is the argument check all loaders share; it is defined
before the loaders are imported because they import it from this package.
"""

from __future__ import annotations

from typing import Any, Callable

from amodal3d.categories import CATEGORIES, category_index
from datamodules.sources.base import SPLITS, ObjectRenders


def resolve_request(data_cfg: Any, category: str, split: str) -> tuple[str, int]:
    """Canonical category name and the object cap for `split` (<= 0: no cap).

    data_cfg may be a `DataConfig` dataclass or an OmegaConf node of it.
    """
    name = CATEGORIES[category_index(category)]
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    counts = data_cfg.objects_per_split
    if split not in counts:
        raise ValueError(
            f"data.objects_per_split has no entry for split {split!r} "
            f"(has {', '.join(map(str, counts.keys())) or 'none'}); add e.g. {split}: 8"
        )
    return name, int(counts[split])


from datamodules.sources.nmr import load_nmr  # noqa: E402  (needs resolve_request)
from datamodules.sources.shapenet import load_shapenet  # noqa: E402
from datamodules.sources.synth13 import load_synth13  # noqa: E402

SOURCES: dict[str, Callable[[Any, str, str], ObjectRenders]] = {
    "synth13": load_synth13,
    "nmr": load_nmr,
    "shapenet": load_shapenet,
}


def load_objects(data_cfg: Any, category: str, split: str) -> ObjectRenders:
    """Object renders of one category and split from the configured source."""
    source = data_cfg.source
    if source not in SOURCES:
        raise ValueError(f"unknown object source data.source={source!r}; valid sources: {', '.join(SOURCES)}")
    return SOURCES[source](data_cfg, category, split)


__all__ = ["SOURCES", "load_objects", "resolve_request", "ObjectRenders"]

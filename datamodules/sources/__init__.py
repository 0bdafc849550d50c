"""Object sources: every source yields `ObjectRenders` for (category, split).

`load_objects` dispatches on `data_cfg.source` (synth13 | nmr | shapenet). The
loaders are imported on first use, so reading a built dataset never pays for
pytorch3d's renderer imports.
"""

from __future__ import annotations

import importlib
from typing import Any

from amodal3d.datamodules.sources.base import ObjectRenders, resolve_request

#: source name -> "module:function" of its loader
SOURCES: dict[str, str] = {
    "synth13": "amodal3d.datamodules.sources.synth13:load_synth13",
    "nmr": "amodal3d.datamodules.sources.nmr:load_nmr",
    "shapenet": "amodal3d.datamodules.sources.shapenet:load_shapenet",
}


def load_objects(data_cfg: Any, category: str, split: str) -> ObjectRenders:
    """Object renders of one category and split from the configured source."""
    source = data_cfg.source
    if source not in SOURCES:
        raise ValueError(f"unknown object source data.source={source!r}; valid sources: {', '.join(SOURCES)} "
                         "(objects, composited) or kins, kins2020, cocoa, coco_amodal (annotated datasets, imported)")
    module, func = SOURCES[source].split(":")
    return getattr(importlib.import_module(module), func)(data_cfg, category, split)


__all__ = ["SOURCES", "load_objects", "resolve_request", "ObjectRenders"]

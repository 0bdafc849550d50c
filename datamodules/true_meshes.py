"""True meshes of a built dataset's objects, for evaluation only (Chamfer, view symmetries).

Part of the data layer: it reads the dataset's manifest and regenerates the
objects; the metrics that use it (metrics.chamfer, metrics.camera) take tensors.
"""

from __future__ import annotations

import numpy as np
import torch


class TrueMeshes:
    """The true mesh of an object of a built dataset, for evaluation only.

    synth13 objects are regenerated from (category, split, index, seed), which the
    manifest's `objects` table gives for every split-wide object id; other sources
    keep no meshes in the dataset, so `get` and `same_views` return None for them.
    """

    def __init__(self, root) -> None:
        from amodal3d.datamodules.shard_format import read_manifest

        try:
            manifest = read_manifest(root)
        except Exception:  # no readable dataset: no 3D diagnostics, not a training error
            manifest = {}
        gen = manifest.get("generator", {})
        self.enabled = gen.get("source") == "synth13" and "objects" in manifest
        self.seed = int(gen.get("seed", 0))
        self.views = int(gen.get("views", 24))
        self.render_size = int(gen.get("render_size", 64))
        self.objects = manifest.get("objects", {})
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._same: dict[tuple[str, int], np.ndarray] = {}

    def __bool__(self) -> bool:
        return self.enabled

    def _object(self, split: str, object_id: int):
        """The regenerated synth13 object behind a split-wide object id (None: unknown)."""
        from amodal3d.datamodules.sources.synth13 import synth_object

        for cat, info in self.objects.get(split, {}).items():
            k = object_id - int(info["offset"])
            if 0 <= k < int(info["count"]):
                return synth_object(cat, split, k, self.seed)
        return None

    def get(self, split: str, object_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not self.enabled:
            return None
        meshes = []
        for oid in object_ids.tolist():
            key = (split, int(oid))
            if key not in self._cache:
                obj = self._object(split, int(oid))
                if obj is None:
                    return None
                self._cache[key] = (torch.from_numpy(obj.verts).float(), torch.from_numpy(obj.faces).long())
            meshes.append(self._cache[key])
        return meshes

    def same_views(self, split: str, object_ids: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor | None:
        """(B, V) 1 for every one of the object's V views that is the same picture as the
        instance's own view (metrics.view_symmetry.same_picture on the object's renders,
        the view itself included), else 0; a NaN row for an azimuth between views or
        an unknown object; None without true meshes."""
        from amodal3d.datamodules.sources.base import nmr_cameras
        from amodal3d.datamodules.sources.synth13 import render_synth_objects
        from amodal3d.metrics.view_symmetry import same_picture

        if not self.enabled:
            return None
        out = torch.full((len(object_ids), self.views), float("nan"))
        step = 360.0 / self.views
        for i, (oid, az) in enumerate(zip(object_ids.tolist(), azimuth.tolist())):
            key = (split, int(oid))
            if key not in self._same:
                obj = self._object(split, int(oid))
                if obj is None:  # not in the manifest: unknown, like an azimuth between views
                    continue
                self._same[key] = same_picture(render_synth_objects([obj], nmr_cameras(self.views), self.render_size))[0]
            view = az / step
            if abs(view - round(view)) < 1e-3:
                out[i] = torch.from_numpy(self._same[key][int(round(view)) % self.views].astype(np.float32))
        return out

"""Per-face pixel windows: the renderers here evaluate each face only on the pixels of
its own projected box, faces grouped by window side so each group is one batched
tensor computation (models.mesh_renderer.sparse_soft_silhouette,
models.hard_silhouette.hard_silhouette)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def window_sides(extent: torch.Tensor, exact_up_to: int = 8) -> tuple[torch.Tensor, list[int]]:
    """(window side per face (N,) long, the sides present, ascending) for faces whose
    pixel boxes span `extent` pixels: the extent itself up to `exact_up_to` (most faces:
    a power-of-two window would evaluate up to 2.6x the pixels: 8x8 for 5), the next power of two
    above (large faces are few: few loops). The sides present come from a bincount,
    not a sort."""
    e = extent.long().clamp_min(1)
    side = torch.where(e <= exact_up_to, e, torch.exp2(torch.ceil(torch.log2(e.double()))).long())
    if side.numel() == 0:
        return side, []
    return side, torch.bincount(side).nonzero(as_tuple=True)[0].tolist()


@functools.cache
def compiled_window(fn: Callable) -> Callable:
    """`fn` (a window computation: elementwise tensor maths over (faces, w, w)) through
    torch.compile with dynamic shapes: one fused kernel instead of some forty passes
    over the window tensors (inductor's C++ on the CPU, Triton on CUDA), forward and
    backward. The first call compiles (tens of seconds on 2 cores; inductor caches the
    result on disk for later processes); the values are those of `fn`."""
    return torch.compile(fn, dynamic=True)

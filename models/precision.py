"""Geometry in float32 under mixed precision.

Under `trainer.precision=bf16-mixed` (or 16-mixed) autocast runs matmuls in half
precision. Mesh geometry does not take that well: sparse Laplacian products have
no half-precision backward, and vertex positions, projections and soft
rasterisation lose the accuracy the silhouettes depend on. Modules that compute
geometry wrap their forward with `float32_geometry`: autocast off, floating
tensor arguments cast to float32 (gradients flow back through the cast).
"""

from __future__ import annotations

import functools

import torch


def _to_float(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def float32_geometry(fn):
    """Decorator: run `fn` with autocast disabled and float tensor arguments in float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(_to_float(a) for a in args), **{k: _to_float(v) for k, v in kwargs.items()})

    return wrapper

"""Soft silhouettes without gradient by a C++ CPU kernel (models/soft_silhouette_cpu.cpp).

Most renders of the 3D path need no gradient: recon's camera multiplex compares its
hypotheses' silhouettes, and at inference every render is one. Through tensor ops those
cost some forty passes over per-face windows (models.mesh_renderer.sparse_soft_silhouette);
the kernel walks each face's pixels once, meshes in parallel, and gives the same values to
within 2e-6 (tests/test_native_silhouette.py). It is built by torch.utils.cpp_extension on a
machine's first use (about 40 s on 2 cores; cached under torch's extension directory, one
build per CPU type because it is compiled for the CPU it runs on). Where it cannot be built
(no C++ compiler or OpenMP), `available()` warns once with the reason and the renderers keep
the tensor path (same values, slower).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("soft_silhouette_cpu.cpp")


def _cpu_tag() -> str:
    """A short hash of what the build depends on: the CPU's features (-march=native), the
    torch version and the source."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    key = "|".join([platform.machine(), flags, torch.__version__, SOURCE.read_text()])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


@functools.cache
def extension():
    """The compiled kernel module (built on first use; raises when it cannot be built)."""
    from torch.utils.cpp_extension import load

    try:  # the ninja of the `ninja` wheel: its bin folder is not on PATH outside an activated venv
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except (ImportError, AttributeError):
        pass
    cflags = ["-O3", "-ffast-math", "-fopenmp"]  # fast-math: the vector exp (inputs are finite: checked)
    if platform.machine().lower() in ("x86_64", "amd64"):
        cflags.append("-march=native")
    return load(f"amodal3d_soft_silhouette_{_cpu_tag()}", [str(SOURCE)], extra_cflags=cflags,
                extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def available() -> bool:
    """Whether the kernel builds and loads here; the first failure is warned about once."""
    try:
        extension()
        return True
    except Exception as err:  # a missing compiler, OpenMP or ninja: the tensor path stays
        warnings.warn(f"the native CPU silhouette kernel ({SOURCE.name}) could not be built, renders "
                      f"without gradient keep the tensor path (same values, slower; "
                      f"model.renderer_native=false silences this): {err}", RuntimeWarning, stacklevel=2)
        return False


def soft_silhouette(xy: torch.Tensor, faces: torch.Tensor, size: int, sigma: float, blur_radius: float) -> torch.Tensor:
    """(B,S,S) SoftRas silhouettes of NDC vertices xy (B,V,2) and faces (F,3) or padded
    (B,F,3) (-1 rows ignored), as models.mesh_renderer.sparse_soft_silhouette computes
    them; CPU only, no gradient."""
    if xy.device.type != "cpu":
        raise ValueError(f"native soft_silhouette: CPU tensors only, got {xy.device}")
    if torch.is_grad_enabled() and xy.requires_grad:
        raise ValueError("native soft_silhouette has no backward: call it where no gradient flows")
    if faces.ndim == 2:
        faces = faces[None].expand(xy.shape[0], -1, -1)
    if faces.numel() and int(faces.max()) >= xy.shape[1]:
        raise ValueError(f"native soft_silhouette: a face indexes vertex {int(faces.max())} of {xy.shape[1]}")
    if not bool(torch.isfinite(xy).all()):  # the kernel is compiled with -ffast-math
        raise ValueError("native soft_silhouette: non-finite vertex coordinates")
    return extension().soft_silhouette(xy.detach(), faces, int(size), float(sigma), float(blur_radius))

"""Per-face windows (models/face_windows.py): exact sides for small faces, powers of two
above, every pixel of a face's box inside its window; the compiled window maths give the
same silhouettes and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amodal3d.models.face_windows import window_sides
from amodal3d.models.mesh_renderer import CropRenderer, set_renderer_compiled


def test_small_extents_keep_their_side_and_large_ones_round_up():
    side, present = window_sides(torch.tensor([1, 3, 3, 8, 9, 17, 0]))
    assert side.tolist() == [1, 3, 3, 8, 16, 32, 1]
    assert present == [1, 3, 8, 16, 32]


def test_every_window_holds_its_face_box():
    extent = torch.randint(0, 200, (1000,))
    side, present = window_sides(extent)
    assert (side >= extent.clamp_min(1)).all()
    assert (side[extent > 8] < 2 * extent[extent > 8]).all()
    assert present == sorted(set(side.tolist()))


def test_no_faces_no_windows():
    side, present = window_sides(torch.zeros(0, dtype=torch.long))
    assert side.numel() == 0 and present == []


@pytest.mark.slow  # compiles (about a minute on 2 cores with an empty inductor cache)
def test_compiled_window_maths_give_the_same_silhouettes_and_gradients():
    from test_hard_silhouette import scene  # tests/ is on sys.path (pytest prepend import mode)

    verts, faces, camera, place = scene(b=3, level=2)
    outs = {}
    for compiled in (False, True):
        r = CropRenderer(sigma=3e-4, without_grad="hard", compiled=compiled)
        v = verts.clone().requires_grad_(True)
        soft = r(v, faces, camera, place, 24)
        (soft * torch.linspace(0, 1, soft.numel()).view_as(soft)).sum().backward()
        with torch.no_grad():
            hard = r(verts, faces, camera, place, 24)
        outs[compiled] = (soft.detach(), v.grad, hard)
    (s0, g0, h0), (s1, g1, h1) = outs[False], outs[True]
    assert s0.max() > 0.9 and h0.sum() > 0  # the meshes are in view
    assert torch.allclose(s0, s1, atol=1e-5)
    assert torch.allclose(g0, g1, rtol=1e-3, atol=1e-5 * float(g0.abs().max()))
    assert torch.equal(h0, h1)
    assert set_renderer_compiled(nn.Sequential(r), False) == 1 and not r.compiled

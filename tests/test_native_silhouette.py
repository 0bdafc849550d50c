"""The C++ CPU kernel for soft renders without gradient (models.native_silhouette): the
values of the tensor path, which renders take it, and what it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch3d.structures import Meshes

from amodal3d.models import native_silhouette
from amodal3d.models.mesh_renderer import (
    CropRenderer, SparseSoftSilhouette, make_cameras, set_renderer_native, sparse_soft_silhouette,
)
from tests.test_hard_silhouette import scene


def projected(b: int = 8, level: int = 3, seed: int = 0):
    verts, faces, camera, place = scene(b=b, level=level, noise=0.01, seed=seed)
    return make_cameras(camera, place).transform_points(verts)[..., :2], faces


@pytest.mark.parametrize("size,sigma", [(16, 1e-4), (32, 3e-4), (64, 3e-4), (37, 1e-3)])
def test_it_gives_the_tensor_paths_values(size, sigma):
    """Against sparse_soft_silhouette: values to 2e-6, the masks > 0.5 identical, at square
    sizes that are and are not powers of two and at the sigmas recon uses."""
    xy, faces = projected()
    blur = math.log(1.0 / 1e-4 - 1.0) * sigma
    with torch.no_grad():
        ref = sparse_soft_silhouette(xy, faces, size, sigma, blur)
        ours = native_silhouette.soft_silhouette(xy, faces, size, sigma, blur)
    assert ours.shape == ref.shape == (len(xy), size, size)
    assert 0.1 < (ref > 0.5).float().mean() < 0.9  # the meshes are in view, not filling it
    assert (ours - ref).abs().max() < 2e-6
    assert torch.equal(ours > 0.5, ref > 0.5)


def test_padded_faces_and_meshes_off_the_image():
    """(B,F,3) faces with -1 padding rows are skipped (a mesh of padding renders empty); a mesh shifted half out of the frame
    is clipped as the tensor path clips it."""
    xy, faces = projected(b=4)
    xy = xy.clone()
    xy[1] += 0.9  # half off the image
    padded = faces[None].repeat(4, 1, 1)
    padded[2] = -1  # mesh 2: padding only
    padded[3, ::3] = -1  # a third of mesh 3's faces are padding
    blur = math.log(1.0 / 1e-4 - 1.0) * 3e-4
    with torch.no_grad():
        ref = sparse_soft_silhouette(xy, padded, 32, 3e-4, blur)
        ours = native_silhouette.soft_silhouette(xy, padded, 32, 3e-4, blur)
    assert (ours - ref).abs().max() < 2e-6
    full = native_silhouette.soft_silhouette(xy, faces, 32, 3e-4, blur)
    assert ours[2].max() == 0 and full[2].max() > 0.5  # the padding rows were left out, not rendered


def test_renderers_take_it_only_where_no_gradient_flows():
    """SparseSoftSilhouette(native=True): the kernel under no_grad (no window work counted),
    the tensor path when the vertices need a gradient (which then arrives), same values."""
    verts, faces, camera, place = scene(b=4, level=3, noise=0.01)
    cams = make_cameras(camera, place)
    r = SparseSoftSilhouette(32, sigma=3e-4, native=True)
    with torch.no_grad():
        fast = r(Meshes(verts, faces[None].expand(4, -1, -1)), cams)
    assert r.last_stats["window_pixels"] == 0  # nothing went through the tensor windows
    v = verts.clone().requires_grad_(True)
    slow = r(Meshes(v, faces[None].expand(4, -1, -1)), cams)
    assert r.last_stats["window_pixels"] > 0
    slow.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert (fast - slow.detach()).abs().max() < 2e-6


def test_crop_renderer_switch():
    """CropRenderer(native=...) reaches the renderer it builds; set_renderer_native flips
    every CropRenderer of a module and counts them."""
    verts, faces, camera, place = scene(b=3, level=2)
    r = CropRenderer(sigma=3e-4, native=True)
    with torch.no_grad():
        on = r(verts, faces, camera, place, 24)
    assert r.last_window_pixels == 0
    assert set_renderer_native(torch.nn.Sequential(r, torch.nn.Linear(1, 1)), False) == 1 and not r.native
    with torch.no_grad():
        off = r(verts, faces, camera, place, 24)
    assert r.last_window_pixels > 0
    assert (on - off).abs().max() < 2e-6


def test_what_it_refuses():
    xy, faces = projected(b=2, level=1)
    with pytest.raises(ValueError, match="no backward"):
        native_silhouette.soft_silhouette(xy.clone().requires_grad_(True), faces, 16, 1e-4, 1e-3)
    with pytest.raises(ValueError, match="indexes vertex"):
        native_silhouette.soft_silhouette(xy, faces + 1000, 16, 1e-4, 1e-3)
    bad = xy.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        native_silhouette.soft_silhouette(bad, faces, 16, 1e-4, 1e-3)


def test_a_failed_build_warns_once_and_keeps_the_tensor_path(monkeypatch):
    """Without a compiler the renderers still render (the tensor path), after one warning
    that names the kernel's source and the switch that silences it."""
    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(native_silhouette, "extension", no_compiler)
    native_silhouette.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"soft_silhouette_cpu.cpp.*renderer_native=false.*no C\+\+ compiler"):
            assert not native_silhouette.available()
        verts, faces, camera, place = scene(b=2, level=2)
        r = CropRenderer(native=True)
        with torch.no_grad():
            sil = r(verts, faces, camera, place, 16)
        assert r.last_window_pixels > 0 and sil.shape == (2, 16, 16)
    finally:
        native_silhouette.available.cache_clear()


def test_bench_speed_compares_the_native_path_with_the_soft_eager_one():
    """A 3D row on the native kernel: `bench speed` times it against the soft eager tensor
    path, finds the same masks, labels the line and leaves the row on its own path."""
    from amodal3d.bench.speed import render_path, silhouette_markdown, silhouette_paths

    class Row(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.renderer = CropRenderer(sigma=3e-4, native=True)
            self.scene = scene(b=4, level=3, noise=0.01)

        def predict_amodal(self, batch):
            verts, faces, camera, place = self.scene
            return self.renderer(verts, faces, camera, place, 32)[:, None]

    row = Row()
    assert render_path(row) == "native"
    res = silhouette_paths(row, [{"visible": torch.zeros(4, 1, 32, 32)}] * 2, torch.device("cpu"))
    assert res["path"] == "native" and res["instances_differing"] == 0 and res["mask_iou_min"] == 1.0
    assert row.renderer.native and row.renderer.without_grad == "soft" and not row.renderer.compiled
    md = silhouette_markdown([{"method": "Ours", "instances_per_s": 50.0, "silhouettes": res}])
    assert "- Ours: native kernel 50.0 instances/s" in md and "bench.renderer_native" in md

"""The hard silhouettes of renders no gradient flows through (models.hard_silhouette):
against pytorch3d's own hard rasteriser, against the soft path thresholded at 0.5, and
which renders get them."""

from __future__ import annotations

import pytest
import torch
from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
from pytorch3d.structures import Meshes
from pytorch3d.utils import ico_sphere

from amodal3d.errors import ConfigError
from amodal3d.models.hard_silhouette import HardSilhouette, hard_silhouette
from amodal3d.models.mesh_renderer import CropRenderer, SparseSoftSilhouette, make_cameras


def scene(b: int = 6, level: int = 2, noise: float = 0.03, seed: int = 0):
    """Deformed ico spheres in view of placed NMR-style cameras (not centred, not square-on)."""
    g = torch.Generator().manual_seed(seed)
    ico = ico_sphere(level)
    verts = ico.verts_packed()[None].repeat(b, 1, 1) * (0.3 + 0.2 * torch.rand(b, 1, 3, generator=g))
    verts = verts + noise * torch.randn(verts.shape, generator=g)
    camera = torch.stack([360 * torch.rand(b, generator=g), 50 * torch.rand(b, generator=g),
                          2.2 + torch.rand(b, generator=g)], 1)
    place = torch.cat([0.8 + 0.4 * torch.rand(b, 2, generator=g), 0.3 * torch.randn(b, 2, generator=g)], 1)
    return verts, ico.faces_packed(), camera, place


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a & b).sum(1).float() / (a | b).sum(1).clamp_min(1).float()


def test_without_margin_it_is_pytorch3ds_hard_coverage():
    """margin 0: exactly the pixels pytorch3d's rasteriser finds a face for (one face per
    pixel, no blur, no culling), at a square size and with faces off the image."""
    verts, faces, camera, place = scene()
    cams = make_cameras(camera, place)
    meshes = Meshes(verts, faces[None].expand(len(verts), -1, -1))
    for size in (16, 37):
        frags = MeshRasterizer(cameras=cams, raster_settings=RasterizationSettings(
            image_size=size, blur_radius=0.0, faces_per_pixel=1, bin_size=0))(meshes)
        ref = frags.pix_to_face[..., 0] >= 0
        ours = hard_silhouette(cams.transform_points(verts)[..., :2], faces, size) > 0.5
        assert ref.any() and not ref.all()
        assert (ours != ref).sum() <= 2, (ours != ref).sum()  # a centre exactly on an edge may go either way


def test_it_matches_the_soft_path_thresholded_at_half():
    """With the margin of sigma it agrees with the soft silhouette > 0.5 except on a few
    outline pixels (these small meshes at 32 px: IoU above 0.98 on average, 0.8 for each;
    a flipped axis or a shifted grid falls far below),
    and without the margin it misses the soft path's outline pixels."""
    verts, faces, camera, place = scene(b=8, level=3, noise=0.01)
    cams = make_cameras(camera, place)
    meshes = Meshes(verts, faces[None].expand(len(verts), -1, -1))
    soft_renderer = SparseSoftSilhouette(32, sigma=1e-4)
    with torch.no_grad():
        soft = soft_renderer(meshes, cams) > 0.5
    hard = HardSilhouette(32, 1e-4, soft_renderer)(meshes, cams)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    grown = iou(hard > 0.5, soft)
    plain = iou(hard_silhouette(cams.transform_points(verts)[..., :2], faces, 32) > 0.5, soft)
    assert grown.mean() > 0.98 and grown.min() > 0.8, grown
    assert grown.mean() > plain.mean()


def test_crop_renderer_is_hard_only_where_no_gradient_flows():
    """Soft while a render's inputs take a gradient (and the gradient arrives); hard under
    no_grad or for inputs that need none (a frozen prior); always soft with "soft" (the default)."""
    verts, faces, camera, place = scene(b=3)
    r = CropRenderer(without_grad="hard")
    v = verts.clone().requires_grad_(True)
    soft = r(v, faces, camera, place, 24)
    assert ((soft > 0.01) & (soft < 0.99)).any()
    soft.sum().backward()
    assert v.grad.abs().sum() > 0
    with torch.no_grad():
        under_no_grad = r(v, faces, camera, place, 24)
    frozen = r(verts, faces, camera, place, 24)
    for hard in (under_no_grad, frozen):
        assert set(hard.unique().tolist()) == {0.0, 1.0}
        assert iou(hard > 0.5, soft.detach() > 0.5).min() > 0.97
    kept_soft = CropRenderer()(verts, faces, camera, place, 24)  # the default
    assert torch.allclose(kept_soft, soft.detach())


def test_a_mesh_at_the_near_plane_takes_the_exact_path():
    """A mesh through the camera's near plane has no plain projection: that row is the exact
    soft render thresholded at 0.5, the others stay hard coverage."""
    ico = ico_sphere(2)
    verts = ico.verts_packed()[None].repeat(2, 1, 1) * torch.tensor([0.3, 0.3, 1.3])
    faces = ico.faces_packed()
    camera = torch.tensor([[0.0, 0.0, 1.25], [90.0, 10.0, 2.2]])  # row 0: the tip passes the camera
    place = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).repeat(2, 1)
    cams = make_cameras(camera, place)
    meshes = Meshes(verts, faces[None].expand(2, -1, -1))
    soft = SparseSoftSilhouette(32, sigma=1e-4)
    with torch.no_grad():
        exact = soft.exact(meshes[[0]], cams[[0]])[0] > 0.5
    hard = HardSilhouette(32, 1e-4, soft)(meshes, cams)
    assert torch.equal(hard[0] > 0.5, exact)
    assert hard[1].sum() > 0


def test_an_unknown_mode_is_named():
    with pytest.raises(ConfigError, match="silhouette_without_grad='fuzzy'"):
        CropRenderer(without_grad="fuzzy")


class _MeshRow(torch.nn.Module):
    """A stand-in 3D row for the bench: predict_amodal renders fixed meshes through a CropRenderer."""

    def __init__(self) -> None:
        super().__init__()
        self.renderer = CropRenderer(without_grad="hard")
        self.scene = scene(b=4)

    def predict_amodal(self, batch: dict) -> torch.Tensor:
        verts, faces, camera, place = self.scene
        return self.renderer(verts, faces, camera, place, 32)[:, None]


def test_bench_speed_times_both_paths_and_compares_their_masks():
    """`bench speed` times a 3D row with hard and with soft renders and reports how far its
    masks agree; the row is left on its own path; a row that is soft already gets no line."""
    from amodal3d.bench.speed import silhouette_markdown, silhouette_paths
    from amodal3d.models.mesh_renderer import set_silhouettes_without_grad

    row, cpu = _MeshRow(), torch.device("cpu")
    batches = [{"visible": torch.zeros(4, 1, 32, 32)}] * 3
    res = silhouette_paths(row, batches, cpu)
    assert res["instances"] == 12 and res["soft"]["instances"] == 12 and res["soft"]["instances_per_s"] > 0
    assert 0.97 < res["mask_iou_mean"] <= 1.0 and res["mask_iou_min"] <= res["mask_iou_mean"]
    assert row.renderer.without_grad == "hard"
    md = silhouette_markdown([{"method": "Ours", "instances_per_s": 20.0, "silhouettes": res}])
    assert md.count("\n- ") == 1 and "- Ours: hard silhouettes 20.0 instances/s" in md
    assert res["path"] == "hard" and row.renderer.compiled is False
    assert set_silhouettes_without_grad(row, "soft") == 1
    assert silhouette_paths(row, batches, cpu) is None
    with pytest.raises(ConfigError, match="silhouette_without_grad"):
        set_silhouettes_without_grad(row, "binary")


def test_bench_raster_times_the_paths_without_gradient():
    """`bench raster` also times the renders without gradient (soft, pytorch3d's hard
    coverage, ours, the native kernel) and scores each against the soft mask."""
    from amodal3d.bench.raster import bench_raster, format_table

    r = bench_raster(batch=2, faces=320, image_size=24, repeats=1)
    paths = r["no_grad"]
    assert set(paths) == {"sparse soft", "pytorch3d hard (1 face/pixel)", "hard (ours)", "native soft (C++)"}
    assert paths["native soft (C++)"]["iou_vs_soft"] == 1.0  # the same values
    assert all(p["forward_s"] > 0 for p in paths.values())
    assert paths["hard (ours)"]["iou_vs_soft"] > 0.97 and paths["pytorch3d hard (1 face/pixel)"]["iou_vs_soft"] > 0.9
    assert "| hard (ours) |" in format_table(r)


def test_bench_render_settings_name_a_bad_value():
    """bench.silhouettes, bench.renderer_compiled, bench.renderer_native and
    bench.fused_encoders: a bad value names the key and the value; on/off (YAML booleans)
    are accepted for the switches."""
    from amodal3d.bench.evaluate import bench_render_settings
    from amodal3d.config import load_config

    assert bench_render_settings(load_config(None)) == {
        "silhouettes": "checkpoint", "renderer_compiled": "checkpoint", "renderer_native": "checkpoint",
        "fused_encoders": "checkpoint"}
    assert bench_render_settings(load_config(None, overrides=[
        "bench.silhouettes=hard", "bench.renderer_compiled=on", "bench.renderer_native=off",
        "bench.fused_encoders=false"])) == {
        "silhouettes": "hard", "renderer_compiled": "true", "renderer_native": "false", "fused_encoders": "false"}
    with pytest.raises(ConfigError, match=r"bench.silhouettes='binary'"):
        bench_render_settings(load_config(None, overrides=["bench.silhouettes=binary"]))
    with pytest.raises(ConfigError, match=r"bench.renderer_compiled='fast'"):
        bench_render_settings(load_config(None, overrides=["bench.renderer_compiled=fast"]))
    with pytest.raises(ConfigError, match=r"bench.renderer_native='cpp'"):
        bench_render_settings(load_config(None, overrides=["bench.renderer_native=cpp"]))

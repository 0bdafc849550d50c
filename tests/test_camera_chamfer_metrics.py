"""metrics.camera and metrics.chamfer: the torchmetrics classes agree with their
functional cores, and the Chamfer core with a brute-force numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amodal3d.metrics import chamfer as chamfer_module
from amodal3d.metrics.camera import CameraError, camera_errors, camera_offsets
from amodal3d.metrics.chamfer import ViewFrameChamfer, point_chamfer, view_frame_chamfer


def camera_rows(n: int, views: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows in camera_errors' layout: true azimuths on the view grid, some unknown
    Chamfer distances and same-picture rows (NaN), as the recon stage logs them."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([
        torch.randint(0, 3, (n, 1), generator=g).float(),  # category
        torch.rand(n, 1, generator=g) * 360, 10 + 40 * torch.rand(n, 1, generator=g), 2.2 + torch.rand(n, 1, generator=g),
        torch.randint(0, views, (n, 1), generator=g).float() * (360.0 / views),
        10 + 40 * torch.rand(n, 1, generator=g), 2.2 + torch.rand(n, 1, generator=g),
        torch.rand(n, 1, generator=g) * 0.05,  # chamfer
        (torch.rand(n, views, generator=g) > 0.7).float(),  # same-picture views
    ], dim=1)
    rows[::7, 7] = float("nan")
    rows[::5, 8:] = float("nan")
    return rows


def assert_same_errors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("views", [0, 8])
def test_camera_error_metric_over_batches_equals_the_functional_on_all_rows(views):
    rows = camera_rows(60, views=max(views, 1))[:, : 8 + views]
    metric = CameraError(num_categories=13)
    for part in (rows[:17], rows[17:41], rows[41:]):
        metric.update(part)
    assert_same_errors(metric.compute(), camera_errors(rows, 13))
    # offsets fitted elsewhere (validation) are applied, not refitted
    offsets = camera_offsets(camera_rows(40, seed=1)[:, : 8 + views], 13)
    fixed = CameraError(num_categories=13, offsets=offsets)
    for part in (rows[:30], rows[30:]):
        fixed.update(part)
    assert_same_errors(fixed.compute(), camera_errors(rows, 13, offsets))


def test_camera_error_metric_keeps_nan_rows_and_checks_the_layout():
    metric = CameraError(num_categories=13)
    assert metric.compute() == {}  # nothing seen: nothing to log
    rows = camera_rows(10)
    metric.update(rows)
    assert metric.rows[0].shape == rows.shape  # unknown entries kept, not dropped (CatMetric would)
    assert "chamfer" in metric.compute() and "az_err_symaware" in metric.compute()
    with pytest.raises(ValueError, match="layout"):
        metric.update(rows[:, :7])


def numpy_chamfer(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(B,) what view_frame_chamfer scores, by brute force: both sets normalised (bbox
    centred, bbox diagonal 1), then the mean squared distance to the nearest point of
    the other set, x to y plus y to x."""
    def normalise(p):
        lo, hi = p.min(axis=1, keepdims=True), p.max(axis=1, keepdims=True)
        return (p - 0.5 * (lo + hi)) / np.maximum(np.linalg.norm(hi - lo, axis=-1, keepdims=True), 1e-6)

    x, y = normalise(x.astype(np.float64)), normalise(y.astype(np.float64))
    d = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)  # (B,N,M)
    return d.min(axis=2).mean(axis=1) + d.min(axis=1).mean(axis=1)


def test_point_chamfer_matches_brute_force_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5]) + 3.0
    y = torch.rand(3, 25, 3, generator=g) * 4.0 - 1.0  # other size, scale and offset
    got = point_chamfer(x, y)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), numpy_chamfer(x.numpy(), y.numpy()), rtol=1e-5, atol=1e-7)
    # scale- and translation-free: only the shapes count
    np.testing.assert_allclose(point_chamfer(5.0 * x - 2.0, y).numpy(), got.numpy(), rtol=1e-4, atol=1e-6)


def _meshes():
    from pytorch3d.utils import ico_sphere

    m = ico_sphere(1)
    v, f = m.verts_packed(), m.faces_packed()
    true = [(v * torch.tensor(s), f) for s in ([1.0, 0.5, 0.3], [0.4, 0.5, 0.3], [0.6, 0.6, 0.2], [0.3, 0.8, 0.5])]
    g = torch.Generator().manual_seed(1)
    pred = (0.4 * v)[None].repeat(4, 1, 1) + 0.02 * torch.randn(4, len(v), 3, generator=g)
    cams = torch.tensor([[30.0, 30.0, 2.7], [100.0, 10.0, 2.9], [200.0, 45.0, 2.4], [310.0, 20.0, 3.0]])
    return pred, f, cams, true, cams + torch.tensor([15.0, -5.0, 0.1])


def test_view_frame_chamfer_is_brute_force_chamfer_of_its_view_frame_samples(monkeypatch):
    pred, faces, cams, true, true_cams = _meshes()
    seen = {}

    def recording(pred_pts, true_pts):
        seen["pts"] = pred_pts, true_pts
        return point_chamfer(pred_pts, true_pts)

    monkeypatch.setattr(chamfer_module, "point_chamfer", recording)
    got = view_frame_chamfer(pred, faces, cams, true, true_cams, num_points=200)
    pred_pts, true_pts = seen["pts"]
    assert pred_pts.shape == true_pts.shape == (4, 200, 3)
    # sampled in the camera frames: the objects lie about one camera distance in front
    assert torch.allclose(true_pts[..., 2].mean(1), true_cams[:, 2], atol=0.3)
    np.testing.assert_allclose(got.numpy(), numpy_chamfer(pred_pts.numpy(), true_pts.numpy()), rtol=1e-5, atol=1e-7)


def test_chamfer_metric_over_batches_equals_the_functional_on_all_instances():
    # the surface samples are random: each batch is seeded alike on both sides
    pred, faces, cams, true, true_cams = _meshes()
    parts = [slice(0, 1), slice(1, 3), slice(3, 4)]
    metric = ViewFrameChamfer(num_points=150)
    assert torch.isnan(metric.compute())
    metric.reset()
    dists = []
    for seed, s in enumerate(parts):
        torch.manual_seed(seed)
        metric.update(pred[s], faces, cams[s], true[s], true_cams[s])
        torch.manual_seed(seed)
        dists.append(view_frame_chamfer(pred[s], faces, cams[s], true[s], true_cams[s], num_points=150))
    want = torch.cat(dists)
    assert int(metric.count) == 4
    torch.testing.assert_close(metric.compute(), want.double().mean(), rtol=1e-6, atol=0)
    # and it is the `chamfer` camera_errors reports from the same per-instance distances
    rows = torch.cat([torch.zeros(4, 1), cams, true_cams, want[:, None]], dim=1)
    torch.testing.assert_close(metric.compute().float(), camera_errors(rows, 13)["chamfer"])


def test_seeded_chamfer_of_an_instance_does_not_depend_on_its_batch():
    pred, faces, cams, true, true_cams = _meshes()
    seeds = torch.tensor([11, 12, 13, 14])
    whole = view_frame_chamfer(pred, faces, cams, true, true_cams, num_points=150, seeds=seeds)
    torch.rand(7)  # the global RNG moved on: no effect
    parts = torch.cat([view_frame_chamfer(pred[s], faces, cams[s], true[s], true_cams[s], num_points=150,
                                          seeds=seeds[s]) for s in (slice(2, 4), slice(0, 2))])
    torch.testing.assert_close(whole, parts[[2, 3, 0, 1]], rtol=0, atol=0)
    other = view_frame_chamfer(pred, faces, cams, true, true_cams, num_points=150, seeds=seeds + 100)
    assert not torch.equal(whole, other)  # the seed does pick the samples

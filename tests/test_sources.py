"""Object sources: synth13 generator, renderer conventions, NMR import, ShapeNet import."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from amodal3d.categories import CATEGORIES, SYNSETS
from amodal3d.config import DataConfig
from amodal3d.datamodules.sources import SOURCES, load_objects
from amodal3d.datamodules.sources.base import (
    ALL_OBJECTS, NMR_NUM_VIEWS, MissingSourceError, SourceError, camera_eyes, count_objects, nmr_cameras,
    softras_cameras, softras_eye,
)
from amodal3d.datamodules.sources.nmr import nmr_file
from amodal3d.datamodules.sources.render import NMR_FOV, cluster_vertices, normalize_vertices, render_objects
from amodal3d.datamodules.sources.shapenet import shapenet_split
from amodal3d.datamodules.sources.sheet import object_contact_sheet
from amodal3d.datamodules.sources.synth13 import load_synth13, render_synth_objects, synth_object
from amodal3d.errors import ConfigError

VIEWS = 8  # 45 degree steps keep the tests fast while covering all sides


def small_cfg(**kw) -> DataConfig:
    base = dict(objects_per_split={"train": 2, "val": 1, "test": 1}, views=VIEWS, render_size=64)
    base.update(kw)
    return DataConfig(**base)


def bbox_diag(verts: np.ndarray) -> float:
    return float(np.linalg.norm(verts.max(0) - verts.min(0)))


# ------------------------------------------------------------------ renderer
def test_normalize_vertices_centres_and_scales():
    v = np.array([[1.0, 2.0, 3.0], [5.0, 2.0, 3.0], [1.0, 5.0, 3.0], [1.0, 2.0, 15.0]])
    n = normalize_vertices(v)
    assert n.dtype == np.float32
    np.testing.assert_allclose((n.max(0) + n.min(0)) / 2, 0, atol=1e-6)
    assert bbox_diag(n) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="degenerate"):
        normalize_vertices(np.zeros((3, 3)))


def _cube(center, size):
    from amodal3d.datamodules.sources.synth13_shapes import MeshBuilder

    b = MeshBuilder()
    b.box(center, (size, size, size), (0.8, 0.2, 0.2))
    return b.build()


def test_render_camera_conventions():
    """Azimuth 0 looks from +z with y up: world +x is image right, +y is image top."""
    right = _cube((0.3, 0.0, 0.0), 0.15)
    top = _cube((0.0, 0.3, 0.0), 0.15)
    cams = np.array([[0.0, 0.0, 2.732]], np.float32)
    out = render_objects([right, top], cams, 64)
    assert out.shape == (2, 1, 64, 64, 4) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[0, 0, ..., 3])
    assert xs.min() > 36, "a box at +x must render in the right half"
    ys, xs = np.nonzero(out[1, 0, ..., 3])
    assert ys.max() < 28, "a box at +y must render in the top half"
    # seen from azimuth 90 (camera on +x), the +x box is in front of the origin: centred
    side = render_objects([right], np.array([[90.0, 0.0, 2.732]], np.float32), 64)
    ys, xs = np.nonzero(side[0, 0, ..., 3])
    assert abs(xs.mean() - 31.5) < 2 and abs(ys.mean() - 31.5) < 2


def test_render_alpha_is_hard_and_background_black():
    out = render_objects([_cube((0, 0, 0), 0.5)], nmr_cameras(4), 32)
    assert set(np.unique(out[..., 3])) == {0, 255}
    assert (out[..., :3][out[..., 3] == 0] == 0).all()
    assert (out[..., :3][out[..., 3] == 255].max(-1) > 0).all()


def test_render_per_mesh_cameras_and_bad_input():
    mesh = _cube((0, 0, 0), 0.5)
    per = np.stack([nmr_cameras(2), nmr_cameras(2)[::-1]])  # (2 meshes, 2 views, 3)
    out = render_objects([mesh, mesh], per, 32)
    np.testing.assert_array_equal(out[0, 0], out[1, 1])
    with pytest.raises(ValueError, match="cameras must be"):
        render_objects([mesh], np.zeros((2, 2, 3), np.float32), 32)
    with pytest.raises(ValueError, match="face indices"):
        render_objects([(mesh[0], mesh[1] + 100, mesh[2])], nmr_cameras(1), 32)
    with pytest.raises(ValueError, match="colors"):
        render_objects([(mesh[0], mesh[1], np.ones((5, 3)))], nmr_cameras(1), 32)


def test_render_chunking_does_not_change_output(monkeypatch):
    from amodal3d.datamodules.sources import render as render_mod

    meshes = [_cube((0.1 * k, 0, 0), 0.3 + 0.05 * k) for k in range(3)]
    whole = render_objects(meshes, nmr_cameras(3), 32)
    monkeypatch.setattr(render_mod, "CHUNK_PIXELS", 1)  # one object per chunk
    np.testing.assert_array_equal(render_objects(meshes, nmr_cameras(3), 32), whole)


def test_cluster_vertices_keeps_silhouette_with_fewer_faces():
    from pytorch3d.utils import ico_sphere

    s = ico_sphere(5)
    v, f = s.verts_packed().numpy() * 0.45, s.faces_packed().numpy()
    cv, cf = cluster_vertices(v, f, 0.03)
    assert len(cf) < len(f) / 2
    col = np.array([0.5, 0.5, 0.5])
    a = render_objects([(v, f, col), (cv, cf, col)], nmr_cameras(3), 64)[..., 3] > 127
    iou = (a[0] & a[1]).sum() / (a[0] | a[1]).sum()
    assert iou > 0.97


# ------------------------------------------------------------------ synth13
def test_synth13_deterministic_and_split_disjoint():
    cfg = small_cfg()
    a = load_synth13(cfg, "chair", "train")
    b = load_synth13(cfg, "chair", "train")
    np.testing.assert_array_equal(a.rgba, b.rgba)
    for (va, fa), (vb, fb) in zip(a.meshes, b.meshes):
        np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(fa, fb)
    assert a.object_ids == ["synth-chair-train-0", "synth-chair-train-1"]
    val = load_synth13(cfg, "chair", "val")
    assert val.object_ids == ["synth-chair-val-0"]
    assert not np.array_equal(val.rgba[0], a.rgba[0])
    assert synth_object("chair", "val", 0).params != synth_object("chair", "train", 0).params
    other_seed = load_synth13(small_cfg(seed=1), "chair", "train")
    assert not np.array_equal(other_seed.rgba, a.rgba)
    # object k is the same whatever the requested count (subsets regenerate alone)
    one = load_synth13(small_cfg(objects_per_split={"train": 1}), "chair", "train")
    np.testing.assert_array_equal(one.rgba[0], a.rgba[0])


def test_synth13_shapes_dtypes_and_meshes():
    cfg = small_cfg()
    r = load_synth13(cfg, "airplane", "test")
    assert r.category == "airplane" and r.split == "test"
    assert r.rgba.shape == (1, VIEWS, 64, 64, 4) and r.rgba.dtype == np.uint8
    assert r.cameras.dtype == np.float32
    np.testing.assert_array_equal(r.cameras[0], nmr_cameras(VIEWS))
    v, f = r.meshes[0]
    assert v.dtype == np.float32 and f.dtype == np.int64 and f.shape[1] == 3
    assert bbox_diag(v) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose((v.max(0) + v.min(0)) / 2, 0, atol=1e-5)
    assert 0 <= f.min() and f.max() < len(v)


def test_synth13_accepts_omegaconf_and_synset_ids():
    cfg = OmegaConf.structured(small_cfg())
    r = load_objects(cfg, SYNSETS["table"], "val")
    assert r.category == "table" and r.num_objects == 1


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_renders_framed_silhouettes(category):
    objs = [synth_object(category, "train", k) for k in range(3)]
    assert all(24 <= len(o.faces) <= 3000 for o in objs), [len(o.faces) for o in objs]
    meshes = [(o.verts, o.faces, o.colors) for o in objs]
    rgba = render_objects(meshes, nmr_cameras(VIEWS), 64, cull_backfaces=True)
    sil = rgba[..., 3] > 127
    area = sil.mean((2, 3))
    assert area.min() > 0.008, f"{category}: a view is nearly empty ({area.min():.4f})"
    assert area.max() < 0.5, f"{category}: object fills the frame ({area.max():.3f})"
    border = sil[..., :3, :].any() or sil[..., -3:, :].any() or sil[..., :, :3].any() or sil[..., :, -3:].any()
    assert not border, f"{category}: silhouette reaches the image border (clipped or too large)"
    rows, cols = sil.any(3), sil.any(2)
    span = np.maximum(rows.sum(-1), cols.sum(-1))
    assert span.min() >= 16, f"{category}: object too small in the frame ({span.min()} px)"
    # synth13 renders with back-face culling: it must not change any silhouette
    plain = render_objects(meshes, nmr_cameras(VIEWS), 64, cull_backfaces=False)
    np.testing.assert_array_equal(plain[..., 3], rgba[..., 3])


@pytest.mark.parametrize("category", CATEGORIES)
def test_synth13_meshes_are_mirror_symmetric_about_x0(category):
    """The shared frame promises bilateral symmetry (the recon stage's symmetric offsets)."""
    for k in range(3):
        v = synth_object(category, "train", k).verts.astype(np.float64)
        mirrored = v * [-1.0, 1.0, 1.0]
        d = np.sqrt(((mirrored[:, None, :] - v[None, :, :]) ** 2).sum(-1)).min(1)
        assert d.max() < 1e-5, f"{category} #{k}: vertex without a mirror image ({d.max():.2g})"


@pytest.mark.parametrize("category", CATEGORIES)
def test_shape_parameters_vary(category):
    objs = [synth_object(category, "train", k) for k in range(6)]
    keys = objs[0].params.keys()
    varying = [k for k in keys if len({round(o.params[k], 6) for o in objs}) > 1]
    assert len(varying) >= 3, f"{category}: only {varying} vary"
    extents = np.stack([o.verts.max(0) - o.verts.min(0) for o in objs])
    assert extents.std(0).max() > 0.02, f"{category}: proportions do not change"


# ------------------------------------------------------------------ cameras: synth13 unchanged, NMR = SoftRas
#: nmr_cameras as the code computed them before softras_cameras existed (recorded from that
#: code): every synth13 dataset rests on these exact float32 values
NMR_CAMERAS_HEAD_HEX = "000000000000f04117d92e40000070410000f04117d92e400000f0410000f04117d92e40"
NMR_CAMERAS_SHA256 = {
    24: "b01ef52d00056f30fa120ac1bf8c187026d55e22525dfd1e7e8201c35ace8a84",
    8: "1cfc91ca2c7349d3882fbae211ca02c3004e8da7c12254a595f9e68c23a16a41",
    6: "30b0ee0b74d9e76ac9907fe324dd1637c695d0672d2519ec3f5ceed5984d3614",
}


def test_synth13_cameras_are_unchanged():
    head = nmr_cameras()[:3]
    assert head.dtype == np.float32
    assert head.tobytes().hex() == NMR_CAMERAS_HEAD_HEX
    np.testing.assert_array_equal(head, np.array([[0, 30, 2.732], [15, 30, 2.732], [30, 30, 2.732]], np.float32))
    for views, digest in NMR_CAMERAS_SHA256.items():
        assert hashlib.sha256(nmr_cameras(views).tobytes()).hexdigest() == digest, views
    # what synth13 records, and the cameras it renders with, for the default 24 views
    cfg = small_cfg(objects_per_split={"train": 1}, views=24, render_size=32)
    r = load_synth13(cfg, "chair", "train")
    assert hashlib.sha256(np.ascontiguousarray(r.cameras[0]).tobytes()).hexdigest() == NMR_CAMERAS_SHA256[24]
    reference = np.array([[15.0 * k, 30.0, 2.732] for k in range(24)], np.float32)
    np.testing.assert_array_equal(r.rgba, render_synth_objects([synth_object("chair", "train", 0)], reference, 32))


def test_softras_cameras_put_the_eye_where_softras_does():
    """SoftRas: view k at azimuth -15k, eye (d cos e sin a, d sin e, -d cos e cos a); pytorch3d's
    look_at_view_transform: eye (d cos e sin a, d sin e, +d cos e cos a)."""
    from pytorch3d.renderer.cameras import camera_position_from_spherical_angles

    cams = softras_cameras()
    assert cams.shape == (NMR_NUM_VIEWS, 3) and cams.dtype == np.float32
    assert (cams[:, 1] == np.float32(30.0)).all() and (cams[:, 2] == np.float32(2.732)).all()
    d, e = 2.732, math.radians(30.0)
    for k in range(NMR_NUM_VIEWS):
        a = math.radians(-15.0 * k)
        softras = np.array([d * math.cos(e) * math.sin(a), d * math.sin(e), -d * math.cos(e) * math.cos(a)])
        az = math.radians(float(cams[k, 0]))
        ours = np.array([d * math.cos(e) * math.sin(az), d * math.sin(e), d * math.cos(e) * math.cos(az)])
        np.testing.assert_allclose(ours, softras, atol=1e-5, err_msg=f"view {k}")
        np.testing.assert_allclose(softras_eye(d, 30.0, -15.0 * k), softras, atol=1e-12)
        np.testing.assert_allclose(camera_eyes(cams[k]), ours, atol=1e-5)
        p3d = camera_position_from_spherical_angles(cams[k, 2], cams[k, 1], cams[k, 0])[0].double().numpy()
        np.testing.assert_allclose(p3d, softras, atol=1e-5, err_msg=f"view {k}")
        # the synth13 views (+15k) are SoftRas's eyes reflected through the y axis, never the same
        old = camera_eyes(nmr_cameras()[k])
        np.testing.assert_allclose(old * [-1, 1, -1], softras, atol=1e-5)
        assert np.linalg.norm(old - softras) > 1.0
    assert 0.0 <= cams[:, 0].min() and cams[:, 0].max() < 360.0
    np.testing.assert_allclose(cams[:, 0], (180.0 + 15.0 * np.arange(24)) % 360.0, atol=1e-4)


def _asymmetric_mesh():
    """A bar with a post at +x pointing up and an arm at -x pointing to +z: no mirror or turn symmetry."""
    from amodal3d.datamodules.sources.synth13_shapes import MeshBuilder

    b, col = MeshBuilder(), (0.6, 0.4, 0.3)
    b.box((0.0, 0.0, 0.0), (0.5, 0.12, 0.12), col)
    b.box((0.2, 0.17, 0.0), (0.1, 0.22, 0.1), col)
    b.box((-0.2, -0.03, 0.22), (0.1, 0.06, 0.32), col)
    return b.build()


def _silhouettes_at_eyes(verts, faces, eyes: np.ndarray, size: int) -> np.ndarray:
    """bool (V, size, size): pytorch3d renders from the given eye positions (looking at the origin, y up)."""
    import torch
    from pytorch3d.renderer import FoVPerspectiveCameras, MeshRasterizer, RasterizationSettings, look_at_view_transform
    from pytorch3d.structures import Meshes

    R, T = look_at_view_transform(eye=torch.tensor(eyes, dtype=torch.float32))
    cams = FoVPerspectiveCameras(R=R, T=T, fov=NMR_FOV, znear=0.1, zfar=100.0)
    n = len(eyes)
    meshes = Meshes(verts=[torch.from_numpy(verts)] * n, faces=[torch.from_numpy(faces)] * n)
    settings = RasterizationSettings(image_size=size, blur_radius=0.0, faces_per_pixel=1, bin_size=0)
    return (MeshRasterizer(cameras=cams, raster_settings=settings)(meshes).pix_to_face[..., 0] >= 0).numpy()


def test_nmr_view_k_renders_what_softras_describes_for_view_k(tmp_path):
    verts, faces, colors = _asymmetric_mesh()
    eyes = np.stack([softras_eye(2.732, 30.0, -15.0 * k) for k in range(NMR_NUM_VIEWS)])
    expected = _silhouettes_at_eyes(verts, faces, eyes, 32)
    assert (expected.sum((1, 2)) > 30).all()  # every view sees the object
    # the cameras the NMR importer records for view k
    np.savez(tmp_path / f"{SYNSETS['car']}_test_images.npz", np.zeros((NMR_NUM_VIEWS, 4, 64, 64), np.uint8))
    recorded = load_objects(nmr_cfg(tmp_path, objects_per_split={"test": 1}), "car", "test").cameras[0]
    ours = render_objects([(verts, faces, colors)], recorded, 32)[0, ..., 3] > 127
    np.testing.assert_array_equal(ours, expected)
    # the synth13 views (+15k) would show another picture in every view of this mesh
    old = render_objects([(verts, faces, colors)], nmr_cameras(), 32)[0, ..., 3] > 127
    iou = (old & expected).sum((1, 2)) / (old | expected).sum((1, 2))
    assert iou.max() < 0.75, iou


# ------------------------------------------------------------------ nmr
def _nmr_array(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n * NMR_NUM_VIEWS, 4, 64, 64), dtype=np.float32)


def nmr_cfg(folder, **kw) -> DataConfig:
    return DataConfig(source="nmr", source_path=str(folder), **kw)


def test_nmr_import_matches_file(tmp_path):
    arr = _nmr_array(3)
    np.savez(tmp_path / f"{SYNSETS['car']}_train_images.npz", arr)
    r = load_objects(nmr_cfg(tmp_path, objects_per_split={"train": ALL_OBJECTS}), "car", "train")
    assert r.rgba.shape == (3, 24, 64, 64, 4) and r.rgba.dtype == np.uint8
    expected = (arr * 255 + 0.5).astype(np.uint8).reshape(3, 24, 4, 64, 64).transpose(0, 1, 3, 4, 2)
    np.testing.assert_array_equal(r.rgba, expected)
    assert r.object_ids == [f"nmr-02958343-train-{k}" for k in range(3)]
    np.testing.assert_array_equal(r.cameras, np.repeat(softras_cameras()[None], 3, 0))
    assert r.meshes is None
    capped = load_objects(nmr_cfg(tmp_path, objects_per_split={"train": 2}), "car", "train")
    np.testing.assert_array_equal(capped.rgba, expected[:2])
    # the builder's progress total: the file's objects (from its header), capped
    assert count_objects(nmr_cfg(tmp_path, objects_per_split={"train": ALL_OBJECTS}), "car", "train") == 3
    assert count_objects(nmr_cfg(tmp_path, objects_per_split={"train": 2}), "car", "train") == 2
    assert count_objects(nmr_cfg(tmp_path, objects_per_split={"train": 50}), "car", "train") == 3


def test_objects_per_split_rule_of_the_real_sources(tmp_path):
    np.savez(tmp_path / f"{SYNSETS['car']}_val_images.npz", _nmr_array(2))
    for n in (0, -2):
        with pytest.raises(ConfigError, match=re.escape(f"data.objects_per_split.val={n}")) as err:
            load_objects(nmr_cfg(tmp_path, objects_per_split={"val": n}), "car", "val")
        assert "-1" in str(err.value)  # says how to ask for every model
    tree = _shapenet_tree(tmp_path / "sn")
    cfg = DataConfig(source="shapenet", source_path=str(tmp_path / "sn"), views=2, objects_per_split={"test": 0})
    with pytest.raises(ConfigError, match=r"data\.objects_per_split\.test=0 means the test split is not built"):
        load_objects(cfg, "bench", "test")
    with pytest.raises(ConfigError, match=r"objects_per_split\.test=-5: expected -1"):
        load_objects(dataclasses.replace(cfg, objects_per_split={"test": -5}), "bench", "test")
    r = load_objects(dataclasses.replace(cfg, objects_per_split={"test": ALL_OBJECTS}), "bench", "test")
    assert r.object_ids == tree["test"]
    # synth13 keeps needing a positive count
    with pytest.raises(ValueError, match="synth13 needs a positive object count"):
        load_synth13(small_cfg(objects_per_split={"train": ALL_OBJECTS}), "chair", "train")


def test_nmr_uint8_and_compressed(tmp_path):
    arr = (_nmr_array(2, seed=1) * 255).astype(np.uint8)
    np.savez_compressed(tmp_path / f"{SYNSETS['lamp']}_val_images.npz", arr)
    r = load_objects(nmr_cfg(tmp_path), "lamp", "val")
    np.testing.assert_array_equal(r.rgba, arr.reshape(2, 24, 4, 64, 64).transpose(0, 1, 3, 4, 2))
    # the object-major (N, 24, 4, 64, 64) form of the same data reads identically
    np.savez(tmp_path / f"{SYNSETS['lamp']}_test_images.npz", arr.reshape(2, 24, 4, 64, 64))
    np.testing.assert_array_equal(load_objects(nmr_cfg(tmp_path), "lamp", "test").rgba, r.rgba)


def test_nmr_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="NMR folder not found"):
        load_objects(nmr_cfg(tmp_path / "missing"), "car", "train")
    with pytest.raises(FileNotFoundError) as err:
        load_objects(nmr_cfg(tmp_path), "car", "test")
    assert str(nmr_file(tmp_path, "car", "test")) in str(err.value)
    bad = tmp_path / f"{SYNSETS['sofa']}_train_images.npz"
    np.savez(bad, np.zeros((25, 4, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"must have shape \(N\*24, 4, 64, 64\), got \(25, 4, 64, 64\)") as err:
        load_objects(nmr_cfg(tmp_path), "sofa", "train")
    assert str(bad) in str(err.value)
    np.savez(bad, np.full((24, 4, 64, 64), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_objects(nmr_cfg(tmp_path), "sofa", "train")
    with pytest.raises(ValueError, match="unknown category"):
        load_objects(nmr_cfg(tmp_path), "toaster", "train")


# ------------------------------------------------------------------ shapenet
def _ids_in_split(split: str, count: int, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < count:
        mid = f"{prefix}{i:04d}"
        if shapenet_split(mid) == split:
            out.append(mid)
        i += 1
    return out


def _box_obj(sx: float = 1.0, header: str = "") -> str:
    """A 12-triangle box OBJ, stretched sx times along x."""
    corners = [(x * sx, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    tris = [(1, 2, 4), (1, 4, 3), (5, 7, 8), (5, 8, 6), (1, 5, 6), (1, 6, 2),
            (3, 4, 8), (3, 8, 7), (1, 3, 7), (1, 7, 5), (2, 6, 8), (2, 8, 4)]
    lines = [header] if header else []
    lines += [f"v {x} {y} {z}" for x, y, z in corners] + [f"f {a} {b} {c}" for a, b, c in tris]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _shapenet_tree(root: Path) -> dict:
    syn = root / SYNSETS["bench"]
    good_v1, good_v2, empty, garbage = _ids_in_split("train", 4, "m")
    _write(syn / good_v1 / "model.obj", _box_obj(1.0))
    # v2 layout: a long box that references a .mtl file that is absent
    _write(syn / good_v2 / "models" / "model_normalized.obj", _box_obj(4.0, "mtllib model_normalized.mtl"))
    _write(syn / empty / "model.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    _write(syn / garbage / "models" / "model_normalized.obj", "not an obj\nv 1 2\nf x y z\n")
    (test_id,) = _ids_in_split("test", 1, "t")
    _write(syn / test_id / "model.obj", _box_obj(2.0))
    return dict(good=sorted([good_v1, good_v2]), v1=good_v1, v2=good_v2, bad=sorted([empty, garbage]), empty=empty,
                garbage=garbage, test=[test_id])


def test_shapenet_split_is_stable_and_balanced():
    ids = [f"id{i}" for i in range(3000)]
    splits = [shapenet_split(i) for i in ids]
    assert splits == [shapenet_split(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert 0.76 < frac["train"] < 0.84 and 0.07 < frac["val"] < 0.13 and 0.07 < frac["test"] < 0.13


def test_shapenet_v1_v2_layouts_and_skips(tmp_path):
    tree = _shapenet_tree(tmp_path)
    cfg = DataConfig(source="shapenet", source_path=str(tmp_path), views=4,
                     objects_per_split={"train": ALL_OBJECTS, "val": ALL_OBJECTS, "test": ALL_OBJECTS})
    with pytest.warns(UserWarning) as rec:
        r = load_objects(cfg, "bench", "train")
    assert r.object_ids == tree["good"]
    assert sorted(r.skipped) == tree["bad"]
    messages = " ".join(str(w.message) for w in rec)
    assert all(mid in messages for mid in tree["bad"])
    reasons = dict(zip(r.skipped, r.skip_reasons))
    empty, garbage = tree["empty"], tree["garbage"]
    assert reasons[empty] == f"{SYNSETS['bench']}/{empty}/model.obj: OBJ has no faces"
    assert reasons[garbage].startswith(f"{SYNSETS['bench']}/{garbage}/models/model_normalized.obj: cannot parse OBJ")
    assert r.skipped_records() == [{"id": m, "reason": reasons[m]} for m in r.skipped]
    assert r.rgba.shape == (2, 4, 64, 64, 4)
    assert (r.silhouettes().mean((2, 3)) > 0.02).all()
    for v, f in r.meshes:
        assert bbox_diag(v) == pytest.approx(1.0, abs=1e-4) and len(f) == 12
    # the v2 model is 4x longer in x, the v1 one a cube: the v2 file was the one read
    ext = {mid: v.max(0) - v.min(0) for mid, (v, _) in zip(r.object_ids, r.meshes)}
    assert ext[tree["v2"]][0] == pytest.approx(4 * ext[tree["v2"]][1], rel=1e-4)
    v1 = next(m for m in tree["good"] if m != tree["v2"])
    assert ext[v1][0] == pytest.approx(ext[v1][1], rel=1e-4)
    test = load_objects(cfg, "bench", "test")
    assert test.object_ids == tree["test"] and test.skipped == []


def test_shapenet_cap_counts_valid_models(tmp_path):
    tree = _shapenet_tree(tmp_path)
    cfg = DataConfig(source="shapenet", source_path=str(tmp_path), views=2, objects_per_split={"train": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = load_objects(cfg, "bench", "train")
    assert r.object_ids == tree["good"][:1]


def test_shapenet_errors(tmp_path):
    cfg = DataConfig(source="shapenet", source_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="ShapeNetCore folder not found"):
        load_objects(cfg, "car", "train")
    cfg = dataclasses.replace(cfg, source_path=str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_objects(cfg, "car", "train")
    assert str(tmp_path / SYNSETS["car"]) in str(err.value)
    with pytest.raises(ValueError, match="unknown category"):
        load_objects(cfg, "spaceship", "train")


def _progress_lines(text: str) -> list[tuple[int, int, str]]:
    """(done, total, message) of the builder's plain progress lines."""
    return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(r"^\[data +\d+s (\d+)/(\d+)\] (.*)$", text, re.M)]


def test_build_shapenet_all_models_records_skips_and_counts_found_models(tmp_path, capsys):
    from amodal3d.datamodules.build import build_dataset

    tree = _shapenet_tree(tmp_path / "sn")
    views = 2
    cfg = DataConfig(root=str(tmp_path / "d"), source="shapenet", source_path=str(tmp_path / "sn"), categories=["bench"],
                     views=views, objects_per_split={"train": ALL_OBJECTS, "val": 0, "test": ALL_OBJECTS})
    with pytest.warns(UserWarning, match="skipping model"):
        m = build_dataset(cfg, progress=True)
    assert set(m["splits"]) == {"train", "test"}  # -1: every model; 0: the split is not built
    train = m["objects"]["train"]["bench"]
    assert train["ids"] == tree["good"] and train["count"] == 2
    assert [rec["id"] for rec in train["skipped"]] == tree["bad"]  # id and reason of each, in reading order
    reasons = {rec["id"]: rec["reason"] for rec in train["skipped"]}
    assert reasons[tree["empty"]] == f"{SYNSETS['bench']}/{tree['empty']}/model.obj: OBJ has no faces"
    assert reasons[tree["garbage"]].startswith(
        f"{SYNSETS['bench']}/{tree['garbage']}/models/model_normalized.obj: cannot parse OBJ")
    test = m["objects"]["test"]["bench"]
    assert test["ids"] == tree["test"] and "skipped" not in test  # nothing skipped: no key
    lines = _progress_lines(capsys.readouterr().out)
    # before anything is read: the 4 + 1 model folders found, not a cap
    assert lines[0][1] == (4 + 1) * views
    # once read, the 2 unusable models drop out, and the bar ends full
    assert lines[-1][0] == lines[-1][1] == (2 + 1) * views
    assert m["counts"]["train"]["images"] + sum(m["counts"]["train"]["skipped"].values()) == 2 * views
    # a resumed build (every shard done, the manifest lost) settles the total from the sidecars
    (tmp_path / "d" / "manifest.json").unlink()
    again = build_dataset(cfg, progress=True)
    assert again["objects"] == m["objects"]
    lines = _progress_lines(capsys.readouterr().out)
    assert any("already built" in msg for _, _, msg in lines)
    assert lines[-1][0] == lines[-1][1] == (2 + 1) * views


def test_build_progress_total_ignores_a_large_cap(tmp_path, capsys):
    from amodal3d.datamodules.build import build_dataset

    _shapenet_tree(tmp_path / "sn")
    cfg = DataConfig(root=str(tmp_path / "d"), source="shapenet", source_path=str(tmp_path / "sn"), categories=["bench"],
                     views=2, objects_per_split={"train": 50, "val": 0, "test": 50})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dataset(cfg, progress=True)
    lines = _progress_lines(capsys.readouterr().out)
    assert lines[0][1] == (4 + 1) * 2 and lines[-1][0] == lines[-1][1] == (2 + 1) * 2


def test_build_objects_per_split_rule(tmp_path, capsys):
    from amodal3d.datamodules.build import build_dataset

    base = DataConfig(root=str(tmp_path / "d"), categories=["chair"], views=2, render_size=32, image_size=32,
                      objects_per_split={"train": 1, "val": 0, "test": 0})
    with pytest.raises(ConfigError, match=r"data\.objects_per_split\.train=-1 .*synth13 generates its objects"):
        build_dataset(dataclasses.replace(base, objects_per_split={"train": ALL_OBJECTS}), progress=False)
    with pytest.raises(ConfigError, match=r"data\.objects_per_split\.val=-2: expected -1"):
        build_dataset(dataclasses.replace(base, source="shapenet", objects_per_split={"train": 1, "val": -2}),
                      progress=False)
    assert not (tmp_path / "d" / "generator.json").exists()  # refused before anything was claimed
    m = build_dataset(base, progress=True)  # synth13 as before: 0 leaves a split out
    assert set(m["splits"]) == {"train"} and m["objects"]["train"]["chair"]["count"] == 1
    assert "skipped" not in m["objects"]["train"]["chair"]
    lines = _progress_lines(capsys.readouterr().out)
    assert lines[0][1] == 1 * 2 and lines[-1][0] == lines[-1][1] == 2


# ------------------------------------------------------------------ shapenet: official split file
SPLIT_HEADER = "id,synsetId,subSynsetId,modelId,split"


def _split_cfg(tmp_path: Path, split_file: Path, **kw):
    base = DataConfig(source="shapenet", source_path=str(tmp_path / "sn"), views=2,
                      objects_per_split={"train": ALL_OBJECTS, "val": ALL_OBJECTS, "test": ALL_OBJECTS}, **kw)
    return OmegaConf.create({**dataclasses.asdict(base), "split_file": str(split_file)})


def _split_fixture(tmp_path: Path) -> tuple[dict, Path]:
    """The shapenet tree and a split CSV that moves its models against the hash split."""
    tree = _shapenet_tree(tmp_path / "sn")
    bench = SYNSETS["bench"].lstrip("0")  # as the official file writes it: no leading zero
    rows = [SPLIT_HEADER,
            f"1,{bench},2828884,{tree['v1']},test",
            f"2,{bench},2828884,{tree['v2']},train",
            f"3,{bench},2828884,{tree['test'][0]},val",
            f"4,{bench},2828884,{tree['empty']},train",
            f"5,{bench},2828884,absentmodel,train",  # listed, no folder: nothing to read
            f"6,{SYNSETS['car']},2958343,{tree['garbage']},test",  # another synset's row
            ""]
    path = tmp_path / "all.csv"
    path.write_text("\n".join(rows))
    return tree, path


def test_shapenet_split_file_decides_the_split(tmp_path):
    tree, path = _split_fixture(tmp_path)
    cfg = _split_cfg(tmp_path, path)
    with pytest.warns(UserWarning) as rec:
        train = load_objects(cfg, "bench", "train")
    assert train.object_ids == [tree["v2"]] and train.skipped == [tree["empty"]]
    # the folder the file does not list (for bench) belongs to no split, and a warning says so
    unlisted = [str(w.message) for w in rec if "not listed" in str(w.message)]
    assert len(unlisted) == 1 and tree["garbage"] in unlisted[0] and str(path) in unlisted[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = load_objects(cfg, "bench", "val")
        test = load_objects(cfg, "bench", "test")
        assert count_objects(cfg, "bench", "train") == 2  # v2 and the faceless one: the folders found
    assert val.object_ids == tree["test"] and test.object_ids == [tree["v1"]]
    everything = set(train.object_ids + train.skipped + val.object_ids + test.object_ids)
    assert tree["garbage"] not in everything
    # without the file, the hash split as before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hashed = load_objects(OmegaConf.merge(cfg, {"split_file": ""}), "bench", "train")
    assert hashed.object_ids == tree["good"]


@pytest.mark.parametrize("text, row, what", [
    (SPLIT_HEADER + "\n1,2828884,2828884,m0001,training\n", 2, "split 'training' is not one of train, val, test"),
    ("id,synsetId,subSynsetId,modelId\n1,2828884,2828884,m0001\n", 1, "lacks column(s) split"),
    (SPLIT_HEADER + "\n1,2828884,2828884,a,train\n2,2828884,2828884\n", 3, "expected 5 fields, found 3"),
    (SPLIT_HEADER + "\n1,bench,2828884,m0001,train\n", 2, "synsetId 'bench' is not a ShapeNet synset id"),
    (SPLIT_HEADER + "\n1,2828884,2828884,,train\n", 2, "modelId '' is not a model folder name"),
    (SPLIT_HEADER + "\n1,2828884,x,a,train\n2,2828884,x,b,val\n3,2828884,x,a,test\n", 4,
     "listed again with split 'test' (row 2: 'train')"),
])
def test_shapenet_bad_split_file_names_file_and_row(tmp_path, text, row, what):
    _shapenet_tree(tmp_path / "sn")
    path = tmp_path / "split.csv"
    path.write_text(text)
    with pytest.raises(SourceError) as err:
        load_objects(_split_cfg(tmp_path, path), "bench", "train")
    msg = str(err.value)
    assert msg.startswith(f"{path}: row {row}: ") and what in msg, msg


def test_shapenet_split_file_errors(tmp_path):
    _shapenet_tree(tmp_path / "sn")
    missing = tmp_path / "nope.csv"
    with pytest.raises(MissingSourceError, match=re.escape(f"data.split_file not found: {missing}")):
        load_objects(_split_cfg(tmp_path, missing), "bench", "train")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SourceError, match=re.escape(f"{empty}: empty file")):
        load_objects(_split_cfg(tmp_path, empty), "bench", "train")
    other = tmp_path / "cars.csv"
    other.write_text(SPLIT_HEADER + f"\n1,{SYNSETS['car']},x,abc,train\n")
    with pytest.raises(SourceError, match=re.escape(f"{other}: no row has synsetId {SYNSETS['bench']} (bench)")):
        load_objects(_split_cfg(tmp_path, other), "bench", "train")
    # the NMR renders come split already: a split file there is an error, not silently ignored
    np.savez(tmp_path / f"{SYNSETS['car']}_train_images.npz", _nmr_array(1))
    nmr = OmegaConf.create({**dataclasses.asdict(nmr_cfg(tmp_path)), "split_file": str(other)})
    with pytest.raises(ConfigError, match="does not apply to data.source=nmr"):
        load_objects(nmr, "car", "train")


# ------------------------------------------------------------------ registry, sheet
def test_registry_and_errors():
    assert set(SOURCES) == {"synth13", "nmr", "shapenet"}
    with pytest.raises(ValueError, match="valid sources: synth13, nmr, shapenet"):
        load_objects(DataConfig(source="blender"), "car", "train")
    with pytest.raises(ValueError, match="unknown category"):
        load_objects(small_cfg(), "toaster", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_objects(small_cfg(), "car", "holdout")
    with pytest.raises(ValueError, match="objects_per_split has no entry"):
        load_objects(small_cfg(objects_per_split={"train": 1}), "car", "val")


def test_contact_sheet(tmp_path):
    from PIL import Image

    cfg = small_cfg(categories=["car", "lamp"])
    out = object_contact_sheet(cfg, tmp_path / "sheet.png", views=(0, 2), objects_per_category=1)
    img = np.asarray(Image.open(out))
    assert img.shape[0] > 2 * 64 and img.shape[1] > 2 * 64
    assert (img < 200).any()  # objects were drawn
    with pytest.raises(ValueError, match="views must lie"):
        object_contact_sheet(cfg, tmp_path / "x.png", views=(0, VIEWS))

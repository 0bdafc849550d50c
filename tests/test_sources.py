"""Object sources: synth13 generator, renderer conventions, NMR import, ShapeNet import."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from amodal3d.categories import CATEGORIES, SYNSETS
from amodal3d.config import DataConfig
from amodal3d.datamodules.sources import SOURCES, load_objects
from amodal3d.datamodules.sources.base import NMR_NUM_VIEWS, nmr_cameras
from amodal3d.datamodules.sources.nmr import nmr_file
from amodal3d.datamodules.sources.render import cluster_vertices, normalize_vertices, render_objects
from amodal3d.datamodules.sources.shapenet import shapenet_split
from amodal3d.datamodules.sources.sheet import object_contact_sheet
from amodal3d.datamodules.sources.synth13 import load_synth13, synth_object

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


# ------------------------------------------------------------------ nmr
def _nmr_array(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n * NMR_NUM_VIEWS, 4, 64, 64), dtype=np.float32)


def nmr_cfg(folder, **kw) -> DataConfig:
    return DataConfig(source="nmr", source_path=str(folder), **kw)


def test_nmr_import_matches_file(tmp_path):
    arr = _nmr_array(3)
    np.savez(tmp_path / f"{SYNSETS['car']}_train_images.npz", arr)
    r = load_objects(nmr_cfg(tmp_path, objects_per_split={"train": 0}), "car", "train")
    assert r.rgba.shape == (3, 24, 64, 64, 4) and r.rgba.dtype == np.uint8
    expected = (arr * 255 + 0.5).astype(np.uint8).reshape(3, 24, 4, 64, 64).transpose(0, 1, 3, 4, 2)
    np.testing.assert_array_equal(r.rgba, expected)
    assert r.object_ids == [f"nmr-02958343-train-{k}" for k in range(3)]
    np.testing.assert_array_equal(r.cameras, np.repeat(nmr_cameras()[None], 3, 0))
    assert r.meshes is None
    capped = load_objects(nmr_cfg(tmp_path, objects_per_split={"train": 2}), "car", "train")
    np.testing.assert_array_equal(capped.rgba, expected[:2])


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
    return dict(good=sorted([good_v1, good_v2]), v2=good_v2, bad=sorted([empty, garbage]), test=[test_id])


def test_shapenet_split_is_stable_and_balanced():
    ids = [f"id{i}" for i in range(3000)]
    splits = [shapenet_split(i) for i in ids]
    assert splits == [shapenet_split(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert 0.76 < frac["train"] < 0.84 and 0.07 < frac["val"] < 0.13 and 0.07 < frac["test"] < 0.13


def test_shapenet_v1_v2_layouts_and_skips(tmp_path):
    tree = _shapenet_tree(tmp_path)
    cfg = DataConfig(source="shapenet", source_path=str(tmp_path), views=4,
                     objects_per_split={"train": 0, "val": 0, "test": 0})
    with pytest.warns(UserWarning) as rec:
        r = load_objects(cfg, "bench", "train")
    assert r.object_ids == tree["good"]
    assert sorted(r.skipped) == tree["bad"]
    messages = " ".join(str(w.message) for w in rec)
    assert all(mid in messages for mid in tree["bad"])
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

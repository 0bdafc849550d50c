"""Occlusion composites: mask invariants, occlusion range, determinism, paste layering."""

from __future__ import annotations

import numpy as np
import pytest

from amodal3d.categories import category_index
from amodal3d.datamodules.composites import (
    BACKGROUNDS, CompositeParams, ObjectPool, erase, mask_box, paste, resize_rgba,
)
from amodal3d.datamodules.sources.base import ObjectRenders
from fakes import blob_objects


def fake_objects(category: str, split: str, n: int = 3, views: int = 4, size: int = 64, seed: int = 0):
    """Ellipses and rectangles of random sizes, one colour each: no renderer needed."""
    return blob_objects(category, split, n, views, size, [seed, category_index(category), len(split), n])


def _erase_all(objs: ObjectRenders, params: CompositeParams, split: str = "train", offset: int = 0):
    out, skipped = [], []
    for o in range(objs.num_objects):
        for v in range(objs.num_views):
            idx = o * objs.num_views + v
            c, reason = erase(
                objs.rgba[o, v], objs.cameras[o, v], params=params, split=split, category=objs.category,
                object_id=offset + o, view_id=v, index=idx, image_id=idx,
            )
            (out if c is not None else skipped).append(c if c is not None else reason)
    return out, skipped


def test_erase_masks_and_occlusion_range():
    objs = fake_objects("chair", "train", n=4, views=6)
    params = CompositeParams(occlusion_min=0.1, occlusion_max=0.7)
    comps, skipped = _erase_all(objs, params, offset=10)
    assert len(comps) >= 20
    for c in comps:
        a, v, o = c.amodal[0], c.visible[0], c.occluder[0]
        assert not (v & ~a).any(), "visible must lie inside amodal"
        assert np.array_equal(v, a & ~o), "visible = silhouette minus the erased region"
        occ = 1 - v.sum() / a.sum()
        assert 0.1 <= occ <= 0.7
        assert c.fields["occlusion"][0] == pytest.approx(occ, abs=1e-6)
        assert np.array_equal(c.fields["amodal_box"][0], mask_box(a))
        assert np.array_equal(c.fields["visible_box"][0], mask_box(v))
        assert c.fields["category"][0] == category_index("chair")
        assert 10 <= c.fields["object_id"][0] < 14
        assert c.image.dtype == np.uint8 and c.image.shape == (64, 64, 3)
    o, view = divmod(comps[0].image_id, 6)
    assert np.array_equal(comps[0].fields["camera"][0], objs.cameras[o, view])
    # the amodal mask is exactly the render's silhouette
    assert np.array_equal(comps[0].amodal[0], objs.rgba[o, view, ..., 3] > 127)


def test_erasers_are_rectangles_or_bands_some_touching_the_border():
    objs = fake_objects("car", "train", n=6, views=8)
    comps, _ = _erase_all(objs, CompositeParams())
    touching = [c.occluder[0][[0, -1]].any() or c.occluder[0][:, [0, -1]].any() for c in comps]
    assert 0.2 < np.mean(touching) < 1.0
    assert {c.background for c in comps} == set(BACKGROUNDS)


def test_erase_is_deterministic_per_sample_and_independent_of_order():
    objs = fake_objects("lamp", "val", n=2, views=3)
    params = CompositeParams(seed=3)
    kw = dict(params=params, split="val", category="lamp", object_id=0, view_id=1, index=1, image_id=1)
    a, _ = erase(objs.rgba[0, 1], objs.cameras[0, 1], **kw)
    _erase_all(objs, params, split="val")  # other samples in between change nothing
    b, _ = erase(objs.rgba[0, 1], objs.cameras[0, 1], **kw)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.occluder, b.occluder)
    c, _ = erase(objs.rgba[0, 1], objs.cameras[0, 1], **{**kw, "params": CompositeParams(seed=4)})
    assert not np.array_equal(a.occluder, c.occluder)


def test_erase_skips_with_reason_when_range_unreachable_or_silhouette_empty():
    objs = fake_objects("sofa", "test", n=1, views=2)
    params = CompositeParams(occlusion_min=0.995, occlusion_max=0.999)
    comp, reason = erase(objs.rgba[0, 0], objs.cameras[0, 0], params=params, split="test", category="sofa",
                         object_id=0, view_id=0, index=0, image_id=0)
    assert comp is None and reason == "occlusion_out_of_range"
    empty = np.zeros_like(objs.rgba[0, 0])
    comp, reason = erase(empty, objs.cameras[0, 0], params=CompositeParams(), split="test", category="sofa",
                         object_id=0, view_id=0, index=0, image_id=0)
    assert comp is None and reason == "empty_silhouette"


def test_erase_resizes_renders_to_image_size():
    objs = fake_objects("phone", "train", n=1, views=1, size=32)
    comp, _ = erase(objs.rgba[0, 0], objs.cameras[0, 0], params=CompositeParams(image_size=64), split="train",
                    category="phone", object_id=0, view_id=0, index=0, image_id=0)
    assert comp.image.shape == (64, 64, 3) and comp.amodal.shape == (1, 64, 64)
    big = resize_rgba(objs.rgba[0, 0], 64)[..., 3] > 127
    assert np.array_equal(comp.amodal[0], big)


def _pool(split="train", squares=False):
    renders = [fake_objects(c, split, n=3, views=4) for c in ("chair", "car", "vessel")]
    if squares:  # objects that fill their box: a big one in front can hide a small one entirely
        for r in renders:
            r.rgba[..., 3] = 0
            r.rgba[..., 20:44, 20:44, 3] = 255
    return ObjectPool.from_renders(renders)


@pytest.mark.parametrize("occ_max", [0.7, 1.0])
def test_paste_layering_invariants(occ_max):
    pool = _pool(squares=occ_max == 1.0)
    params = CompositeParams(composite="paste", image_size=96, paste_objects_min=2, paste_objects_max=5,
                             paste_scale_min=0.15 if occ_max == 1.0 else 0.4, paste_scale_max=0.8,
                             occlusion_max=occ_max)
    dropped = 0
    for idx in range(40):
        c = paste(pool, params=params, split="train", index=idx)
        m = c.num_instances
        rank = c.fields["depth_rank"]
        assert len(set(rank.tolist())) == m and np.all(np.diff(rank) > 0), "front to back, unique ranks"
        dropped += int(rank.max()) + 1 - m
        for i in range(m):
            front = rank < rank[i]
            union_front = c.amodal[front].any(0) if front.any() else np.zeros_like(c.amodal[0])
            assert np.array_equal(c.visible[i], c.amodal[i] & ~union_front)
            vis_front = c.visible[front].any(0) if front.any() else np.zeros_like(c.amodal[0])
            assert np.array_equal(c.occluder[i], vis_front), "occluder = union of visible masks in front"
            assert c.visible[i].any(), "instances with empty visible masks are dropped"
            occ = 1 - c.visible[i].sum() / c.amodal[i].sum()
            assert c.fields["occlusion"][i] == pytest.approx(occ, abs=1e-6)
            x1, y1, x2, y2 = c.fields["amodal_box"][i]
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
        for i in range(m):
            for j in range(i + 1, m):
                assert not (c.visible[i] & c.visible[j]).any(), "visible masks are disjoint"
        cat = c.fields["category"]
        oid = c.fields["object_id"]
        for i in range(m):
            k = [category_index(r.category) for r in pool.renders].index(int(cat[i]))
            n = int(oid[i]) - pool.offsets[k]
            assert 0 <= n < pool.renders[k].num_objects
            assert np.array_equal(c.fields["camera"][i], pool.renders[k].cameras[n, c.fields["view_id"][i]])
    if occ_max == 1.0:
        assert dropped > 0, "with no occlusion limit some objects end up fully hidden"


def test_paste_deterministic_and_occluded():
    pool = _pool("val")
    params = CompositeParams(composite="paste", image_size=128)
    a = paste(pool, params=params, split="val", index=7)
    b = paste(pool, params=params, split="val", index=7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.visible, b.visible)
    occ = np.concatenate([paste(pool, params=params, split="val", index=i).fields["occlusion"] for i in range(30)])
    assert (occ > 0).mean() > 0.3, "scenes must actually overlap"
    assert occ.max() <= params.occlusion_max + 1e-6


def test_invalid_params_are_named():
    with pytest.raises(ValueError, match="occlusion_min"):
        CompositeParams(occlusion_min=0.8, occlusion_max=0.2).check()
    with pytest.raises(ValueError, match="data.composite"):
        CompositeParams(composite="blend").check()

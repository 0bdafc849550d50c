"""Occlusion composites: turn object renders into occluded images with exact masks.

Two generators (docs/design.md, "Data"):

- `erase`: one centred object per image; 1-2 rectangles or bands (some touching
  the border) are erased to the background. amodal = the silhouette, visible =
  silhouette minus the erased region, occluder = the erased region. Samples whose
  invisible/amodal ratio falls outside [occlusion_min, occlusion_max] get new
  erasers (bounded retries) and are skipped, and counted, if none fits.
- `paste`: 2-4 objects at random scale and position, drawn back to front
  (painter's order). visible_i = amodal_i minus the union of the amodal masks
  in front of i; occluder_i = union of the visible masks in front of i (which
  equals the union of their amodal masks). Instances whose visible mask is empty
  are dropped from the instance list but still occlude the ones behind them.

Every sample draws from its own generator seeded by (seed, composite, split,
category, index), so one sample never depends on another, on the order of
generation, or on how samples are grouped into shards.

Backgrounds (per sample, uniformly one of three): `plain` (a random colour),
`gradient` (linear between two random colours along a random direction),
`noise` (a random 3x3..8x8 colour grid upsampled bilinearly, plus per-pixel
Gaussian noise of std 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image

from amodal3d.categories import category_index
from amodal3d.config import DataConfig
from amodal3d.datamodules.sources.base import SPLITS, ObjectRenders

COMPOSITES = ("erase", "paste")
#: bump whenever the generators change what a given seed produces
GENERATOR_VERSION = 1
BACKGROUNDS = ("plain", "gradient", "noise")

#: per-instance fields of a composite (name -> dtype); shapes are (M,) or (M,k)
INSTANCE_FIELDS: dict[str, Any] = {
    "category": np.int16,
    "object_id": np.int32,
    "view_id": np.int16,
    "camera": np.float32,  # (M,3) azimuth, elevation (degrees), distance
    "amodal_box": np.float32,  # (M,4) xyxy, x2/y2 exclusive
    "visible_box": np.float32,  # (M,4)
    "depth_rank": np.int16,  # 0 = frontmost; number of drawn objects in front
    "occlusion": np.float32,  # invisible / amodal area
}

_ERASE_TRIES = 64
_PASTE_PLACE_TRIES = 20
_PASTE_PICK_TRIES = 20


_D = DataConfig  # the defaults live in the config schema, once


@dataclass(frozen=True)
class CompositeParams:
    """The DataConfig fields the generators read (plus the paste scale range, fixed)."""

    composite: str = _D.composite
    image_size: int = _D.image_size
    occluders_min: int = _D.occluders_min
    occluders_max: int = _D.occluders_max
    occlusion_min: float = _D.occlusion_min
    occlusion_max: float = _D.occlusion_max
    paste_objects_min: int = _D.paste_objects_min
    paste_objects_max: int = _D.paste_objects_max
    paste_scale_min: float = 0.3
    paste_scale_max: float = 0.65
    seed: int = _D.seed

    @classmethod
    def from_data_config(cls, data_cfg: Any) -> "CompositeParams":
        kinds = {f.name: type(f.default) for f in fields(cls)}
        given = {name: getattr(data_cfg, name, None) for name in kinds}  # DictConfig or DataConfig
        p = cls(**{name: kinds[name](value) for name, value in given.items() if value is not None})
        p.check()
        return p

    def check(self) -> None:
        """Reject values that would make the generators loop or lie."""
        problems = []
        if self.composite not in COMPOSITES:
            problems.append(f"data.composite={self.composite!r} (expected one of {', '.join(COMPOSITES)})")
        if self.image_size < 8:
            problems.append(f"data.image_size={self.image_size} (must be >= 8)")
        if not 1 <= self.occluders_min <= self.occluders_max:
            problems.append(
                f"data.occluders_min={self.occluders_min}, occluders_max={self.occluders_max} "
                "(need 1 <= min <= max)"
            )
        if not 0.0 <= self.occlusion_min <= self.occlusion_max <= 1.0:
            problems.append(
                f"data.occlusion_min={self.occlusion_min}, occlusion_max={self.occlusion_max} "
                "(need 0 <= min <= max <= 1)"
            )
        if not 1 <= self.paste_objects_min <= self.paste_objects_max:
            problems.append(
                f"data.paste_objects_min={self.paste_objects_min}, paste_objects_max="
                f"{self.paste_objects_max} (need 1 <= min <= max)"
            )
        if problems:
            raise ValueError("invalid composite settings: " + "; ".join(problems))


@dataclass
class Composite:
    """One image and its instances (M of them, front to back for paste)."""

    image: np.ndarray  # uint8 (H,W,3)
    image_id: int
    amodal: np.ndarray  # bool (M,H,W)
    visible: np.ndarray  # bool (M,H,W)
    occluder: np.ndarray  # bool (M,H,W)
    fields: dict[str, np.ndarray] = field(default_factory=dict)  # INSTANCE_FIELDS, M rows
    background: str = "plain"

    @property
    def num_instances(self) -> int:
        return int(self.amodal.shape[0])


def sample_rng(seed: int, composite: str, split: str, category: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of its identity."""
    key = [int(seed), COMPOSITES.index(composite), SPLITS.index(split), int(category) + 1, int(index)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def mask_box(mask: np.ndarray) -> np.ndarray:
    """float32 xyxy box of a bool (H,W) mask; x2/y2 exclusive; zeros if empty.

    The generators call this once per mask; for one small mask this numpy code
    is ~8x faster than torchvision's masks_to_boxes (mask_boxes gives the same numbers).
    """
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return np.zeros(4, np.float32)
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """float32 (N,4) boxes of bool (N,H,W) masks, all at once: mask_box of each mask."""
    import torch  # imported here: the generators and the shard reader do not need torch
    from torchvision.ops import masks_to_boxes

    masks = np.asarray(masks, bool)
    if masks.size == 0:
        return np.zeros((masks.shape[0], 4), np.float32)
    boxes = masks_to_boxes(torch.from_numpy(np.ascontiguousarray(masks)))
    # masks_to_boxes gives the last pixel (x2, y2 inclusive); our boxes end one past it
    # (exclusive): +1, except for empty masks, whose box stays all zeros
    boxes[torch.from_numpy(masks.reshape(len(masks), -1).any(1)), 2:] += 1
    return boxes.numpy()


def make_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A float32 (S,S,3) background in [0,255] and its kind (see module doc)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if kind == "plain":
        img = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (size, size, 3)).copy()
    elif kind == "gradient":
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = (c0[None, None] + t[..., None] * (c1 - c0)[None, None]).astype(np.float32)
    else:
        g = int(rng.integers(3, 9))
        base = rng.uniform(40, 215, 3)
        grid = np.clip(base + rng.uniform(-40, 40, (g, g, 3)), 0, 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR), np.float32)
        img = np.clip(up + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.float32)
    return img, kind


def resize_rgba(rgba: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize uint8 (h,w,4) RGBA to (size) with premultiplied bilinear filtering."""
    wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if rgba.shape[1] == wh[0] and rgba.shape[0] == wh[1]:
        return rgba
    img = Image.fromarray(np.ascontiguousarray(rgba), "RGBA").convert("RGBa")
    return np.asarray(img.resize(wh, Image.Resampling.BILINEAR).convert("RGBA"))


def _blend(canvas: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return rgba[..., :3].astype(np.float32) * a + canvas * (1.0 - a)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- erase


def _eraser(rng: np.random.Generator, size: int, box: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """One rectangle (half of them snapped to a border) or band, near the object."""
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = max(x1 - x0, 2.0), max(y1 - y0, 2.0)
    if rng.random() < 0.6:
        w = max(rng.uniform(0.25, 0.7) * bw, 2.0)
        h = max(rng.uniform(0.25, 0.7) * bh, 2.0)
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        rx0, rx1 = int(round(cx - w / 2)), int(round(cx + w / 2))
        ry0, ry1 = int(round(cy - h / 2)), int(round(cy + h / 2))
        if rng.random() < 0.5:  # extend to the nearest border on one side
            side = int(rng.integers(4))
            if side == 0:
                rx0 = 0
            elif side == 1:
                rx1 = size
            elif side == 2:
                ry0 = 0
            else:
                ry1 = size
        m = np.zeros((size, size), bool)
        m[max(ry0, 0):max(ry1, 0), max(rx0, 0):max(rx1, 0)] = True
        return m
    # a band crossing the whole image (touches two borders): axis-aligned or slanted
    theta = rng.choice([0.0, np.pi / 2]) if rng.random() < 0.5 else rng.uniform(0, np.pi)
    nx, ny = np.cos(theta), np.sin(theta)  # band normal
    extent = abs(nx) * bw + abs(ny) * bh
    thick = max(rng.uniform(0.15, 0.45) * extent, 2.0)
    cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
    d = (xx + 0.5 - cx) * nx + (yy + 0.5 - cy) * ny
    return np.abs(d) < thick / 2


def erase(
    rgba: np.ndarray,
    camera: np.ndarray,
    *,
    params: CompositeParams,
    split: str,
    category: str,
    object_id: int,
    view_id: int,
    index: int,
    image_id: int,
) -> tuple[Composite | None, str | None]:
    """The erase composite of one (object, view) render.

    rgba: uint8 (h,w,4) render (resized to params.image_size if different).
    index: the sample's index within (split, category); seeds its generator.
    Returns (composite, None) or (None, reason) when the sample is skipped:
    "empty_silhouette" or "occlusion_out_of_range".
    """
    size = params.image_size
    cat = category_index(category)
    rng = sample_rng(params.seed, "erase", split, cat, index)
    rgba = resize_rgba(rgba, size)
    sil = rgba[..., 3] > 127
    area = int(sil.sum())
    if area == 0:
        return None, "empty_silhouette"
    bg, bg_kind = make_background(rng, size)
    box = mask_box(sil)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    erased = None
    for _ in range(_ERASE_TRIES):
        k = int(rng.integers(params.occluders_min, params.occluders_max + 1))
        m = np.zeros((size, size), bool)
        for _ in range(k):
            m |= _eraser(rng, size, box, yy, xx)
        hidden = int((m & sil).sum())
        ratio = hidden / area
        if params.occlusion_min <= ratio <= params.occlusion_max and hidden < area:
            erased = m
            break
    if erased is None:
        return None, "occlusion_out_of_range"
    image = np.where(erased[..., None], bg, _blend(bg, rgba))
    visible = sil & ~erased
    fields = {
        "category": np.array([cat], np.int16),
        "object_id": np.array([object_id], np.int32),
        "view_id": np.array([view_id], np.int16),
        "camera": np.asarray(camera, np.float32).reshape(1, 3),
        "amodal_box": box[None],
        "visible_box": mask_box(visible)[None],
        "depth_rank": np.zeros(1, np.int16),
        "occlusion": np.array([1.0 - visible.sum() / area], np.float32),
    }
    return (
        Composite(
            image=_to_uint8(image), image_id=int(image_id), amodal=sil[None], visible=visible[None],
            occluder=erased[None], fields=fields, background=bg_kind,
        ),
        None,
    )


# ----------------------------------------------------------------------------- paste


@dataclass
class ObjectPool:
    """Every category's renders of one split, with split-wide object ids."""

    renders: list[ObjectRenders]
    offsets: list[int]  # object_id of renders[c] object n = offsets[c] + n

    @classmethod
    def from_renders(cls, renders: list[ObjectRenders]) -> "ObjectPool":
        if not renders or any(r.num_objects == 0 for r in renders):
            empty = [r.category for r in renders if r.num_objects == 0]
            raise ValueError(f"paste needs objects in every category; none for: {', '.join(empty) or 'all'}")
        offsets = np.concatenate([[0], np.cumsum([r.num_objects for r in renders])[:-1]])
        return cls(renders=list(renders), offsets=[int(o) for o in offsets])


def paste(pool: ObjectPool, *, params: CompositeParams, split: str, index: int) -> Composite:
    """The paste scene number `index` of a split (see the module doc).

    Objects are drawn back to front; each new object is placed (up to 20 tries)
    so that no earlier object ends up hidden beyond occlusion_max, 75% of them
    anchored near an earlier object so that scenes do overlap. Objects stay
    inside the image, so amodal masks are never cut by the frame.
    """
    size = params.image_size
    rng = sample_rng(params.seed, "paste", split, -1, index)
    bg, bg_kind = make_background(rng, size)
    n = int(rng.integers(params.paste_objects_min, params.paste_objects_max + 1))
    canvas = bg
    drawn: list[dict] = []  # back to front
    for _ in range(n):
        for _ in range(_PASTE_PICK_TRIES):
            c = int(rng.integers(len(pool.renders)))
            r = pool.renders[c]
            o, v = int(rng.integers(r.num_objects)), int(rng.integers(r.num_views))
            sil = r.rgba[o, v, ..., 3] > 127
            if sil.any():
                break
        else:
            continue
        x0, y0, x1, y1 = (int(t) for t in mask_box(sil))
        patch = r.rgba[o, v, y0:y1, x0:x1]
        longest = rng.uniform(params.paste_scale_min, params.paste_scale_max) * size
        s = longest / max(x1 - x0, y1 - y0)
        pw, ph = max(1, min(size, int(round((x1 - x0) * s)))), max(1, min(size, int(round((y1 - y0) * s))))
        patch = resize_rgba(patch, (pw, ph))
        pmask = patch[..., 3] > 127
        if not pmask.any():
            continue
        amodal = None
        for _ in range(_PASTE_PLACE_TRIES):
            if drawn and rng.random() < 0.75:
                a = drawn[int(rng.integers(len(drawn)))]
                ax0, ay0, ax1, ay1 = a["box"]
                reach_x, reach_y = 0.4 * ((ax1 - ax0) + pw), 0.4 * ((ay1 - ay0) + ph)
                cx = (ax0 + ax1) / 2 + rng.uniform(-reach_x, reach_x)
                cy = (ay0 + ay1) / 2 + rng.uniform(-reach_y, reach_y)
                px = int(np.clip(round(cx - pw / 2), 0, size - pw))
                py = int(np.clip(round(cy - ph / 2), 0, size - ph))
            else:
                px, py = int(rng.integers(0, size - pw + 1)), int(rng.integers(0, size - ph + 1))
            cand = np.zeros((size, size), bool)
            cand[py:py + ph, px:px + pw] = pmask
            ok = all(
                1.0 - (d["visible"] & ~cand).sum() / d["area"] <= params.occlusion_max for d in drawn
            )
            amodal = cand
            if ok:
                break
        full = np.zeros((size, size, 4), np.uint8)
        full[py:py + ph, px:px + pw] = patch
        canvas = _blend(canvas, full)
        for d in drawn:
            d["visible"] &= ~amodal
        drawn.append({
            "cat": c, "object": o, "view": v, "amodal": amodal, "visible": amodal.copy(),
            "area": int(amodal.sum()), "box": (px, py, px + pw, py + ph),
        })
    n_drawn = len(drawn)
    if n_drawn == 0:
        raise ValueError(f"paste scene {split}/{index}: no object with a non-empty silhouette could be drawn")
    keep = []
    front_union = np.zeros((size, size), bool)
    for rank, d in enumerate(reversed(drawn)):  # front to back
        d["rank"] = rank
        d["occluder"] = front_union.copy()
        front_union |= d["visible"]
        if d["visible"].any():
            keep.append(d)
    m = len(keep)
    fields = {
        "category": np.array([category_index(pool.renders[d["cat"]].category) for d in keep], np.int16),
        "object_id": np.array([pool.offsets[d["cat"]] + d["object"] for d in keep], np.int32),
        "view_id": np.array([d["view"] for d in keep], np.int16),
        "camera": np.array(
            [pool.renders[d["cat"]].cameras[d["object"], d["view"]] for d in keep], np.float32
        ).reshape(m, 3),
        "amodal_box": np.stack([mask_box(d["amodal"]) for d in keep]),
        "visible_box": np.stack([mask_box(d["visible"]) for d in keep]),
        "depth_rank": np.array([d["rank"] for d in keep], np.int16),
        "occlusion": np.array([1.0 - d["visible"].sum() / d["area"] for d in keep], np.float32),
    }
    return Composite(
        image=_to_uint8(canvas), image_id=int(index),
        amodal=np.stack([d["amodal"] for d in keep]),
        visible=np.stack([d["visible"] for d in keep]),
        occluder=np.stack([d["occluder"] for d in keep]),
        fields=fields, background=bg_kind,
    )

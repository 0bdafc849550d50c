"""Procedural part-based meshes for the 13 benchmark categories.

Every builder draws its proportions from a numpy Generator and assembles the
object from box / cylinder / ellipsoid / prism / loft primitives (merged into
one mesh; watertightness is not needed for rendering silhouettes). The parts
that make a category hard for amodal segmentation are there on purpose: thin
legs, poles and barrels, holes between slats and frames, wings and tails.

Frame (shared by all categories, before normalisation): y is up, the objects
are mirror-symmetric about the x = 0 plane, furniture faces +z, and long
objects (airplane, car, rifle, vessel) lie along z with their front at +z.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Array = np.ndarray


# ----------------------------------------------------------------- rotations
def rot_x(deg: float) -> Array:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(deg: float) -> Array:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(deg: float) -> Array:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _perp_basis(axis: Array) -> tuple[Array, Array]:
    a = axis / np.linalg.norm(axis)
    helper = np.array([1.0, 0, 0]) if abs(a[0]) < 0.9 else np.array([0, 1.0, 0])
    u = np.cross(a, helper)
    u /= np.linalg.norm(u)
    return u, np.cross(a, u)


def _ring_faces(n_rings: int, k: int, offset: int = 0) -> list[list[int]]:
    """Quads (as 2 triangles) joining consecutive closed rings of k vertices."""
    faces = []
    for r in range(n_rings - 1):
        for i in range(k):
            a, b = offset + r * k + i, offset + r * k + (i + 1) % k
            c, d = b + k, a + k
            faces += [[a, b, c], [a, c, d]]
    return faces


def _fan(center: int, ring: list[int], flip: bool) -> list[list[int]]:
    k = len(ring)
    return [
        [center, ring[(i + 1) % k], ring[i]] if flip else [center, ring[i], ring[(i + 1) % k]]
        for i in range(k)
    ]


# ----------------------------------------------------------------- builder
class MeshBuilder:
    """Accumulates coloured primitives into one (verts, faces, colors) mesh."""

    def __init__(self) -> None:
        self._verts: list[Array] = []
        self._faces: list[Array] = []
        self._colors: list[Array] = []
        self._count = 0

    def add(self, verts: Array, faces, color, inside=None) -> None:
        """Append a closed primitive; faces are wound to point away from `inside`.

        inside: a point (3,) or one point per face (Nf,3) inside the
        primitive (default: the vertex mean, right for convex parts).
        Consistent outward winding lets the renderer cull back faces.
        """
        verts = np.asarray(verts, dtype=np.float64).reshape(-1, 3)
        faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
        ref = verts.mean(0) if inside is None else np.asarray(inside, dtype=np.float64)
        tri = verts[faces]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        inward = np.einsum("fi,fi->f", normal, tri.mean(1) - ref) < 0
        faces = faces.copy()
        faces[inward] = faces[inward][:, [0, 2, 1]]
        self._verts.append(verts)
        self._faces.append(faces + self._count)
        self._colors.append(np.broadcast_to(np.asarray(color, dtype=np.float64), verts.shape))
        self._count += len(verts)

    def box(self, center, size, color, R: Array | None = None) -> None:
        """Axis-aligned box of the given size, optionally rotated about its centre."""
        s = np.asarray(size, dtype=np.float64) / 2
        corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64) * s
        if R is not None:
            corners = corners @ np.asarray(R).T
        faces = [
            [0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5],  # -x, +x
            [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],  # -y, +y
            [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3],  # -z, +z
        ]
        self.add(corners + np.asarray(center, dtype=np.float64), faces, color)

    def cylinder(self, p0, p1, r0: float, r1: float | None = None, color=(0.5, 0.5, 0.5),
                 segments: int = 12, caps: bool = True) -> None:
        """Cylinder (or cone frustum when r1 != r0) from point p0 to point p1."""
        p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        r1 = r0 if r1 is None else r1
        u, v = _perp_basis(p1 - p0)
        t = np.linspace(0, 2 * np.pi, segments, endpoint=False)
        circle = np.cos(t)[:, None] * u + np.sin(t)[:, None] * v
        verts = [p0 + r0 * circle, p1 + r1 * circle]
        faces = _ring_faces(2, segments)
        if caps:
            verts.append(np.stack([p0, p1]))
            c0, c1 = 2 * segments, 2 * segments + 1
            faces += _fan(c0, list(range(segments)), flip=True)
            faces += _fan(c1, list(range(segments, 2 * segments)), flip=False)
        self.add(np.concatenate(verts), faces, color)

    def ellipsoid(self, center, radii, color, R: Array | None = None,
                  rings: int = 6, segments: int = 12) -> None:
        """UV ellipsoid with `rings` latitude bands."""
        lat = np.linspace(0, np.pi, rings + 1)[1:-1]
        lon = np.linspace(0, 2 * np.pi, segments, endpoint=False)
        ring_pts = np.stack([
            np.sin(lat)[:, None] * np.cos(lon)[None],
            np.cos(lat)[:, None] * np.ones_like(lon)[None],
            np.sin(lat)[:, None] * np.sin(lon)[None],
        ], -1).reshape(-1, 3)
        pts = np.concatenate([ring_pts, [[0, 1, 0], [0, -1, 0]]]) * np.asarray(radii, dtype=np.float64)
        if R is not None:
            pts = pts @ np.asarray(R).T
        n_ring = rings - 1
        faces = _ring_faces(n_ring, segments)
        top, bottom = n_ring * segments, n_ring * segments + 1
        faces += _fan(top, list(range(segments)), flip=True)
        faces += _fan(bottom, list(range((n_ring - 1) * segments, n_ring * segments)), flip=False)
        self.add(pts + np.asarray(center, dtype=np.float64), faces, color)

    def prism(self, poly, w0: float, w1: float, color, axes: str = "zy",
              center2d=None, R: Array | None = None, offset=(0, 0, 0)) -> None:
        """Extrude a star-shaped 2D polygon along the third axis from w0 to w1.

        axes names the world axes of the polygon's (u, v) coordinates, e.g.
        "zy" draws a side profile extruded along x. The caps are fans from
        `center2d` (default: the vertex mean), so the polygon must be
        star-shaped around it.
        """
        poly = np.asarray(poly, dtype=np.float64)
        k = len(poly)
        iu, iv = "xyz".index(axes[0]), "xyz".index(axes[1])
        iw = 3 - iu - iv
        c2 = poly.mean(0) if center2d is None else np.asarray(center2d, dtype=np.float64)
        pts2 = np.concatenate([poly, c2[None]])
        verts = np.zeros((2 * (k + 1), 3))
        for j, w in enumerate((w0, w1)):
            blk = verts[j * (k + 1):(j + 1) * (k + 1)]
            blk[:, iu], blk[:, iv], blk[:, iw] = pts2[:, 0], pts2[:, 1], w
        # reorder to rings first: [ring0 (k), ring1 (k), c0, c1]
        order = list(range(k)) + list(range(k + 1, 2 * k + 1)) + [k, 2 * k + 1]
        verts = verts[order]
        faces = _ring_faces(2, k)
        faces += _fan(2 * k, list(range(k)), flip=True)
        faces += _fan(2 * k + 1, list(range(k, 2 * k)), flip=False)
        if R is not None:
            verts = verts @ np.asarray(R).T
        verts = verts + np.asarray(offset, dtype=np.float64)
        self.add(verts, faces, color, inside=verts[2 * k:].mean(0))

    def loft(self, rings: Array, color, caps: bool = True) -> None:
        """Skin consecutive closed rings (S, K, 3) into a tube; fan-cap both ends."""
        rings = np.asarray(rings, dtype=np.float64)
        s, k = rings.shape[:2]
        verts = [rings.reshape(-1, 3)]
        faces = _ring_faces(s, k)
        centres = rings.mean(1)
        mids = (centres[:-1] + centres[1:]) / 2
        inside = list(np.repeat(mids, 2 * k, 0))  # each ring segment has 2k faces
        if caps:
            verts.append(np.stack([centres[0], centres[-1]]))
            faces += _fan(s * k, list(range(k)), flip=True)
            faces += _fan(s * k + 1, list(range((s - 1) * k, s * k)), flip=False)
            inside += [mids[0]] * k + [mids[-1]] * k
        self.add(np.concatenate(verts), faces, color, inside=np.array(inside))

    def mirror_x(self, fn: Callable[[float], None]) -> None:
        """Call fn(+1) and fn(-1): build a part and its mirror image across x = 0."""
        fn(1.0)
        fn(-1.0)

    def build(self) -> tuple[Array, Array, Array]:
        verts = np.concatenate(self._verts).astype(np.float32)
        faces = np.concatenate(self._faces).astype(np.int64)
        colors = np.concatenate(self._colors).clip(0, 1).astype(np.float32)
        return verts, faces, colors


def pixel(*extent: float) -> float:
    """World size of one 64 px pixel at the object centre, for an object of this extent.

    Objects are normalised to a unit bounding-box diagonal and seen from
    distance 2.732 with a 30 degree field of view, where one pixel spans
    2 * 2.732 * tan(15 deg) / 64 = 0.0229. Thin parts (legs, poles, barrels,
    masts) are sized in these units so that they stay at least about one
    pixel wide after normalisation: a hard-edged rasteriser drops thinner ones.
    """
    return 0.0229 * float(np.linalg.norm(extent))


# ----------------------------------------------------------------- colours
def _jitter(rng: np.random.Generator, base, amount: float = 0.06) -> Array:
    return np.clip(np.asarray(base, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 1)


def _pick(rng: np.random.Generator, palette, amount: float = 0.06) -> Array:
    return _jitter(rng, palette[rng.integers(len(palette))], amount)


WOODS = [(0.55, 0.35, 0.2), (0.7, 0.5, 0.3), (0.4, 0.25, 0.15), (0.8, 0.65, 0.45), (0.3, 0.2, 0.12)]
NEUTRALS = [(0.85, 0.85, 0.82), (0.25, 0.25, 0.27), (0.55, 0.55, 0.57), (0.9, 0.88, 0.8)]
FABRICS = [(0.6, 0.15, 0.15), (0.2, 0.3, 0.55), (0.35, 0.5, 0.3), (0.7, 0.6, 0.45),
           (0.45, 0.45, 0.5), (0.55, 0.35, 0.55)]
PAINTS = [(0.8, 0.1, 0.1), (0.1, 0.25, 0.7), (0.9, 0.9, 0.9), (0.15, 0.15, 0.15),
          (0.75, 0.75, 0.78), (0.9, 0.6, 0.1), (0.2, 0.5, 0.3)]
DARK = (0.08, 0.08, 0.1)
METAL = (0.6, 0.62, 0.65)


# ----------------------------------------------------------------- categories
def airplane(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Fuselage (loft), swept wings with dihedral, tailplane, fin, optional engines."""
    u = rng.uniform
    length = 1.0
    radius = u(0.04, 0.075)
    span = u(0.75, 1.3)
    root_chord = u(0.14, 0.26)
    taper = u(0.25, 0.6)
    sweep = u(0.0, 38.0)
    dihedral = u(0.0, 8.0)
    wing_z = u(-0.08, 0.1)
    wing_y = rng.choice([-0.6, 0.0, 0.6]) * radius
    fin_height = u(0.1, 0.2)
    engines = int(rng.choice([0, 2, 4], p=[0.3, 0.5, 0.2]))
    body = _pick(rng, [(0.92, 0.92, 0.92), (0.75, 0.77, 0.8), (0.35, 0.4, 0.45), (0.85, 0.85, 0.7)], 0.04)
    accent = _pick(rng, PAINTS)

    # fuselage: circular sections; the nose is rounded, the tail narrows and rises
    k = 10
    zs = np.array([-0.5, -0.42, -0.3, -0.15, 0.1, 0.3, 0.38, 0.44, 0.48, 0.5]) * length
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    rings = []
    for z in zs:
        f = (z / length + 0.5)  # 0 at tail, 1 at nose
        if f > 0.8:
            r = radius * np.sqrt(max(1 - ((f - 0.8) / 0.2) ** 2, 0.02))
            yc = -0.15 * radius * (f - 0.8) / 0.2
        elif f < 0.35:
            r = radius * (0.3 + 0.7 * f / 0.35)
            yc = 0.6 * radius * (1 - f / 0.35)
        else:
            r, yc = radius, 0.0
        rings.append(np.stack([r * np.cos(t), yc + r * np.sin(t), np.full(k, z)], 1))
    b.loft(np.stack(rings), body)

    def wing(sign, span_, chord, z_le, y, sweep_deg, dih, thick, color):
        half = span_ / 2
        tip_chord = chord * taper
        off = half * np.tan(np.deg2rad(sweep_deg))
        poly = np.array([[0, z_le], [0, z_le - chord], [half, z_le - off - tip_chord], [half, z_le - off]])
        poly[:, 0] *= sign
        b.prism(poly, y - thick / 2, y + thick / 2, color, axes="xz", R=rot_z(sign * dih))

    b.mirror_x(lambda s: wing(s, span, root_chord, wing_z + root_chord / 2, wing_y, sweep, dihedral, 0.02, body))
    tail_span = span * u(0.28, 0.4)
    tail_chord = root_chord * 0.55
    tail_z = -0.5 * length + tail_chord + 0.02
    b.mirror_x(lambda s: wing(s, tail_span, tail_chord, tail_z, 0.45 * radius, sweep + 5, 0, 0.014, body))
    # vertical fin in the symmetry plane
    fin_root = tail_chord * 1.3
    fin_off = min(fin_height * np.tan(np.deg2rad(sweep + 15)), fin_root * 0.55)
    z0, yb = -0.5 * length + 0.01, 0.4 * radius
    top_le = z0 + fin_root - fin_off
    fin = np.array([[z0, yb], [z0 + fin_root, yb], [top_le, yb + fin_height],
                    [top_le - fin_root * 0.4, yb + fin_height]])
    b.prism(fin, -0.008, 0.008, accent, axes="zy")
    if engines:
        positions = [0.3] if engines == 2 else [0.22, 0.42]
        er = radius * u(0.4, 0.55)
        for fx in positions:
            x = fx * span / 2
            z = wing_z + root_chord / 2 - x * np.tan(np.deg2rad(sweep))
            for s in (1, -1):
                p = np.array([s * x, wing_y - er * 1.3, z + 0.02])
                b.cylinder(p - [0, 0, root_chord * 0.7], p + [0, 0, root_chord * 0.15], er, er * 0.9,
                           color=(0.5, 0.5, 0.52), segments=10)
    return dict(radius=radius, span=span, root_chord=root_chord, taper=taper, sweep=sweep,
                dihedral=dihedral, wing_z=wing_z, fin_height=fin_height, engines=engines)


def bench(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Seat slats with gaps, legs or side frames, optional slatted back and arms."""
    u = rng.uniform
    length = u(1.2, 2.0)
    depth = u(0.35, 0.55)
    seat_h = u(0.35, 0.5)
    n_slats = int(rng.integers(3, 7))
    slat_t = u(0.03, 0.05)
    has_back = bool(rng.random() < 0.75)
    back_h = u(0.25, 0.5)
    back_tilt = u(0.0, 18.0)
    frames = bool(rng.random() < 0.5)  # side panels instead of four legs
    arms = bool(rng.random() < 0.4)
    wood = _pick(rng, WOODS)
    frame = _pick(rng, [DARK, METAL, (0.2, 0.3, 0.2)] + WOODS[:2])
    gap = depth / n_slats * u(0.2, 0.4)
    slat_d = (depth - gap * (n_slats - 1)) / n_slats
    for i in range(n_slats):
        z = -depth / 2 + slat_d / 2 + i * (slat_d + gap)
        b.box((0, seat_h - slat_t / 2, z), (length, slat_t, slat_d), wood)
    leg_t = u(1.5, 2.8) * pixel(length, seat_h + back_h, depth)
    xin = length / 2 - u(0.05, 0.2)
    under = seat_h - slat_t
    for s in (1, -1):
        if frames:
            b.box((s * xin, under / 2, 0), (leg_t, under, depth * 0.9), frame)
        else:
            for zs in (1, -1):
                b.box((s * xin, under / 2, zs * (depth / 2 - leg_t)), (leg_t, under, leg_t), frame)
            b.box((s * xin, under * 0.3, 0), (leg_t * 0.7, leg_t * 0.7, depth - leg_t), frame)
    if has_back:
        R = rot_x(-back_tilt)
        n_back = int(rng.integers(2, 4))
        base = np.array([0, seat_h, -depth / 2 + slat_t])
        for s in (1, -1):
            post_c = base + R @ np.array([0, back_h / 2, 0]) + [s * xin, 0, 0]
            b.box(post_c, (leg_t, back_h, leg_t), frame, R)
        for i in range(n_back):
            y = back_h * (0.35 + 0.6 * i / max(n_back - 1, 1))
            c = base + R @ np.array([0, y, 0.02])
            b.box(c, (length * 0.98, back_h * 0.15, slat_t * 0.8), wood, R)
    if arms:
        arm_h = u(0.18, 0.28)
        for s in (1, -1):
            b.box((s * xin, seat_h + arm_h / 2, depth * 0.3), (leg_t, arm_h, leg_t), frame)
            b.box((s * xin, seat_h + arm_h, -0.02), (leg_t * 1.4, leg_t * 0.7, depth * 0.9), frame)
    return dict(length=length, depth=depth, seat_h=seat_h, n_slats=n_slats, back_h=back_h * has_back,
                back_tilt=back_tilt, frames=int(frames), arms=int(arms))


def dresser(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Cabinet with a grid of protruding drawer fronts and handles, on legs or a plinth."""
    u = rng.uniform
    width = u(0.6, 1.5)
    height = u(0.6, 1.5)
    depth = u(0.35, 0.55)
    rows = int(rng.integers(2, 6))
    cols = 1 if width < 0.8 else int(rng.integers(1, 4))
    leg_h = u(0.0, 0.15)
    body = _pick(rng, WOODS + NEUTRALS[:1])
    front = _jitter(rng, body, 0.1)
    handle = _pick(rng, [DARK, METAL, (0.75, 0.6, 0.2)])
    base_h = max(leg_h, 0.03)
    if leg_h > 0.04:
        leg = min(0.06, width * 0.08)
        for xs in (1, -1):
            for zs in (1, -1):
                b.box((xs * (width / 2 - leg), leg_h / 2, zs * (depth / 2 - leg)), (leg, leg_h, leg), body)
    else:
        b.box((0, base_h / 2, -0.01), (width * 0.96, base_h, depth * 0.95), body * 0.7)
    body_h = height - base_h
    b.box((0, base_h + body_h / 2, 0), (width, body_h, depth), body)
    b.box((0, height + 0.01, 0.01), (width * 1.04, 0.03, depth * 1.04), body)  # top overhang
    margin, gap = 0.03, 0.02
    dw = (width - 2 * margin - gap * (cols - 1)) / cols
    dh = (body_h - 2 * margin - gap * (rows - 1)) / rows
    for r in range(rows):
        for c in range(cols):
            x = -width / 2 + margin + dw / 2 + c * (dw + gap)
            y = base_h + margin + dh / 2 + r * (dh + gap)
            b.box((x, y, depth / 2 + 0.01), (dw, dh, 0.02), front)
            b.box((x, y + dh * 0.15, depth / 2 + 0.03), (min(dw * 0.35, 0.15), 0.02, 0.03), handle)
    return dict(width=width, height=height, depth=depth, rows=rows, cols=cols, leg_h=leg_h)


def car(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Lower body side profile, narrower glass cabin with a roof, four wheels."""
    u = rng.uniform
    length = 1.0
    width = u(0.38, 0.5)
    body_h = u(0.16, 0.26)
    clearance = u(0.05, 0.1)
    cabin_h = u(0.1, 0.2)
    cabin_len = u(0.35, 0.55)
    cabin_z = u(-0.15, 0.05)  # centre of the cabin along the car
    slope = u(0.08, 0.18)  # windshield / rear window run
    wheel_r = u(0.075, 0.11)
    paint = _pick(rng, PAINTS, 0.08)
    glass = _jitter(rng, (0.2, 0.25, 0.3), 0.05)
    y0, y1 = clearance, clearance + body_h
    hood_drop = u(0.0, 0.05)
    profile = np.array([
        [-0.5, y0 + 0.02], [-0.48, y0], [0.48, y0], [0.5, y0 + 0.03],
        [0.5, y1 - hood_drop - 0.03], [0.45, y1 - hood_drop],
        [0.0, y1], [-0.45, y1 - 0.01], [-0.5, y1 - 0.04],
    ]) * [length, 1]
    b.prism(profile, -width / 2, width / 2, paint, axes="zy", center2d=(0.0, (y0 + y1) / 2))
    zf, zr = cabin_z + cabin_len / 2, cabin_z - cabin_len / 2
    y2 = y1 + cabin_h
    cabin = np.array([[zr - slope, y1], [zf + slope, y1], [zf, y2], [zr, y2]])
    cw = width * u(0.78, 0.9)
    b.prism(cabin, -cw / 2, cw / 2, glass, axes="zy")
    b.box((0, y2 + 0.008, (zr + zf) / 2), (cw + 0.006, 0.016, zf - zr + 0.01), paint)
    wheel_w = u(0.06, 0.09)
    axle = 0.5 - u(0.14, 0.2)
    for zs in (1, -1):
        for xs in (1, -1):
            x = xs * (width / 2 - wheel_w / 2 + 0.01)
            c = np.array([x, wheel_r, zs * axle])
            b.cylinder(c - [wheel_w / 2, 0, 0], c + [wheel_w / 2, 0, 0], wheel_r, color=DARK, segments=14)
    return dict(width=width, body_h=body_h, clearance=clearance, cabin_h=cabin_h,
                cabin_len=cabin_len, cabin_z=cabin_z, wheel_r=wheel_r)


def chair(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Seat, four (possibly splayed) legs or an office pedestal, solid or framed back."""
    u = rng.uniform
    seat_w = u(0.4, 0.56)
    seat_d = u(0.38, 0.52)
    seat_h = u(0.38, 0.5)
    seat_t = u(0.03, 0.08)
    back_h = u(0.3, 0.6)
    back_tilt = u(0.0, 20.0)
    leg_t = u(1.4, 2.4) * pixel(seat_w, seat_h + back_h, seat_d)
    splay = u(0.0, 0.05)
    pedestal = bool(rng.random() < 0.2)
    framed_back = bool(rng.random() < 0.5)
    arms = bool(rng.random() < 0.3)
    main = _pick(rng, WOODS + FABRICS + NEUTRALS)
    legs = _pick(rng, [DARK, METAL] + WOODS) if rng.random() < 0.6 else main
    b.box((0, seat_h - seat_t / 2, 0), (seat_w, seat_t, seat_d), main)
    under = seat_h - seat_t
    if pedestal:
        b.cylinder((0, 0.06, 0), (0, under, 0), leg_t * 0.9, color=legs)
        for i in range(5):
            ang = np.deg2rad(90 + 72 * i)
            tip = np.array([np.cos(ang), 0, np.sin(ang)]) * seat_w * 0.55
            b.box(tip / 2 + [0, 0.04, 0], (np.hypot(tip[0], tip[2]), 0.03, 0.04), legs, rot_y(-np.degrees(ang)))
            b.cylinder(tip + [0, 0.03, 0], tip, 0.025, color=DARK, segments=8)
    else:
        for xs in (1, -1):
            for zs in (1, -1):
                top = np.array([xs * (seat_w / 2 - leg_t), under, zs * (seat_d / 2 - leg_t)])
                foot = top + [xs * splay, -under, zs * splay]
                b.cylinder(foot, top, leg_t / 2, color=legs, segments=8)
    R = rot_x(-back_tilt)
    base = np.array([0, seat_h, -seat_d / 2 + 0.02])
    if framed_back:
        post = leg_t * 1.1
        for xs in (1, -1):
            c = base + R @ np.array([0, back_h / 2, 0]) + [xs * (seat_w / 2 - post), 0, 0]
            b.box(c, (post, back_h, post), main, R)
        b.box(base + R @ np.array([0, back_h - back_h * 0.1, 0]), (seat_w, back_h * 0.2, post), main, R)
        n_slats = int(rng.integers(0, 4))
        for i in range(n_slats):
            x = seat_w * (-0.3 + 0.6 * (i + 0.5) / n_slats)
            b.box(base + R @ np.array([x, back_h * 0.45, 0]), (0.03, back_h * 0.7, post * 0.6), main, R)
    else:
        b.box(base + R @ np.array([0, back_h / 2, 0]), (seat_w, back_h, u(0.03, 0.08)), main, R)
    if arms:
        arm_h = u(0.15, 0.25)
        for xs in (1, -1):
            x = xs * (seat_w / 2 + 0.02)
            b.box((x, seat_h + arm_h / 2, seat_d * 0.3), (0.03, arm_h, 0.03), legs)
            b.box((x, seat_h + arm_h, 0), (0.05, 0.03, seat_d * 0.85), main)
    return dict(seat_w=seat_w, seat_d=seat_d, seat_h=seat_h, back_h=back_h, back_tilt=back_tilt,
                leg_t=leg_t, splay=splay, pedestal=int(pedestal), framed_back=int(framed_back))


def display(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Thin panel with a dark screen, a neck and a flat stand base."""
    u = rng.uniform
    width = u(0.6, 1.0)
    aspect = u(0.5, 0.82)
    thick = u(0.02, 0.06)
    bezel = u(0.015, 0.05)
    neck_h = u(0.06, 0.25)
    base_w = u(0.22, 0.5)
    tilt = u(0.0, 10.0)
    crt_back = bool(rng.random() < 0.2)
    frame = _pick(rng, [DARK, (0.2, 0.2, 0.22), METAL, (0.9, 0.9, 0.88)], 0.04)
    screen = _jitter(rng, (0.05, 0.07, 0.12), 0.04)
    height = width * aspect
    base_d = u(0.14, 0.28)
    b.box((0, 0.012, 0), (base_w, 0.024, base_d), frame)
    b.box((0, 0.024 + neck_h / 2, -0.02), (min(0.08, base_w * 0.3), neck_h, 0.03), frame)
    R = rot_x(-tilt)
    center = np.array([0, 0.024 + neck_h + height / 2, 0.0])
    b.box(center, (width, height, thick), frame, R)
    b.box(center + R @ np.array([0, 0, thick / 2 + 0.003]), (width - 2 * bezel, height - 2 * bezel, 0.006), screen, R)
    if crt_back:
        back = center + R @ np.array([0, 0, -thick / 2 - height * 0.2])
        b.box(back, (width * 0.6, height * 0.6, height * 0.4), frame, R)
    return dict(width=width, aspect=aspect, thick=thick, bezel=bezel, neck_h=neck_h,
                base_w=base_w, tilt=tilt, crt_back=int(crt_back))


def lamp(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Base, thin pole (straight or jointed arm in the symmetry plane), conical shade."""
    u = rng.uniform
    pole_h = u(0.5, 1.4)
    base_r = u(0.1, 0.22)
    shade_bottom = u(0.14, 0.3)
    shade_top = shade_bottom * u(0.35, 0.9)
    shade_h = u(0.14, 0.3)
    pole_r = u(0.65, 1.1) * pixel(pole_h + 0.2, 2 * max(base_r, shade_bottom))
    arm = bool(rng.random() < 0.4)
    arm_angle = u(25.0, 65.0)
    metal = _pick(rng, [DARK, METAL, (0.75, 0.6, 0.25), (0.9, 0.9, 0.88)])
    shade = _pick(rng, [(0.95, 0.92, 0.8), (0.85, 0.8, 0.65), (0.2, 0.35, 0.5), (0.7, 0.2, 0.2), (0.9, 0.9, 0.9)])
    base_t = u(0.02, 0.05)
    if rng.random() < 0.6:
        b.cylinder((0, 0, 0), (0, base_t, 0), base_r, color=metal, segments=16)
    else:
        b.box((0, base_t / 2, 0), (base_r * 1.6, base_t, base_r * 1.6), metal)
    if not arm:
        top = np.array([0, base_t + pole_h, 0])
        b.cylinder((0, base_t, 0), top, pole_r, color=metal, segments=8)
        b.cylinder(top - [0, shade_h * 0.6, 0], top + [0, shade_h * 0.4, 0], shade_bottom, shade_top,
                   color=shade, segments=16)
    else:
        lower = pole_h * 0.55
        joint = np.array([0, base_t + lower, 0])
        a = np.deg2rad(arm_angle)
        upper = pole_h * 0.6
        head = joint + upper * np.array([0, np.cos(a), np.sin(a)])
        b.cylinder((0, base_t, 0), joint, pole_r, color=metal, segments=8)
        b.cylinder(joint, head, pole_r, color=metal, segments=8)
        b.ellipsoid(joint, (pole_r * 2, pole_r * 2, pole_r * 2), metal, rings=4, segments=8)
        # shade hangs from the arm's end, opening downward and forward
        d = np.array([0, -np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))])
        b.cylinder(head, head + d * shade_h, shade_top * 0.6, shade_bottom * 0.8, color=shade, segments=16)
    return dict(pole_h=pole_h, base_r=base_r, shade_bottom=shade_bottom, shade_top=shade_top,
                shade_h=shade_h, pole_r=pole_r, arm=int(arm), arm_angle=arm_angle * arm)


def speaker(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Cabinet with 1-3 protruding driver cones and a tweeter on the front."""
    u = rng.uniform
    width = u(0.3, 0.6)
    height = u(0.45, 1.3)
    depth = u(0.28, 0.5)
    n_cones = int(rng.integers(1, 4))
    cone_frac = u(0.28, 0.42)
    feet = u(0.0, 0.06)
    tweeter = bool(rng.random() < 0.6)
    box_col = _pick(rng, WOODS + [DARK, (0.2, 0.2, 0.22), (0.85, 0.85, 0.85)])
    cone_col = _pick(rng, [DARK, (0.3, 0.3, 0.32), (0.6, 0.55, 0.45)])
    if feet > 0.015:
        for xs in (1, -1):
            for zs in (1, -1):
                b.cylinder((xs * width * 0.35, 0, zs * depth * 0.35), (xs * width * 0.35, feet, zs * depth * 0.35),
                           0.025, color=DARK, segments=8)
    b.box((0, feet + height / 2, 0), (width, height, depth), box_col)
    r = min(cone_frac * width, height / (2.6 * n_cones + (1.5 if tweeter else 0)))
    slots = n_cones + (1 if tweeter else 0)
    for i in range(n_cones):
        y = feet + height * (i + 0.5) / slots
        zf = depth / 2
        b.cylinder((0, y, zf - 0.005), (0, y, zf + 0.012), r * 1.12, color=box_col * 0.6, segments=12)
        b.cylinder((0, y, zf + 0.012), (0, y, zf + 0.03), r, r * 0.4, color=cone_col, segments=12)
        b.ellipsoid((0, y, zf + 0.03), (r * 0.3, r * 0.3, r * 0.15), cone_col * 0.6, rings=4, segments=10)
    if tweeter:
        y = feet + height * (slots - 0.5) / slots
        b.ellipsoid((0, y, depth / 2), (r * 0.35, r * 0.35, r * 0.25), cone_col, rings=4, segments=10)
    return dict(width=width, height=height, depth=depth, n_cones=n_cones, cone_frac=cone_frac,
                feet=feet, tweeter=int(tweeter))


def rifle(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Stock, receiver, pistol grip, magazine, long thin barrel, optional scope."""
    u = rng.uniform
    barrel_len = u(0.3, 0.5)
    barrel_r = 0.0  # set from the total length below
    receiver_len = u(0.22, 0.32)
    receiver_h = u(0.06, 0.1)
    stock_len = u(0.2, 0.3)
    stock_drop = u(0.0, 0.07)
    butt_h = u(0.1, 0.17)
    mag_len = u(0.0, 0.16)
    scope = bool(rng.random() < 0.5)
    handguard = bool(rng.random() < 0.5)
    width = u(0.035, 0.05)
    wood = _pick(rng, WOODS + [DARK, (0.3, 0.32, 0.25)])
    metal = _pick(rng, [DARK, (0.25, 0.25, 0.27), (0.4, 0.4, 0.42)], 0.03)
    total = stock_len + receiver_len + barrel_len
    barrel_r = u(0.65, 1.0) * pixel(total)
    z0 = -total / 2
    zr0 = z0 + stock_len
    zr1 = zr0 + receiver_len
    yc = 0.0
    stock = np.array([
        [z0, yc - stock_drop - butt_h * 0.75], [zr0 + 0.01, yc - receiver_h * 0.45],
        [zr0 + 0.01, yc + receiver_h * 0.3], [z0, yc - stock_drop + butt_h * 0.25],
    ])
    b.prism(stock, -width * 0.45, width * 0.45, wood, axes="zy")
    b.box((0, yc, (zr0 + zr1) / 2), (width, receiver_h, receiver_len), metal)
    b.cylinder((0, yc + receiver_h * 0.2, zr1), (0, yc + receiver_h * 0.2, zr1 + barrel_len), barrel_r,
               color=metal, segments=8)
    if handguard:
        hl = barrel_len * u(0.3, 0.6)
        b.cylinder((0, yc + receiver_h * 0.1, zr1), (0, yc + receiver_h * 0.1, zr1 + hl), receiver_h * 0.4,
                   color=wood, segments=10)
    grip_c = np.array([0, yc - receiver_h / 2 - 0.04, zr0 + receiver_len * 0.15])
    b.box(grip_c, (width * 0.8, 0.1, 0.035), wood, rot_x(-20))
    if mag_len > 0.04:
        mc = np.array([0, yc - receiver_h / 2 - mag_len / 2, zr0 + receiver_len * 0.6])
        b.box(mc, (width * 0.7, mag_len, 0.05), metal, rot_x(15))
    if scope:
        sy = yc + receiver_h / 2 + 0.04
        sz0, sz1 = zr0 + receiver_len * 0.1, zr1 + 0.02
        b.cylinder((0, sy, sz0), (0, sy, sz1), 0.022, color=DARK, segments=10)
        for zz in (sz0 + 0.04, sz1 - 0.04):
            b.box((0, yc + receiver_h / 2 + 0.015, zz), (0.02, 0.03, 0.02), DARK)
    return dict(barrel_len=barrel_len, barrel_r=barrel_r, receiver_len=receiver_len, receiver_h=receiver_h,
                stock_len=stock_len, stock_drop=stock_drop, butt_h=butt_h, mag_len=mag_len, scope=int(scope))


def sofa(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Base, seat cushions, thick back, arms of varying height and width, short legs."""
    u = rng.uniform
    length = u(1.3, 2.2)
    depth = u(0.7, 0.95)
    leg_h = u(0.0, 0.12)
    base_h = u(0.18, 0.3)
    cushion_t = u(0.08, 0.15)
    back_h = u(0.25, 0.5)
    back_t = u(0.14, 0.26)
    arm_h = u(0.08, 0.25)
    arm_w = u(0.08, 0.2)
    n_cush = int(rng.integers(1, 4))
    fabric = _pick(rng, FABRICS + NEUTRALS)
    cush = _jitter(rng, fabric, 0.05)
    if leg_h > 0.02:
        for xs in (1, -1):
            for zs in (1, -1):
                b.box((xs * (length / 2 - 0.08), leg_h / 2, zs * (depth / 2 - 0.08)), (0.05, leg_h, 0.05), DARK)
    y_base = leg_h + base_h
    b.box((0, leg_h + base_h / 2, 0), (length, base_h, depth), fabric)
    inner = length - 2 * arm_w
    seat_d = depth - back_t
    cw = inner / n_cush
    for i in range(n_cush):
        x = -inner / 2 + cw * (i + 0.5)
        b.box((x, y_base + cushion_t / 2, back_t / 2 + 0.01), (cw - 0.015, cushion_t, seat_d - 0.02), cush)
    b.box((0, y_base + back_h / 2, -depth / 2 + back_t / 2), (length, back_h, back_t), fabric)
    for xs in (1, -1):
        b.box((xs * (length / 2 - arm_w / 2), y_base + arm_h / 2, 0), (arm_w, arm_h, depth), fabric)
    return dict(length=length, depth=depth, leg_h=leg_h, base_h=base_h, back_h=back_h,
                back_t=back_t, arm_h=arm_h, arm_w=arm_w, n_cush=n_cush)


def table(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Rectangular top on four legs (optional apron, shelf) or a round pedestal table."""
    u = rng.uniform
    round_top = bool(rng.random() < 0.3)
    width = u(0.8, 1.8)
    depth = width * u(0.45, 0.85)
    height = u(0.4, 0.8)
    top_t = u(0.025, 0.07)
    leg_t = u(1.4, 3.0) * pixel(width, height, depth)
    inset = u(0.02, 0.15)
    apron = bool(rng.random() < 0.5)
    shelf = bool(rng.random() < 0.2)
    top_col = _pick(rng, WOODS + NEUTRALS)
    leg_col = top_col if rng.random() < 0.5 else _pick(rng, [DARK, METAL] + WOODS)
    under = height - top_t
    if round_top:
        radius = u(0.35, 0.65)
        height = max(height, u(0.5, 0.8))
        under = height - top_t
        b.cylinder((0, under, 0), (0, height, 0), radius, color=top_col, segments=20)
        pedestal = rng.random() < 0.6
        if pedestal:
            b.cylinder((0, 0.03, 0), (0, under, 0), leg_t * 0.8, color=leg_col, segments=10)
            b.cylinder((0, 0, 0), (0, 0.03, 0), radius * u(0.35, 0.6), color=leg_col, segments=16)
        else:
            for i in range(4):
                a = np.deg2rad(45 + 90 * i)
                p = np.array([np.cos(a), 0, np.sin(a)]) * (radius * 0.7 - inset)
                b.cylinder(p, p + [0, under, 0], leg_t / 2, color=leg_col, segments=8)
        return dict(width=2 * radius, depth=2 * radius, height=height, top_t=top_t, leg_t=leg_t,
                    inset=inset, round=1, apron=0, shelf=0)
    b.box((0, height - top_t / 2, 0), (width, top_t, depth), top_col)
    lx, lz = width / 2 - inset - leg_t / 2, depth / 2 - inset - leg_t / 2
    for xs in (1, -1):
        for zs in (1, -1):
            b.box((xs * lx, under / 2, zs * lz), (leg_t, under, leg_t), leg_col)
    if apron:
        ah = min(0.1, under * 0.2)
        b.box((0, under - ah / 2, lz), (2 * lx, ah, 0.02), leg_col)
        b.box((0, under - ah / 2, -lz), (2 * lx, ah, 0.02), leg_col)
        b.box((lx, under - ah / 2, 0), (0.02, ah, 2 * lz), leg_col)
        b.box((-lx, under - ah / 2, 0), (0.02, ah, 2 * lz), leg_col)
    if shelf:
        b.box((0, under * 0.25, 0), (2 * lx, 0.02, 2 * lz), top_col)
    return dict(width=width, depth=depth, height=height, top_t=top_t, leg_t=leg_t, inset=inset,
                round=0, apron=int(apron), shelf=int(shelf))


def phone(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Upright rounded slab with a dark screen on the front, optional home button and camera."""
    u = rng.uniform
    height = u(0.9, 1.2)
    aspect = u(0.42, 0.62)
    thick = u(0.04, 0.11)
    corner = u(0.03, 0.15)
    margin = u(0.025, 0.12)
    button = bool(rng.random() < 0.4)
    camera = bool(rng.random() < 0.5)
    width = height * aspect
    body = _pick(rng, [DARK, (0.85, 0.85, 0.87), (0.75, 0.7, 0.6), (0.3, 0.35, 0.45), (0.6, 0.1, 0.15)])
    screen = _jitter(rng, (0.06, 0.08, 0.14), 0.04)

    def rounded_rect(w, h, r, n=4):
        pts = []
        for cx, cy, a0 in ((w / 2 - r, h / 2 - r, 0), (-w / 2 + r, h / 2 - r, 90),
                           (-w / 2 + r, -h / 2 + r, 180), (w / 2 - r, -h / 2 + r, 270)):
            for a in np.deg2rad(a0 + np.linspace(0, 90, n)):
                pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
        return np.array(pts)

    r = min(corner, width * 0.3)
    b.prism(rounded_rect(width, height, r) + [0, height / 2], -thick / 2, thick / 2, body, axes="xy")
    sh = height - 2 * margin - (0.12 if button else 0.0)
    sw = width - 2 * min(margin, width * 0.15)
    sy = height / 2 + (0.06 if button else 0.0)
    b.box((0, sy, thick / 2 + 0.003), (sw, sh, 0.006), screen)
    if button:
        b.cylinder((0, margin * 0.5 + 0.05, thick / 2), (0, margin * 0.5 + 0.05, thick / 2 + 0.006), 0.035,
                   color=_jitter(rng, body, 0.15), segments=12)
    if camera:
        b.cylinder((0, height - 0.1, -thick / 2), (0, height - 0.1, -thick / 2 - 0.012), 0.04, color=DARK,
                   segments=12)
    return dict(height=height, aspect=aspect, thick=thick, corner=corner, margin=margin,
                button=int(button), camera=int(camera))


def vessel(rng: np.random.Generator, b: MeshBuilder) -> dict:
    """Lofted hull with a pointed bow and sheer; motor ship cabins or a sailboat rig."""
    u = rng.uniform
    length = 1.0
    beam = u(0.16, 0.32)
    hull_d = u(0.09, 0.17)
    sheer = u(0.0, 0.06)
    transom = u(0.5, 0.9)
    sail = bool(rng.random() < 0.3)
    tiers = int(rng.integers(1, 4))
    cabin_len = u(0.2, 0.4)
    cabin_z = u(-0.25, 0.05)
    hull_col = _pick(rng, [(0.9, 0.9, 0.9), (0.15, 0.15, 0.2), (0.6, 0.1, 0.1), (0.2, 0.3, 0.5)])
    deck_col = _pick(rng, WOODS[:2] + [(0.9, 0.9, 0.88), (0.5, 0.5, 0.5)])
    k = 9
    phi = np.linspace(-np.pi / 2, np.pi / 2, k)
    zs = np.linspace(-0.5, 0.5, 9) * length
    rings = []
    for z in zs:
        f = z / length + 0.5  # 0 stern, 1 bow
        half = beam / 2 * (transom + (1 - transom) * np.sin(np.pi * min(f / 0.6, 1) / 2)) if f < 0.6 else \
            beam / 2 * np.sqrt(max(1 - ((f - 0.6) / 0.4) ** 2, 0.0005))
        deck_y = hull_d + sheer * f ** 2
        depth = hull_d * (0.6 + 0.4 * np.sin(np.pi * min(f, 0.95)))
        ring = np.stack([half * np.sin(phi), deck_y - depth * np.cos(phi), np.full(k, z)], 1)
        rings.append(ring)
    rings = np.stack(rings)
    b.loft(rings, hull_col)
    deck_y = hull_d
    if sail:
        mast_h = u(0.5, 0.9)
        mz = u(0.0, 0.15)
        b.cylinder((0, deck_y, mz), (0, deck_y + mast_h, mz), 0.6 * pixel(1.0, mast_h), color=DARK, segments=6)
        boom = u(0.25, 0.4)
        sail_poly = np.array([[mz - 0.01, deck_y + 0.05], [mz - boom, deck_y + 0.05],
                              [mz - 0.01, deck_y + mast_h * 0.95]])
        b.prism(sail_poly, -0.004, 0.004, (0.95, 0.95, 0.92), axes="zy")
        jib = np.array([[mz + 0.01, deck_y + mast_h * 0.85], [mz + 0.01, deck_y + 0.05], [mz + 0.3, deck_y + 0.03]])
        b.prism(jib, -0.004, 0.004, (0.93, 0.93, 0.9), axes="zy")
        b.box((0, deck_y + 0.03, -0.1), (beam * 0.4, 0.06, 0.2), deck_col)
        return dict(beam=beam, hull_d=hull_d, sheer=sheer, transom=transom, sail=1,
                    tiers=0, cabin_len=boom, cabin_z=mz, mast_h=mast_h)
    cl, cw, y = cabin_len, beam * u(0.6, 0.85), deck_y
    tier_h = u(0.06, 0.11)
    for t in range(tiers):
        b.box((0, y + tier_h / 2, cabin_z), (cw, tier_h, cl), deck_col if t == 0 else (0.92, 0.92, 0.9))
        # a dark window band on each tier
        b.box((0, y + tier_h * 0.6, cabin_z + 0.002), (cw + 0.004, tier_h * 0.25, cl * 0.9), DARK)
        y += tier_h
        cl *= 0.65
        cw *= 0.85
    mast_h = 0.0
    if rng.random() < 0.6:
        mast_h = u(0.1, 0.25)
        b.cylinder((0, y, cabin_z), (0, y + mast_h, cabin_z), 0.6 * pixel(1.0, y + mast_h), color=DARK, segments=6)
    if rng.random() < 0.5:
        fz = cabin_z - cabin_len * 0.5 - 0.05
        b.cylinder((0, deck_y, fz), (0, deck_y + tier_h * 2.2, fz), beam * 0.12, color=_pick(rng, PAINTS),
                   segments=10)
    return dict(beam=beam, hull_d=hull_d, sheer=sheer, transom=transom, sail=0, tiers=tiers,
                cabin_len=cabin_len, cabin_z=cabin_z, mast_h=mast_h)


BUILDERS: dict[str, Callable[[np.random.Generator, MeshBuilder], dict]] = {
    "airplane": airplane, "bench": bench, "dresser": dresser, "car": car, "chair": chair,
    "display": display, "lamp": lamp, "speaker": speaker, "rifle": rifle, "sofa": sofa,
    "table": table, "phone": phone, "vessel": vessel,
}


def build_shape(category: str, rng: np.random.Generator) -> tuple[Array, Array, Array, dict]:
    """(verts, faces, per-vertex colours, shape parameters) of one random object."""
    if category not in BUILDERS:
        raise ValueError(f"unknown synth13 category {category!r}; expected one of {', '.join(BUILDERS)}")
    b = MeshBuilder()
    params = BUILDERS[category](rng, b)
    verts, faces, colors = b.build()
    return verts, faces, colors, {k: float(v) for k, v in params.items()}

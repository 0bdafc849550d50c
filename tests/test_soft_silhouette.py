"""The fast soft-silhouette path must equal pytorch3d's MeshRasterizer +
SoftSilhouetteShader: values, vertex gradients and camera gradients, on
heterogeneous batches, perspective and orthographic cameras, several
blur / faces-per-pixel settings, and empty pixels."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch3d.renderer import (
    BlendParams,
    FoVOrthographicCameras,
    FoVPerspectiveCameras,
    MeshRasterizer,
    RasterizationSettings,
    SoftSilhouetteShader,
    look_at_view_transform,
)
from pytorch3d.structures import Meshes
from pytorch3d.utils import ico_sphere

from amodal3d.models.soft_silhouette import (
    SoftSilhouetteRenderer,
    default_blur_radius,
    pixel_centres_ndc,
    sigmoid_alpha,
    signed_face_dists,
)

REL = 1e-4  # relative tolerance on silhouettes and gradients (float32 kernels on both sides)


class Scene:
    """A heterogeneous batch (ico spheres of levels 1-3, random offsets, scale,
    translation) whose packed vertices and camera angles are autograd leaves."""

    def __init__(self, seed: int, levels=(1, 3, 2, 3), spread: float = 0.25, scale=(0.5, 0.9)):
        g = torch.Generator().manual_seed(seed)
        verts, self.faces = [], []
        for level in levels:
            sphere = ico_sphere(level)
            v = sphere.verts_packed()
            s = scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g)
            v = v * s + 0.06 * torch.randn(v.shape, generator=g) + spread * (torch.rand(3, generator=g) - 0.5)
            verts.append(v)
            self.faces.append(sphere.faces_packed())
        self.sizes = [len(v) for v in verts]
        self.verts = torch.cat(verts).requires_grad_(True)
        n = len(levels)
        self.dist = (2.3 + 0.8 * torch.rand(n, generator=g)).requires_grad_(True)
        self.elev = (-40 + 80 * torch.rand(n, generator=g)).requires_grad_(True)
        self.azim = (360 * torch.rand(n, generator=g)).requires_grad_(True)
        self.g = g

    def leaves(self):
        return [self.verts, self.dist, self.elev, self.azim]

    def meshes(self) -> Meshes:
        return Meshes(verts=list(torch.split(self.verts, self.sizes)), faces=self.faces)

    def cameras(self, kind: str = "perspective"):
        R, T = look_at_view_transform(dist=self.dist, elev=self.elev, azim=self.azim)
        if kind == "perspective":
            return FoVPerspectiveCameras(R=R, T=T)
        return FoVOrthographicCameras(R=R, T=T)


def reference(image_size, sigma, faces_per_pixel, blur_radius):
    """pytorch3d's own pipeline, built here independently of the module under test."""
    settings = RasterizationSettings(image_size=image_size, blur_radius=blur_radius, faces_per_pixel=faces_per_pixel)
    shader = SoftSilhouetteShader(BlendParams(sigma=sigma))

    def render(meshes, cameras):
        return shader(MeshRasterizer(cameras=cameras, raster_settings=settings)(meshes), meshes)[..., 3]

    return render


def render_and_grads(render, scene: Scene, kind: str, weights: torch.Tensor):
    for leaf in scene.leaves():
        leaf.grad = None
    alpha = render(scene.meshes(), scene.cameras(kind))
    (alpha * weights).sum().backward()
    return alpha.detach(), [leaf.grad.clone() for leaf in scene.leaves()]


def assert_rel_close(fast: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL):
    scale = ref.abs().max()
    assert scale > 0, f"{what}: reference is all zero, the check would be vacuous"
    err = (fast - ref).abs().max()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} x {scale:.3g}"
    assert (fast - ref).norm() <= rel * ref.norm(), f"{what}: relative L2 error too large"


def compare(scene, kind, image_size=48, sigma=1e-4, faces_per_pixel=10, blur_radius=None):
    blur = default_blur_radius(sigma) if blur_radius is None else blur_radius
    fast_renderer = SoftSilhouetteRenderer(image_size, sigma, faces_per_pixel, blur_radius, backend="fast")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    weights = torch.rand(len(scene.sizes), h, w, generator=scene.g)
    alpha_fast, grads_fast = render_and_grads(fast_renderer, scene, kind, weights)
    assert fast_renderer.last_backend == "fast"
    alpha_ref, grads_ref = render_and_grads(reference(image_size, sigma, faces_per_pixel, blur), scene, kind, weights)
    assert alpha_fast.shape == alpha_ref.shape == (len(scene.sizes), h, w)
    # The scene must exercise covered, partly covered and empty pixels.
    assert (alpha_ref > 0.99).any() and (alpha_ref == 0).any() and ((alpha_ref > 0.01) & (alpha_ref < 0.99)).any()
    torch.testing.assert_close(alpha_fast, alpha_ref, rtol=0, atol=REL)
    for name, gf, gr in zip(("verts", "dist", "elev", "azim"), grads_fast, grads_ref):
        if name == "dist" and kind == "orthographic":
            continue  # an orthographic image does not depend on the distance: both are rounding noise
        assert_rel_close(gf, gr, f"grad {name}")


@pytest.mark.parametrize("seed", [0, 1])
def test_perspective_batch_matches_pytorch3d(seed):
    compare(Scene(seed), "perspective")


def test_orthographic_batch_matches_pytorch3d():
    compare(Scene(2, levels=(2, 1, 3)), "orthographic", image_size=40)


@pytest.mark.parametrize(
    "image_size, sigma, faces_per_pixel, blur_radius",
    [
        (40, 1e-4, 1, 0.0),  # hard edges, one face per pixel
        (40, 3e-4, 4, None),  # wider blur, few faces per pixel
        (40, 1e-4, 10, 1e-5),  # blur smaller than the sigmoid default
        ((32, 48), 1e-4, 10, None),  # non-square: the long side spans more than [-1, 1]
    ],
)
def test_blur_and_faces_per_pixel_variants(image_size, sigma, faces_per_pixel, blur_radius):
    scene = Scene(3, levels=(1, 3, 2))
    if blur_radius == 0.0:
        # No blur: only inside pixels are recorded, alpha is 0 or > 0.5; exercise the
        # value path only where gradients exist (sigmoid of interior distances).
        renderer = SoftSilhouetteRenderer(image_size, sigma, faces_per_pixel, blur_radius, backend="fast")
        fast = renderer(scene.meshes(), scene.cameras())
        ref = reference(image_size, sigma, faces_per_pixel, blur_radius)(scene.meshes(), scene.cameras())
        assert renderer.last_backend == "fast" and (ref > 0).any() and (ref == 0).any()
        torch.testing.assert_close(fast, ref, rtol=0, atol=REL)
        return
    compare(scene, "perspective", image_size, sigma, faces_per_pixel, blur_radius)


def test_signed_dists_and_alpha_match_fragments():
    scene = Scene(4)
    settings = SoftSilhouetteRenderer(48).raster_settings
    rasterizer = MeshRasterizer(cameras=scene.cameras(), raster_settings=settings)
    with torch.no_grad():
        meshes = scene.meshes()
        fragments = rasterizer(meshes)
        projected = rasterizer.transform(meshes)
        dists = signed_face_dists(projected.verts_packed(), projected.faces_packed(), fragments.pix_to_face)
        recorded = fragments.pix_to_face >= 0
        assert (fragments.dists[recorded] < 0).any() and (fragments.dists[recorded] > 0).any()
        assert_rel_close(dists, fragments.dists, "signed distances")
        assert torch.equal(dists[~recorded], torch.full_like(dists[~recorded], -1.0))
        ref_alpha = SoftSilhouetteShader(BlendParams(sigma=1e-4))(fragments, meshes)[..., 3]
        torch.testing.assert_close(sigmoid_alpha(fragments.dists, fragments.pix_to_face, 1e-4), ref_alpha, rtol=0, atol=REL)


def test_pixel_centres_follow_pytorch3d_convention():
    ys, xs = pixel_centres_ndc(4, 8)
    # +Y up: row 0 is the top; +X left: column 0 has the largest x; the short side spans [-1, 1].
    torch.testing.assert_close(ys, torch.tensor([0.75, 0.25, -0.25, -0.75]))
    torch.testing.assert_close(xs, torch.linspace(1.75, -1.75, 8))


def test_empty_pixels_are_zero_with_zero_gradient():
    scene = Scene(5, levels=(2, 1), spread=0.0, scale=(0.3, 0.4))
    with torch.no_grad():  # move the second mesh wholly behind its camera: an all-empty image
        scene.verts[scene.sizes[0]:] += 2 * scene.cameras().get_camera_center()[1]
    renderer = SoftSilhouetteRenderer(32, backend="fast")
    rasterizer = MeshRasterizer(cameras=scene.cameras(), raster_settings=renderer.raster_settings)
    with torch.no_grad():
        empty = (rasterizer(scene.meshes()).pix_to_face < 0).all(-1)
    assert empty[0].any() and (~empty[0]).any() and empty[1].all()
    alpha = renderer(scene.meshes(), scene.cameras())
    assert renderer.last_backend == "fast"
    assert torch.equal(alpha[empty], torch.zeros_like(alpha[empty]))
    assert (alpha[~empty] > 0).all()
    (alpha * empty).sum().backward()
    for leaf in scene.leaves():
        assert leaf.grad is None or torch.count_nonzero(leaf.grad) == 0
    # The same loss over covered pixels does move the vertices of the visible mesh only.
    scene.verts.grad = None
    alpha = renderer(scene.meshes(), scene.cameras())
    (alpha * ~empty).sum().backward()
    assert torch.count_nonzero(scene.verts.grad[: scene.sizes[0]]) > 0
    assert torch.count_nonzero(scene.verts.grad[scene.sizes[0]:]) == 0


def test_near_plane_clipping_falls_back_to_pytorch3d():
    scene = Scene(6, levels=(1, 1), spread=0.0, scale=(1.0, 1.0))
    with torch.no_grad():
        scene.dist.copy_(torch.tensor([0.9, 2.5]))  # camera 0 sits inside its sphere: faces straddle z = znear / 2
    renderer = SoftSilhouetteRenderer(24, faces_per_pixel=4, backend="fast")
    with pytest.warns(UserWarning, match="straddles the near clipping plane"):
        alpha = renderer(scene.meshes(), scene.cameras())
    assert renderer.last_backend == "pytorch3d"
    ref = reference(24, 1e-4, 4, default_blur_radius(1e-4))(scene.meshes(), scene.cameras())
    torch.testing.assert_close(alpha, ref, rtol=0, atol=0)


def test_backend_choice():
    renderer = SoftSilhouetteRenderer(16)
    assert renderer.resolve_backend(torch.device("cpu")) == "fast"
    assert renderer.resolve_backend(torch.device("cuda")) == "pytorch3d"
    assert SoftSilhouetteRenderer(16, backend="pytorch3d").resolve_backend(torch.device("cpu")) == "pytorch3d"
    scene = Scene(7, levels=(1,))
    renderer(scene.meshes(), scene.cameras())
    assert renderer.last_backend == "fast"
    assert math.isclose(renderer.raster_settings.blur_radius, math.log(1 / 1e-4 - 1) * 1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=0), "image_size"),
        (dict(image_size=(16, 16, 3)), "image_size"),
        (dict(image_size=16, sigma=0.0), "sigma"),
        (dict(image_size=16, faces_per_pixel=0), "faces_per_pixel"),
        (dict(image_size=16, blur_radius=-1.0), "blur_radius"),
        (dict(image_size=16, backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftSilhouetteRenderer(**kwargs)


def test_non_meshes_input_is_rejected():
    with pytest.raises(TypeError, match="Meshes"):
        SoftSilhouetteRenderer(16)(torch.zeros(1, 3, 3), Scene(8, levels=(1,)).cameras())


def test_sparse_window_renderer_matches_pytorch3d():
    """recon's default backend (models.mesh_renderer.SparseSoftSilhouette: every face
    within the blur radius, by per-face windows) against pytorch3d's rasteriser + soft
    silhouette shader with enough faces per pixel to keep them all: silhouettes and
    vertex gradients agree."""
    from pytorch3d.utils import ico_sphere

    from amodal3d.models.mesh_renderer import make_cameras, make_silhouette_renderer

    torch.manual_seed(0)
    ico = ico_sphere(2)
    b = 3
    verts = ico.verts_packed()[None].repeat(b, 1, 1) * (0.35 + 0.1 * torch.rand(b, 1, 3))
    verts = verts + 0.03 * torch.randn_like(verts)
    faces = ico.faces_packed()[None].repeat(b, 1, 1)
    cams = make_cameras(torch.tensor([[30.0, 20.0, 2.7], [200.0, 45.0, 2.4], [300.0, 5.0, 3.0]]))
    weights = torch.rand(b, 32, 32)
    out = {}
    for backend in ("sparse", "pytorch3d"):
        v = verts.clone().requires_grad_(True)
        alpha = make_silhouette_renderer(32, sigma=1e-4, faces_per_pixel=100, backend=backend)(Meshes(v, faces), cams)
        (alpha * weights).sum().backward()
        out[backend] = (alpha.detach(), v.grad)
    (a_sparse, g_sparse), (a_ref, g_ref) = out["sparse"], out["pytorch3d"]
    assert a_ref.max() > 0.9 and a_ref.min() < 0.1  # the meshes are in view and not covering everything
    assert (a_sparse - a_ref).abs().max() < 1e-4
    assert (g_sparse - g_ref).norm() / g_ref.norm() < 1e-4


def test_sparse_renderer_sends_only_meshes_at_the_near_plane_to_pytorch3d():
    """A placed crop camera keeps znear = 0.1 (it used to report pytorch3d's default 1,
    so a long mesh 2.2 away sent the whole batch down the ~100x slower exact path);
    a mesh that does reach the near plane takes the exact path alone."""
    from pytorch3d.utils import ico_sphere

    from amodal3d.models.mesh_renderer import ZNEAR, make_cameras, make_silhouette_renderer

    ico = ico_sphere(2)
    verts = ico.verts_packed()[None].repeat(3, 1, 1) * torch.tensor([0.3, 0.3, 1.3])  # long along z
    faces = ico.faces_packed()[None].repeat(3, 1, 1)
    camera = torch.tensor([[0.0, 0.0, 2.2], [0.0, 0.0, 1.25], [90.0, 10.0, 2.2]])  # row 1: the tip passes the camera
    place = torch.tensor([[1.0, 0.0, 0.0]]).repeat(3, 1)
    cams = make_cameras(camera, place)
    assert torch.allclose(torch.as_tensor(cams.get_znear()), torch.tensor(ZNEAR))
    renderer = make_silhouette_renderer(32, sigma=1e-4, faces_per_pixel=100, backend="sparse")
    v = verts.clone().requires_grad_(True)
    alpha = renderer(Meshes(v, faces), cams)
    assert renderer.last_exact_rows == 1 and renderer.last_stats["window_pixels"] > 0
    alpha.sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad[1].abs().sum() > 0
    with torch.no_grad():
        alone = renderer(Meshes(verts[[0, 2]], faces[[0, 2]]), make_cameras(camera[[0, 2]], place[[0, 2]]))
        assert renderer.last_exact_rows == 0  # the tip 0.9 from the camera is no longer "near"
        exact = renderer.exact(Meshes(verts[[1]], faces[[1]]), make_cameras(camera[[1]], place[[1]]))
    assert torch.allclose(alpha[[0, 2]].detach(), alone) and torch.allclose(alpha[1].detach(), exact[0])


def test_sparse_renderer_reports_its_window_work():
    """`window_pixels` (logged as train/render_window_mpx) grows with the faces' projected size."""
    from pytorch3d.utils import ico_sphere

    from amodal3d.models.mesh_renderer import sparse_soft_silhouette

    ico = ico_sphere(2)
    xy = ico.verts_packed()[None, :, :2] * 0.3
    faces = ico.faces_packed()
    small, large = {}, {}
    sparse_soft_silhouette(xy, faces, 32, 1e-4, 1e-3, small)
    sparse_soft_silhouette(xy * 3, faces, 32, 1e-4, 1e-3, large)
    assert len(faces) <= small["window_pixels"] < large["window_pixels"]

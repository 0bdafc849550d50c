"""Category colour templates (models.appearance) and their use in recon's camera
multiplex: a phone-like sphere whose front carries a dark "screen" looks the same
from both sides in silhouette, and only the colours tell which side is seen."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch3d.utils import ico_sphere

from fakes import LabelGuard
from test_recon import _cfg, synthetic_batch
from amodal3d.datamodules.sources.render import render_objects
from amodal3d.lightning_modules.recon import ReconStage
from amodal3d.models.appearance import ColourTemplates, colour_error, sample_at, visible_vertices
from amodal3d.models.mesh_decoder import SymmetricMeshDecoder

S = 64
BODY = (0.9, 0.6, 0.2)
EL, DIST = 20.0, 2.732


def _screen_sphere():
    """The decoder's own sphere (so templates index its vertices), its faces, and which
    vertices form the dark screen on the +z side (azimuth 0 looks at it)."""
    dec = SymmetricMeshDecoder(8, 1)
    verts = dec.normalise(dec.sphere[None])[0]
    return dec, verts, dec.faces, verts[:, 2] > 0.15


def _view(azimuth: float, body=BODY) -> dict[str, torch.Tensor]:
    """A one-instance batch: the screen sphere rendered by the dataset's renderer."""
    _, verts, faces, screen = _screen_sphere()
    colours = np.tile(np.asarray(body, np.float32), (len(verts), 1))
    colours[screen.numpy()] = 0.05
    rgba = render_objects([(verts.numpy(), faces.numpy(), colours)], np.array([[azimuth, EL, DIST]], np.float32), S)[0, 0]
    alpha = torch.from_numpy(rgba[..., 3] > 0).float()
    ys, xs = torch.nonzero(alpha, as_tuple=True)
    return {
        "rgb": torch.from_numpy(rgba[..., :3]).float().permute(2, 0, 1)[None] / 255.0,
        "visible": alpha[None, None], "occluder": torch.zeros(1, 1, S, S), "category": torch.zeros(1, dtype=torch.long),
        "crop_box": torch.tensor([[0.0, 0.0, S, S]]),
        "amodal_box": torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float(),
    }


def _set_screen_templates(templates: ColourTemplates, screen: torch.Tensor, src: torch.Tensor) -> None:
    """Templates that know the category: dark detail with full share on the screen, none elsewhere."""
    half_screen = torch.zeros(templates.share.shape[1], dtype=torch.bool)
    half_screen[src[screen]] = True
    with torch.no_grad():
        templates.detail.fill_(-4.0)  # sigmoid: ~0.02, dark
        templates.share.copy_(torch.where(half_screen, 8.0, -8.0)[None])


def test_colour_templates_are_mirror_symmetric():
    dec = SymmetricMeshDecoder(8, 3)
    templates = ColourTemplates(3, dec.src)
    with torch.no_grad():
        templates.detail.normal_()
        templates.share.normal_()
    detail, share = templates(torch.tensor([0, 2]))
    assert detail.shape == (2, dec.num_verts, 3) and share.shape == (2, dec.num_verts)
    assert torch.equal(detail, detail[:, dec.mirror]) and torch.equal(share, share[:, dec.mirror])
    assert not torch.allclose(detail[0], detail[1])  # one template per category
    with pytest.raises(ValueError, match="share_init"):
        ColourTemplates(3, dec.src, share_init=1.0)


def test_colour_templates_start_uniform_or_with_a_front_back_bias():
    dec = SymmetricMeshDecoder(8, 2)
    detail, share = ColourTemplates(2, dec.src)(torch.tensor([0, 1]))
    assert torch.equal(detail, torch.full_like(detail, 0.5)) and torch.allclose(share, torch.full_like(share, 0.1))
    torch.manual_seed(0)
    detail, share = ColourTemplates(2, dec.src, init_noise=1.0)(torch.tensor([0, 1]))
    front, back = dec.sphere[:, 2] > 0.2, dec.sphere[:, 2] < -0.2
    assert (share[:, front].mean(1) - share[:, back].mean(1)).abs().min() > 0  # not the same both sides
    assert torch.equal(share, share[:, dec.mirror])  # still mirror symmetric
    with pytest.raises(ValueError, match="init_noise"):
        ColourTemplates(2, dec.src, init_noise=-1.0)


def test_visible_vertices_face_the_camera_and_drop_hidden_ones():
    big = ico_sphere(2)
    small = ico_sphere(2)
    v_big = big.verts_packed() * 0.4 + torch.tensor([0.0, 0.0, 0.4])
    v_small = small.verts_packed() * 0.3 - torch.tensor([0.0, 0.0, 0.5])  # right behind the big one
    verts = torch.cat([v_big, v_small])[None]
    faces = torch.cat([big.faces_packed(), small.faces_packed() + len(v_big)])
    camera = torch.tensor([[0.0, 0.0, 2.732]])  # from +z
    xy, visible = visible_vertices(verts, faces, camera, torch.tensor([[1.0, 0.0, 0.0]]))
    n = len(v_big)
    # within 60 degrees of the view axis: visible; turned away: not (the coarse depth
    # grid may drop some grazing vertices near the rim, which sample the silhouette's edge)
    front = v_big[:, 2] > 0.4 + 0.4 * 0.5
    back = v_big[:, 2] < 0.4
    assert visible[0, :n][front].all() and not visible[0, :n][back].any()
    # the small sphere's camera-facing half faces the camera but is hidden by the big one
    assert not visible[0, n:].any()
    # alone and zoomed to fill the frame (as recon places every mesh), its front is visible (45 degrees:
    # a smaller sphere turns more within one grid cell)
    _, alone = visible_vertices(v_small[None], small.faces_packed(), camera, torch.tensor([[2.0, 0.0, 0.0]]))
    assert alone[0, v_small[:, 2] > -0.5 + 0.3 * 0.7].all() and not alone[0, v_small[:, 2] < -0.5].any()
    # positions are placed NDC: the sphere on the view axis is centred, its front cap within its outline
    assert xy[0, :n][front].mean(0).abs().max() < 0.05
    assert xy[0, :n][front].norm(dim=-1).max() < xy[0, :n].norm(dim=-1).max()


def test_sample_at_reads_the_pixel_under_an_ndc_point():
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 1, 6] = 1.0  # row 1 (top), column 6 (right)
    # pytorch3d NDC: +x left, +y up; pixel (row 1, col 6) centre is x = 1 - 2*6.5/8, y = 1 - 2*1.5/8
    point = torch.tensor([[[1 - 2 * 6.5 / 8, 1 - 2 * 1.5 / 8]]])
    assert sample_at(img, point)[0, 0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("body", [BODY, (0.2, 0.4, 0.9)])
def test_colour_error_tells_the_front_from_the_back(body):
    dec, verts, faces, screen = _screen_sphere()
    templates = ColourTemplates(1, dec.src)
    _set_screen_templates(templates, screen, dec.src)
    detail, share = templates(torch.zeros(1, dtype=torch.long))
    place = torch.tensor([[1.0, 0.0, 0.0]])  # the dataset render is the uncropped frame
    for seen in (0.0, 180.0):
        batch = _view(seen, body)
        observed = batch["visible"] * (1 - batch["occluder"])
        errs, colours = {}, {}
        for az in (seen, seen + 180.0):
            xy, vis = visible_vertices(verts[None], faces, torch.tensor([[az, EL, DIST]]), place)
            errs[az], colours[az] = colour_error(xy, vis, detail, share, batch["rgb"], observed)
        right, flipped = float(errs[seen]), float(errs[seen + 180.0])
        assert right < 0.02 and flipped > 2 * right, (seen, right, flipped)
    # seen from the back under the right camera every visible vertex is body: the base
    # colour solved for the instance is the body's (up to the renderer's shading)
    _, vis_back = visible_vertices(verts[None], faces, torch.tensor([[180.0, EL, DIST]]), place)
    assert vis_back.sum() > 100
    base = colours[180.0][0, vis_back[0]]
    assert torch.cosine_similarity(base.mean(0), torch.tensor(body), dim=0) > 0.99


def test_the_multiplex_uses_colour_where_the_silhouettes_tie():
    over = ["model.camera_hypotheses=2", "model.select_size=32", "model.w_colour=1.0", "model.colour_select=1.0"]
    torch.manual_seed(0)
    stage = ReconStage(_cfg(overrides=over)).eval()
    net = stage.net
    _, verts, _, screen = _screen_sphere()
    _set_screen_templates(net.appearance, screen, net.decoder.src)
    for seen in (0.0, 180.0):
        batch = _view(seen)
        with torch.no_grad():
            out = net.encode(net.inputs(batch), batch["category"])
            out["verts"] = verts[None]
            for order in ((0.0, 180.0), (180.0, 0.0)):
                out["hypotheses"] = torch.tensor([[[seen + d, EL, DIST] for d in order]])
                _, best = net.select_camera(out, batch, net.target_box(batch))
                assert order[int(best)] == 0.0, (seen, order)
    # without the colour term the two hypotheses are (nearly) the same picture
    net.colour_select = 0.0
    with torch.no_grad():
        out["hypotheses"] = torch.tensor([[[d, EL, DIST] for d in (0.0, 180.0)]])
        box = net.target_box(batch)
        sil = net.render(verts[None].repeat(2, 1, 1), out["hypotheses"][0], box.repeat(2, 1), 32)
    assert (sil[0] - sil[1]).abs().mean() < 0.01


def test_training_with_colour_reads_no_hidden_labels_and_fits_the_templates(monkeypatch):
    torch.manual_seed(0)
    stage = ReconStage(_cfg(overrides=["model.w_colour=1.0", "model.camera_hypotheses=2"]))
    seen = {}
    monkeypatch.setattr(stage, "log", lambda name, value, **kw: seen.__setitem__(name, float(value)))
    loss = stage.training_step(LabelGuard(synthetic_batch(objects=2, views=2)), 0)
    loss.backward()
    assert math.isfinite(seen["train/colour"]) and math.isfinite(seen["train/swap_colour"])
    assert stage.net.appearance.detail.grad.abs().sum() > 0 and stage.net.appearance.share.grad.abs().sum() > 0
    # the colour templates learn at the templates' rate
    groups = stage.configure_optimizers()
    opt = groups["optimizer"] if isinstance(groups, dict) else groups
    fast = next(g for g in opt.param_groups if any(p is stage.net.appearance.share for p in g["params"]))
    assert any(p is stage.net.decoder.template for p in fast["params"])
    # off by default: no colour parameters, so older checkpoints load
    assert ReconStage(_cfg()).net.appearance is None
    for key in ("w_colour", "colour_select", "colour_init_noise"):
        with pytest.raises(ValueError, match=key):
            ReconStage(_cfg(overrides=[f"model.{key}=-1.0"]))

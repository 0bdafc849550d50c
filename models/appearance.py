"""Category colour templates: what a front looks like, so the camera multiplex can
tell it from a back.

Many objects have nearly the same silhouette from opposite sides while their
colours differ (a phone's dark screen, a display's panel, a car's windows); a
silhouette loss cannot see that. Each category gets a left-right symmetric colour
template on the mesh vertices: a shared "detail" colour d_v and its share w_v in
[0, 1]. An instance's vertex colour is w_v d_v + (1 - w_v) c, where c is the
instance's own base colour (paint, fabric and wood vary between instances),
solved in closed form from the image, so only what the category shares is learned.

Colours are compared where the visible vertices land in the crop (point sampling,
no rasteriser): a vertex counts if it faces the camera, is near the nearest
surface in a coarse depth grid, and lands where the visible mask holds and no occluder is
known. The mesh and camera only place the samples (no gradient flows to them).
recon adds this error to the multiplex choice, so a hypothesis that shows the
back where the image shows the front loses, and fits the templates to the views
the multiplex picked. The hope is a loop in which one convention per category
(the side that carries the screen) wins, as the shape templates settle which side
of a chair carries the backrest; on synth13 it did not start (docs/results.md:
with front and back tossed per instance, both sides of a template learn the same
average), so recon has it off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch3d.structures import Meshes
from torch import nn

from amodal3d.models.mesh_renderer import make_cameras
from amodal3d.models.precision import float32_geometry


class ColourTemplates(nn.Module):
    """Per-category symmetric vertex colours: (detail (B,V,3), share (B,V)) of category (B,).

    `src` (V,) maps every vertex to its slot in the independent half (the mesh
    decoder's mirror map), so a vertex and its mirror image share their colour."""

    def __init__(self, num_categories: int, src: torch.Tensor, share_init: float = 0.1,
                 init_noise: float = 0.0) -> None:
        super().__init__()
        if not 0.0 < share_init < 1.0:
            raise ValueError(f"share_init={share_init}: expected a value in (0, 1)")
        if init_noise < 0:
            raise ValueError(f"init_noise={init_noise}: expected >= 0")
        half = int(src.max()) + 1
        self.register_buffer("src", src.long().clone(), persistent=False)
        # logits; the base colour explains most at first, details grow where the data agree.
        # init_noise > 0 starts each template a little different front and back: a bias the
        # multiplex can amplify, where a uniform start gives it nothing to choose by
        detail = torch.zeros(num_categories, half, 3)
        share = torch.full((num_categories, half), float(torch.logit(torch.tensor(share_init))))
        if init_noise > 0:  # drawn only then: a uniform start leaves the random stream as it was
            detail += torch.randn_like(detail) * init_noise
            share += torch.randn_like(share) * init_noise
        self.detail = nn.Parameter(detail)
        self.share = nn.Parameter(share)

    def forward(self, category: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        detail = torch.sigmoid(self.detail[category])[:, self.src]
        share = torch.sigmoid(self.share[category])[:, self.src]
        return detail, share


@float32_geometry
def visible_vertices(
    verts: torch.Tensor, faces: torch.Tensor, camera: torch.Tensor, place: torch.Tensor,
    grid: int = 16, depth_tol: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(xy (B,V,2) placed NDC positions, visible (B,V) bool) of the vertices under the cameras.

    A vertex is visible if it faces the camera, lands in the frame, and lies within
    depth_tol of the nearest surface point in its cell of a grid x grid depth map: a
    coarse z-buffer of points spread over the camera-facing faces (four per face,
    so every cell a surface covers holds some), which drops concave parts hidden
    behind others."""
    cams = make_cameras(camera, place)
    to_ndc, to_view = cams.get_full_projection_transform(), cams.get_world_to_view_transform()
    xy = to_ndc.transform_points(verts)[..., :2]
    depth = to_view.transform_points(verts)[..., 2]
    centre = cams.get_camera_center()[:, None]
    meshes = Meshes(verts=verts, faces=faces[None].expand(verts.shape[0], -1, -1))
    facing = (meshes.verts_normals_padded() * (centre - verts)).sum(-1) > 0
    # depth samples: the centroid and three points towards the corners of every facing face
    tri = verts[:, faces]  # (B,F,3,3)
    face_facing = (meshes.faces_normals_padded() * (centre - tri.mean(2))).sum(-1) > 0
    mix = torch.tensor([[2, 2, 2], [4, 1, 1], [1, 4, 1], [1, 1, 4]], dtype=verts.dtype, device=verts.device) / 6.0
    pts = torch.einsum("sk,bfkc->bfsc", mix, tri).flatten(1, 2)  # (B,4F,3)
    pts_ok = face_facing.repeat_interleave(len(mix), dim=1)

    def cells(ndc: torch.Tensor) -> torch.Tensor:
        col_row = ((1.0 - ndc.clamp(-1 + 1e-6, 1 - 1e-6)) * 0.5 * grid).long()  # NDC +x left, +y up
        batch = torch.arange(ndc.shape[0], device=ndc.device)[:, None]
        return (batch * grid + col_row[..., 1]) * grid + col_row[..., 0]

    pts_xy = to_ndc.transform_points(pts)[..., :2]
    pts_ok &= (pts_xy.abs() < 1).all(-1)
    zmin = torch.full((depth.shape[0] * grid * grid,), float("inf"), device=verts.device, dtype=depth.dtype)
    zmin = zmin.scatter_reduce(0, cells(pts_xy)[pts_ok], to_view.transform_points(pts)[..., 2][pts_ok], reduce="amin")
    inside = (xy.abs() < 1).all(-1)
    visible = facing & inside & (depth <= zmin[cells(xy)] + depth_tol)
    return xy, visible


def sample_at(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """(B,C,S,S) image sampled bilinearly at placed NDC points xy (B,N,2) -> (B,N,C)."""
    grid = -xy[:, None].to(image.dtype)  # NDC (+x left, +y up) -> grid_sample (+x right, +y down)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, :, 0].transpose(1, 2)


@float32_geometry
def colour_error(
    xy: torch.Tensor, visible: torch.Tensor, detail: torch.Tensor, share: torch.Tensor,
    rgb: torch.Tensor, observed: torch.Tensor, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(error (B,), colours (B,V,3)): mean squared colour error over the visible vertices
    that land on observed object pixels, with each instance's base colour c solved in
    closed form (least squares of w d + (1 - w) c against the sampled colours).

    rgb (B,3,S,S) crop, observed (B,1,S,S) visible mask x (1 - occluded)."""
    y = sample_at(rgb.float(), xy)  # (B,V,3)
    m = visible.float() * sample_at(observed.float(), xy)[..., 0]  # (B,V)
    a = 1.0 - share
    r = y - share[..., None] * detail
    base = (m[..., None] * a[..., None] * r).sum(1) / ((m * a * a).sum(1)[:, None] + eps)  # (B,3)
    colours = share[..., None] * detail + a[..., None] * base[:, None]
    err = (m * (colours - y).pow(2).mean(-1)).sum(1) / m.sum(1).clamp_min(1.0)
    return err, colours

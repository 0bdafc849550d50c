"""recon on the test split: camera and shape errors, and its meshes per category.

The errors are recon's own evaluation (azimuth/elevation/distance against the
true cameras, view-frame Chamfer distance against the true synth13 meshes). The
per-category azimuth offsets that align recon's arbitrary canonical frame with
the true one are fitted on the validation split and applied to the test split.
Beside recon stands a constant camera (every instance: elevation and distance at
the middle of the camera head's ranges, where it starts, and the best single
azimuth per category, fitted on validation) - the error a method with no view
information gets. The
sheet shows, for a few test instances of every category: the input crop, the predicted mesh
rendered (shaded, the dataset's renderer) from the predicted camera and from two
other azimuths, and the true synth13 mesh from the true camera. A picture of
what recon learned that no single number gives (docs/results.md shows it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image, ImageDraw

from amodal3d.categories import CATEGORIES, class_names
from amodal3d.atomic import save_png_atomic

_GREY = np.array([0.72, 0.72, 0.75], np.float32)


def _on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)


def constant_camera_rows(rows: torch.Tensor, elevation: float, distance: float) -> torch.Tensor:
    """camera_errors rows with the prediction replaced by one constant camera
    (azimuth 0 before the per-category offset; no Chamfer)."""
    out = rows.clone()
    out[:, 1], out[:, 2], out[:, 3] = 0.0, float(elevation), float(distance)
    out[:, 7] = float("nan")
    return out


def split_errors(rows: torch.Tensor, offsets: dict, names: tuple[str, ...] = CATEGORIES) -> dict:
    """camera_errors of rows (overall and per category of the table `names`) under the given offsets."""
    from amodal3d.metrics.camera import camera_errors

    n = len(names)
    errors = {k: float(v) for k, v in camera_errors(rows, n, offsets).items()}
    errors["per_category"] = {
        names[c]: {k: float(v) for k, v in camera_errors(rows[rows[:, 0] == c], n, offsets).items()}
        for c in sorted(set(rows[:, 0].long().tolist()))
    }
    errors["instances"] = int(len(rows))
    return errors


def camera_report(stage, val_loader, test_loader, device: torch.device, true_meshes=None,
                  max_batches: int | None = None) -> tuple[dict[str, list[dict]], dict]:
    """(test cases for the mesh sheet, errors): recon's test errors and the constant
    camera's ("constant"), each with azimuth offsets fitted on validation."""
    from amodal3d.metrics.camera import camera_offsets

    _, val_rows = collect_reconstructions(stage, val_loader, device, 0, true_meshes, max_batches, split="val",
                                          chamfer=False)
    cases, test_rows = collect_reconstructions(stage, test_loader, device, 2, true_meshes, max_batches)
    if not len(test_rows):
        return cases, {"instances": 0}
    head = stage.net.camera_head
    el, dist = 0.5 * sum(head.el_range), 0.5 * sum(head.dist_range)
    names = class_names(stage.cfg)
    errors = split_errors(test_rows, camera_offsets(val_rows, len(names)), names)
    const_val = constant_camera_rows(val_rows, el, dist)
    errors["constant"] = split_errors(constant_camera_rows(test_rows, el, dist),
                                      camera_offsets(const_val, len(names)), names)
    errors["constant"]["camera"] = {"elevation": el, "distance": dist}
    errors["offsets_fitted_on"] = "val"
    return cases, errors


@torch.no_grad()
def collect_reconstructions(stage, loader, device: torch.device, per_category: int = 2,
                            true_meshes=None, max_batches: int | None = None, split: str = "test",
                            chamfer: bool = True) -> tuple[dict[str, list[dict]], torch.Tensor]:
    """Over the whole loader (of `split`): the first `per_category` instances of
    each category as recon predicts them ({category: [{rgb, verts, faces, camera,
    object_id, true_camera}]}), and the per-instance rows camera_errors scores
    against the true cameras and meshes (evaluation only)."""
    from amodal3d.metrics.chamfer import view_frame_chamfer

    stage.eval()
    found: dict[int, list[dict]] = {}
    rows = []
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        batch = move_data_to_device(batch, device)
        out = stage.net(batch)
        true_cam = batch["eval_camera"].float()
        cham = torch.full((len(true_cam),), float("nan"), device=device)
        meshes = true_meshes.get(split, batch["object_id"]) if true_meshes and chamfer else None
        if meshes is not None:
            cham = view_frame_chamfer(out["verts"], stage.net.faces, out["camera"], meshes, true_cam)
        same = true_meshes.same_views(split, batch["object_id"].cpu(), true_cam[:, 0].cpu()) if true_meshes else None
        row = torch.cat([batch["category"].float()[:, None], out["camera"], true_cam, cham[:, None]], 1).cpu()
        rows.append(row if same is None else torch.cat([row, same], 1))
        for i in range(len(true_cam)):
            c = int(batch["category"][i])
            if len(found.setdefault(c, [])) < per_category:
                found[c].append({
                    "rgb": (batch["rgb"][i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8),
                    "verts": out["verts"][i].cpu().numpy(), "faces": stage.net.faces.cpu().numpy(),
                    "camera": out["camera"][i].cpu().numpy(), "object_id": int(batch["object_id"][i]),
                    "true_camera": true_cam[i].cpu().numpy(),
                })
    rows_t = torch.cat(rows) if rows else torch.zeros(0, 8)
    names = class_names(stage.cfg)
    return {names[c]: v for c, v in sorted(found.items())}, rows_t


def errors_markdown(errors: dict) -> str:
    """The overall figures beside the constant camera's, then azimuth errors per
    category (aligned; how many are quarter turns and front/back flips; modulo 180 deg)."""
    const = errors.get("constant", {})
    lines = ["| figure | recon | constant camera |", "|---|---|---|"]
    for k, v in errors.items():
        if isinstance(v, (int, float)):
            c = const.get(k)
            lines.append(f"| {k} | {v:.4g} | {'' if not isinstance(c, (int, float)) else f'{c:.4g}'} |")
    per = errors.get("per_category", {})
    if per:
        lines += ["", "| category | azimuth error (aligned) | median | within 30 deg | off by 45-135 deg | "
                  "off by > 135 deg | modulo 180 deg | symmetry-aware | views with a twin | elevation error |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for cat, e in per.items():
            sym = (f"{e['az_err_symaware']:.1f} | {100 * e['views_with_twin']:.0f}%" if "az_err_symaware" in e
                   else "n/a | n/a")
            lines.append(f"| {cat} | {e['az_err_aligned']:.1f} | {e['az_median_aligned']:.1f} | "
                         f"{100 * e['az_acc30_aligned']:.0f}% | {100 * e['az_quarter_share']:.0f}% | "
                         f"{100 * e['az_flip_share']:.0f}% | {e['az_err_aligned_sym']:.1f} | {sym} | "
                         f"{e['el_err']:.1f} |")
    cper = const.get("per_category", {})
    if cper:
        lines += ["", "Constant camera (best single azimuth per category on val; elevation "
                  f"{const['camera']['elevation']:.0f} deg): azimuth error per category: "
                  + ", ".join(f"{c} {e['az_err_aligned']:.1f}" for c, e in cper.items())]
    return "\n".join(lines)


def mesh_sheet(cases: dict[str, list[dict]], true_meshes, out_png: str | os.PathLike, size: int = 96) -> Path:
    """Write the PNG: a row per category; per instance: crop | predicted mesh from the
    predicted camera, +90 deg, +180 deg | true mesh from the true camera."""
    from amodal3d.datamodules.sources.render import render_objects

    if not cases:
        raise ValueError("no reconstructions to draw")
    n = max(len(v) for v in cases.values())
    label_w, pad, top = 84, 4, 18
    cell = 5 * (size + 2) + 3 * pad
    sheet = Image.new("RGB", (label_w + n * cell, top + len(cases) * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), "input | predicted mesh: predicted camera, +90 deg, +180 deg | true mesh, true camera",
              fill=(0, 0, 0))
    for row, (cat, items) in enumerate(cases.items()):
        y = top + row * (size + pad)
        draw.text((4, y + size // 2 - 6), cat, fill=(0, 0, 0))
        for col, case in enumerate(items):
            cam = case["camera"].astype(np.float32)
            views = np.stack([cam + [d, 0.0, 0.0] for d in (0.0, 90.0, 180.0)])
            pred = render_objects([(case["verts"], case["faces"], _GREY)], views, size, normalize=True)[0]
            tiles = [case["rgb"]] + [_on_white(v) for v in pred]
            true = true_meshes.get("test", torch.tensor([case["object_id"]])) if true_meshes else None
            if true:
                v, f = true[0]
                img = render_objects([(v.numpy(), f.numpy(), _GREY)], case["true_camera"][None].astype(np.float32),
                                     size, normalize=True)[0, 0]
                tiles.append(_on_white(img))
            x = label_w + col * cell
            for j, arr in enumerate(tiles):
                sheet.paste(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR), (x + j * (size + 2), y))
    return save_png_atomic(sheet, out_png)

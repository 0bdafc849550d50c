"""Soft-silhouette rendering speed: pytorch3d's own path vs the fast path.

The recon and viewpoint stages render a batch of soft silhouettes every step;
on the CPU pytorch3d's rasteriser backward dominates that step. This times
forward and backward of both paths of `models.soft_silhouette` on randomly
deformed ico spheres seen from the NMR cameras, checks that they agree, and
reports the speedups.

    python -m amodal3d.bench.raster [--batch 16] [--faces 1280] [--image-size 64]
                                    [--faces-per-pixel 10] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Callable

import torch
from pytorch3d.renderer import FoVPerspectiveCameras, look_at_view_transform
from pytorch3d.structures import Meshes
from pytorch3d.utils import ico_sphere

from amodal3d.datamodules.sources.base import nmr_cameras
from amodal3d.models.soft_silhouette import SoftSilhouetteRenderer

PATHS = ("pytorch3d", "fast")


def _ico_level(faces: int) -> int:
    """Ico sphere level with exactly `faces` faces (20 * 4**level)."""
    level = round(math.log(max(faces, 1) / 20, 4)) if faces >= 20 else -1
    if level < 0 or 20 * 4**level != faces:
        valid = ", ".join(str(20 * 4**k) for k in range(6))
        raise ValueError(f"bench_raster: faces={faces} is not an ico-sphere face count; use one of {valid}")
    return level


def _scene(batch: int, faces: int, device: torch.device, seed: int = 0):
    """Randomly deformed ico spheres (radial noise, anisotropic scale) as one
    autograd leaf, and NMR cameras (azimuth 15 deg * k, elevation 30, distance 2.732)."""
    g = torch.Generator().manual_seed(seed)
    sphere = ico_sphere(_ico_level(faces))
    v0, f0 = sphere.verts_packed(), sphere.faces_packed()
    radial = 1.0 + 0.15 * torch.randn(batch, len(v0), 1, generator=g)
    aniso = 0.5 + 0.4 * torch.rand(batch, 1, 3, generator=g)
    verts = (v0[None] * radial * aniso).to(device).requires_grad_(True)
    cams = torch.from_numpy(nmr_cameras())[torch.arange(batch) % 24]
    R, T = look_at_view_transform(dist=cams[:, 2], elev=cams[:, 1], azim=cams[:, 0])
    cameras = FoVPerspectiveCameras(R=R, T=T, device=device)
    weights = torch.rand(batch, 1, 1, generator=g).to(device)  # per-image loss weights, broadcast below
    return verts, f0.to(device), cameras, weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_path(step: Callable[[], tuple[torch.Tensor, torch.Tensor]], device, repeats: int) -> dict:
    """Median forward, backward and forward+backward seconds after one warm-up."""
    fwd, bwd, tot = [], [], []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        alpha, loss = step()
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        if i:  # iteration 0 is the warm-up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            tot.append(t2 - t0)
    return {
        "forward_s": statistics.median(fwd),
        "backward_s": statistics.median(bwd),
        "forward_backward_s": statistics.median(tot),
    }


def bench_raster(
    batch: int = 16,
    faces: int = 1280,
    image_size: int = 64,
    faces_per_pixel: int = 10,
    repeats: int = 3,
    device: str = "cpu",
) -> dict:
    """Time both soft-silhouette paths; returns figures, speedups and agreement.

    Returns a dict with the settings, "device", "torch", "threads", per path
    ("pytorch3d", "fast") median "forward_s", "backward_s", "forward_backward_s",
    "speedup" (pytorch3d time / fast time per phase), "max_abs_alpha_diff"
    and "grad_rel_diff" (relative L2 difference of the vertex gradients).
    """
    if batch < 1 or image_size < 1 or faces_per_pixel < 1 or repeats < 1:
        raise ValueError(
            f"bench_raster: batch, image_size, faces_per_pixel and repeats must be >= 1, got "
            f"{batch}, {image_size}, {faces_per_pixel}, {repeats}"
        )
    dev = torch.device(device)
    verts, faces_t, cameras, weights = _scene(batch, faces, dev)
    pixel_weights = weights * torch.linspace(0.5, 1.5, image_size, device=dev)[None, :, None]
    result: dict = {
        "batch": batch,
        "faces": faces,
        "image_size": image_size,
        "faces_per_pixel": faces_per_pixel,
        "repeats": repeats,
        "device": _device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    outputs = {}
    for path in PATHS:
        renderer = SoftSilhouetteRenderer(image_size, faces_per_pixel=faces_per_pixel, backend=path)

        def step():
            verts.grad = None
            alpha = renderer(Meshes(verts=verts, faces=faces_t[None].expand(batch, -1, -1)), cameras)
            return alpha, (alpha * pixel_weights).sum()

        result[path] = _time_path(step, dev, repeats)
        if renderer.last_backend != path:
            raise RuntimeError(f"bench_raster: asked for the {path} path but {renderer.last_backend} ran")
        grad = verts.grad.clone()  # from the last timed backward
        with torch.no_grad():
            outputs[path] = (step()[0], grad)
    result["speedup"] = {
        phase: result["pytorch3d"][f"{phase}_s"] / result["fast"][f"{phase}_s"]
        for phase in ("forward", "backward", "forward_backward")
    }
    (a_ref, g_ref), (a_fast, g_fast) = outputs["pytorch3d"], outputs["fast"]
    result["max_abs_alpha_diff"] = float((a_fast - a_ref).abs().max())
    result["grad_rel_diff"] = float((g_fast - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
    result["no_grad"] = bench_no_grad(verts.detach(), faces_t, cameras, image_size, faces_per_pixel, repeats, dev)
    return result


def bench_no_grad(verts, faces, cameras, image_size: int, faces_per_pixel: int, repeats: int, dev) -> dict:
    """Renders no gradient flows through: recon's soft renderer (sparse, tensor ops), the
    same values by the native C++ kernel (CPU, where it builds: models.native_silhouette),
    pytorch3d's rasteriser with one face per pixel and no blur (hard coverage), and
    models.hard_silhouette; median seconds and, per other path, the mean IoU of its mask
    against the soft one thresholded at 0.5."""
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings

    from amodal3d.models import native_silhouette
    from amodal3d.models.hard_silhouette import HardSilhouette
    from amodal3d.models.mesh_renderer import SparseSoftSilhouette

    soft = SparseSoftSilhouette(image_size, faces_per_pixel=faces_per_pixel)
    native = SparseSoftSilhouette(image_size, faces_per_pixel=faces_per_pixel, native=True)
    hard = HardSilhouette(image_size, soft.sigma, soft)
    coverage = MeshRasterizer(raster_settings=RasterizationSettings(
        image_size=image_size, blur_radius=0.0, faces_per_pixel=1, bin_size=0))
    paths = {
        "sparse soft": lambda m: soft(m, cameras),
        "pytorch3d hard (1 face/pixel)": lambda m: (coverage(m, cameras=cameras).pix_to_face[..., 0] >= 0).float(),
        "hard (ours)": lambda m: hard(m, cameras),
    }
    if verts.device.type == "cpu" and native_silhouette.available():
        paths["native soft (C++)"] = lambda m: native(m, cameras)
    meshes = Meshes(verts=verts, faces=faces[None].expand(len(verts), -1, -1))
    out: dict = {}
    masks = {}
    with torch.no_grad():
        for name, render in paths.items():
            times = []
            for i in range(repeats + 1):
                _sync(dev)
                t0 = time.perf_counter()
                masks[name] = render(meshes) > 0.5
                _sync(dev)
                if i:
                    times.append(time.perf_counter() - t0)
            out[name] = {"forward_s": statistics.median(times)}
    ref = masks["sparse soft"].flatten(1)
    for name in list(paths)[1:]:
        m = masks[name].flatten(1)
        out[name]["iou_vs_soft"] = float(((m & ref).sum(1) / (m | ref).sum(1).clamp_min(1)).mean())
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()})"


def format_table(r: dict) -> str:
    """Markdown table of the figures of `bench_raster`."""
    lines = [
        f"soft silhouettes: batch {r['batch']} x {r['faces']} faces, {r['image_size']}x{r['image_size']}, "
        f"{r['faces_per_pixel']} faces/pixel, median of {r['repeats']} after 1 warm-up",
        f"device: {r['device']} | torch {r['torch']} | threads {r['threads']}",
        "",
        "| path | forward (s) | backward (s) | forward+backward (s) |",
        "|---|---|---|---|",
    ]
    for path in PATHS:
        p = r[path]
        lines.append(f"| {path} | {p['forward_s']:.3f} | {p['backward_s']:.3f} | {p['forward_backward_s']:.3f} |")
    s = r["speedup"]
    lines.append(f"| speedup | {s['forward']:.1f}x | {s['backward']:.1f}x | {s['forward_backward']:.1f}x |")
    lines += [
        "",
        f"agreement: max |alpha diff| {r['max_abs_alpha_diff']:.2e}, vertex-gradient relative L2 diff "
        f"{r['grad_rel_diff']:.2e}",
    ]
    if "no_grad" in r:
        lines += ["", "without gradient (forward only; masks > 0.5 against the sparse soft path's):", "",
                  "| path | forward (s) | mean IoU vs soft |", "|---|---|---|"]
        for name, p in r["no_grad"].items():
            iou = f"{p['iou_vs_soft']:.4f}" if "iou_vs_soft" in p else "(reference)"
            lines.append(f"| {name} | {p['forward_s']:.4f} | {iou} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amodal3d bench raster", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--faces", type=int, default=1280, help="ico-sphere face count: 20 * 4**level")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--faces-per-pixel", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = bench_raster(
        batch=args.batch,
        faces=args.faces,
        image_size=args.image_size,
        faces_per_pixel=args.faces_per_pixel,
        repeats=args.repeats,
        device=args.device,
    )
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The speed section of `make bench`: inference throughput and peak memory per method,
plus the loader and rasteriser figures, each with the machine it was measured on.

Throughput times `predict_amodal` alone on test batches already on the device
(data loading is the loader section's business). Peak memory is the CUDA
allocator's peak on a GPU; on a Linux CPU it is the rise of the process's
resident-set high-water mark during the timed pass (reset through
/proc/self/clear_refs), elsewhere the process's peak RSS.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import socket
import statistics
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device


def machine_info(device: torch.device) -> dict:
    """Where a figure was measured: host, OS, CPU/GPU, threads, library versions."""
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews every timing
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager measuring the peak memory of the code inside, in MiB (`.mib`, `.kind`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = math.nan
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda peak allocated"
            return self
        self._base = None
        try:  # "5" resets the resident-set high-water mark (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _proc_status_kb("VmRSS")
            self.kind = "cpu RSS rise at peak"
        except OSError:
            self.kind = "process peak RSS"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        hwm = _proc_status_kb("VmHWM")
        if self._base is not None and hwm is not None:
            self.mib = max(hwm - self._base, 0) / 1024
        else:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_inference(module, batches: list[dict], device: torch.device, warmup: int = 2) -> dict:
    """instances/s of `module.predict_amodal` over `batches` (on `device`), and its peak memory."""
    if not batches:
        raise ValueError("measure_inference: no batches to time (is the test split empty?)")
    module.eval()
    for i in range(warmup):
        module.predict_amodal(batches[i % len(batches)])
    _sync(device)
    n = 0
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for b in batches:
            module.predict_amodal(b)
            n += int(b["visible"].shape[0])
        _sync(device)
        dt = time.perf_counter() - t0
    return {
        "instances_per_s": n / dt if dt > 0 else math.nan,
        "instances": n,
        "batches": len(batches),
        "batch_size": int(batches[0]["visible"].shape[0]),
        "seconds": dt,
        "peak_mem_mib": mem.mib,
        "mem_kind": mem.kind,
        "params": sum(p.numel() for p in module.parameters()),
    }


RENDER_PARTS = {"hard": "hard silhouettes", "compiled": "compiled windows", "native": "native kernel",
                "fused": "folded encoder"}


def paired_ratio(a, b, batches: list[dict], device: torch.device, rounds: int = 5) -> dict:
    """Throughput of module `a` over that of `b`, the two timed in alternation `rounds`
    times on the same batches: a shared machine's speed can drift by tens of per cent
    between rows timed minutes apart (docs/results.md), so a ratio of two rows of the
    table is noisier than this one. Median, min and max over the rounds, and the rounds themselves."""
    if rounds < 1:
        raise ValueError(f"paired_ratio: rounds={rounds}, expected at least 1")
    pairs = []
    for _ in range(rounds):
        ta = measure_inference(a, batches, device)["instances_per_s"]
        tb = measure_inference(b, batches, device)["instances_per_s"]
        pairs.append((ta, tb))
    ratios = sorted(x / y for x, y in pairs)
    return {"rounds": rounds, "median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
            "instances_per_s": [list(p) for p in pairs]}


def paired_markdown(name_a: str, name_b: str, r: dict | None) -> str:
    if not r:
        return ""
    return (f"{name_a} / {name_b} throughput, timed in alternation ({r['rounds']} rounds, same batches): "
            f"**median {r['median']:.2f}x** (min {r['min']:.2f}, max {r['max']:.2f}).")


def render_path(module) -> str | None:
    """The path of a 3D row's inference: its parts ("hard", "compiled", "native": the C++
    kernel, counted only where it runs: a CPU module, the kernel built; "fused": the
    encoders' folded backbones, models.encoder) joined by "+", "soft" for the soft eager
    tensor path with plain encoders (the one before any of them existed), None for a row
    without a 3D renderer."""
    from amodal3d.models import native_silhouette
    from amodal3d.models.encoder import CropEncoder
    from amodal3d.models.mesh_renderer import CropRenderer

    renderers = [m for m in module.modules() if isinstance(m, CropRenderer)]
    if not renderers:
        return None
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    parts = {
        "hard": all(r.without_grad == "hard" for r in renderers),
        "compiled": all(r.compiled for r in renderers),
        "native": all(r.native for r in renderers) and on_cpu and native_silhouette.available(),
        "fused": any(isinstance(m, CropEncoder) for m in module.modules())
        and all(m.fused_inference for m in module.modules() if isinstance(m, CropEncoder)),
    }
    return "+".join(p for p, on in parts.items() if on) or "soft"


@torch.no_grad()
def silhouette_paths(module, batches: list[dict], device: torch.device) -> dict | None:
    """For a method whose 3D renders without gradient take a new path (hard silhouettes,
    models.hard_silhouette; compiled window maths, models.face_windows; the native kernel,
    models.native_silhouette; folded encoders, models.encoder): its throughput on the path
    before (soft, eager, tensor ops, plain encoders), and how far its masks (> 0.5, crop
    frame) under the two paths agree: per-instance IoU (two empty masks: 1). None for a
    method on that path already or without 3D renders."""
    from amodal3d.models.encoder import CropEncoder
    from amodal3d.models.mesh_renderer import CropRenderer

    path = render_path(module)
    if path in (None, "soft"):
        return None
    renderers = [m for m in module.modules() if isinstance(m, CropRenderer)]
    encoders = [m for m in module.modules() if isinstance(m, CropEncoder)]
    state = [(r.without_grad, r.compiled, r.native) for r in renderers]
    fused = [e.fused_inference for e in encoders]
    module.eval()
    new = [module.predict_amodal(b) > 0.5 for b in batches]
    for r in renderers:
        r.without_grad, r.compiled, r.native = "soft", False, False
    for e in encoders:
        e.fused_inference = False
    try:
        soft_speed = measure_inference(module, batches, device)
        soft = [module.predict_amodal(b) > 0.5 for b in batches]
    finally:
        for r, (mode, compiled, native) in zip(renderers, state):
            r.without_grad, r.compiled, r.native = mode, compiled, native
        for e, on in zip(encoders, fused):
            e.fused_inference = on
    h, s = torch.cat(new).flatten(1), torch.cat(soft).flatten(1)
    union = (h | s).sum(1)
    iou = torch.where(union > 0, (h & s).sum(1) / union.clamp_min(1), torch.ones_like(union, dtype=torch.float))
    return {"path": path, "soft": soft_speed, "mask_iou_mean": float(iou.float().mean()),
            "mask_iou_min": float(iou.min()), "instances_differing": int((h != s).any(1).sum()),
            "instances": int(len(iou))}


def silhouette_markdown(rows: list[dict]) -> str:
    """The lines comparing each 3D row's new render path with the soft eager one (silhouette_paths)."""
    lines = []
    for r in rows:
        p = r.get("silhouettes")
        if not p:
            continue
        path = p.get("path", "hard")
        label = " + ".join(RENDER_PARTS.get(part, part) for part in path.split("+"))
        lines.append(
            f"- {r['method']}: {label} {r['instances_per_s']:.1f} instances/s, soft eager "
            f"{p['soft']['instances_per_s']:.1f} ({r['instances_per_s'] / p['soft']['instances_per_s']:.2f}x); "
            f"masks (> 0.5) {path} vs soft eager: mean IoU {p['mask_iou_mean']:.4f}, min {p['mask_iou_min']:.3f}, "
            f"{p['instances_differing']} of {p['instances']} instances differ in a pixel")
    if not lines:
        return ""
    return ("Renders no gradient flows through (3D rows; `bench.silhouettes`, models/hard_silhouette.py; "
            "`bench.renderer_compiled`, models/face_windows.py; `bench.renderer_native`, "
            "models/native_silhouette.py; `bench.fused_encoders`, models/encoder.py):\n\n" + "\n".join(lines))


def collect_batches(loader, device: torch.device, n: int) -> list[dict]:
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append(move_data_to_device(batch, device))
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def methods_markdown(rows: list[dict]) -> str:
    lines = ["| method | instances/s | batch | peak memory (MiB) | memory measured as | parameters |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("status", "ok") != "ok"):  # measured rows first
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['method']} ({r['status']}) | — | — | — | — | — |")
            continue
        lines.append(
            f"| {r['method']} | {r['instances_per_s']:.1f} | {r['batch_size']} | {fmt(r['peak_mem_mib'])} "
            f"| {r['mem_kind']} | {r['params']:,} |"
        )
    return "\n".join(lines)


def predict_markdown(res: dict) -> str:
    """The `predict` throughput lines of the speed section: with mask files, and from the
    images alone through step 1."""
    if res.get("status") != "ok":
        return f"`predict` with the Ours model: {res.get('status')}."
    lines = [(f"`predict` with the Ours model, files in and out ({res['images']} test images and their visible-mask "
              f"files, {res['instances']} instances, batch {res['batch_size']}, {res['device']}, "
              f"{res['torch_threads']} threads): **{res['images_per_s']:.1f} images/s, "
              f"{res['instances_per_s']:.1f} instances/s** ({res['seconds']:.1f} s).")]
    raw = res.get("from_images")
    if raw is not None and raw.get("status") != "ok":
        lines.append(f"`predict` from the images alone: {raw['status']}.")
    elif raw is not None:
        lines.append(f"`predict` from the same images alone (step 1 detects, {raw['instances']} instances found of "
                     f"{raw['exported_instances']}): **{raw['images_per_s']:.1f} images/s, "
                     f"{raw['instances_per_s']:.1f} instances/s** ({raw['seconds']:.1f} s).")
    return "\n\n".join(lines)


def section_markdown(title: str, body: str, meta: dict) -> str:
    setup = "\n".join(f"- {k}: `{v}`" for k, v in meta.items())
    return f"# {title}\n\n{body}\n\n## Setup\n\n{setup}\n"


def run_loader_bench(cfg) -> tuple[dict, str]:
    """The data loader's figures (amodal3d/bench/loader.py) for the bench config's dataset,
    and their markdown."""
    from amodal3d.bench import loader
    from amodal3d.bench.evaluate import dataset_class_names

    dataset_class_names(cfg)  # built first if missing; the config then says which categories it holds
    report = loader.bench_loader(cfg.data, cfg.loader, workers=(0, 2))
    return report, loader.markdown(report)


def run_raster_bench(device: torch.device) -> tuple[dict, str]:
    """The rasteriser's figures (amodal3d/bench/raster.py) on `device`, and their markdown."""
    from amodal3d.bench import raster

    report = raster.bench_raster(device=str(device))
    return report, raster.format_table(report)

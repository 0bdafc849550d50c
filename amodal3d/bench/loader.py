"""Crop loader throughput: the CropDataModule with 0 and 2 workers vs in memory.

Times data only (no model). Wall-clock crops/s depends on what else runs on
the machine, so crops per CPU-second (this process plus its worker processes)
is reported next to it. The in-memory baseline produces the same crops
with the same crop code from images and masks already unpacked in numpy
arrays, so the difference is the cost of HDF5 reads, decompression, bit
unpacking and worker transport.

    python -m amodal3d.bench.loader [--batches 40] [--exp NAME] [key=value ...]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from amodal3d.datamodules.crops import CropDataModule, _CropSampler, crop_arrays, protocol_crop_boxes


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _in_memory_rate(dm: CropDataModule, split: str, n_items: int, batch_size: int) -> tuple[float, float]:
    """(crops/s, crops per CPU-second) of the same crops from arrays in memory."""
    ds = dm.dataset(split)
    r = ds.reader
    idx = r.index
    rows = np.arange(min(n_items, len(ds)))
    images = np.stack([r.image(int(idx["image"][i])) for i in rows])
    masks = [r.instance_masks(int(i)) for i in rows]
    vis = np.stack([m["visible"] for m in masks])
    occ = np.stack([m["occluder"] for m in masks])
    amo = np.stack([m["amodal"] for m in masks])
    boxes = protocol_crop_boxes(idx, ds.protocol, ds.crop_margin, ds.visible_crop_margin)[rows]
    sampler = _CropSampler(ds.crop_size)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for lo in range(0, len(rows), batch_size):
        items = []
        for j in range(lo, min(lo + batch_size, len(rows))):
            rgb, (v, o, a) = crop_arrays(images[j], [vis[j], occ[j], amo[j]], boxes[j], sampler)
            items.append({"rgb": torch.from_numpy(rgb), "visible": torch.from_numpy(v),
                          "occluder": torch.from_numpy(o), "eval_amodal": torch.from_numpy(a)})
        default_collate(items)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return len(rows) / wall, len(rows) / max(cpu, 1e-9)


def _loader_rate(dm: CropDataModule, workers: int, batches: int) -> tuple[float, float, float]:
    """(crops/s over `batches` batches after the first, first-batch seconds,
    crops per CPU-second of the whole pass, workers included)."""
    dm.loader_cfg = _with(dm.loader_cfg, num_workers=workers, persistent_workers=False)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    it = iter(dm.train_dataloader())
    n_all = int(next(it)["rgb"].shape[0])
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += int(b["rgb"].shape[0])
    rate = n / max(time.perf_counter() - t1, 1e-9)
    del it  # joins the workers, so their CPU time is counted
    gc.collect()
    cpu = _cpu_seconds() - c0
    return rate, first, (n + n_all) / max(cpu, 1e-9)


def _with(cfg: Any, **kw: Any) -> Any:
    from types import SimpleNamespace

    d = {k: getattr(cfg, k) for k in ("batch_size", "num_workers", "crop_size", "crop_margin", "visible_crop_margin",
                                       "pin_memory", "persistent_workers") if hasattr(cfg, k)}
    d.update(kw)
    return SimpleNamespace(**d)


def bench_loader(
    data_cfg: Any, loader_cfg: Any, workers: tuple[int, ...] = (0, 2), batches: int = 40, split: str = "train"
) -> dict:
    """Crops/s of the crop DataModule per worker count and of the in-memory baseline.

    The dataset of data_cfg must be built. Returns a flat-ish dict of figures.
    """
    dm = CropDataModule(data_cfg, _with(loader_cfg), verify=False)
    bs = int(loader_cfg.batch_size)
    ds = dm.dataset(split)
    n_items = min(len(ds), batches * bs)
    out: dict[str, Any] = {
        "root": str(data_cfg.root), "split": split, "instances": len(ds), "crop_size": int(loader_cfg.crop_size),
        "batch_size": bs, "batches": batches, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "crops_per_s": {}, "first_batch_s": {}, "crops_per_cpu_s": {},
    }
    rate, per_cpu = _in_memory_rate(dm, split, n_items, bs)
    out["crops_per_s"]["in_memory"] = round(rate, 1)
    out["crops_per_cpu_s"]["in_memory"] = round(per_cpu, 1)
    for w in workers:
        rate, first, per_cpu = _loader_rate(dm, w, batches)
        out["crops_per_s"][f"workers_{w}"] = round(rate, 1)
        out["first_batch_s"][f"workers_{w}"] = round(first, 3)
        out["crops_per_cpu_s"][f"workers_{w}"] = round(per_cpu, 1)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


def markdown(res: dict) -> str:
    lines = ["| loader | crops/s (wall) | crops per CPU-second | first batch (s) |", "|---|---|---|---|"]
    for k, v in res["crops_per_s"].items():
        first = res["first_batch_s"].get(k)
        lines.append(
            f"| {k.replace('_', ' ')} | {v:,.0f} | {res['crops_per_cpu_s'][k]:,.0f} "
            f"| {'—' if first is None else f'{first:.2f}'} |"
        )
    lines.append("")
    lines.append(
        f"{res['root']} ({res['split']}, {res['instances']} instances), crop {res['crop_size']}, "
        f"batch {res['batch_size']}, {res['batches']} batches, {res['cpus']} CPUs, "
        f"load average {res['load_average_1min']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amodal3d.bench.loader", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--exp", default=None)
    ap.add_argument("--split", default="train")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from amodal3d.bench.evaluate import dataset_class_names
    from amodal3d.config import load_config

    cfg = load_config(None, args.exp, args.overrides)
    dataset_class_names(cfg)  # built first if missing; the config then says which categories it holds
    print(markdown(bench_loader(cfg.data, cfg.loader, workers=(0, 2), batches=args.batches, split=args.split)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

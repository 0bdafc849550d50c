"""End-to-end predict throughput for the bench: a built dataset's test
images exported as folder inputs, then timed through predict_files (`make bench-speed`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from amodal3d.categories import manifest_categories
from amodal3d.predict.outputs import save_png
from amodal3d.predict.run import predict_files


def export_folder_inputs(data_root: str | Path, split: str, out_dir: str | Path, max_images: int,
                         masks: bool = True) -> int:
    """Write the first max_images images of a built dataset's split as folder inputs
    (image PNG + one visible-mask PNG per instance, or the images alone: step 1 then
    finds the instances); returns the dataset's instance count in them."""
    from amodal3d.datamodules.shard_format import read_manifest
    from amodal3d.datamodules.shard_reader import SplitReader

    names = manifest_categories(read_manifest(data_root))  # what the shards' category field indexes
    reader = SplitReader(data_root, split, verify=False)
    out = Path(out_dir)
    cats = reader.index["category"]
    n = 0
    for i in range(min(max_images, reader.num_images)):
        save_png(reader.image(i), out / f"img{i:05d}.png")
        lo, hi = reader.instance_range(i)
        for j in range(lo, hi):
            n += 1
            if not masks:
                continue
            vis = reader.instance_masks(j, ("visible",))["visible"]
            save_png(vis.astype(np.uint8) * 255, out / f"img{i:05d}" / f"{names[int(cats[j])]}_{j - lo}.png")
    return n


def predict_throughput(module, data_root: str | Path, split: str = "test", max_images: int = 64,
                       batch_size: int = 32, device: str | torch.device = "cpu",
                       step1_checkpoint: str | Path | None = None) -> dict:
    """images/s and instances/s of predict_files end to end (files in, files out) on
    `max_images` images of a built dataset, exported to a temporary folder first (not
    timed): with their visible-mask files, or, given step 1's checkpoint, the images alone
    (step 1 detects, the chain completes)."""
    masks = step1_checkpoint is None
    with tempfile.TemporaryDirectory(prefix="amodal3d-predict-") as tmp:
        n = export_folder_inputs(data_root, split, Path(tmp) / "in", max_images, masks=masks)
        rep = predict_files(Path(tmp) / "in", Path(tmp) / "out", module=module, device=device, batch_size=batch_size,
                            step1_checkpoint=step1_checkpoint)
    return {"instances_per_s": rep.instances_per_s, "instances": rep.instances, "exported_instances": n,
            "images": rep.images, "images_per_s": rep.images / rep.seconds if rep.seconds > 0 else float("nan"),
            "seconds": rep.seconds, "errors": len(rep.errors), "device": str(device), "batch_size": batch_size,
            "torch_threads": torch.get_num_threads(), "inputs": "visible-mask files" if masks else "images (step 1)"}

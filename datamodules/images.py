"""Whole images with all their instances, for the detection (Mask R-CNN family) stages.

An item is `(image, target)` in the torchvision detection convention:
image float32 (3,H,W) in [0,1]; target a dict with, for the M instances:

    boxes (M,4) float32 visible boxes xyxy     labels (M,) int64 category + 1 (0 = background)
    masks (M,H,W) uint8 visible masks          amodal_boxes (M,4) float32
    occluder_masks (M,H,W) uint8               category (M,) int64, object_id (M,) int64
    depth_rank (M,) int64                      instance_index (M,) int64 (global rows, = crop `index`)
    image_id int64 ()                          index int64 () (image row in the split)
    eval_amodal_masks (M,H,W) uint8            eval_camera (M,3), eval_view_id (M,), eval_occlusion (M,)
    amodal_masks (M,H,W) uint8                 training/validation items of a stage that trains on
                                               amodal masks (targets=("amodal",))

`collate_detection` returns (list of images, list of targets), what
torchvision's detection models take.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from amodal3d.datamodules.shard_reader import SplitReader
from amodal3d.protocols import TARGET_SPLITS, check_targets
from amodal3d.datamodules.split_datamodule import SplitDataModule


class ImageDataset(Dataset):
    """Images of one split of a built dataset with their instances."""

    def __init__(self, root: str | os.PathLike, split: str, verify: bool = True, targets: tuple[str, ...] = ()) -> None:
        self.reader = SplitReader(root, split, verify=verify)
        self.split = split
        self.with_amodal_target = "amodal" in check_targets(targets) and split in TARGET_SPLITS

    def __len__(self) -> int:
        return self.reader.num_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.split}: image {i} out of range ({len(self)} images)")
        r = self.reader
        idx = r.index
        lo, hi = r.instance_range(i)
        masks = r.image_masks(i)
        image = torch.from_numpy(r.image(i)).permute(2, 0, 1).float().div_(255.0)

        def rows(name: str, dtype: Any) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(idx[name][lo:hi]).astype(dtype))

        amodal = torch.from_numpy(masks["amodal"].astype(np.uint8))
        target = {
            "boxes": rows("visible_box", np.float32),
            "labels": rows("category", np.int64) + 1,
            "masks": torch.from_numpy(masks["visible"].astype(np.uint8)),
            "amodal_boxes": rows("amodal_box", np.float32),
            "occluder_masks": torch.from_numpy(masks["occluder"].astype(np.uint8)),
            "category": rows("category", np.int64),
            "object_id": rows("object_id", np.int64),
            "depth_rank": rows("depth_rank", np.int64),
            "instance_index": torch.arange(lo, hi, dtype=torch.int64),
            "image_id": torch.tensor(int(idx["image_ids"][i]), dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
            "eval_amodal_masks": amodal,
            "eval_camera": rows("camera", np.float32),
            "eval_view_id": rows("view_id", np.int64),
            "eval_occlusion": rows("occlusion", np.float32),
        }
        if self.with_amodal_target:
            target["amodal_masks"] = amodal
        return image, target


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """(list of images, list of targets): images may differ in instance count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionDataModule(SplitDataModule):
    """Whole images of data.root for the detection stages (targets: StageSpec.targets)."""

    def __init__(self, data_cfg: Any, loader_cfg: Any, verify: bool = True, targets: tuple[str, ...] = ()) -> None:
        super().__init__(data_cfg, loader_cfg, verify)
        self.targets = check_targets(targets)

    def make_dataset(self, split: str) -> ImageDataset:
        return ImageDataset(self.root, split, verify=self.verify, targets=self.targets)

    def make_loader(self, ds: ImageDataset, split: str) -> DataLoader:
        from amodal3d.datamodules.crops import make_sampler  # the crops' rule: exact resume, DDP eval = 1 process

        sampler = make_sampler(ds, split == "train", int(getattr(self.data_cfg, "seed", 0)), split)
        return DataLoader(ds, sampler=sampler, collate_fn=collate_detection, **self.loader_kwargs())

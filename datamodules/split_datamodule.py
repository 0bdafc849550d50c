"""What the crop and image DataModules share: the dataset built on demand (a missing
dataset is built first, in prepare_data), one dataset per split, and the split
each of Lightning's loader hooks reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

#: the splits each Lightning stage reads
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class SplitDataModule(L.LightningDataModule, ABC):
    """Subclasses say how one split's dataset and its DataLoader are made."""

    def __init__(self, data_cfg: Any, loader_cfg: Any, verify: bool = True) -> None:
        super().__init__()
        self.data_cfg, self.loader_cfg = data_cfg, loader_cfg
        self.root = str(data_cfg.root)
        self.verify = verify
        self.datasets: dict[str, Dataset] = {}

    @abstractmethod
    def make_dataset(self, split: str) -> Dataset:
        """The dataset of one split (called once per split)."""

    @abstractmethod
    def make_loader(self, dataset: Dataset, split: str) -> DataLoader:
        """The DataLoader over one split's dataset."""

    def prepare_data(self) -> None:
        from amodal3d.datamodules.build import ensure_dataset

        ensure_dataset(self.data_cfg)

    def dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage or "", ("train", "val", "test")):
            self.dataset(split)

    def loader_kwargs(self) -> dict:
        """batch size, workers, pinning and worker persistence from the loader config."""
        lc = self.loader_cfg
        workers = int(lc.num_workers)
        return {"batch_size": int(lc.batch_size), "num_workers": workers, "pin_memory": bool(lc.pin_memory),
                "persistent_workers": bool(lc.persistent_workers) and workers > 0}

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("train"), "train")

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("val"), "val")

    def test_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("test"), "test")

    def predict_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("test"), "test")

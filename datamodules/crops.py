"""Per-instance crops under an evaluation protocol (amodal3d.protocols), and
their LightningDataModule.

One item per instance: a square window resampled to `crop_size` (bilinear,
zero outside the image; masks thresholded at 0.5). Under `gt-visible` the
window is centred on the instance's *visible* box, its side the box's longer
side x `visible_crop_margin`; under `gt-box` on the amodal box x `crop_margin`.
Item contract (other stages code against these names; docs/data.md):

    rgb (3,S,S) float32 [0,1]     visible (1,S,S) {0,1}     occluder (1,S,S) {0,1}
    category int64 ()             object_id int64 ()        index int64 ()
    crop_box (4,) xyxy pixels     image_visible (1,H,W)     image_occluder (1,H,W)  (H,W: the split's largest image; zero padded)
    amodal_box (4,)               gt-box only
    unknown (1,S,S) {0,1}         training/validation items; gt-box test items
    eval_amodal (1,S,S)  eval_image_amodal (1,H,W)  eval_camera (3,)  eval_view_id int64 ()
    eval_occlusion float32 ()
    amodal (1,S,S) {0,1}          training/validation items of a stage that trains on amodal masks (targets)

`occluder` is the occluder the protocol hands out: under gt-box the pixels known to be
occluded, under gt-visible the other instances' visible masks. `unknown` is the
composite's occluder (the eraser in `erase`): where pixels are not seen, for
losses and label-free monitors, never a prediction's input.
`eval_*` keys are hidden ground truth: evaluation only, never in a loss of an
unsupervised stage. With views_per_item=k>1 every item holds k crops of one
object (the anchor instance first) and `collate_views` flattens a batch to
(B*k, ...) rows, rows k*i..k*i+k-1 belonging to one object.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler, get_worker_info

from amodal3d.errors import ConfigError
from amodal3d.protocols import GT_BOX, GT_VISIBLE, TARGET_SPLITS, check_protocol, check_targets
from amodal3d.datamodules.shard_reader import SplitReader
from amodal3d.datamodules.split_datamodule import SplitDataModule

EVAL_PREFIX = "eval_"


# ----------------------------------------------------------------------------- geometry


def square_crop_box(box: np.ndarray | torch.Tensor, margin: float) -> np.ndarray | torch.Tensor:
    """Square xyxy window(s) centred on box(es) (...,4), side = longest side * margin."""
    x1, y1, x2, y2 = box[..., 0], box[..., 1], box[..., 2], box[..., 3]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if isinstance(box, torch.Tensor):
        half = torch.clamp(torch.maximum(x2 - x1, y2 - y1), min=1.0) * (margin / 2)
        return torch.stack([cx - half, cy - half, cx + half, cy + half], -1)
    half = np.maximum(np.maximum(x2 - x1, y2 - y1), 1.0) * (margin / 2)
    return np.stack([cx - half, cy - half, cx + half, cy + half], -1).astype(np.float32)


def _crop_grid(boxes: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    """(B,S,S,2) grid_sample grid (align_corners=False) of crop pixel centres."""
    t = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    x = boxes[:, 0:1] + t[None] * (boxes[:, 2:3] - boxes[:, 0:1])  # (B,S) image x of each column
    y = boxes[:, 1:2] + t[None] * (boxes[:, 3:4] - boxes[:, 1:2])
    gx = (2 * x / w - 1)[:, None, :].expand(-1, size, -1)
    gy = (2 * y / h - 1)[:, :, None].expand(-1, -1, size)
    return torch.stack([gx, gy], -1)


def crop_to_box(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (B,C,H,W) -> (B,C,S,S) crops of xyxy pixel boxes (B,4); 0 outside."""
    h, w = images.shape[-2:]
    grid = _crop_grid(boxes.to(images.dtype), size, h, w)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def paste_crop_to_image(mask_crop: torch.Tensor, crop_box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of crop_to_box: (B,1,S,S) crop-frame maps -> (B,1,H,W) image frame.

    Bilinear; image pixels outside the crop window get 0.
    """
    b, _, s, _ = mask_crop.shape
    box = crop_box.to(mask_crop.dtype)
    xs = torch.arange(w, device=mask_crop.device, dtype=mask_crop.dtype) + 0.5
    ys = torch.arange(h, device=mask_crop.device, dtype=mask_crop.dtype) + 0.5
    gx = 2 * (xs[None] - box[:, 0:1]) / (box[:, 2:3] - box[:, 0:1]) - 1  # (B,W)
    gy = 2 * (ys[None] - box[:, 1:2]) / (box[:, 3:4] - box[:, 1:2]) - 1  # (B,H)
    grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], -1)
    return F.grid_sample(mask_crop, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def protocol_crop_boxes(index: dict, protocol: str, crop_margin: float, visible_crop_margin: float) -> np.ndarray:
    """(M,4) crop windows of a split's instances (its reader's index) under `protocol`:
    gt-visible reads the visible boxes only, gt-box the amodal boxes."""
    if check_protocol(protocol) == GT_VISIBLE:
        return square_crop_box(index["visible_box"], visible_crop_margin)
    return square_crop_box(index["amodal_box"], crop_margin)


def crop_coverage(index: dict, boxes: np.ndarray) -> np.ndarray:
    """(M,) bool: the instance's whole amodal box lies inside its crop window
    (evaluation only: where it does not, no method can score the part outside)."""
    a = index["amodal_box"]
    return ((a[:, 0] >= boxes[:, 0]) & (a[:, 1] >= boxes[:, 1]) & (a[:, 2] <= boxes[:, 2])
            & (a[:, 3] <= boxes[:, 3]))


class _CropSampler:
    """Fast single-item crops: numpy grid, one grid_sample over rgb + masks (of any image size)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.t = ((np.arange(size, dtype=np.float32) + 0.5) / size)
        self.grid = np.empty((1, size, size, 2), np.float32)

    def __call__(self, chw: np.ndarray, box: np.ndarray) -> np.ndarray:
        h, w = chw.shape[1:]
        x = box[0] + self.t * (box[2] - box[0])
        y = box[1] + self.t * (box[3] - box[1])
        self.grid[0, :, :, 0] = (2 * x / w - 1)[None, :]
        self.grid[0, :, :, 1] = (2 * y / h - 1)[:, None]
        out = F.grid_sample(
            torch.from_numpy(chw)[None], torch.from_numpy(self.grid), mode="bilinear",
            padding_mode="zeros", align_corners=False,
        )
        return out[0].numpy()


def crop_arrays(
    image: np.ndarray, masks: list[np.ndarray], box: np.ndarray, sampler: _CropSampler
) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 (H,W,3) image and bool (H,W) masks -> float rgb (3,S,S) and {0,1} masks (1,S,S)."""
    h, w = image.shape[:2]
    chw = np.empty((3 + len(masks), h, w), np.float32)
    np.multiply(image.transpose(2, 0, 1), np.float32(1 / 255), out=chw[:3])
    for j, m in enumerate(masks):
        chw[3 + j] = m
    out = sampler(chw, box)
    return out[:3], [(out[3 + j:4 + j] > 0.5).astype(np.float32) for j in range(len(masks))]


# ----------------------------------------------------------------------------- dataset


def _scalar(value, dtype) -> torch.Tensor:
    """0-d tensor (torch.from_numpy of a 0-d array: ~3x cheaper than torch.tensor)."""
    return torch.from_numpy(np.array(value, dtype))


class CropDataset(Dataset):
    """Instance crops of one split of a built dataset (see the module doc)."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        crop_size: int = 64,
        crop_margin: float = 1.15,
        views_per_item: int = 1,
        train: bool = False,
        verify: bool = True,
        protocol: str = GT_VISIBLE,
        visible_crop_margin: float = 2.5,
        targets: tuple[str, ...] = (),
    ) -> None:
        self.protocol = check_protocol(protocol)
        # a supervised stage's training target: the amodal mask under its own key, train/val only
        self.with_amodal_target = "amodal" in check_targets(targets) and split in TARGET_SPLITS
        if visible_crop_margin <= 0:
            raise ValueError(f"visible_crop_margin={visible_crop_margin}: must be > 0")
        if views_per_item < 1:
            raise ValueError(f"views_per_item={views_per_item}: must be >= 1")
        if crop_size < 2 or crop_margin <= 0:
            raise ValueError(f"crop_size={crop_size}, crop_margin={crop_margin}: need size >= 2, margin > 0")
        self.reader = SplitReader(root, split, verify=verify)
        self.split, self.crop_size, self.crop_margin = split, int(crop_size), float(crop_margin)
        self.visible_crop_margin = float(visible_crop_margin)
        # gt-visible test items do not say where pixels are unknown
        self.with_unknown = self.protocol == GT_BOX or split != "test"
        self.views_per_item, self.train = int(views_per_item), bool(train)
        self.composite = self.reader.manifest.get("composite", "erase")
        self._sampler = _CropSampler(self.crop_size)
        self._groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._rng: tuple[int, np.random.Generator] | None = None
        self._boxes: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.reader.num_instances

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_groups=None, _rng=None, _boxes=None)
        return state

    # -- views of the same object
    def _object_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, starts, position): instances sorted by (object_id, view_id, index)."""
        if self._groups is None:
            idx = self.reader.index
            n = len(idx["object_id"])
            order = np.lexsort((np.arange(n), idx["view_id"], idx["object_id"]))
            oid = idx["object_id"][order]
            starts = np.flatnonzero(np.r_[True, oid[1:] != oid[:-1], True])
            position = np.empty(n, np.int64)
            position[order] = np.arange(n)
            self._groups = (order, starts, position)
        return self._groups

    def _generator(self) -> np.random.Generator:
        pid = os.getpid()
        if self._rng is None or self._rng[0] != pid:
            self._rng = (pid, np.random.default_rng(torch.initial_seed() % 2**63))
        return self._rng[1]

    def views_of(self, i: int) -> list[int]:
        """Instance indices of the item of anchor i: i, then k-1 other views of its object.

        Train: other instances of the object drawn at random (without
        replacement while enough exist). Otherwise: deterministic, spread evenly
        around the object's instances sorted by view. An object with fewer than
        k instances repeats some (an object seen once repeats the anchor).
        """
        k = self.views_per_item
        if k == 1:
            return [i]
        order, starts, position = self._object_groups()
        p = int(position[i])
        g = int(np.searchsorted(starts, p, side="right") - 1)
        members = order[starts[g]:starts[g + 1]]
        n = len(members)
        if self.train:
            others = members[members != i]
            if len(others) == 0:
                return [i] * k
            pick = self._generator().choice(others, size=k - 1, replace=len(others) < k - 1)
            return [i] + [int(j) for j in pick]
        q = p - int(starts[g])
        step = max(1, n // k)
        return [i] + [int(members[(q + j * step) % n]) for j in range(1, k)]

    # -- items
    def _crop_boxes(self) -> np.ndarray:
        """(M,4) crop windows of every instance, computed once per process: on the
        visible box under gt-visible, on the amodal box under gt-box."""
        if self._boxes is None or self._boxes[0] != os.getpid():
            self._boxes = (os.getpid(), protocol_crop_boxes(self.reader.index, self.protocol, self.crop_margin,
                                                            self.visible_crop_margin))
        return self._boxes[1]

    def others_visible(self, i: int, image: int) -> np.ndarray:
        """bool (H,W) union of the visible masks of the other instances of instance i's image."""
        start, stop = self.reader.instance_range(image)
        if stop - start <= 1:
            return np.zeros(self.reader.image_size(image), bool)
        vis = self.reader.image_masks(image, ["visible"])["visible"]
        keep = np.arange(start, stop) != i
        return vis[keep].any(axis=0)

    def _image_frame(self, mask: np.ndarray) -> torch.Tensor:
        """float (1,H,W) of an image-frame mask, padded (zeros, bottom and right) to the split's
        largest image, so that items of images of different sizes batch together."""
        h, w = self.reader.height, self.reader.width
        if mask.shape == (h, w):
            return torch.from_numpy(mask[None].astype(np.float32))
        out = np.zeros((1, h, w), np.float32)
        out[0, :mask.shape[0], :mask.shape[1]] = mask
        return torch.from_numpy(out)

    def crop(self, i: int) -> dict[str, torch.Tensor]:
        """The single-view item of instance i (keys: the module doc)."""
        r = self.reader
        idx = r.index
        crop_box = self._crop_boxes()[i]
        img = int(idx["image"][i])
        image = r.image(img)
        m = r.instance_masks(i)
        given = m["occluder"] if self.protocol == GT_BOX else self.others_visible(i, img)
        rgb, (vis, occ, unk, amo) = crop_arrays(
            image, [m["visible"], given, m["occluder"], m["amodal"]], crop_box, self._sampler)
        item = {
            "rgb": torch.from_numpy(rgb),
            "visible": torch.from_numpy(vis),
            "occluder": torch.from_numpy(occ),
            "category": _scalar(idx["category"][i], np.int64),
            "object_id": _scalar(idx["object_id"][i], np.int64),
            "crop_box": torch.from_numpy(crop_box.copy()),
            "image_visible": self._image_frame(m["visible"]),
            "image_occluder": self._image_frame(given),
            "index": _scalar(i, np.int64),
        }
        if self.protocol == GT_BOX:
            item["amodal_box"] = torch.from_numpy(idx["amodal_box"][i].copy())
        if self.with_unknown:
            item["unknown"] = torch.from_numpy(unk)
        amodal = torch.from_numpy(amo)
        if self.with_amodal_target:
            item["amodal"] = amodal
        item.update({
            "eval_amodal": amodal,
            "eval_image_amodal": self._image_frame(m["amodal"]),
            "eval_camera": torch.from_numpy(idx["camera"][i].copy()),
            "eval_view_id": _scalar(idx["view_id"][i], np.int64),
            "eval_occlusion": _scalar(idx["occlusion"][i], np.float32),
        })
        return item

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.split}: item {i} out of range ({len(self)} instances)")
        if self.views_per_item == 1:
            return self.crop(i)
        items = [self.crop(j) for j in self.views_of(i)]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class CropBatch(dict):
    """A collated batch (an ordinary dict of tensors) whose tensors are views of one buffer.

    Sent from a DataLoader worker it pickles as that buffer plus its layout:
    one shared-memory handle per batch instead of one per key. With torch's
    default file_descriptor sharing each handle costs a socket round trip, and
    15 keys cost the main process ~140 us of CPU per crop (measured), more than
    a crop takes to make. A batch whose entries were replaced pickles as a dict.
    """

    def __reduce__(self):
        views = getattr(self, "_views", None)
        if views is not None and self.keys() == views.keys() and all(self[k] is v for k, v in views.items()):
            return _unpack_batch, (self._buf, self._layout)
        return CropBatch, (dict(self),)


def _unpack_batch(buf: torch.Tensor, layout: list[tuple]) -> CropBatch:
    out = CropBatch()
    for key, dtype, shape, offset, nbytes in layout:
        out[key] = buf[offset:offset + nbytes].view(dtype).view(shape)
    out._buf, out._layout, out._views = buf, layout, dict(out)
    return out


def _pack(batch: list[dict[str, torch.Tensor]], flatten: bool) -> CropBatch:
    """Stack (or, flatten=True, concatenate along dim 0) items into one buffer."""
    layout, total = [], 0
    for key, t in batch[0].items():
        shape = ((len(batch) * t.shape[0],) + tuple(t.shape[1:])) if flatten else ((len(batch),) + tuple(t.shape))
        nbytes = int(np.prod(shape)) * t.element_size()
        layout.append((key, t.dtype, shape, total, nbytes))
        total += (nbytes + 63) // 64 * 64
    if get_worker_info() is not None:  # allocate in shared memory: no copy when sent
        buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    else:
        buf = torch.empty(total, dtype=torch.uint8)
    out = _unpack_batch(buf, layout)
    for key, *_ in layout:
        parts = [item[key] for item in batch]
        if flatten:
            torch.cat(parts, out=out[key])
        else:
            torch.stack(parts, out=out[key])
    return out


def collate_crops(batch: list[dict[str, torch.Tensor]]) -> CropBatch:
    """default_collate for crop items, into one buffer (see CropBatch)."""
    return _pack(batch, flatten=False)


def collate_views(batch: list[dict[str, torch.Tensor]]) -> CropBatch:
    """Collate k-view items (every tensor (k,...)) into (B*k, ...) rows;
    rows k*i..k*i+k-1 are the k crops of item i."""
    return _pack(batch, flatten=True)


# ----------------------------------------------------------------------------- datamodule


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one (Lightning calls set_epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_sampler(dataset: Dataset, train: bool, seed: int, split: str = "") -> Sampler[int]:
    """Training: a (seed, epoch)-determined shuffle, split over ranks under DDP.
    Evaluation: sequential, and under DDP each instance on exactly one rank
    (no padding duplicates), so a metric reduced by sum equals the
    single-process value. An evaluation split smaller than the world size is
    refused: Lightning skips the epoch on a rank without batches, and the
    other ranks would wait for it forever in the metric's sync."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        if train:
            return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
        world = torch.distributed.get_world_size()
        if len(dataset) < world:
            raise ConfigError(
                f"the {split or 'evaluation'} split holds {len(dataset)} instance(s), fewer than the {world} DDP "
                f"processes: every process needs at least one batch. Build more objects "
                f"(data.objects_per_split.{split or '<split>'}) or run on fewer devices (trainer.devices)."
            )
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(dataset, shuffle=False)
    return EpochSeededSampler(len(dataset), seed) if train else SequentialSampler(dataset)


class CropDataModule(SplitDataModule):
    """Crops of data.root for every stage that works per instance, under `protocol`.

    views_per_item (argument, else loader_cfg.views_per_item if the config has
    it, else 1) applies to the training split only: validation and test score
    each instance once. targets: the stage's training targets (StageSpec.targets).
    """

    def __init__(self, data_cfg: Any, loader_cfg: Any, views_per_item: int | None = None, verify: bool = True,
                 protocol: str = GT_VISIBLE, targets: tuple[str, ...] = ()) -> None:
        super().__init__(data_cfg, loader_cfg, verify)
        self.views_per_item = int(views_per_item or getattr(loader_cfg, "views_per_item", 1) or 1)
        self.seed = int(getattr(data_cfg, "seed", 0))
        self.protocol = check_protocol(protocol)
        self.targets = check_targets(targets)

    def make_dataset(self, split: str) -> CropDataset:
        lc = self.loader_cfg
        return CropDataset(
            self.root, split, crop_size=int(lc.crop_size), crop_margin=float(lc.crop_margin),
            views_per_item=self.views_per_item if split == "train" else 1,
            train=split == "train", verify=self.verify, protocol=self.protocol,
            visible_crop_margin=float(getattr(lc, "visible_crop_margin", 2.5)), targets=self.targets,
        )

    def make_loader(self, ds: CropDataset, split: str) -> DataLoader:
        return DataLoader(
            ds, sampler=make_sampler(ds, split == "train", self.seed, split), drop_last=False,
            collate_fn=collate_views if ds.views_per_item > 1 else collate_crops, **self.loader_kwargs(),
        )

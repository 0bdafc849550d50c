"""Evaluation protocols: what a method is handed for each instance.

- `gt-visible` (the headline): the instance's visible mask and category, and the
  visible masks of the other instances of its image (the item's `occluder`
  channel; empty in `erase` composites, where the erased region is painted
  background). No amodal box, no eraser mask. Crops are placed from the visible
  box alone.
- `gt-box`: the visible mask, the category, the amodal box (the item's
  `amodal_box`; crops are placed on it) and the pixels known to be occluded
  (`occluder`: the eraser in `erase`, the instances in front in `paste`).

Whatever the protocol, training and validation items also carry `unknown`: the
pixels of the composite whose content is not seen (the eraser, or the
instances in front). It says where a pixel is unknown, not what is behind it;
losses and label-free monitors may read it, predictions never do, and test
items carry it only under gt-box (where it equals `occluder`).
"""

from __future__ import annotations

import torch

GT_VISIBLE = "gt-visible"
GT_BOX = "gt-box"
PROTOCOLS = (GT_VISIBLE, GT_BOX)
#: the protocol of configs and checkpoints written before protocols existed
LEGACY_PROTOCOL = GT_BOX


#: labels a supervised stage may train on beyond what the protocol hands out (StageSpec.targets):
#: "amodal" puts the amodal mask in its training and validation items, as `amodal` (crops) or
#: `amodal_masks` (whole images). Every other stage's batches carry amodal masks only as
#: evaluation-only `eval_*` keys.
TRAINING_TARGETS = ("amodal",)
TARGET_SPLITS = ("train", "val")


def check_targets(targets) -> tuple[str, ...]:
    """`targets` as a tuple, or a ValueError naming the unknown one."""
    targets = tuple(str(t) for t in (targets or ()))
    for t in targets:
        if t not in TRAINING_TARGETS:
            raise ValueError(f"training target {t!r}: expected one of {', '.join(TRAINING_TARGETS)}")
    return targets


def check_protocol(name: str) -> str:
    """`name` if it is a protocol, else a ValueError naming the valid ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r}: expected one of {', '.join(PROTOCOLS)}")
    return name


def protocol_of(cfg) -> str:
    """The protocol a config (or a checkpoint's stored config) was made for."""
    return check_protocol(str(cfg.get("protocol", LEGACY_PROTOCOL) or LEGACY_PROTOCOL))


def gives_amodal_box(protocol: str) -> bool:
    return check_protocol(protocol) == GT_BOX


def item_keys_hidden(protocol: str, split: str) -> tuple[str, ...]:
    """Keys a crop item of `split` must not carry under `protocol` (the label guard's list)."""
    if check_protocol(protocol) == GT_VISIBLE:
        return ("amodal_box", "unknown") if split == "test" else ("amodal_box",)
    return ()


def unknown_pixels(batch: dict) -> torch.Tensor:
    """(B,1,S,S) pixels whose content is not seen, for losses (training batches
    always carry them); a clear error where a batch does not."""
    if "unknown" not in batch:
        raise KeyError("this batch has no 'unknown' key: gt-visible test items do not say where pixels are "
                       "unknown; only training and validation batches (and gt-box test batches) carry it")
    return batch["unknown"]


def monitor_unknown(batch: dict) -> torch.Tensor:
    """The unknown pixels for a label-free score: `unknown` where the batch has it,
    else what the protocol gives as occluded (gt-visible test batches)."""
    return batch["unknown"] if "unknown" in batch else batch["occluder"]

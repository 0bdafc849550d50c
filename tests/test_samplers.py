"""Samplers that make resume exact and DDP evaluation equal to one process."""

from __future__ import annotations

import torch
from torch.utils.data import SequentialSampler

from amodal3d.datamodules.crops import EpochSeededSampler, make_sampler


def test_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochSeededSampler(50, seed=3), EpochSeededSampler(50, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert sorted(a) == list(range(50))
    # consuming global RNG state elsewhere does not change the order
    torch.rand(100)
    assert list(a) == _order(50, 3, 4)


def _order(n, seed, epoch):
    s = EpochSeededSampler(n, seed)
    s.set_epoch(epoch)
    return list(s)


def test_single_process_samplers():
    ds = list(range(7))
    assert isinstance(make_sampler(ds, train=False, seed=0), SequentialSampler)
    assert isinstance(make_sampler(ds, train=True, seed=0), EpochSeededSampler)


def test_unrepeated_eval_split_covers_each_item_once():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    ds = list(range(7))
    seen = []
    for rank in range(2):
        seen += list(UnrepeatedDistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False))
    assert sorted(seen) == ds  # 7 items over 2 ranks: no padding duplicate

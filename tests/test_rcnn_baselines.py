"""The Mask R-CNN-family baselines on the shared detector: ORCNN's and BCNet's heads and targets."""

from __future__ import annotations

import math

import pytest
import torch

from amodal3d.config import ConfigError, load_config
from amodal3d.lightning_modules.baselines.bcnet import BCNetStage
from amodal3d.lightning_modules.baselines.orcnn import OrcnnStage
from amodal3d.models.bcnet import BCNetMaskBranch, NonLocalBlock, mask_boundary
from amodal3d.models.orcnn import OrcnnMaskBranch, invisible_logits
from fakes import LabelGuard
from test_detection import _ov, tiny  # noqa: F401 (tiny: the fixture)


def test_orcnn_invisible_logits_fire_only_where_amodal_is_on_and_visible_off():
    big = 6.0
    a = torch.tensor([[big, big], [-big, big]])
    v = torch.tensor([[big, -big], [-big, -big]])
    inv = invisible_logits(a, v).sigmoid() > 0.5
    # amodal on, visible on -> not invisible; amodal on, visible off -> invisible; amodal off -> not
    assert inv.tolist() == [[False, True], [False, True]]
    # no parameters of its own: the gradient of the invisible loss reaches both heads
    branch = OrcnnMaskBranch(8, 8, 1, num_classes=3)
    out = branch(torch.randn(2, 8, 14, 14))
    assert set(out) == {"masks", "visible_masks", "invisible_masks"} and out["masks"].shape == (2, 3, 28, 28)
    out["invisible_masks"].sum().backward()
    assert branch.amodal.predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert branch.visible.predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert sum(p.numel() for p in branch.parameters()) == sum(
        p.numel() for p in (*branch.amodal.parameters(), *branch.visible.parameters()))


def test_orcnn_targets_are_amodal_and_not_visible(tiny):
    stage = OrcnnStage(load_config("orcnn", overrides=_ov(tiny)))
    amodal = torch.zeros(1, 8, 8, dtype=torch.uint8)
    amodal[0, 2:6, 2:6] = 1
    visible = torch.zeros_like(amodal)
    visible[0, 2:6, 2:4] = 1
    visible[0, 0, 0] = 1  # a visible pixel outside the amodal mask (annotation noise): not invisible
    t = stage.train_targets({"amodal_boxes": torch.tensor([[2.0, 2, 6, 6]]), "labels": torch.tensor([1]),
                             "masks": visible, "amodal_masks": amodal})
    expected = torch.zeros_like(amodal)
    expected[0, 2:6, 4:6] = 1
    assert torch.equal(t["invisible_masks"], expected)
    assert torch.equal(t["masks"], amodal) and torch.equal(t["visible_masks"], visible)


def test_orcnn_fast_dev_run_and_labels(tiny):
    from amodal3d.datamodules.images import ImageDataset, collate_detection
    from amodal3d.train import train_from_args

    summary = train_from_args("orcnn", None, _ov(tiny), None, debug="fdr")
    assert summary["global_step"] == 1 and math.isfinite(summary["metrics"]["train/loss"])
    for key in ("val/amodal_mask_ap", "val/detect_miou", "val/detect_miou_occ"):
        assert key in summary["metrics"], key
    # trains on amodal and visible masks, boxes and classes; no camera, view or occluder key
    stage = OrcnnStage(load_config("orcnn", overrides=_ov(tiny)))
    images, targets = collate_detection([ImageDataset(tiny / "data", "train", targets=("amodal",))[i] for i in range(2)])
    guarded = [LabelGuard(t, allowed={"amodal_masks"}, hidden={"occluder_masks"}) for t in targets]
    loss = stage.training_step((images, guarded), 0)
    assert math.isfinite(float(loss))
    from amodal3d.lightning_modules.detector import keep_trainable

    tt = [keep_trainable(stage.train_targets(t), *img.shape[-2:]) for img, t in zip(images, guarded)]
    assert {"loss_masks", "loss_visible_masks", "loss_invisible_masks"} <= set(stage.net(images, tt))


def test_bcnet_boundary_of_a_hand_built_square():
    m = torch.zeros(1, 7, 7)
    m[0, 2:5, 2:5] = 1
    b = mask_boundary(m)[0]
    # dilation (1:6) minus erosion (the single centre pixel 3,3): a ring, 2 px wide
    expected = torch.zeros(7, 7)
    expected[1:6, 1:6] = 1
    expected[3, 3] = 0
    assert torch.equal(b, expected)


def test_bcnet_branch_starts_its_non_local_blocks_as_identity_and_trains_the_occluder_layer():
    from torch import nn

    norm = lambda c: nn.GroupNorm(4, c)  # noqa: E731
    block = NonLocalBlock(8, norm)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(block(x), x)
    branch = BCNetMaskBranch(8, norm)
    out = branch(torch.randn(3, 8, 14, 14))
    assert set(out) == set(branch.weights) and all(v.shape == (3, 1, 28, 28) for v in out.values())
    assert branch.derived["boundary_masks"][0] == "masks" and branch.derived["occluder_boundary_masks"][0] == "occluder_masks"
    # the occludee mask depends on the occluder layer (x + x_bo): its loss reaches that layer
    out["masks"].sum().backward()
    assert branch.occluder.body[0][0].weight.grad.abs().sum() > 0


def test_bcnet_fast_dev_run_trains_four_outputs_on_amodal_and_occluder_targets(tiny):
    from amodal3d.datamodules.images import ImageDataset, collate_detection
    from amodal3d.lightning_modules.detector import keep_trainable
    from amodal3d.train import train_from_args

    summary = train_from_args("bcnet", None, _ov(tiny), None, debug="fdr")
    assert summary["global_step"] == 1 and math.isfinite(summary["metrics"]["train/loss"])
    assert "val/amodal_mask_ap" in summary["metrics"] and "val/detect_miou" in summary["metrics"]
    stage = BCNetStage(load_config("bcnet", overrides=_ov(tiny)))
    images, targets = collate_detection([ImageDataset(tiny / "data", "train", targets=("amodal",))[i] for i in range(2)])
    guarded = [LabelGuard(t, allowed={"amodal_masks"}, hidden={"masks"}) for t in targets]  # no visible mask
    tt = [keep_trainable(stage.train_targets(t), *img.shape[-2:]) for img, t in zip(images, guarded)]
    assert torch.equal(tt[0]["occluder_masks"], targets[0]["occluder_masks"])
    losses = stage.net(images, tt)
    assert {"loss_masks", "loss_boundary_masks", "loss_occluder_masks", "loss_occluder_boundary_masks"} <= set(losses)
    with pytest.raises(ConfigError, match="mask_channels"):
        BCNetStage(load_config("bcnet", overrides=_ov(tiny, "model.mask_channels=8")))

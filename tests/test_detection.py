"""The shared Mask R-CNN infrastructure (models/maskrcnn.py, amodal_roi_heads.py,
detection_transform.py) and the two detector stages: visible (step 1) and maskrcnn."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.roi_heads import maskrcnn_loss, paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from amodal3d.config import load_config
from amodal3d.lightning_modules.visible import VisibleStage
from amodal3d.models.amodal_roi_heads import MaskBranch, pick_channel, roi_mask_loss
from amodal3d.models.detection_transform import MultiMaskTransform
from amodal3d.models.maskrcnn import DetectorModelConfig, build_maskrcnn, group_norm
from fakes import LabelGuard, build_fake_dataset, tiny_overrides

SMALL = ["model.fpn_channels=16", "model.mask_channels=16", "model.mask_layers=1", "model.box_representation=32",
         "loader.batch_size=2"]


def _blobs(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, h, w, generator=g) > 0.6).to(torch.uint8)


def test_every_masks_target_is_resized_like_torchvisions_masks():
    """Resizing to twice the size: each `*masks` key equals what torchvision makes of `masks`."""
    img = torch.rand(3, 20, 30)
    masks = _blobs(2, 20, 30)
    boxes = torch.tensor([[1.0, 2, 10, 12], [5, 5, 25, 18]])
    ours = MultiMaskTransform(40, 60, [0.5] * 3, [0.2] * 3).eval()
    ref = GeneralizedRCNNTransform(40, 60, [0.5] * 3, [0.2] * 3).eval()
    other = _blobs(2, 20, 30, seed=1)
    _, t_ours = ours.resize(img, {"boxes": boxes.clone(), "masks": masks, "visible_masks": other,
                                  "occluder_masks": masks.clone()})
    _, t_ref = ref.resize(img, {"boxes": boxes.clone(), "masks": masks})
    _, t_ref_other = ref.resize(img, {"boxes": boxes.clone(), "masks": other})
    assert t_ours["masks"].shape == (2, 40, 60)
    assert torch.equal(t_ours["masks"], t_ref["masks"])
    assert torch.equal(t_ours["occluder_masks"], t_ref["masks"])
    assert torch.equal(t_ours["visible_masks"], t_ref_other["masks"])


def test_every_masks_output_is_pasted_like_torchvisions_masks():
    ours = MultiMaskTransform(40, 60, [0.5] * 3, [0.2] * 3).eval()
    ref = GeneralizedRCNNTransform(40, 60, [0.5] * 3, [0.2] * 3).eval()
    probs = torch.rand(3, 1, 28, 28)
    boxes = torch.tensor([[2.0, 4, 30, 24], [10, 0, 58, 39], [0, 0, 5, 5]])

    def result():
        return [{"boxes": boxes.clone(), "labels": torch.ones(3, dtype=torch.long), "scores": torch.ones(3),
                 "masks": probs.clone(), "visible_masks": probs.flip(-1).clone()}]

    got = ours.postprocess(result(), [(40, 60)], [(20, 30)])[0]
    want = ref.postprocess(result(), [(40, 60)], [(20, 30)])[0]
    assert got["masks"].shape == (3, 1, 20, 30)
    assert torch.equal(got["masks"], want["masks"]) and torch.equal(got["boxes"], want["boxes"])
    assert torch.equal(got["visible_masks"], paste_masks_in_image(probs.flip(-1), want["boxes"], (20, 30)))


def test_mask_loss_is_torchvisions_for_class_specific_heads_and_picks_channel_0_otherwise():
    torch.manual_seed(0)
    gt = [_blobs(3, 32, 32), _blobs(2, 32, 32, seed=2)]
    props = [torch.tensor([[0.0, 0, 16, 16], [4, 4, 30, 30]]), torch.tensor([[2.0, 2, 20, 28]])]
    matched = [torch.tensor([2, 0]), torch.tensor([1])]
    labels = [torch.tensor([3, 1, 2]), torch.tensor([4, 5])]
    logits = torch.randn(3, 6, 28, 28)
    picked = [lab[m] for lab, m in zip(labels, matched)]
    ours = roi_mask_loss(logits, props, gt, picked, matched)
    assert torch.allclose(ours, maskrcnn_loss(logits, props, gt, labels, matched))
    agnostic = roi_mask_loss(logits[:, :1], props, gt, picked, matched)
    assert torch.allclose(agnostic, maskrcnn_loss(logits[:, :1], props, gt, [torch.zeros_like(lab) for lab in labels],
                                                  matched))
    assert torch.equal(pick_channel(logits, torch.tensor([5, 0, 2]))[:, 0], logits[[0, 1, 2], [5, 0, 2]])


class TwoMasks(MaskBranch):
    """A branch with two named outputs (what ORCNN-like heads do)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, 1, 1)
        self.b = nn.Conv2d(c, 1, 1)
        self.weights = {"masks": 1.0, "visible_masks": 0.5}

    def forward(self, x):
        x = nn.functional.interpolate(x, scale_factor=2)
        return {"masks": self.a(x), "visible_masks": self.b(x)}


def test_a_pluggable_branch_trains_each_output_on_its_own_target_and_returns_each_pasted():
    torch.manual_seed(0)
    m = DetectorModelConfig(fpn_channels=16, box_representation=32)
    net = build_maskrcnn(m, num_classes=3, image_size=64, mask_branch=TwoMasks(16))
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    amodal = [torch.zeros(1, 64, 64, dtype=torch.uint8) for _ in range(2)]
    for a in amodal:
        a[:, 10:50, 12:40] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10, 40, 50]]), "labels": torch.tensor([1]), "masks": a,
                "visible_masks": a * 0} for a in amodal]
    losses = net(images, targets)
    assert {"loss_masks", "loss_visible_masks", "loss_classifier", "loss_box_reg", "loss_objectness"} <= set(losses)
    sum(losses.values()).backward()
    assert net.roi_heads.mask_branch.a.weight.grad.abs().sum() > 0 and net.roi_heads.mask_branch.b.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="visible_masks"):
        net(images, [{k: v for k, v in t.items() if k != "visible_masks"} for t in targets])
    net.eval()
    with torch.no_grad():
        out = net(images)
    assert all(o["masks"].shape[1:] == (1, 64, 64) and o["visible_masks"].shape == o["masks"].shape for o in out)


def test_group_norm_everywhere_and_no_batch_norm():
    net = build_maskrcnn(DetectorModelConfig(), num_classes=14, image_size=64)
    kinds = {type(mod) for mod in net.modules()}
    assert nn.GroupNorm in kinds and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert net.transform.min_size == (64,) and net.transform.max_size == 64  # the data's own size, not 800 px
    sizes = [s[0] for s in net.rpn.anchor_generator.sizes]
    assert sizes == [8.0, 16.0, 32.0, 64.0]  # anchors matched to the image size
    assert group_norm(16)(24).num_groups == 8


def test_min_and_max_sides_set_the_transform_and_anchors_of_wide_images():
    """model.min_size / max_size (real datasets: KINS is 1242x375): torchvision's resize rule,
    anchors on the shorter side, and detections returned in each image's own frame."""
    from amodal3d.errors import ConfigError

    m = DetectorModelConfig(fpn_channels=16, box_representation=32, mask_channels=16, mask_layers=1,
                            min_size=48, max_size=80)
    net = build_maskrcnn(m, num_classes=3, image_size=64)
    assert net.transform.min_size == (48,) and net.transform.max_size == 80
    assert [s[0] for s in net.rpn.anchor_generator.sizes] == [6.0, 12.0, 24.0, 48.0]
    images = [torch.rand(3, 40, 96), torch.rand(3, 64, 48)]
    batch, _ = net.transform(images)
    # 40x96: min(48/40, 80/96) -> longer side capped at 80; 64x48: shorter side to 48 -> 64x48
    assert batch.image_sizes == [(33, 80), (64, 48)]
    net.eval()
    with torch.no_grad():
        out = net(images)
    assert out[0]["masks"].shape[-2:] == (40, 96) and out[1]["masks"].shape[-2:] == (64, 48)
    with pytest.raises(ConfigError, match="model.max_size=-1"):
        build_maskrcnn(DetectorModelConfig(max_size=-1), num_classes=3, image_size=64)


# -- the stages ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detect")
    build_fake_dataset(tmp)
    return tmp


def _ov(tmp, *extra):
    return tiny_overrides(tmp, "data.categories=[chair,car]", *SMALL, *extra)


@pytest.mark.parametrize("stage", ["visible", "maskrcnn"])
def test_fast_dev_run_of_the_detector_stages(tiny, stage):
    from amodal3d.train import train_from_args

    summary = train_from_args(stage, None, _ov(tiny), None, debug="fdr")
    assert summary["global_step"] == 1 and math.isfinite(summary["metrics"]["train/loss"])
    keys = (["val/visible_mask_ap", "val/amodal_box_ap50"] if stage == "visible"
            else ["val/amodal_mask_ap", "val/detect_miou", "val/detect_miou_occ"])
    for key in keys:
        assert key in summary["metrics"], key


def test_visible_stage_reads_no_amodal_mask(tiny):
    """Training step and validation of step 1 read no evaluation-only key (amodal masks,
    cameras) of the whole-image targets."""
    from amodal3d.datamodules.images import ImageDataset, collate_detection

    stage = VisibleStage(load_config("visible", overrides=_ov(tiny)))
    images, targets = collate_detection([ImageDataset(tiny / "data", "train", targets=("amodal",))[i] for i in range(2)])
    guarded = [LabelGuard(t) for t in targets]
    loss = stage.training_step((images, guarded), 0)
    assert math.isfinite(float(loss))
    stage.eval()
    with torch.no_grad():
        stage.validation_step((images, guarded), 0)
    stage.on_validation_epoch_end()
    # the guard does catch a stage that reads them: Mask R-CNN (amodal) trains on amodal masks
    from amodal3d.lightning_modules.baselines.maskrcnn import MaskRCNNStage

    with pytest.raises(AssertionError, match="amodal_masks"):
        MaskRCNNStage(load_config("maskrcnn", overrides=_ov(tiny))).training_step((images, guarded), 0)


def test_degenerate_and_outside_boxes_are_clipped_or_dropped():
    from amodal3d.lightning_modules.detector import keep_trainable

    t = {"boxes": torch.tensor([[-5.0, 2, 20, 30], [10, 10, 10.5, 30], [60, 60, 80, 70]]),
         "labels": torch.tensor([1, 2, 3]), "masks": torch.zeros(3, 64, 64, dtype=torch.uint8)}
    out = keep_trainable(t, 64, 64)
    assert out["boxes"].tolist() == [[0.0, 2, 20, 30], [60, 60, 64, 64]]
    assert out["labels"].tolist() == [1, 3] and out["masks"].shape[0] == 2

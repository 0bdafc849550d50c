"""A Mask R-CNN built for small images, from scratch (no pretrained weights).

torchvision's MaskRCNN with: a torchvision ResNet + FPN backbone, GroupNorm
everywhere instead of BatchNorm (detection batches are small), anchors sized to
the transform's shorter side, the transform at the data's native size by default
(torchvision's default resizes every image to 800 px; `model.min_size` /
`model.max_size` set the sides for real datasets such as KINS) and AmodalRoIHeads
with a pluggable mask branch. The defaults are sized to train on 2 CPU cores in under 30 minutes;
experiments/exp/detector_paper.yaml gives the paper-sized model (ResNet-50,
256-channel FPN and heads) for GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from amodal3d.errors import ConfigError
from amodal3d.models.amodal_roi_heads import AmodalRoIHeads, ConvMaskBranch, MaskBranch
from amodal3d.models.detection_transform import MultiMaskTransform


@dataclass
class DetectorModelConfig:
    backbone: str = "resnet18"  # a torchvision ResNet builder (resnet18 | resnet34 | resnet50 ...)
    group_norm_groups: int = 16
    fpn_channels: int = 64
    fpn_layers: list[int] = field(default_factory=lambda: [1, 2, 3])  # ResNet stages (strides 4, 8, 16) + a max-pool level
    # the transform scales each image so that its shorter side is min_size, unless its longer side
    # would pass max_size (torchvision's rule); 0: data.image_size (square synth13 images: unscaled)
    min_size: int = 0
    max_size: int = 0
    anchor_sizes: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])  # x min_size, one per level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_batch_size_per_image: int = 64
    box_batch_size_per_image: int = 32
    box_head_convs: int = 0  # 0: two FC layers (TwoMLPHead-like), >0: convs (GroupNorm) + one FC
    box_representation: int = 256
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 20
    mask_channels: int = 64
    mask_layers: int = 4
    class_specific_masks: bool = True  # Mask R-CNN's per-class masks; False: one class-agnostic mask
    max_train_minutes: float = 27.0  # the stage stops training after this long (0: no limit)


def group_norm(groups: int):
    """A norm_layer for torchvision's builders: GroupNorm with min(groups, channels) groups."""
    def make(channels: int) -> nn.GroupNorm:
        g = groups
        while channels % g:
            g //= 2
        return nn.GroupNorm(max(g, 1), channels)
    return make


def resnet_fpn(m: DetectorModelConfig) -> BackboneWithFPN:
    builder = getattr(resnet, m.backbone, None)
    if builder is None or not callable(builder):
        raise ValueError(f"model.backbone={m.backbone!r}: not a torchvision ResNet builder (resnet18, resnet50, ...)")
    norm = group_norm(int(m.group_norm_groups))
    body = builder(weights=None, norm_layer=norm)
    layers = [int(i) for i in m.fpn_layers]
    if not layers or any(i not in (1, 2, 3, 4) for i in layers):
        raise ValueError(f"model.fpn_layers={layers}: ResNet stages are 1..4")
    width = body.inplanes // 8  # channels of stage 1 (64 for basic blocks, 256 for bottlenecks)
    channels = [width * 2 ** (i - 1) for i in layers]
    return BackboneWithFPN(body, {f"layer{i}": str(k) for k, i in enumerate(layers)}, channels,
                           int(m.fpn_channels), extra_blocks=LastLevelMaxPool(), norm_layer=norm)


def transform_sides(m: DetectorModelConfig, image_size: int) -> tuple[int, int]:
    """(min_size, max_size) of the detector's transform: the config's, 0 meaning `image_size`."""
    sides = []
    for key in ("min_size", "max_size"):
        v = int(getattr(m, key))
        if v < 0:
            raise ConfigError(f"model.{key}={v}: expected a side in pixels, or 0 for data.image_size ({image_size})")
        sides.append(v or int(image_size))
    return sides[0], sides[1]


def build_maskrcnn(m: DetectorModelConfig, num_classes: int, image_size: int,
                   mask_branch: MaskBranch | None = None) -> MaskRCNN:
    """torchvision MaskRCNN (num_classes includes the background) whose RoI heads are
    AmodalRoIHeads with `mask_branch` (default: Mask R-CNN's conv head on `masks`)."""
    min_side, max_side = transform_sides(m, image_size)
    backbone = resnet_fpn(m)
    levels = len(m.fpn_layers) + 1
    if len(m.anchor_sizes) != levels:
        raise ValueError(f"model.anchor_sizes: {len(m.anchor_sizes)} sizes for {levels} FPN levels")
    anchors = AnchorGenerator(tuple((float(s) * min_side,) for s in m.anchor_sizes),
                              (tuple(float(a) for a in m.aspect_ratios),) * levels)
    names = [str(k) for k in range(len(m.fpn_layers))]
    norm = group_norm(int(m.group_norm_groups))
    c = int(m.fpn_channels)
    if int(m.box_head_convs) > 0:
        box_head = FastRCNNConvFCHead((c, 7, 7), [c] * int(m.box_head_convs), [int(m.box_representation)],
                                      norm_layer=norm)
    else:
        box_head = FastRCNNConvFCHead((c, 7, 7), [], [int(m.box_representation)] * 2)
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=int(m.rpn_pre_nms_top_n_train), rpn_post_nms_top_n_train=int(m.rpn_post_nms_top_n_train),
        rpn_pre_nms_top_n_test=int(m.rpn_pre_nms_top_n_test), rpn_post_nms_top_n_test=int(m.rpn_post_nms_top_n_test),
        rpn_batch_size_per_image=int(m.rpn_batch_size_per_image),
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2), box_head=box_head,
        box_predictor=FastRCNNPredictor(int(m.box_representation), num_classes),
        box_batch_size_per_image=int(m.box_batch_size_per_image), box_score_thresh=float(m.box_score_thresh),
        box_detections_per_img=int(m.box_detections_per_img),
        mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), mask_head=nn.Identity(), mask_predictor=nn.Identity(),
    )
    old = model.roi_heads
    branch = mask_branch or ConvMaskBranch(c, int(m.mask_channels), int(m.mask_layers),
                                           num_classes if m.class_specific_masks else 1, norm_layer=norm)
    model.roi_heads = AmodalRoIHeads(
        old.box_roi_pool, old.box_head, old.box_predictor,
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=int(m.box_batch_size_per_image),
        positive_fraction=0.25, bbox_reg_weights=None, score_thresh=float(m.box_score_thresh), nms_thresh=0.5,
        detections_per_img=int(m.box_detections_per_img), mask_roi_pool=old.mask_roi_pool, mask_branch=branch,
    )
    t = model.transform  # by default the data's native size; ImageNet statistics (the images are RGB in [0, 1])
    model.transform = MultiMaskTransform(min_side, max_side, t.image_mean, t.image_std)
    return model


def boxes_in_image(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes clipped to the image (amodal boxes may leave it)."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out



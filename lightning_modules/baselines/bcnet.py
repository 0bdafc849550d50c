"""BCNet (Ke et al., CVPR'21), re-implemented from scratch on the shared Mask R-CNN
(models/maskrcnn.py) with its bilayer mask branch (models/bcnet.py): amodal boxes,
the occludee (= amodal) mask and boundary, the occluder mask and boundary, all
class-agnostic as the official two-stage path. The occluder target is the data's
occluder mask of each instance (the pixels that hide it: the erasers in `erase`,
the objects in front in `paste`), where BCNet's preparation takes every other
object's visible pixels inside the box without a depth order. A supervised baseline
with the same data, schedule and budget as `maskrcnn`; checkpoint chosen on
validation amodal-mask AP.
"""

from __future__ import annotations

from amodal3d.config import ConfigError
from amodal3d.lightning_modules.baselines.maskrcnn import MaskRCNNStage
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.models.bcnet import BCNetMaskBranch
from amodal3d.models.maskrcnn import DetectorModelConfig, group_norm


class BCNetStage(MaskRCNNStage):
    def train_targets(self, target: dict) -> dict:
        return {"boxes": target["amodal_boxes"], "labels": target["labels"], "masks": target["amodal_masks"],
                "occluder_masks": target["occluder_masks"]}

    def mask_branch(self):
        m = self.m
        if int(m.mask_channels) != int(m.fpn_channels):
            raise ConfigError(f"bcnet: model.mask_channels={m.mask_channels} must equal model.fpn_channels="
                             f"{m.fpn_channels} (the occludee layer adds the occluder layer's output to the RoI features)")
        return BCNetMaskBranch(int(m.fpn_channels), norm_layer=group_norm(int(m.group_norm_groups)))


STAGE = StageSpec(
    name="bcnet",
    module=BCNetStage,
    model_schema=DetectorModelConfig,
    data="images",
    targets=("amodal",),
    method="BCNet",
    table_order=22,
    help="BCNet baseline: bilayer occluder/occludee mask head with non-local blocks, from scratch",
)

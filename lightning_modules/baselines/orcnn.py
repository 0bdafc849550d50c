"""ORCNN (Follmann et al., WACV'19), re-implemented from scratch on the shared Mask
R-CNN (models/maskrcnn.py): amodal boxes, and amodal, visible and invisible mask
heads on the same RoI features (models/orcnn.py). The invisible target is
amodal AND NOT visible (not XOR: a visible pixel outside the amodal mask, from
annotation noise, is not invisible). A supervised baseline with the same data,
schedule and budget as `maskrcnn`; checkpoint chosen on validation amodal-mask AP,
and its amodal masks make its detect row.
"""

from __future__ import annotations

from amodal3d.lightning_modules.baselines.maskrcnn import MaskRCNNStage
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.models.maskrcnn import DetectorModelConfig, group_norm
from amodal3d.models.orcnn import OrcnnMaskBranch


class OrcnnStage(MaskRCNNStage):
    def train_targets(self, target: dict) -> dict:
        amodal, visible = target["amodal_masks"], target["masks"]
        return {"boxes": target["amodal_boxes"], "labels": target["labels"], "masks": amodal,
                "visible_masks": visible, "invisible_masks": amodal * (1 - visible)}

    def mask_branch(self):
        m = self.m
        classes = self.num_classes if m.class_specific_masks else 1
        return OrcnnMaskBranch(int(m.fpn_channels), int(m.mask_channels), int(m.mask_layers), classes,
                               norm_layer=group_norm(int(m.group_norm_groups)))


STAGE = StageSpec(
    name="orcnn",
    module=OrcnnStage,
    model_schema=DetectorModelConfig,
    data="images",
    targets=("amodal",),
    method="ORCNN",
    table_order=21,
    help="ORCNN baseline: amodal + visible mask heads, invisible = amodal - relu(visible), from scratch",
)

"""Mask R-CNN (amodal): the detector trained with amodal boxes and amodal masks as its
targets, as the amodal benchmarks' baseline configs do; otherwise the same network,
data and schedule rules as step 1 (models/maskrcnn.py, from scratch). A supervised
baseline: it trains on amodal masks and chooses its checkpoint on validation
amodal-mask AP. Reports that AP and the detect protocol's mIoU (GT instances matched
to detections by amodal-box IoU >= 0.5; a missed instance scores 0).
"""

from __future__ import annotations

from amodal3d.lightning_modules.detector import DetectorStage, ap_inputs, ap_metric
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.metrics.detection import DetectionAmodalMIoU
from amodal3d.models.maskrcnn import DetectorModelConfig


class MaskRCNNStage(DetectorStage):
    def train_targets(self, target: dict) -> dict:
        return {"boxes": target["amodal_boxes"], "labels": target["labels"], "masks": target["amodal_masks"]}

    def eval_metric_factories(self) -> dict:
        n = len(self.class_names)
        return {"amodal_mask": ap_metric("masks", n), "detect": DetectionAmodalMIoU(n)}

    def update_eval(self, outputs, targets, metrics) -> None:
        metrics["amodal_mask"].update(*ap_inputs(outputs, targets, "masks", "eval_amodal_masks", "masks"))
        for o, t in zip(outputs, targets):
            metrics["detect"].update_detections(o["boxes"], o["masks"][:, 0] > 0.5, t["amodal_boxes"],
                                                t["eval_amodal_masks"].bool(), t["masks"].bool(), t["category"],
                                                scores=o["scores"])


STAGE = StageSpec(
    name="maskrcnn",
    module=MaskRCNNStage,
    model_schema=DetectorModelConfig,
    data="images",
    targets=("amodal",),
    method="Mask R-CNN",
    table_order=20,
    help="Mask R-CNN (amodal) baseline: amodal boxes and masks as targets, from scratch",
)

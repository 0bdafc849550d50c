"""Step 1 of A3D: visible instance segmentation with an amodal box per instance.

A Mask R-CNN (models/maskrcnn.py, from scratch) whose box branch regresses the
instance's amodal box and whose mask head predicts its visible mask inside that
box. Trained on classes, amodal boxes and visible masks; no amodal mask is read
(in training, validation or the checkpoint choice). Reports visible-mask AP and
amodal-box AP (pycocotools); the best checkpoint is chosen on the visible-mask AP.
Its detections start the `detect` protocol for every method that begins from a
visible mask.
"""

from __future__ import annotations

from amodal3d.lightning_modules.detector import DetectorStage, ap_inputs, ap_metric
from amodal3d.lightning_modules.registry import StageSpec
from amodal3d.models.maskrcnn import DetectorModelConfig


class VisibleStage(DetectorStage):
    def train_targets(self, target: dict) -> dict:
        return {"boxes": target["amodal_boxes"], "labels": target["labels"], "masks": target["masks"]}

    def eval_metric_factories(self) -> dict:
        n = len(self.class_names)
        return {"visible_mask": ap_metric("masks", n), "amodal_box": ap_metric("boxes", n)}

    def update_eval(self, outputs, targets, metrics) -> None:
        metrics["visible_mask"].update(*ap_inputs(outputs, targets, "masks", "masks", "masks"))
        metrics["amodal_box"].update(*ap_inputs(outputs, targets, "boxes", "amodal_boxes", "boxes"))


STAGE = StageSpec(
    name="visible",
    module=VisibleStage,
    model_schema=DetectorModelConfig,
    data="images",
    method=None,  # step 1: its detections feed the detect protocol; its own row is the bench's visible floor
    table_order=5,
    help="step 1: Mask R-CNN for visible masks, classes and amodal boxes (trained from scratch)",
)

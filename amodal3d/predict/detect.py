"""Step 1 for predict: instances of an image that came without visible masks.

The `visible` stage (a Mask R-CNN, lightning_modules/visible.py) detects each
instance's class, score, visible mask and amodal box; each detection then goes
through the amodal model like a given visible mask (its amodal box is the crop
box of a gt-box model, as a COCO `amodal_bbox` would be).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from amodal3d.categories import class_names
from amodal3d.errors import CheckpointError, MissingCheckpointError
from amodal3d.predict.inputs import InstanceInput

#: detections below this score are not passed on (the detector's own floor is 0.05)
MIN_SCORE = 0.5


def load_step1(checkpoint: str | Path | None, experiment: str, root: str, device: torch.device):
    """(module, path) of the step-1 detector: the given checkpoint, else the best checkpoint of
    the latest finished `visible` run of the experiment."""
    from amodal3d.lightning_modules.visible import VisibleStage
    from amodal3d.predict.run import checkpoint_stage
    from amodal3d.runs import find_stage_checkpoint

    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise MissingCheckpointError(f"--step1 {path}: no such checkpoint file")
        if checkpoint_stage(path) != "visible":
            raise CheckpointError(f"--step1 {path}: a checkpoint of stage {checkpoint_stage(path)!r}, "
                                  "not of the step-1 stage `visible`")
    else:
        try:
            path = find_stage_checkpoint("visible", experiment, root)
        except FileNotFoundError as err:
            raise MissingCheckpointError(
                f"no step-1 checkpoint (a finished `visible` run of experiment {experiment!r} under {root}): "
                f"train it with `make train STAGE=visible`, or give --step1 <ckpt> ({err})") from None
    return VisibleStage.load_from_checkpoint(str(path), map_location=device).to(device).eval(), path


@torch.no_grad()
def detected_instances(step1, rgb: np.ndarray, source: str, device: torch.device,
                       min_score: float = MIN_SCORE) -> list[InstanceInput]:
    """Step 1's detections of one uint8 (H,W,3) image as predict instances, highest score first;
    each one's category is named by step 1's own table (its checkpoint's class names), which
    predict maps by name onto the amodal model's."""
    names = class_names(step1.cfg)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0).to(device)
    det = step1.detect([image])[0]
    out = []
    for j in range(len(det["scores"])):
        score = float(det["scores"][j])
        mask = (det["masks"][j, 0] > 0.5).cpu().numpy()
        if score < min_score or not mask.any():
            continue
        cat = names[max(int(det["labels"][j]) - 1, 0)]
        x0, y0, x1, y1 = (float(v) for v in det["boxes"][j])
        out.append(InstanceInput(name=f"{len(out)}_{cat}", source=f"detection {j} of {source}", category=cat,
                                 mask=mask, score=score, amodal_bbox=[x0, y0, x1 - x0, y1 - y0]))
    return out

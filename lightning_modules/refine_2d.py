"""Stage `refine_2d`: the 2D-only counterpart of `refine` (ablation of the 3D prior).

The same RefineNet, losses and training settings, with the coarse-mask input
zeroed (model.prior=none): what the refinement achieves from the crop RGB and
the visible and occluder masks alone. Trained separately:
`make train STAGE=refine_2d` (experiments/stage/refine_2d.yaml mirrors
refine.yaml; a test keeps the two in step).
"""

from __future__ import annotations

from amodal3d.lightning_modules.common import as_config
from amodal3d.lightning_modules.refine import RefineModelConfig, RefineStage
from amodal3d.lightning_modules.registry import StageSpec


class Refine2DStage(RefineStage):
    """RefineStage without a 3D prior."""

    def __init__(self, cfg, prior_source: dict | None = None, prior_factory=None) -> None:
        cfg = as_config(cfg)
        if str(cfg.model.prior) != "none":
            raise ValueError(f"stage refine_2d is the no-prior ablation: model.prior must be 'none', "
                             f"got {cfg.model.prior!r} (train `refine` for a refinement with the 3D prior)")
        super().__init__(cfg, prior_source=prior_source, prior_factory=None)


STAGE = StageSpec(
    name="refine_2d",
    module=Refine2DStage,
    model_schema=RefineModelConfig,
    data="crops",
    method="2D-only (no 3D prior)",
    targets=("amodal",),
    table_order=40,
    help="ablation: the refine network with its coarse-mask input zeroed (no 3D prior)",
)

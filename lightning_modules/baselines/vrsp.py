"""VRSP / ShapeDict (Xiao et al., AAAI'21), re-implemented from scratch on the shared
Mask R-CNN (models/maskrcnn.py) with its mask branch (models/vrsp.py): coarse amodal
and visible heads, visible attention refinement, and a shape prior from a per-class
codebook of amodal-mask embeddings fused into the refined amodal mask, plus the
codebook rescoring at inference.

VRSP trains in three phases, which `make train STAGE=vrsp` runs in one run folder
(the runner's `phases`; each phase resumable, a finished one skipped on RESUME):

1. `prior` (phases/prior/): the detector without the prior, plus the mask
   autoencoder on the GT amodal masks cropped by their boxes (MSE);
2. `codebook` (phases/codebook/codebook.pt): the autoencoder's embeddings of the
   training amodal masks (8 rotations/flips each), k-means per class;
3. the final phase (the run folder itself): the detector again, initialised from
   phase 1 and with the codebook, the prior fused in, the autoencoder frozen.

A supervised baseline: it trains on amodal boxes, amodal and visible masks, and
chooses its checkpoints on validation amodal-mask AP (the refined mask A1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from amodal3d.atomic import replace_atomically, write_json_atomic
from amodal3d.categories import class_names
from amodal3d.errors import CheckpointError, ConfigError, MissingCheckpointError
from amodal3d.lightning_modules.baselines.maskrcnn import MaskRCNNStage
from amodal3d.lightning_modules.checkpoints import read_checkpoint, submodule_state
from amodal3d.lightning_modules.registry import Phase, StageSpec
from amodal3d.models.maskrcnn import DetectorModelConfig, group_norm
from amodal3d.models.vrsp import MASK_SIZE, MaskAutoencoder, VrspMaskBranch, augment_masks, kmeans

AUTOENCODER = "net.roi_heads.mask_branch.autoencoder"
CODEBOOK_FILE = "codebook.pt"


@dataclass
class VrspModelConfig(DetectorModelConfig):
    codebook_size: int = 128  # entries per class (VRSP: 1024 on COCOA/KINS, sized here to ~1k masks per class)
    prior_neighbours: int = 16  # nearest codebook shapes fused into the refinement (VRSP: 16)
    autoencoder_convs: int = 3  # 3: an 8x4x4 latent (VRSP's COCOA/D2SA), 2: 8x7x7 (its KINS)
    autoencoder_weight: float = 1.0
    kmeans_iterations: int = 25
    rescore_alpha: float = 2.0  # VRSP: 2 (COCOA, D2SA), 3 (KINS)
    use_prior: bool = False  # set by the phases: false in phase 1, true in the final phase
    prior_epochs: int = 1  # phase 1's epochs (the final phase has trainer.max_epochs)
    prior_train_minutes: float = 9.0  # phase 1's time limit (the final phase has max_train_minutes)
    init_checkpoint: str = ""  # the final phase starts from phase 1's weights (set by the phases)
    codebook_path: str = ""  # ... and reads the codebook phase's file (set by the phases)


def roi_masks(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N,28,28) binary masks: each (N,H,W) mask cropped to its own box (roi_align)."""
    if len(boxes) == 0:
        return masks.new_zeros((0, MASK_SIZE, MASK_SIZE), dtype=torch.float32)
    crops = project_masks_on_boxes(masks.float(), boxes.float(), torch.arange(len(boxes)), MASK_SIZE)
    return (crops > 0.5).float()


class VrspStage(MaskRCNNStage):
    model_schema = VrspModelConfig

    def train_targets(self, target: dict) -> dict:
        return {"boxes": target["amodal_boxes"], "labels": target["labels"], "masks": target["amodal_masks"],
                "visible_masks": target["masks"]}

    def mask_branch(self):
        m = self.m
        classes = self.num_classes if m.class_specific_masks else 1
        branch = VrspMaskBranch(int(m.fpn_channels), int(m.mask_channels), int(m.mask_layers), classes,
                                len(self.class_names), codebook_size=int(m.codebook_size),
                                neighbours=int(m.prior_neighbours), autoencoder_convs=int(m.autoencoder_convs),
                                rescore_alpha=float(m.rescore_alpha), use_prior=bool(m.use_prior),
                                norm_layer=group_norm(int(m.group_norm_groups)))
        if m.use_prior:
            branch.autoencoder.requires_grad_(False)  # VRSP's retraining keeps the autoencoder fixed
        return branch

    @property
    def branch(self) -> VrspMaskBranch:
        return self.net.roi_heads.mask_branch

    def extra_losses(self, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Phase 1 also trains the mask autoencoder on the GT amodal masks in their boxes."""
        if self.m.use_prior:
            return {}
        crops = torch.cat([roi_masks(t["masks"], t["boxes"]) for t in targets])
        if len(crops) == 0:
            return {}
        recon = self.branch.autoencoder(crops)
        return {"loss_autoencoder": float(self.m.autoencoder_weight) * F.mse_loss(recon, crops)}

    def setup(self, stage: str) -> None:
        """The final phase of a fresh run starts from phase 1's weights and the codebook
        (a resumed run's own checkpoint then overwrites both, as it should)."""
        if stage != "fit" or not self.m.use_prior:
            return
        if not self.m.init_checkpoint or not self.m.codebook_path:
            raise ConfigError("vrsp: model.use_prior=true needs model.init_checkpoint and model.codebook_path; "
                              "`make train STAGE=vrsp` sets both from its first two phases")
        state = read_checkpoint(self.m.init_checkpoint)["state_dict"]
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("net.roi_heads.mask_branch.fuse.") for k in missing):
            raise CheckpointError(f"model.init_checkpoint={self.m.init_checkpoint}: not a phase-1 VRSP checkpoint "
                                  f"of this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        try:
            book = torch.load(self.m.codebook_path, map_location="cpu", weights_only=True)["codebook"]
            self.branch.set_codebook(book)
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"model.codebook_path={self.m.codebook_path}: not a usable VRSP codebook "
                                  f"({type(err).__name__}: {err}); rerun its phase: delete "
                                  "phases/codebook/ of the run and RESUME it") from None


def build_codebook(cfg: DictConfig, folder: Path) -> dict:
    """Phase 2: embed every training amodal mask (in its box, 8 rotations/flips) with
    phase 1's autoencoder and k-means each class's embeddings into model.codebook_size
    entries. A class with no training mask gets the k-means of all classes (reported)."""
    from torch.utils.data import DataLoader

    from amodal3d.datamodules.images import ImageDataset, collate_detection
    from amodal3d.lightning_modules.detector import keep_trainable

    m = cfg.model
    ckpt = str(m.init_checkpoint)
    ae = MaskAutoencoder(int(m.autoencoder_convs))
    ae.load_state_dict(submodule_state(ckpt, AUTOENCODER))
    ae.eval()
    names = class_names(cfg)  # the codebook has one entry set per category of the run's table
    ds = ImageDataset(cfg.data.root, "train", targets=("amodal",))
    loader = DataLoader(ds, batch_size=32, num_workers=int(cfg.loader.num_workers), collate_fn=collate_detection)
    latents: list[list[torch.Tensor]] = [[] for _ in names]
    with torch.no_grad():
        for images, targets in loader:
            for img, t in zip(images, targets):
                t = keep_trainable({"boxes": t["amodal_boxes"], "masks": t["amodal_masks"],
                                    "category": t["category"]}, *img.shape[-2:])
                crops = roi_masks(t["masks"], t["boxes"])
                n = len(crops)
                if n == 0:
                    continue
                z = ae.encode(augment_masks(crops))  # (8n, D), view-major
                cats = t["category"].repeat(8)
                for c in cats.unique().tolist():
                    latents[c].append(z[cats == c])
    per_class = [torch.cat(z) if z else torch.zeros((0, ae.latent_dim)) for z in latents]
    if all(len(z) == 0 for z in per_class):
        raise RuntimeError(f"vrsp codebook: no training amodal mask in {cfg.data.root} (train split)")
    k, iters, seed = int(m.codebook_size), int(m.kmeans_iterations), int(cfg.seed)
    everything = torch.cat(per_class)
    fallback = None
    book, empty = [], []
    for c, z in enumerate(per_class):
        if len(z) == 0:
            empty.append(names[c])
            fallback = kmeans(everything, k, iters, seed) if fallback is None else fallback
            book.append(fallback)
        else:
            book.append(kmeans(z, k, iters, seed + c))
    codebook = torch.stack(book)
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomically(folder / CODEBOOK_FILE, lambda p: torch.save({"codebook": codebook, "checkpoint": ckpt}, p))
    summary = {"phase": "codebook", "checkpoint": ckpt, "entries_per_class": k,
               "samples_per_class": {names[c]: len(z) for c, z in enumerate(per_class)},
               "classes_without_masks": empty}
    write_json_atomic(folder / "summary.json", summary)
    return summary


def _phase_prior(cfg: DictConfig, run: Path) -> DictConfig:
    cfg.model.use_prior = False
    cfg.trainer.max_epochs = int(cfg.model.prior_epochs)
    cfg.model.max_train_minutes = float(cfg.model.prior_train_minutes)
    return cfg


def _phase_codebook(cfg: DictConfig, run: Path) -> DictConfig:
    cfg.model.init_checkpoint = str(_best(run / "phases" / "prior"))
    return cfg


def _phase_final(cfg: DictConfig, run: Path) -> DictConfig:
    cfg.model.use_prior = True
    cfg.model.init_checkpoint = str(_best(run / "phases" / "prior"))
    cfg.model.codebook_path = str(run / "phases" / "codebook" / CODEBOOK_FILE)
    return cfg


def _best(folder: Path) -> Path:
    p = folder / "checkpoints" / "best.ckpt"
    if not p.is_file():
        raise MissingCheckpointError(f"vrsp: {p} missing: phase 1 did not finish; resume the run (RESUME=<run id>)")
    return p


STAGE = StageSpec(
    name="vrsp",
    module=VrspStage,
    model_schema=VrspModelConfig,
    data="images",
    targets=("amodal",),
    method="ShapeDict",
    table_order=23,
    help="VRSP/ShapeDict baseline: coarse + visible-attention refinement + codebook shape prior, 3 phases, from scratch",
    phases=(Phase("prior", _phase_prior), Phase("codebook", _phase_codebook, run=build_codebook),
            Phase("final", _phase_final)),
)

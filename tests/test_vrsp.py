"""VRSP / ShapeDict: the codebook, its rescoring, the mask branch, the labels it reads and
its three phases through the runner."""

from __future__ import annotations

import json
import math

import pytest
import torch

from amodal3d.config import load_config
from amodal3d.lightning_modules.baselines.vrsp import VrspStage, roi_masks
from amodal3d.models.vrsp import (MaskAutoencoder, VrspMaskBranch, augment_masks, kmeans, nearest_entries,
                                  shape_score)
from fakes import LabelGuard
from test_detection import _ov, tiny  # noqa: F401 (tiny: the fixture)


def _shapes() -> torch.Tensor:
    """Three hand-built 28x28 masks: a square, a horizontal bar, a vertical bar."""
    s = torch.zeros(3, 28, 28)
    s[0, 6:22, 6:22] = 1
    s[1, 12:16, 2:26] = 1
    s[2, 2:26, 12:16] = 1
    return s


def test_codebook_from_a_tiny_set_of_masks_finds_the_nearest_entry():
    g = torch.Generator().manual_seed(0)
    shapes = _shapes()
    noisy = shapes.repeat(10, 1, 1)
    flip = torch.rand(noisy.shape, generator=g) < 0.03  # 3% of the pixels flipped
    noisy = torch.where(flip, 1 - noisy, noisy).flatten(1)  # the latent here: the mask itself
    book = kmeans(noisy, 3, seed=0)
    # each centre is one of the shapes (up to the noise), each shape has one centre
    d = torch.cdist(book, shapes.flatten(1))
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2] and float(d.min(1).values.max()) < 4.0
    query = shapes[1].clone()
    query[12:16, 2:5] = 0  # a bar with one end cut off is still nearest to the bar
    idx = nearest_entries(book[None], query.flatten()[None], torch.tensor([0]), 1)
    assert int(d[idx[0, 0]].argmin()) == 1
    assert nearest_entries(book[None], query.flatten()[None], torch.tensor([0]), 3).shape == (1, 3)
    # fewer samples than entries: the samples fill the codebook
    assert torch.equal(kmeans(shapes.flatten(1)[:2], 4), shapes.flatten(1)[[0, 1, 0, 1]])


def test_shape_score_is_one_for_a_codebook_shape_and_falls_with_the_distance():
    shapes = _shapes()
    same = shape_score(shapes, shapes)
    assert torch.allclose(same, torch.ones(3))
    worse = shape_score(shapes, 1 - shapes)  # s = 1 = alpha - 1: score 0
    assert torch.allclose(worse, torch.zeros(3), atol=1e-5)
    half = shape_score(torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.5))  # s = 0.5: log(1.5)/log(2)
    assert math.isclose(float(half), math.log(1.5) / math.log(2.0), rel_tol=1e-5)


def test_augment_masks_gives_the_eight_rotations_and_flips():
    m = torch.zeros(1, 5, 5)
    m[0, 0, :3] = 1
    m[0, 1, 0] = 1  # no symmetry: 8 distinct views
    views = augment_masks(m)
    assert views.shape == (8, 5, 5) and torch.equal(views[0], m[0])
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_autoencoder_latent_sizes():
    assert MaskAutoencoder(3).latent_dim == 8 * 4 * 4 and MaskAutoencoder(2).latent_dim == 8 * 7 * 7
    out = MaskAutoencoder(3)(_shapes())
    assert out.shape == (3, 28, 28) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_branch_passes_and_prior():
    torch.manual_seed(0)
    branch = VrspMaskBranch(8, 8, 1, num_classes=3, categories=2, codebook_size=4, neighbours=2, use_prior=True)
    x, labels = torch.randn(5, 8, 14, 14), torch.tensor([1, 2, 1, 2, 1])
    with pytest.raises(RuntimeError, match="codebook"):
        branch(x, labels)
    branch.set_codebook(torch.randn(2, 4, branch.autoencoder.latent_dim))
    out = branch(x, labels)
    assert set(out) == {"coarse_masks", "coarse_visible_masks", "visible_masks", "masks"}
    assert all(v.shape == (5, 3, 28, 28) for v in out.values())
    # the refined amodal mask depends on the prior: another codebook changes it
    before = out["masks"].detach().clone()
    branch.set_codebook(torch.randn(2, 4, branch.autoencoder.latent_dim))
    assert not torch.allclose(branch(x, labels)["masks"], before)
    # at inference the shape rescoring comes out, one factor per RoI in [0, 1]
    branch.eval()
    f = branch(x, labels)["score_factors"]
    assert f.shape == (5,) and bool(((f >= 0) & (f <= 1)).all())
    with pytest.raises(ValueError, match="codebook of shape"):
        branch.set_codebook(torch.zeros(2, 5, branch.autoencoder.latent_dim))


def test_roi_masks_crop_each_mask_to_its_box():
    m = torch.zeros(1, 16, 16)
    m[0, 4:12, 4:8] = 1  # the left half of the box 4..12
    crop = roi_masks(m, torch.tensor([[4.0, 4, 12, 12]]))
    assert crop.shape == (1, 28, 28) and float(crop[0, :, :12].mean()) > 0.9 and float(crop[0, :, 16:].max()) == 0


def test_vrsp_reads_only_its_papers_labels_and_trains_the_autoencoder_in_phase_one(tiny):
    from amodal3d.datamodules.images import ImageDataset, collate_detection
    from amodal3d.lightning_modules.detector import keep_trainable

    stage = VrspStage(load_config("vrsp", overrides=_ov(tiny)))
    images, targets = collate_detection([ImageDataset(tiny / "data", "train", targets=("amodal",))[i] for i in range(2)])
    guarded = [LabelGuard(t, allowed={"amodal_masks"}, hidden={"occluder_masks"}) for t in targets]
    loss = stage.training_step((images, guarded), 0)
    assert math.isfinite(float(loss))
    tt = [keep_trainable(stage.train_targets(t), *img.shape[-2:]) for img, t in zip(images, guarded)]
    losses = stage.net(images, tt)
    assert {"loss_coarse_masks", "loss_coarse_visible_masks", "loss_visible_masks", "loss_masks"} <= set(losses)
    assert set(stage.extra_losses(tt)) == {"loss_autoencoder"}
    stage.extra_losses(tt)["loss_autoencoder"].backward()
    assert stage.branch.autoencoder.encoder[0].weight.grad.abs().sum() > 0
    final = VrspStage(load_config("vrsp", overrides=_ov(tiny, "model.use_prior=true")))
    assert final.extra_losses(tt) == {} and not any(p.requires_grad for p in final.branch.autoencoder.parameters())


def test_vrsp_runs_its_three_phases_in_one_command(tiny):
    from amodal3d.train import train_from_args

    root = tiny / "runs-vrsp"
    summary = train_from_args("vrsp", None, _ov(tiny, f"run.root={root}"), None, debug="fdr")
    assert summary["global_step"] == 1 and summary["phase"] == "final"
    assert "val/amodal_mask_ap" in summary["metrics"] and "val/detect_miou" in summary["metrics"]
    run = next((root / "default" / "vrsp").iterdir())
    book_summary = json.loads((run / "phases" / "codebook" / "summary.json").read_text())
    assert sum(book_summary["samples_per_class"].values()) > 0
    book = torch.load(run / "phases" / "codebook" / "codebook.pt", weights_only=True)["codebook"]
    from amodal3d.categories import CATEGORIES

    assert book.shape == (len(CATEGORIES), 128, MaskAutoencoder(3).latent_dim) and book.abs().sum() > 0
    assert set(book_summary["classes_without_masks"]) == set(CATEGORIES) - {"chair", "car"}  # reported
    assert (run / "phases" / "prior" / "checkpoints" / "best.ckpt").is_file()


def test_a_finished_phase_is_skipped_on_resume(tmp_path, monkeypatch):
    """The phase runner: phases run in order, a phase with summary.json is not run again."""
    from amodal3d.lightning_modules.registry import Phase, StageSpec
    from amodal3d.train import _train_phases

    calls = []

    def step(name):
        def run(cfg, folder):
            calls.append(name)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "summary.json").write_text("{}")
            return {"phase": name}
        return run

    spec = StageSpec(name="x", module=object, model_schema=object,
                     phases=tuple(Phase(n, lambda cfg, run: cfg, run=step(n)) for n in ("a", "b", "c")))
    cfg = load_config("vrsp", overrides=_ov(tmp_path))
    (tmp_path / "run" / "phases" / "a").mkdir(parents=True)
    (tmp_path / "run" / "phases" / "a" / "summary.json").write_text("{}")
    assert _train_phases(cfg, spec, tmp_path / "run") == {"phase": "c"}
    assert calls == ["b", "c"]


def test_resume_of_a_phased_run_needs_only_its_folder(tmp_path):
    """RESUME=<id> of a stage with phases continues the folder (its phases know where they
    stopped); an unknown id is still refused."""
    from amodal3d.errors import MissingCheckpointError
    from amodal3d.lightning_modules.registry import get_stage
    from amodal3d.train import prepare_run

    spec = get_stage("vrsp")
    (tmp_path / "runs" / "default" / "vrsp" / "r1" / "phases" / "prior").mkdir(parents=True)
    cfg = load_config("vrsp", overrides=[f"run.root={tmp_path / 'runs'}", "run.resume=r1"])
    folder, ckpt = prepare_run(cfg, spec)
    assert folder.name == "r1" and ckpt is None
    cfg = load_config("vrsp", overrides=[f"run.root={tmp_path / 'runs'}", "run.resume=nope"])
    with pytest.raises(MissingCheckpointError, match="nope"):
        prepare_run(cfg, spec)


def test_vrsp_ablation_scores_the_variants_of_a_run(tiny):
    """bench/vrsp_ablation.py: the row, the row without rescoring and the coarse mask, each
    over the same GT instances; the rescoring only lowers scores (factors in [0, 1])."""
    from amodal3d.bench.vrsp_ablation import VARIANTS, markdown, vrsp_variants
    from fakes import write_run

    torch.manual_seed(0)
    root = tiny / "runs-ablation"
    stage = VrspStage(load_config("vrsp", overrides=_ov(tiny, "model.use_prior=true")))
    stage.branch.set_codebook(torch.randn_like(stage.branch.codebook))
    write_run(stage, root, "vrsp")
    cfg = load_config("vrsp", overrides=_ov(tiny, f"run.root={root}"))
    res = vrsp_variants(cfg, torch.device("cpu"), "val", max_batches=2)
    assert list(res) == list(VARIANTS)
    counts = {name: sum(r.row.count) for name, r in res.items()}
    assert len(set(counts.values())) == 1 and next(iter(counts.values())) > 0
    assert all(math.isfinite(r.row.miou) for r in res.values()) and "| coarse mask A0, rescored |" in markdown(res)
    from amodal3d.datamodules.images import ImageDataset, collate_detection

    images, _ = collate_detection([ImageDataset(tiny / "data", "val")[i] for i in range(2)])
    stage.eval()
    rescored = stage.detect(images)
    stage.branch.rescore = False
    plain = stage.detect(images)
    for r, p in zip(rescored, plain):
        assert torch.equal(r["boxes"], p["boxes"]) and bool((r["scores"] <= p["scores"] + 1e-6).all())
    lowered = torch.cat([p["scores"] - r["scores"] for r, p in zip(rescored, plain)])
    assert len(lowered) > 0 and float(lowered.max()) > 1e-4  # a random codebook fits no mask exactly


def test_final_phase_inputs_that_are_missing_or_bad_are_named(tiny, tmp_path):
    from amodal3d.errors import CheckpointError, ConfigError

    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        VrspStage(load_config("vrsp", overrides=_ov(tiny, "model.use_prior=true"))).setup("fit")
    prior = VrspStage(load_config("vrsp", overrides=_ov(tiny)))
    ckpt = tmp_path / "prior.ckpt"
    torch.save({"state_dict": prior.state_dict()}, ckpt)
    bad = tmp_path / "codebook.pt"
    torch.save({"codebook": torch.zeros(1, 2, 3)}, bad)  # the wrong shape
    final = VrspStage(load_config("vrsp", overrides=_ov(tiny, "model.use_prior=true", f"model.init_checkpoint={ckpt}",
                                                      f"model.codebook_path={bad}")))
    with pytest.raises(CheckpointError, match="codebook_path"):
        final.setup("fit")

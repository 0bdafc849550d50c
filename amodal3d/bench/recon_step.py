"""recon's training step with soft and with hard camera-choice renders, timed apart.

The camera multiplex picks its hypothesis from renders no gradient flows through
(ReconNet.select_camera); with `model.silhouette_without_grad=hard` those renders are
hard silhouettes (models/hard_silhouette.py). This times forward + backward of the
recon stage's training step on the same training batches and weights under both, after
the warm-ups (instance offsets and the cycle on, as in most of a run), and says how far
the steps agree: the hypotheses chosen, the loss and the gradient.

    python -m amodal3d.bench.recon_step [--exp NAME] [--batches 6] [--repeats 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

MODES = ("soft", "hard")


def _step(module, batch: dict, seed: int) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """(loss, chosen hypotheses, flat gradient, seconds) of one forward + backward."""
    module.zero_grad(set_to_none=True)
    chosen = {}
    select = module.net.select_camera

    def recording(*args, **kw):
        camera, best = select(*args, **kw)
        chosen.setdefault("best", best)  # the first call is the step's own choice (later: the cycle's)
        return camera, best

    module.net.select_camera = recording
    torch.manual_seed(seed)  # the tie noise and the RGB dropout draw the same numbers in both modes
    try:
        t0 = time.perf_counter()
        loss = module.training_step(batch, 0)
        loss.backward()
        dt = time.perf_counter() - t0
    finally:
        del module.net.select_camera
    grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return float(loss), chosen["best"], grad, dt


def bench_recon_step(cfg, batches: int = 6, repeats: int = 2) -> dict:
    """Seconds per step under each mode (median over batches x repeats) and the agreement."""
    import warnings

    from amodal3d.lightning_modules.registry import get_stage
    from amodal3d.train import build_datamodule

    spec = get_stage("recon")
    dm = build_datamodule(cfg, spec)
    dm.setup("fit")
    data = []
    for i, b in enumerate(dm.train_dataloader()):
        if i >= batches:
            break
        data.append(b)
    state = None
    res: dict = {"batches": len(data), "batch_size": int(data[0]["visible"].shape[0]),
                 "threads": torch.get_num_threads()}
    steps: dict = {}
    for mode in MODES:
        torch.manual_seed(0)
        module = spec.module(OmegaConf.merge(cfg, {"model": {"silhouette_without_grad": mode}}))
        if state is None:
            state = module.state_dict()
        module.load_state_dict(state)  # the same weights in both modes
        module.train()
        times, steps[mode] = [], []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is a no-op
            _step(module, data[0], 0)  # warm-up
            for r in range(repeats):
                for i, b in enumerate(data):
                    out = _step(module, b, i)
                    times.append(out[3])
                    if r == 0:
                        steps[mode].append(out)
        res[mode] = {"seconds_per_step": statistics.median(times)}
    res["speedup"] = res["soft"]["seconds_per_step"] / res["hard"]["seconds_per_step"]
    pairs = list(zip(steps["soft"], steps["hard"]))
    res["same_choice"] = float(torch.cat([(s[1] == h[1]).float() for s, h in pairs]).mean())
    res["loss_rel_diff_max"] = max(abs(s[0] - h[0]) / max(abs(s[0]), 1e-12) for s, h in pairs)
    res["grad_rel_diff_max"] = max(float((s[2] - h[2]).norm() / s[2].norm().clamp_min(1e-30)) for s, h in pairs)
    return res


def markdown(r: dict) -> str:
    return "\n".join([
        f"recon training step (forward + backward), {r['batches']} batches of {r['batch_size']} crops, "
        f"{r['threads']} threads:",
        "",
        "| camera-choice renders | s / step |",
        "|---|---|",
        *(f"| {m} | {r[m]['seconds_per_step']:.3f} |" for m in MODES),
        "",
        f"speedup {r['speedup']:.2f}x; same hypothesis chosen for {100 * r['same_choice']:.1f}% of the crops; "
        f"largest relative difference of the loss {r['loss_rel_diff_max']:.2e}, of the gradient "
        f"{r['grad_rel_diff_max']:.2e} (over the batches)",
    ])


def main(argv: list[str] | None = None) -> int:
    from amodal3d.config import load_config

    ap = argparse.ArgumentParser(prog="python -m amodal3d.bench.recon_step", description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default=None)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    # past the warm-ups: offsets and the cycle on, as for most of a run
    cfg = load_config("recon", args.exp, ["model.offset_warmup_steps=0", "model.offset_ramp_steps=0",
                                          "model.cycle_start_step=0", "loader.num_workers=0", *args.overrides])
    from amodal3d.bench.evaluate import dataset_class_names

    dataset_class_names(cfg)
    print(markdown(bench_recon_step(cfg, args.batches, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

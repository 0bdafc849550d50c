"""recon's training step under renderer settings, timed apart on the same batches.

The camera multiplex picks its hypothesis from renders no gradient flows through
(ReconNet.select_camera); with `model.silhouette_without_grad=hard` those renders are
hard silhouettes (models/hard_silhouette.py); with `model.renderer_compiled=true` every
render's per-face window maths runs through torch.compile (models/face_windows.py); with
`model.renderer_native=true` (the default) the soft renders without gradient run in the
C++ CPU kernel of models/native_silhouette.py; with `model.encoder_channels_last=true` (the
default) the encoder's weights and inputs are channels-last (models/encoder.py).
This times forward + backward of the recon stage's training step on the same training
batches and weights under each mode, after the warm-ups (instance offsets and the cycle
on, as in most of a run), and says how far each mode's steps agree with the first
mode's (soft, eager): the hypotheses chosen, the loss and the gradient.

    python -m amodal3d.bench.recon_step [--exp NAME] [--batches 6] [--repeats 2]
        [--modes soft,native,compiled+native,compiled+native+channels_last] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

# mode -> model overrides; the first is the reference the others are compared with
_PARTS = {"silhouette_without_grad": "soft", "renderer_compiled": False, "renderer_native": False,
          "encoder_channels_last": False}
MODES = {name: {**_PARTS, **parts} for name, parts in {
    "soft": {},
    "hard": {"silhouette_without_grad": "hard"},
    "compiled": {"renderer_compiled": True},
    "hard+compiled": {"silhouette_without_grad": "hard", "renderer_compiled": True},
    "native": {"renderer_native": True},
    "compiled+native": {"renderer_compiled": True, "renderer_native": True},
    "native+channels_last": {"renderer_native": True, "encoder_channels_last": True},
    "compiled+native+channels_last": {"renderer_compiled": True, "renderer_native": True, "encoder_channels_last": True},
}.items()}


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


def bench_recon_step(cfg, batches: int = 6, repeats: int = 2, modes: tuple[str, ...] = ("soft", "hard")) -> dict:
    """Seconds per step under each mode (median over batches x repeats; the first
    compiled step of a mode is a warm-up too), its speedup over modes[0] (the median of the
    ratios of their steps on the same batch, timed in turn) and its agreement with modes[0]."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"recon_step modes {list(modes)}: expected some of {', '.join(MODES)}")
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
                 "threads": torch.get_num_threads(), "modes": list(modes)}
    modules = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is a no-op
        for mode in modes:
            torch.manual_seed(0)
            module = spec.module(OmegaConf.merge(cfg, {"model": MODES[mode]}))
            if state is None:
                state = module.state_dict()
            module.load_state_dict(state)  # the same weights in every mode
            modules[mode] = module.train()
            for b in data if MODES[mode]["renderer_compiled"] else data[:1]:  # warm-up (compiles each shape)
                _step(module, b, 0)
        # the modes in turn on each batch: a shared machine's speed drifts between minutes,
        # so each speedup is the median of ratios of steps timed side by side
        times: dict = {m: [] for m in modes}
        steps: dict = {m: [] for m in modes}
        for r in range(repeats):
            for i, b in enumerate(data):
                for mode in modes:
                    out = _step(modules[mode], b, i)
                    times[mode].append(out[3])
                    if r == 0:
                        steps[mode].append(out)
    ref = modes[0]
    for mode in modes:
        res[mode] = {"seconds_per_step": statistics.median(times[mode])}
    for mode in modes[1:]:
        pairs = list(zip(steps[ref], steps[mode]))
        res[mode].update({
            "speedup": statistics.median(a / b for a, b in zip(times[ref], times[mode])),
            "same_choice": float(torch.cat([(s[1] == h[1]).float() for s, h in pairs]).mean()),
            "loss_rel_diff_max": max(abs(s[0] - h[0]) / max(abs(s[0]), 1e-12) for s, h in pairs),
            "grad_rel_diff_max": max(float((s[2] - h[2]).norm() / s[2].norm().clamp_min(1e-30)) for s, h in pairs),
        })
    return res


def markdown(r: dict) -> str:
    ref = r["modes"][0]

    def row(m: str) -> str:
        x = r[m]
        if m == ref:
            return f"| {m} | {x['seconds_per_step']:.3f} | 1 (reference) | — | — | — |"
        return (f"| {m} | {x['seconds_per_step']:.3f} | {x['speedup']:.2f}x | {100 * x['same_choice']:.1f}% | "
                f"{x['loss_rel_diff_max']:.2e} | {x['grad_rel_diff_max']:.2e} |")

    return "\n".join([
        f"recon training step (forward + backward), {r['batches']} batches of {r['batch_size']} crops, "
        f"{r['threads']} threads; each mode against {ref} on the same batches and weights, the modes stepped "
        f"in turn on each batch (speedup: the median of those side-by-side ratios):",
        "",
        "| renders | s / step | speedup | same hypothesis chosen | loss, largest relative difference | "
        "gradient, largest relative difference |",
        "|---|---|---|---|---|---|",
        *(row(m) for m in r["modes"]),
    ])


def main(argv: list[str] | None = None) -> int:
    from amodal3d.config import load_config

    ap = argparse.ArgumentParser(prog="python -m amodal3d.bench.recon_step", description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default=None)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="soft,native,compiled+native,compiled+native+channels_last",
                    help=f"comma-separated, the first is the reference: {', '.join(MODES)}")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    # past the warm-ups: offsets and the cycle on, as for most of a run
    cfg = load_config("recon", args.exp, ["model.offset_warmup_steps=0", "model.offset_ramp_steps=0",
                                          "model.cycle_start_step=0", "loader.num_workers=0", *args.overrides])
    from amodal3d.bench.evaluate import dataset_class_names

    dataset_class_names(cfg)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes {args.modes!r}: expected a comma-separated list of {', '.join(MODES)}")
    print(markdown(bench_recon_step(cfg, args.batches, args.repeats, modes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one command-line interface; the make targets are thin wrappers around it.

    python -m amodal3d train --stage recon [--exp NAME] [--resume RUN_ID] [key=value ...]
    python -m amodal3d data [--exp NAME] [key=value ...]
    python -m amodal3d validate [--root DIR | --exp NAME]
    python -m amodal3d bench [...]
    python -m amodal3d sheets
    python -m amodal3d stages
    python -m amodal3d predict --input PATH [PATH ...] --out DIR [--ckpt CKPT] [--exp NAME]
    python -m amodal3d export --format coco_amodal --out DIR [--exp NAME | --root DIR] [--splits ...] [--force]

A user error (amodal3d.errors.UserError: bad config, data, input or checkpoint) prints one
line and exits 2; anything else keeps its traceback. `python -m amodal3d --traceback ...`
(or AMODAL3D_TRACEBACK=1) shows the traceback of both.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from amodal3d.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from amodal3d.train import train_from_args

    summary = train_from_args(args.stage, args.exp, args.overrides, args.resume, args.debug)
    print(f"[done] {summary['stage']} run {summary['run_id']}: best {summary['best_score']} "
          f"in {summary['train_seconds']:.0f}s -> {summary['run_dir']}")
    return 0


def _data_config(args: argparse.Namespace):
    from amodal3d.config import load_config

    return load_config(args.stage, args.exp, args.overrides, debug=args.debug)


def _cmd_data(args: argparse.Namespace) -> int:
    from amodal3d.datamodules.build import build_dataset

    cfg = _data_config(args)
    manifest = build_dataset(cfg.data, progress=True)
    counts = manifest.get("counts", {})
    print(f"[data] {cfg.data.root}: {counts}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from amodal3d.datamodules.shard_validate import validate_dataset

    root = args.root or _data_config(args).data.root
    report = validate_dataset(root)
    print(report if isinstance(report, str) else "\n".join(f"{k}: {v}" for k, v in dict(report).items()))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from amodal3d.datamodules.coco_export import export_dataset
    from amodal3d.errors import ConfigError

    if args.root and (args.exp or args.debug or args.overrides):
        raise ConfigError("export: give either --root DIR (a built dataset folder) or --exp NAME [--debug ..] "
                          "[key=value ...] (whose data.root is exported), not both")
    root = args.root or _data_config(args).data.root
    if args.root:
        hint = f"`make data OVERRIDES=\"data.root={args.root}\"` (or the experiment that builds it)"
    else:
        hint = "`make data" + (f" EXP={args.exp}" if args.exp else "") + (f" DEBUG={args.debug}" if args.debug else "")
        hint += (f' OVERRIDES="{" ".join(args.overrides)}"`' if args.overrides else "`")
    rep = export_dataset(root, args.out, format=args.format, splits=args.splits, force=args.force, build_hint=hint)
    print(f"[export] {rep.summary()}")
    return 0


def _cmd_sheets(args: argparse.Namespace) -> int:
    from amodal3d.datamodules.sheet_composites import composite_contact_sheet
    from amodal3d.datamodules.sources.sheet import object_contact_sheet

    cfg = _data_config(args)
    object_contact_sheet(cfg.data, f"{args.out}/synth13_objects.png")
    composite_contact_sheet(cfg.data.root, "test", f"{args.out}/composites.png")
    print(f"[sheets] wrote {args.out}/synth13_objects.png and {args.out}/composites.png")
    return 0


def _cmd_stages(args: argparse.Namespace) -> int:
    from amodal3d.lightning_modules.registry import available_stages, get_stage

    for name in available_stages():
        spec = get_stage(name)
        deps = f" (needs: {', '.join(spec.depends_on)})" if spec.depends_on else ""
        print(f"{name:12s} {spec.help}{deps}")
    return 0


def _cmd_slurm(args: argparse.Namespace) -> int:
    from amodal3d.slurm import SlurmRequest, write_and_submit

    from amodal3d.errors import ConfigError

    sweep: tuple[str, ...] = ()
    if args.sweep:
        if not Path(args.sweep).is_file():
            raise ConfigError(f"sweep file {args.sweep} not found (SWEEP=<file with one line of overrides per task>)")
        lines = Path(args.sweep).read_text().splitlines()
        sweep = tuple(ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
        if not sweep:
            raise ConfigError(f"sweep file {args.sweep} has no override lines")
    # fail early on a bad stage, experiment, override or batch split, before anything is written
    from amodal3d.config import load_config
    from amodal3d.slurm import check_batch_size

    cfg = load_config(args.stage, args.exp, args.overrides, debug=args.debug)
    req = SlurmRequest(
        stage=args.stage, experiment=args.exp, nodes=args.nodes, gpus=args.gpus, time=args.time,
        partition=args.partition, cpus_per_task=args.cpus, overrides=tuple(args.overrides),
        sweep=sweep, account=args.account, debug=args.debug,
    )
    check_batch_size(cfg, req)
    for line in sweep:  # every array task's config must load and split its batch too
        check_batch_size(load_config(args.stage, args.exp, [*args.overrides, *line.split()], debug=args.debug), req)
    path, job = write_and_submit(req, dry_run=args.dry_run, root=cfg.run.root)
    if args.dry_run:
        print(path.read_text(), end="")
        print(f"[slurm] dry run: wrote {path} (not submitted)")
    else:
        print(f"[slurm] submitted {path} as job {job}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from amodal3d.bench.run import main as bench_main

    rest = list(args.rest)
    return bench_main(rest[1:] if rest[:1] == ["--"] else rest)


def _cmd_predict(args: argparse.Namespace) -> int:
    from amodal3d.predict.run import predict_files

    rep = predict_files(args.input, args.out, checkpoint=args.ckpt, experiment=args.exp or "default",
                        root=args.runs, device=args.device, batch_size=args.batch_size, occluder=args.occluder,
                        step1_checkpoint=args.step1, meshes=args.meshes)
    print(f"[predict] {rep.instances} instances in {rep.images} images, {rep.instances_per_s:.1f} instances/s "
          f"({args.device}) -> {rep.json_path}" + (f"; {len(rep.errors)} input(s) skipped" if rep.errors else ""))
    for e in rep.errors:
        print(f"  skipped {e['input']}: {e['error']}", file=sys.stderr)
    return 1 if rep.errors else 0


def _add_config_args(p: argparse.ArgumentParser, stage_default: str | None = None) -> None:
    p.add_argument("--exp", default=None, help="named experiment (experiments/exp/<name>.yaml)")
    p.add_argument("--stage", default=stage_default, help="stage whose config to merge")
    p.add_argument("--debug", default=None, help="debug preset (experiments/debug/)")
    p.add_argument("overrides", nargs="*", help="dot-overrides, e.g. trainer.max_epochs=3")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="amodal3d", description="Amodal segmentation guided by a 3D shape prior")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one stage (or a baseline)")
    p.add_argument("--stage", required=True, help="stage name; `amodal3d stages` lists them")
    p.add_argument("--exp", default=None, help="named experiment (experiments/exp/<name>.yaml)")
    p.add_argument("--resume", default=None, help="run id to resume (continues last.ckpt)")
    p.add_argument("--debug", default=None, help="debug preset: fdr | tiny | overfit (experiments/debug/)")
    p.add_argument("overrides", nargs="*", help="dot-overrides, e.g. trainer.max_epochs=3")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="build the occlusion dataset into HDF5 shards (idempotent, resumable)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("validate", help="check a dataset: manifest, checksums, shapes, invariants")
    p.add_argument("--root", default=None, help="dataset folder (default: data.root of the config)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("export", help="write a built dataset as PNG images + a COCO-style amodal JSON per split")
    p.add_argument("--format", default="coco_amodal", help="export format: coco_amodal (docs/data.md, Export)")
    p.add_argument("--out", required=True, help="output folder: <split>/images/*.png, annotations/<split>.json")
    p.add_argument("--root", default=None, help="dataset folder (default: data.root of the config)")
    p.add_argument("--splits", nargs="+", default=None, help="splits to export (default: every split built)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (its contents are deleted)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("sheets", help="write contact-sheet PNGs of objects and composites")
    p.add_argument("--out", default="docs", help="output folder")
    _add_config_args(p)
    p.set_defaults(func=_cmd_sheets)

    p = sub.add_parser("slurm", help="write an sbatch script for a stage and submit it")
    p.add_argument("--stage", required=True)
    p.add_argument("--exp", default=None)
    p.add_argument("--debug", default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1, help="GPUs (= tasks) per node")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--cpus", type=int, default=8, help="CPUs per task (data loader workers)")
    p.add_argument("--sweep", default=None, help="file with one line of overrides per array task")
    p.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_slurm)

    p = sub.add_parser("stages", help="list the stages and what they need")
    p.set_defaults(func=_cmd_stages)

    p = sub.add_parser("predict", help="amodal masks for image files: with visible masks (PNG folders or COCO JSON), "
                                       "or without (step 1 detects the instances)")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, folders of images (masks in <image name>/<category>_<k>.png) or a COCO JSON")
    p.add_argument("--out", required=True, help="output folder: masks/, overlays/, amodal.json")
    p.add_argument("--ckpt", default=None, help="checkpoint to use (default: Ours = joint, or refine if not better)")
    p.add_argument("--exp", default=None, help="experiment whose runs hold the Ours checkpoints")
    p.add_argument("--runs", default="runs", help="runs root folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--occluder", default="auto", choices=("auto", "unknown", "others"),
                   help="occluder of an instance: anything outside its visible mask, or the other instances' "
                        "visible masks; auto: others for gt-visible models, unknown for gt-box ones")
    p.add_argument("--step1", default=None, help="step-1 (visible stage) checkpoint for images without a mask "
                                                 "folder (default: the latest finished visible run of --exp)")
    p.add_argument("--meshes", action="store_true", help="also write each instance's reconstructed mesh (OBJ) "
                                                         "with its camera (a model with a 3D prior)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("bench", help="results table and speed figures (`bench --help`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench has its own parser (parts, --help): hand it everything
        argv = ["bench", "--", *argv[1:]]
    traceback = os.environ.get("AMODAL3D_TRACEBACK") == "1"
    if "--traceback" in argv[:1]:
        traceback, argv = True, argv[1:]
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:  # what the user gave is wrong: one line, exit 2 (other errors keep their traceback)
        if traceback:
            raise
        # one line whatever the message holds (a message is written as one line; this is the guarantee)
        line = " | ".join(part.strip() for part in str(err).splitlines() if part.strip())
        print(f"error: {line or type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

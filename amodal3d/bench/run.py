"""`python -m amodal3d bench [table|seeds|speed|loader|raster|crops|hardest|recon|detections|all] [options] [key=value ...]`.

Each part runs alone or all together (`make bench`); each writes its markdown
(and CSV/JSON) under --out (default bench/) and a TensorBoard text summary
under <out>/tb, and records the command line, device and machine it ran with.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

from amodal3d.config import REPO_ROOT, load_config
from amodal3d.atomic import write_json_atomic

PARTS = ("table", "seeds", "speed", "loader", "raster", "crops", "hardest", "recon", "detections", "all")
#: the experiment whose runs each protocol's table scores when --exp is not given
PROTOCOL_EXPERIMENTS = {"gt-visible": None, "gt-box": "gt_box", "detect": None}
#: protocols a config can be trained under (the crop stages); `detect` scores any experiment's runs
CROP_PROTOCOLS = ("gt-visible", "gt-box")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="amodal3d bench",
        description="Results tables (amodal mIoU on the test split, once per protocol) and speed figures. "
        f"Parts: {', '.join(PARTS)} (default all), given first.",
    )
    ap.add_argument("--protocol", default=None, choices=("gt-visible", "gt-box", "detect", "all"),
                    help="protocol(s) of the table part (default: all; with --exp, that experiment's and detect). "
                         "Each protocol scores its own runs: gt-visible and detect those of the default experiment, "
                         "gt-box those of EXP=gt_box. The seeds part runs the crop protocols only")
    ap.add_argument("--seed-exps", default="default,seed1,seed2",
                    help="seeds part: comma-separated experiments holding one seed each of the refine-family runs "
                         "(gt-box: the same names with a _gt_box suffix)")
    ap.add_argument("--exp", default=None, help="named experiment: its runs and its dataset are benchmarked")
    ap.add_argument("--debug", default=None, help="debug preset for the data/loader config (experiments/debug/)")
    ap.add_argument("--run", action="append", default=[], metavar="PATH",
                    help="benchmark this run folder or checkpoint instead of discovering runs (repeatable)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--out", default="bench", help="output folder (relative to the repo root)")
    ap.add_argument("--limit-batches", type=int, default=None, help="score only this many test batches (smoke runs)")
    ap.add_argument("--speed-batches", type=int, default=20, help="test batches timed per method")
    ap.add_argument("--ratio-rounds", type=int, default=5,
                    help="rounds of Ours and the 2D-only row timed in alternation for their throughput ratio (0: none)")
    ap.add_argument("--hardest-method", default="Ours", help="table row whose hardest cases the hardest part draws")
    ap.add_argument("--hardest-per-category", type=int, default=3, help="cases per category in bench/hardest.png")
    ap.add_argument("--predict-images", type=int, default=64, help="test images `predict` runs on in the speed part")
    ap.add_argument("--sheet-images", type=int, default=8, help="test images the detections part draws")
    ap.add_argument("overrides", nargs="*", help="config dot-overrides, e.g. data.root=data/other loader.batch_size=64")
    return ap


def _out_dir(out: str) -> Path:
    p = Path(out)
    return p if p.is_absolute() else REPO_ROOT / p


def _meta(argv: list[str], cfg, device, part: str) -> dict:
    from amodal3d.bench.speed import machine_info

    meta = {
        "command": "python -m amodal3d bench " + shlex.join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "part": part,
        "experiment": cfg.experiment,
        "dataset": f"{cfg.data.root} (source {cfg.data.source}, composite {cfg.data.composite})",
        "split": "test",
        "protocol": str(cfg.protocol),
        "batch_size": cfg.loader.batch_size,
    }
    meta.update(machine_info(device))
    return meta


def _entries(args, cfg):
    """The rows to score under cfg's protocol: the named runs trained under it, or the
    methods discovered in cfg's experiment."""
    from amodal3d.bench.evaluate import discover_methods, named_methods

    if args.run:
        return [e for e in named_methods(args.run) if e.protocol == str(cfg.protocol)]
    return discover_methods(cfg.experiment, cfg.run.root)


def protocol_configs(args) -> list:
    """(protocol, config) pairs the table and seeds parts run: each protocol with the
    experiment whose runs were trained under it."""
    if args.exp:
        base = load_config(None, args.exp, args.overrides, debug=args.debug)
        if args.protocol == "detect":
            return [("detect", base)]
        if args.protocol not in (None, "all", str(base.protocol)):
            raise SystemExit(f"--exp {args.exp} was trained under protocol {base.protocol}; "
                             f"--protocol {args.protocol} does not apply to it")
        return [(str(base.protocol), base), ("detect", base)]
    names = ["gt-visible", "gt-box", "detect"] if args.protocol in (None, "all") else [args.protocol]
    if args.run and args.protocol is None:  # named runs: the protocols they were trained under
        from amodal3d.bench.evaluate import named_methods

        present = {e.protocol for e in named_methods(args.run)}
        names = [p for p in names if p in present]  # named runs: crop protocols only
    return [(p, load_config(None, PROTOCOL_EXPERIMENTS[p], args.overrides, debug=args.debug)) for p in names]


def crop_coverage_note(cfg) -> str:
    """Share of test instances whose amodal mask reaches outside its crop (no method can score there)."""
    from amodal3d.datamodules.crops import crop_coverage, protocol_crop_boxes
    from amodal3d.datamodules.shard_reader import SplitReader

    idx = SplitReader(cfg.data.root, "test", verify=False).index
    lc = cfg.loader
    boxes = protocol_crop_boxes(idx, str(cfg.protocol), float(lc.crop_margin), float(lc.visible_crop_margin))
    inside = crop_coverage(idx, boxes)
    margin = lc.visible_crop_margin if cfg.protocol == "gt-visible" else lc.crop_margin
    return (f"Crops ({cfg.protocol}, margin {margin}): the amodal mask of {100 * (1 - inside.mean()):.2f}% of the "
            f"test instances ({int((~inside).sum())} of {len(inside)}) reaches outside the crop; no method "
            "predicts there.")


def part_table(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.evaluate import evaluate_all
    from amodal3d.atomic import write_text_atomic
    from amodal3d.bench.table import results_markdown, write_results
    from amodal3d.categories import class_names

    mds, failed = [], []
    for protocol, pcfg in protocol_configs(args):
        pmeta = _meta(args.full_argv, pcfg, device, "table")
        appendix = ""
        if protocol == "detect":
            from amodal3d.bench.detect import DETECT_NOTES, ap_markdown, evaluate_detect

            pmeta["protocol"] = "detect"
            report = evaluate_detect(pcfg, device, args.limit_batches)
            results = [r.row for r in report.scored] + report.unscored
            extra = list(DETECT_NOTES)
            appendix = ap_markdown(report)
        else:
            entries = _entries(args, pcfg)
            results = evaluate_all(pcfg, entries, device, args.limit_batches)
            extra = [crop_coverage_note(pcfg)]
            if protocol == "gt-box":  # the Mask R-CNN family: GT amodal boxes into its RoI heads
                from amodal3d.bench.gt_box_detectors import GT_BOX_NOTE, gt_box_detector_rows

                fed = gt_box_detector_rows(pcfg, entries, device, args.limit_batches)
                results = [r for r in results if r.name not in fed] + [r for r in fed.values() if r.ok] + \
                    [r for r in fed.values() if not r.ok]
                extra.append(GT_BOX_NOTE)
        categories = class_names(pcfg)  # the scored dataset's table (set by the evaluation from its manifest)
        md = results_markdown(results, pmeta, extra, appendix, categories)
        paths = write_results(out, results, pmeta, extra, appendix, categories)
        print(md, flush=True)
        print(f"[bench] wrote {paths['markdown']}, {paths['csv']} and a TensorBoard text under {paths['tensorboard']}")
        mds.append(md)
        failed += [f"{protocol}: {r.name} ({r.status})" for r in results if r.status.startswith("error")]
    md = "\n\n".join(mds)
    write_text_atomic(out / "results.md", md)
    if failed:  # the tables are written; the call still fails, naming each row and why
        raise RuntimeError("evaluation failed for " + "; ".join(failed))
    return md


def part_seeds(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.seeds import seeds_markdown, seed_results
    from amodal3d.atomic import write_text_atomic

    mds = []
    for protocol, pcfg in protocol_configs(args):
        if protocol not in CROP_PROTOCOLS:  # seeds of the refine family: crop protocols
            continue
        exps = [e.strip() for e in args.seed_exps.split(",") if e.strip()]
        if protocol == "gt-box":
            exps = [("gt_box" if e == "default" else f"{e}_gt_box") for e in exps]
        pmeta = _meta(args.full_argv, pcfg, device, "seeds")
        rows, references = seed_results(pcfg, exps, device, args.limit_batches)
        md = seeds_markdown(rows, references, pmeta)
        write_text_atomic(out / f"seeds-{protocol}.md", md)
        print(md, flush=True)
        mds.append(md)
    return "\n\n".join(mds)


def part_speed(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.evaluate import eval_loader, load_method
    from amodal3d.bench.ours import OURS
    from amodal3d.bench.speed import (
        collect_batches, measure_inference, methods_markdown, paired_markdown, paired_ratio, predict_markdown,
        section_markdown, silhouette_markdown, silhouette_paths,
    )
    from amodal3d.atomic import write_text_atomic
    from amodal3d.bench.table import write_tensorboard_text
    from amodal3d.lightning_modules.registry import get_stage

    two_d_only = get_stage("refine_2d").method  # the row Ours' ratio is taken against
    batches = collect_batches(eval_loader(cfg), device, args.speed_batches)
    rows, kept = [], {}
    for e in _entries(args, cfg):
        if e.status != "ok":
            rows.append({"method": e.name, "stage": e.stage, "status": e.status})
            continue
        try:
            module = load_method(e, device, cfg)
            res = measure_inference(module, batches, device)
            paths = silhouette_paths(module, batches, device)
        except Exception as err:
            print(f"[bench] {e.name}: speed measurement failed: {err!r}", file=sys.stderr)
            rows.append({"method": e.name, "stage": e.stage, "status": f"error: {err!r}"})
            continue
        rows.append({"method": e.name, "stage": e.stage, "status": "ok", **res,
                     **({"silhouettes": paths} if paths else {})})
        print(f"[bench] {e.name}: {res['instances_per_s']:.1f} instances/s", flush=True)
        if e.name in (OURS, two_d_only):
            kept[e.name] = module
    ratio = (paired_ratio(kept[OURS], kept[two_d_only], batches, device, args.ratio_rounds)
             if args.ratio_rounds > 0 and len(kept) == 2 else None)
    kept.clear()
    predict = _predict_throughput(args, cfg, device)
    body = methods_markdown(rows) + "\n\n" + predict_markdown(predict)
    if ratio:
        body += "\n\n" + paired_markdown(OURS, two_d_only, ratio)
    if paths_md := silhouette_markdown(rows):
        body += "\n\n" + paths_md
    md = section_markdown("Inference speed (predict_amodal on test batches already on the device)", body, meta)
    write_text_atomic(out / "speed.md", md)
    write_json_atomic(out / "speed.json", {"meta": meta, "methods": rows, "predict": predict,
                                           "ours_over_2d_only": ratio})
    write_tensorboard_text(out / "tb", "bench/speed", md)
    print(md, flush=True)
    return md


def _predict_throughput(args, cfg, device) -> dict:
    """`predict` end to end (files in, masks, overlays and JSON out) with the Ours model
    on test images: with their visible-mask files, and from the images alone through step 1
    ("from_images"; {"status": why} without a finished `visible` run); {"status": why}
    when there is no Ours model."""
    from amodal3d.predict.detect import load_step1
    from amodal3d.predict.run import load_predictor
    from amodal3d.predict.throughput import predict_throughput

    try:
        module, ckpt = load_predictor(None, cfg.experiment, cfg.run.root, device)
    except FileNotFoundError as err:
        return {"status": f"not trained ({err})"}
    from amodal3d.bench.evaluate import check_module_classes, dataset_class_names

    dataset_class_names(cfg)
    check_module_classes(module, ckpt, cfg)  # its inputs are the dataset's files, named by its categories
    res = predict_throughput(module, cfg.data.root, "test", max_images=args.predict_images, device=device)
    res.update(status="ok", checkpoint=str(ckpt))
    print(f"[bench] predict: {res['instances_per_s']:.1f} instances/s", flush=True)
    try:
        _, step1 = load_step1(None, cfg.experiment, cfg.run.root, device)
    except FileNotFoundError as err:
        res["from_images"] = {"status": f"no step 1 ({err})"}
        return res
    raw = predict_throughput(module, cfg.data.root, "test", max_images=args.predict_images, device=device,
                             step1_checkpoint=step1)
    res["from_images"] = dict(raw, status="ok", checkpoint=str(step1))
    print(f"[bench] predict from images (step 1): {raw['images_per_s']:.1f} images/s", flush=True)
    return res


def _part_report(name: str, title: str, report: tuple[dict, str], meta: dict, out: Path) -> str:
    from amodal3d.bench.speed import section_markdown
    from amodal3d.atomic import write_text_atomic
    from amodal3d.bench.table import write_tensorboard_text

    report, body = report
    md = section_markdown(title, body, meta)
    write_text_atomic(out / f"{name}.md", md)
    write_json_atomic(out / f"{name}.json", {"meta": meta, name: report})
    write_tensorboard_text(out / "tb", f"bench/{name}", md)
    print(md, flush=True)
    return md


def part_loader(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.speed import run_loader_bench

    return _part_report("loader", "Data loader throughput", run_loader_bench(cfg), meta, out)


def part_raster(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.speed import run_raster_bench

    return _part_report("raster", "Rasteriser throughput", run_raster_bench(device), meta, out)


def part_crops(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.crop_ops import crop_ops_markdown, crop_ops_report

    r = crop_ops_report(cfg.data.root, "val", int(cfg.loader.crop_size), str(cfg.protocol), device=device)
    return _part_report("crops", "Crop and paste: ours vs torchvision's", (r, crop_ops_markdown(r)), meta, out)


def part_hardest(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.evaluate import eval_loader, load_method
    from amodal3d.bench.hardest import hardest_instances, hardest_sheet
    from amodal3d.bench.speed import section_markdown
    from amodal3d.atomic import write_text_atomic

    entries = {e.name: e for e in _entries(args, cfg)}
    entry = entries.get(args.hardest_method)
    if entry is None or entry.status != "ok":
        why = "no such row" if entry is None else entry.status
        body = f"{args.hardest_method}: {why}; nothing drawn."
    else:
        cases = hardest_instances(load_method(entry, device, cfg), eval_loader(cfg), device,
                                  args.hardest_per_category, args.limit_batches)
        png = hardest_sheet(cases, out / "hardest.png", entry.name)
        lines = ["| category | lowest IoUs |", "|---|---|"]
        for cat, items in cases.items():
            lines.append(f"| {cat} | " + ", ".join(f"{100 * k['iou']:.1f}" for k in items) + " |")
        body = f"![hardest cases]({png.name})\n\n" + "\n".join(lines)
    md = section_markdown(f"Hardest test instances of {args.hardest_method}", body, meta)
    write_text_atomic(out / "hardest.md", md)
    print(md, flush=True)
    return md


def part_detections(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.atomic import write_text_atomic
    from amodal3d.bench.detections import detection_sheet
    from amodal3d.bench.speed import section_markdown

    try:
        png, note = detection_sheet(cfg, device, out / "detections.png", images=args.sheet_images)
        body = f"![step-1 detections and Ours' amodal masks]({png.name})\n\n{note}"
    except FileNotFoundError as err:  # no step-1 run: nothing to draw, said plainly
        body = f"No step-1 detector to draw: {err}"
    md = section_markdown(f"Detections on test images ({cfg.data.composite})", body, meta)
    write_text_atomic(out / "detections.md", md)
    print(md, flush=True)
    return md


def part_recon(args, cfg, device, meta: dict, out: Path) -> str:
    from amodal3d.bench.evaluate import eval_loader, load_method
    from amodal3d.bench.meshes import camera_report, errors_markdown, mesh_sheet
    from amodal3d.bench.speed import section_markdown
    from amodal3d.atomic import write_text_atomic
    from amodal3d.datamodules.true_meshes import TrueMeshes

    entry = next((e for e in _entries(args, cfg) if e.stage == "recon"), None)
    if entry is None or entry.status != "ok":
        body = f"recon: {'no such stage' if entry is None else entry.status}; nothing measured."
        errors = {}
    else:
        true_meshes = TrueMeshes(cfg.data.root)
        cases, errors = camera_report(load_method(entry, device, cfg), eval_loader(cfg, "val"), eval_loader(cfg),
                                      device, true_meshes=true_meshes, max_batches=args.limit_batches)
        png = mesh_sheet(cases, true_meshes, out / "meshes.png")
        body = ("Camera errors in degrees (azimuth after one offset per category, fitted on the validation "
                "split: the learned canonical frame is arbitrary; chance is 90, and 45 modulo 180 deg), Chamfer "
                "distance in the view frame after normalisation. The constant camera: the middle of the camera "
                "head's ranges and the best single azimuth per category on validation.\n\n" + errors_markdown(errors)
                + f"\n\n![reconstructed meshes]({png.name})\n\nCheckpoint: `{entry.checkpoint}`")
    md = section_markdown("recon on the test split: cameras, shapes and meshes", body, meta)
    write_text_atomic(out / "recon.md", md)
    write_json_atomic(out / "recon.json", {"meta": meta, "errors": errors})
    print(md, flush=True)
    return md


PART_FUNCS = {"table": part_table, "seeds": part_seeds, "speed": part_speed, "loader": part_loader, "raster": part_raster,
              "crops": part_crops, "hardest": part_hardest, "recon": part_recon, "detections": part_detections}


def main(argv: list[str]) -> int:
    """Run the named part(s); 0 when every part succeeded, 1 when one failed."""
    argv = list(argv)
    part = argv.pop(0) if argv and argv[0] in PARTS else "all"
    args = build_parser().parse_args(argv)
    from amodal3d.bench.evaluate import resolve_device

    cfg = load_config(None, args.exp, args.overrides, debug=args.debug)
    device = resolve_device(args.device)
    out = _out_dir(args.out)
    full_argv = [part, *argv]
    args.full_argv = full_argv
    parts = list(PART_FUNCS) if part == "all" else [part]
    sections, failed = [], []
    for name in parts:
        meta = _meta(full_argv, cfg, device, name)
        try:
            sections.append(PART_FUNCS[name](args, cfg, device, meta, out))
        except Exception as err:
            if len(parts) == 1:
                raise
            traceback.print_exc()
            failed.append(f"{name}: {err!r}")
            print(f"[bench] part {name!r} failed: {err!r}", file=sys.stderr)
    if part == "all":
        from amodal3d.atomic import write_text_atomic

        body = "\n\n".join(sections)
        if failed:
            body += "\n\n# Parts that failed\n\n" + "\n".join(f"- {f}" for f in failed) + "\n"
        write_text_atomic(out / "bench.md", body)
        print(f"[bench] wrote {out / 'bench.md'}" + (f"; failed parts: {json.dumps(failed)}" if failed else ""))
    return 1 if failed else 0

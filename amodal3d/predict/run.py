"""The predict pipeline: load the model, read and crop every instance, run the model
in batches, paste its masks back and write the outputs (predict_files)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amodal3d.categories import class_names
from amodal3d.predict.crops import OCCLUDER_MODES, make_crops, occluder_masks
from amodal3d.predict.detect import MIN_SCORE
from amodal3d.predict.inputs import (
    ImageInput, InputError, InputSet, InstanceInput, bind_categories, collect_inputs, instance_mask, read_rgb,
    report_error, resolve_category,
)
from amodal3d.predict.outputs import JSON_NAME, boxes_xywh, encode_rle, save_png, write_json
from amodal3d.predict.overlay import overlay_image
from amodal3d.datamodules.composites import mask_boxes
from amodal3d.errors import CheckpointError, MissingCheckpointError
from amodal3d.lightning_modules.checkpoints import checkpoint_hparams


def checkpoint_stage(checkpoint: Path) -> str:
    stage = (checkpoint_hparams(checkpoint).get("cfg") or {}).get("stage")
    if not stage:
        raise CheckpointError(f"{checkpoint}: not an amodal3d stage checkpoint (no hyper_parameters.cfg.stage); "
                              "give --ckpt a best.ckpt or last.ckpt of a run")
    return str(stage)


def load_predictor(checkpoint: str | Path | None = None, experiment: str = "default", root: str = "runs",
                   device: str | torch.device = "cpu"):
    """(module, checkpoint): the given checkpoint's stage module, else the Ours model
    (joint, or refine where joint is not better on validation)."""
    from amodal3d.bench.ours import load_stage_module, ours_checkpoint
    from amodal3d.lightning_modules.common import AmodalStage

    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise MissingCheckpointError(f"--ckpt {path}: no such checkpoint file")
        stage = checkpoint_stage(path)
    else:
        stage, path = ours_checkpoint(experiment, root)
    module = load_stage_module(stage, path, device)
    if not isinstance(module, AmodalStage):
        raise CheckpointError(f"{path}: a checkpoint of stage {stage!r}, which does not predict amodal masks; "
                              "give --ckpt a checkpoint of an amodal stage (refine, joint, ...)")
    return module, path


@dataclass
class PredictReport:
    images: int
    instances: int
    errors: list[dict]
    seconds: float
    json_path: Path
    checkpoint: str = ""

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else math.nan



@dataclass
class _Prepared:
    image: ImageInput
    rgb: np.ndarray
    instances: list[InstanceInput]
    visible: np.ndarray  # (n,H,W) bool
    category: np.ndarray  # (n,) index in the model's category table
    crops: dict
    meshes: tuple | None = None  # (verts (n,V,3), cameras (n,3)) with --meshes


def _nothing_usable(errors: list[dict]) -> InputError:
    """The error of a call none of whose inputs could be used: the first bad input, and how many more."""
    first = errors[0] if errors else {"input": "the inputs", "error": "no image and no instance given"}
    more = f" (and {len(errors) - 1} more bad input(s))" if len(errors) > 1 else ""
    where, what = str(first["input"]), str(first["error"])
    return InputError(f"nothing to predict: {what if where in what else f'{where}: {what}'}{more}")


def _prepare(img: ImageInput, inputs: InputSet, crop_size: int, margin: float, occluder: str,
             amodal_boxes: bool = True, step1=None, device: torch.device | None = None) -> _Prepared | None:
    try:
        rgb = read_rgb(img.path)
    except InputError as err:
        report_error(inputs.errors, str(img.path), str(err))
        return None
    if img.detect:
        from amodal3d.predict.detect import detected_instances

        img.instances = detected_instances(step1, rgb, str(img.path), device)
        if not img.instances:  # nothing detected: an empty result for this image, not an error
            return _Prepared(img, rgb, [], np.zeros((0, *rgb.shape[:2]), bool), np.zeros(0, np.int64), {})
    h, w = rgb.shape[:2]
    if img.size is not None and img.size != (h, w):
        report_error(inputs.errors, str(img.path),
                     f"the image is {h}x{w} (h x w) but the JSON says {img.size[0]}x{img.size[1]}")
        return None
    if not img.instances:
        report_error(inputs.errors, str(img.path), "no instance (visible mask) given for this image")
        return None
    keep, masks, cats, boxes = [], [], [], []
    for inst in img.instances:
        try:
            cat = resolve_category(inst, inputs)
            m = instance_mask(inst, h, w)
            if inst.amodal_bbox is not None and amodal_boxes:
                x, y, bw, bh = (float(v) for v in inst.amodal_bbox)
                if not (bw > 0 and bh > 0):
                    raise InputError(f"amodal_bbox {inst.amodal_bbox} has no area")
                box = np.array([x, y, x + bw, y + bh], np.float32)
            else:
                box = None  # the visible mask's box, computed below for all instances at once
        except InputError as err:
            report_error(inputs.errors, inst.source, str(err))
            continue
        keep.append(inst)
        masks.append(m)
        cats.append(cat)
        boxes.append(box)
    if not keep:
        return None
    visible = np.stack(masks)
    if any(b is None for b in boxes):
        visible_boxes = mask_boxes(visible)
        boxes = [visible_boxes[j] if b is None else b for j, b in enumerate(boxes)]
    crops = make_crops(rgb, visible, occluder_masks(visible, occluder), np.stack(boxes), crop_size, margin)
    if amodal_boxes:
        crops["amodal_box"] = torch.from_numpy(np.stack(boxes))
    return _Prepared(img, rgb, keep, visible, np.array(cats, np.int64), crops)


@torch.no_grad()
def _run_model(module, prepared: list[_Prepared], batch_size: int, device: torch.device,
               meshes: bool = False) -> list[torch.Tensor]:
    """Amodal probabilities in the crop frame, one (n_i,1,S,S) tensor per prepared image;
    with meshes, each prepared image also gets `p.meshes`: (verts (n_i,V,3), cameras (n_i,3))
    of the 3D prior behind each mask."""
    keys = [k for k in ("rgb", "visible", "occluder", "crop_box", "amodal_box") if k in prepared[0].crops]
    allc = {k: torch.cat([p.crops[k] for p in prepared]) for k in keys}
    allc["category"] = torch.from_numpy(np.concatenate([p.category for p in prepared]))
    n = allc["category"].shape[0]
    allc["index"] = torch.arange(n)
    allc["object_id"] = torch.full((n,), -1, dtype=torch.long)
    probs, verts, cams = [], [], []
    for lo in range(0, n, batch_size):
        batch = {k: v[lo:lo + batch_size].to(device) for k, v in allc.items()}
        probs.append(module.predict_amodal(batch).float().cpu())
        if meshes:
            _, out = module.prior.render_outputs(batch)
            verts.append(out["verts"].float().cpu())
            cams.append(out["camera"].float().cpu())
    counts = [len(p.instances) for p in prepared]
    if meshes:
        for p, v, c in zip(prepared, torch.cat(verts).split(counts), torch.cat(cams).split(counts)):
            p.meshes = (v, c)
    return list(torch.split(torch.cat(probs), counts))


def _write_mesh(path: Path, verts: torch.Tensor, faces: torch.Tensor) -> None:
    from pytorch3d.io import save_obj

    from amodal3d.atomic import replace_atomically

    replace_atomically(path, lambda tmp: save_obj(str(tmp), verts, faces))


def _finish(p: _Prepared, prob: torch.Tensor | None, out: Path, anns: list[dict], images: list[dict],
            names: tuple[str, ...], faces: torch.Tensor | None = None) -> None:
    """Write one image's masks and overlay and add its annotations; `names`: the model's category
    table (its checkpoint's class names), what `category` and the overlay labels say."""
    from amodal3d.datamodules.crops import paste_crop_to_image

    h, w = p.rgb.shape[:2]
    if p.instances:
        amodal = (paste_crop_to_image(prob, p.crops["crop_box"], h, w)[:, 0] > 0.5).numpy() | p.visible
    else:
        amodal = np.zeros((0, h, w), bool)
    for j, (inst, v, a, cat, bbox) in enumerate(zip(p.instances, p.visible, amodal, p.category, boxes_xywh(amodal))):
        rel = Path("masks") / p.image.key / f"{inst.name}.png"
        save_png(a.astype(np.uint8) * 255, out / rel)
        anns.append({
            "id": inst.ann_id if inst.ann_id is not None else len(anns) + 1,
            "image_id": p.image.image_id,
            "category_id": inst.category if inst.ann_id is not None else int(cat) + 1,
            "category": names[int(cat)],
            "segmentation": encode_rle(a), "area": int(a.sum()), "bbox": bbox,
            "visible_area": int(v.sum()), "iscrowd": 0, "score": inst.score,
            "mask_file": str(rel), "input": inst.source,
        })
        if p.image.detect:  # what step 1 found: the visible mask, its box and score
            anns[-1].update(visible_segmentation=encode_rle(v), step1_amodal_bbox=inst.amodal_bbox)
        if p.meshes is not None:  # the 3D shape behind the mask, in the prior's canonical frame, and its camera
            mesh_rel = Path("meshes") / p.image.key / f"{inst.name}.obj"
            _write_mesh(out / mesh_rel, p.meshes[0][j], faces)
            az, el, dist = (float(x) for x in p.meshes[1][j])
            anns[-1].update(mesh_file=str(mesh_rel), camera={"azimuth": az, "elevation": el, "distance": dist})
    labels = [f"{names[int(c)]} {inst.score:.2f}" for inst, c in zip(p.instances, p.category)] \
        if p.image.detect else None
    save_png(overlay_image(p.rgb, list(p.visible), list(amodal), labels=labels),
             out / "overlays" / f"{p.image.key}.png")
    images.append({"id": p.image.image_id, "file_name": str(p.image.path), "height": h, "width": w,
                   "overlay": f"overlays/{p.image.key}.png"})


def predict_files(
    inputs,
    out_dir: str | Path,
    module=None,
    checkpoint: str | Path | None = None,
    experiment: str = "default",
    root: str = "runs",
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    occluder: str = "auto",
    step1_checkpoint: str | Path | None = None,
    meshes: bool = False,
) -> PredictReport:
    """Amodal masks of every instance of `inputs` written under out_dir (formats: amodal3d.predict).

    module: an AmodalStage already loaded (else load_predictor(checkpoint, experiment)).
    An image without a mask folder is detected by step 1 (step1_checkpoint, else the
    latest finished `visible` run of the experiment); without a step-1 checkpoint it is
    reported and skipped like any other bad input. meshes: also write each instance's
    mesh (OBJ, meshes/<image>/<instance>.obj) and its camera (in amodal.json); the model
    needs a 3D prior.
    The report's seconds cover reading, cropping, the model and writing (not the
    model load); its errors list every skipped input with the reason. When no input can
    be used, InputError names the first bad one and nothing is written."""
    if occluder not in OCCLUDER_MODES + ("auto",):
        raise ValueError(f"occluder={occluder!r}: expected auto or one of {', '.join(OCCLUDER_MODES)}")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be >= 1")
    device = torch.device(device)
    ckpt_name = str(checkpoint or "")
    t_collect = time.perf_counter()
    inputs = collect_inputs(inputs)  # cheap (lists files, parses a JSON): fail before loading the model
    t_collect = time.perf_counter() - t_collect
    if not inputs.images:
        raise _nothing_usable(inputs.errors)
    step1 = None
    if any(im.detect for im in inputs.images):
        from amodal3d.predict.detect import load_step1

        try:
            step1, _ = load_step1(step1_checkpoint, experiment, root, device)
        except MissingCheckpointError as err:
            for im in [im for im in inputs.images if im.detect]:
                report_error(inputs.errors, str(im.path), f"no mask folder {im.path.with_suffix('')}/ next to "
                             f"it (one PNG per instance) and {err}")
            inputs.images = [im for im in inputs.images if not im.detect]
            if not inputs.images:
                raise _nothing_usable(inputs.errors)
    if module is None:
        module, path = load_predictor(checkpoint, experiment, root, device)
        ckpt_name = str(path)
    module = module.to(device).eval()
    names = class_names(module.cfg)  # outputs and labels say the checkpoint's categories
    bind_categories(inputs, names)
    faces = None
    if meshes:
        if getattr(module, "prior", None) is None:
            raise InputError(f"--meshes needs a model with a 3D prior; stage {module.cfg.stage!r} has none "
                             "(give --ckpt a refine or joint checkpoint, or drop --meshes)")
        faces = module.prior.recon_net.faces.cpu()
    from amodal3d.protocols import gives_amodal_box, protocol_of

    protocol = protocol_of(module.cfg)
    box_protocol = gives_amodal_box(protocol)
    crop_size = int(module.cfg.loader.crop_size)
    margin = float(module.cfg.loader.crop_margin if box_protocol
                   else module.cfg.loader.get("visible_crop_margin", module.cfg.loader.crop_margin))
    if occluder == "auto":
        occluder = "unknown" if box_protocol else "others"
    out = Path(out_dir)
    t0 = time.perf_counter() - t_collect  # the seconds count reading the inputs, not loading the model
    anns: list[dict] = []
    images: list[dict] = []
    chunk: list[_Prepared] = []

    def flush() -> None:
        if chunk:
            for p, prob in zip(chunk, _run_model(module, chunk, batch_size, device, meshes)):
                _finish(p, prob, out, anns, images, names, faces)
            chunk.clear()

    for img in inputs.images:
        p = _prepare(img, inputs, crop_size, margin, occluder, amodal_boxes=box_protocol, step1=step1, device=device)
        if p is not None and not p.instances:
            _finish(p, None, out, anns, images, names)
        elif p is not None:
            chunk.append(p)
        if sum(len(c.instances) for c in chunk) >= batch_size:
            flush()
    flush()
    if not images:  # every input was bad: no JSON that a reader could take for a result
        raise _nothing_usable(inputs.errors)
    doc = {
        "info": {"description": "amodal masks predicted by amodal3d", "checkpoint": ckpt_name,
                 "stage": str(module.cfg.stage), "occluder": occluder, "crop_size": crop_size, "crop_margin": margin,
                 "protocol": protocol,
                 "box": ("amodal_bbox when the input gives one (step 1's amodal box for detections), else the box "
                         "of the visible mask" if box_protocol else "the box of the visible mask"),
                 "step1": "images without a mask folder: instances detected by the `visible` stage, score >= "
                          f"{MIN_SCORE}" if step1 is not None else "not used"},
        "images": images, "categories": inputs.categories, "annotations": anns, "errors": inputs.errors,
    }
    json_path = out / JSON_NAME
    out.mkdir(parents=True, exist_ok=True)
    write_json(doc, json_path)
    seconds = time.perf_counter() - t0
    return PredictReport(len(images), len(anns), inputs.errors, seconds, json_path, ckpt_name)


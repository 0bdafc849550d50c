"""Our crop and paste against torchvision's `roi_align` and `paste_masks_in_image`.

Every crop stage cuts instances out of the image with `crop_to_box` (grid_sample on
fractional square windows, zero outside the image) and scores its predictions in the
image frame with `paste_crop_to_image`, the exact inverse. torchvision has the two
operations for detection heads; this part measures, on a split's amodal masks under
its crop windows, how far each pair is from the other and from the ground truth
after a round trip (crop, threshold at 0.5, paste back), and how fast each runs,
so the choice between them rests on figures.
"""

from __future__ import annotations

import statistics
import time

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import roi_align

from amodal3d.datamodules.crops import CropDataset, collate_crops, crop_to_box, paste_crop_to_image


def _seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of boolean (N,1,H,W) masks (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def crop_ops_report(root: str, split: str, crop_size: int, protocol: str, max_instances: int = 512,
                    device: str | torch.device = "cpu") -> dict:
    """Figures of both crop/paste pairs on the first `max_instances` instances of `split`."""
    ds = CropDataset(root, split, crop_size=crop_size, protocol=protocol)
    n = min(len(ds), int(max_instances))
    batch = collate_crops([ds[i] for i in range(n)])
    amodal = batch["eval_image_amodal"].float().to(device)  # (N,1,H,W)
    boxes = batch["crop_box"].float().to(device)
    h, w = amodal.shape[-2:]
    rois = torch.cat([torch.arange(n, device=device, dtype=boxes.dtype)[:, None], boxes], 1)

    def ours_crop():
        return crop_to_box(amodal, boxes, crop_size)

    def tv_crop():  # aligned=True with one sample per bin: the same sampling points as grid_sample
        return roi_align(amodal, rois, crop_size, spatial_scale=1.0, sampling_ratio=1, aligned=True)

    a, b = ours_crop(), tv_crop()
    crop = (a > 0.5).float()
    back_ours = paste_crop_to_image(crop, boxes, h, w) > 0.5
    back_tv = paste_masks_in_image(crop, boxes, (h, w), padding=1) > 0.5
    truth = amodal > 0.5
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h)
    return {
        "split": split, "instances": n, "crop_size": crop_size, "protocol": protocol,
        "windows_inside_image": int(inside.sum()),
        "crop_mean_abs_diff": float((a - b).abs().mean()),
        "crop_pixels_differing": float(((a > 0.5) != (b > 0.5)).float().mean()),
        "crop_pixels_differing_inside": float(((a > 0.5) != (b > 0.5))[inside].float().mean()) if inside.any()
        else float("nan"),
        "round_trip_iou_ours": float(_iou(back_ours, truth).mean()),
        "round_trip_iou_torchvision": float(_iou(back_tv, truth).mean()),
        "paste_iou_ours_vs_torchvision": float(_iou(back_ours, back_tv).mean()),
        "ms_crop_ours": 1000 * _seconds(ours_crop), "ms_crop_torchvision": 1000 * _seconds(tv_crop),
        "ms_paste_ours": 1000 * _seconds(lambda: paste_crop_to_image(crop, boxes, h, w)),
        "ms_paste_torchvision": 1000 * _seconds(lambda: paste_masks_in_image(crop, boxes, (h, w), padding=1)),
    }


def crop_ops_markdown(r: dict) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    return "\n".join([
        f"{r['instances']} instances of the {r['split']} split, {r['protocol']} crop windows at "
        f"{r['crop_size']} px ({r['windows_inside_image']} windows lie wholly inside their image).",
        "",
        "| | ours (grid_sample) | torchvision |",
        "|---|---|---|",
        f"| crop: ms per batch | {r['ms_crop_ours']:.1f} | {r['ms_crop_torchvision']:.1f} (roi_align) |",
        f"| paste: ms per batch | {r['ms_paste_ours']:.1f} | {r['ms_paste_torchvision']:.1f} (paste_masks_in_image) |",
        f"| round trip IoU vs the amodal mask (%) | {pct(r['round_trip_iou_ours'])} | "
        f"{pct(r['round_trip_iou_torchvision'])} |",
        "",
        f"Crops: mean |ours − roi_align| {r['crop_mean_abs_diff']:.4f}; thresholded pixels that differ "
        f"{pct(r['crop_pixels_differing'])}% (windows inside the image: {pct(r['crop_pixels_differing_inside'])}%). "
        f"Pastes of the same crop: IoU between the two {pct(r['paste_iou_ours_vs_torchvision'])}%.",
    ])

"""Inference on image files: visible masks (given, or detected by step 1) in, amodal
masks out (`make predict`).

Inputs (one or more paths):
  * an image file (PNG/JPEG) `<dir>/<name>.png`, its instances' visible masks in the
    folder `<dir>/<name>/`, one PNG per instance named `<category>[_<anything>].png`
    (category: one of the model's categories, its checkpoint's cfg.data.class_names, by
    name, case-insensitive, a space matching a '_' (the longest start of the file name that
    names one); for a model of the 13 ShapeNet categories also a synset id;
    a mask of two values, 0 and one other (0/1 label masks, 0/255), is "non-zero = on";
    a mask of more grey levels is thresholded at half its range);
  * an image file without a mask folder: step 1 (the `visible` stage, amodal3d.predict.detect)
    detects its instances (score >= 0.5); its amodal box is the crop box of a gt-box model;
    an image with no detection is listed with no annotation;
  * a folder: every PNG/JPEG directly inside it, each with its mask folder or without;
  * a COCO-style JSON: `images` (id, file_name relative to the JSON's folder, optional
    width/height), `categories` (id, name: mapped by name onto the model's categories) and
    `annotations` (image_id, category_id,
    `segmentation` = the visible mask as RLE or polygons, optional `amodal_bbox`
    [x, y, w, h]).
Each instance is cropped exactly like the DataModule crops it under the protocol the
model was trained for (datamodules.crops: square_crop_box, crop_to_box to
loader.crop_size of the model's config). gt-visible models: around the box of the
visible mask, enlarged by loader.visible_crop_margin (an `amodal_bbox` is not read).
gt-box models: around the amodal box when the input gives one (`amodal_bbox`), else
the box of the visible mask, enlarged by loader.crop_margin; then the object's hidden
part can only be found inside that crop. The occluder mask (pixels that may hide the
instance) is, with occluder="unknown", everything outside the instance's visible
mask; with occluder="others", the union of the other instances' visible masks of the
image (what gt-visible models were trained with); "auto" (default) picks "others"
for gt-visible models and "unknown" for gt-box ones.

Outputs under `out`: `masks/<image>/<instance>.png` (amodal masks, 0/255, the visible
mask included), `overlays/<image>.png` (visible part tinted, predicted hidden part
hatched, amodal outline, one colour per instance) and `amodal.json` (COCO style: the
amodal masks as RLE via pycocotools.mask.encode, the score, for detections the visible
RLE and step 1's amodal box, plus an `errors` list); with meshes, `meshes/<image>/
<instance>.obj` (the 3D prior's mesh, pytorch3d's OBJ writer) and its camera in the JSON. A bad input
(missing file, mask size different from its image, unknown category, empty mask)
is reported with its name and skipped; the other inputs are still processed. When no
input can be used, nothing is written and the error names the first bad input.

Modules: inputs (reading and checking the inputs), detect (step 1), crops (what the model is fed),
run (loading the model, the pipeline, predict_files), outputs (PNG, RLE, JSON
writing), overlay (the overlay drawing), throughput (the bench's end-to-end timing).
"""

"""What the bundled models say about a real scan they never saw: pydicom's CT_small.dcm.

    .venv/bin/python benchmarks/real_ct_small.py [--out JSON] [--png PATH]

CT_small.dcm is one 128 × 128 axial CT slice (0.66 mm pixels, 5 mm thick; HU after the
rescale) shipped with pydicom. Each model runs through the same engine as the CLI and
the widgets (the slice is a one-slice volume): the segmenter's volume per structure, the
classifier's probabilities (and where its lesion Grad-CAM peaks), the detector's
detections and its heatmap's maximum. There is no ground truth: this shows how the
phantom-trained models behave on real anatomy, not how accurate they are. ``--png``: the
slice (window −300…500 HU) beside the segmenter's labels over it, ×3.
"""

from __future__ import annotations

import argparse

import numpy as np
from pydicom.data import get_testdata_file

from _common import emit, machine
from napari_medseg.core.explain import gradcam_volume
from napari_medseg.core.inference import classify_volume, detect_lesions, segment_volume
from napari_medseg.core.io import read_volume
from napari_medseg.core.models import load_model
from napari_medseg.core.progress import run_to_completion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--png", help="also write the slice and the segmenter's labels here")
    args = ap.parse_args()
    volume = read_volume(get_testdata_file("CT_small.dcm"))
    arr = volume.array
    result = {"benchmark": "real_ct_small", "shape": list(volume.shape),
              "spacing_mm": [round(float(s), 4) for s in volume.spacing],
              "hu_range": [round(float(np.nanmin(arr)), 1), round(float(np.nanmax(arr)), 1)]}

    seg, seg_card = load_model("segmenter")
    s = run_to_completion(segment_volume(volume, seg, seg_card))
    counts = np.bincount(s.labels.ravel(), minlength=len(s.class_names))
    result["segmenter"] = {"sha256": seg_card["sha256"][:12], "pixels": {
        name: int(n) for name, n in zip(s.class_names, counts) if n}}

    cls, cls_card = load_model("classifier")
    c = run_to_completion(classify_volume(volume, cls, cls_card))
    cam = run_to_completion(gradcam_volume(volume, cls, cls_card, target="lesion"))
    peak = np.unravel_index(int(np.argmax(cam.maps[0])), cam.maps[0].shape)
    result["classifier"] = {"sha256": cls_card["sha256"][:12],
                            "predicted": c.predicted_names()[0],
                            "probabilities": {n: round(float(p), 4)
                                              for n, p in zip(c.class_names, c.probabilities[0])},
                            "lesion_gradcam_peak_yx": [int(peak[0]), int(peak[1])],
                            "label_at_gradcam_peak": s.class_names[int(s.labels[0][peak])]}

    det, det_card = load_model("detector")
    d = run_to_completion(detect_lesions(volume, det, det_card))
    result["detector"] = {"sha256": det_card["sha256"][:12],
                          "card_threshold": det_card.get("peak_threshold"),
                          "heatmap_max": round(float(d.heatmap.max()), 4),
                          "detections": [{"y": round(p.y, 1), "x": round(p.x, 1),
                                          "score": round(p.score, 4),
                                          "diameter_mm": round(p.diameter_mm, 1),
                                          "label_there": s.class_names[int(s.labels[0][
                                              int(round(p.y)), int(round(p.x))])]}
                                         for p in d.detections]}
    result["machine"] = machine()
    if args.png:
        write_png(args.png, arr[0], s.labels[0])
    emit(result, args.out)


def write_png(path: str, image: np.ndarray, labels: np.ndarray, zoom: int = 3) -> None:
    from skimage import io

    grey = np.clip((image + 300.0) / 800.0, 0, 1)[..., None].repeat(3, axis=2)
    colours = np.array([[0, 0, 0], [90, 90, 90], [200, 80, 40], [150, 50, 200], [40, 200, 40],
                        [40, 200, 200], [240, 240, 240], [220, 30, 30], [255, 255, 0]]) / 255.0
    overlay = np.where(labels[..., None] > 0, 0.5 * grey + 0.5 * colours[labels], grey)
    both = np.concatenate([grey, overlay], axis=1).repeat(zoom, 0).repeat(zoom, 1)
    io.imsave(path, (both * 255).astype(np.uint8), check_contrast=False)


if __name__ == "__main__":
    main()

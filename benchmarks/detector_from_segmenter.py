"""Lesion detection from the segmenter's lesion probability, measured on VALIDATION phantoms.

    .venv/bin/python benchmarks/detector_from_segmenter.py [--seeds 12] [--sigma-mm 2]
        [--segmenter segmenter] [--out JSON]

The segmenter is trained on every lesion voxel (Dice + cross-entropy, balanced
sampling); the detector on centre heatmaps. Does the segmenter's lesion output find
lesions the detector misses? Arms, each scored like ``detector_tta.py`` (sensitivity for
lesions ≥ 5 mm at 0.25 / 0.5 / 1 / 2 / 4 false positives per volume, the card's NMS):

- ``detector``: the bundled detector's heatmap (the product);
- ``segmenter``: the segmenter's lesion softmax, resized onto the detector's grid and
  smoothed in-plane (Gaussian ``--sigma-mm``) so a plateau of certain voxels gets one
  peak near its centre, used as the heatmap (diameters read from the detector's map);
- ``components``: 3D connected components of the segmenter's lesion labels; score = the
  component's largest lesion probability, centre = its probability-weighted centroid;
- ``mean`` / ``max`` / ``geomean``: the detector heatmap and the ``segmenter`` map merged.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from _common import machine
from detector_multiscale import matched_peaks, report, sensitivity_table, volume_record
from detector_tta import FLIPS, maps
from napari_medseg.core.inference import ModelGridSlices, prepare_model, resize_yx
from napari_medseg.core.models import load_model
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom
from segmenter_inference_variants import LESION, model_grid_logits, native_probabilities


def lesion_probability(logits: torch.Tensor, size_yx) -> np.ndarray:
    """(z, h, w) lesion softmax of model-grid ``logits`` resized bilinearly to ``size_yx``."""
    return native_probabilities(logits, size_yx)[:, LESION].numpy()


def components(lesion_prob: np.ndarray, ph) -> dict:
    """Connected lesion components (argmax-free: probability ≥ 0.5) as detections."""
    mask = lesion_prob >= 0.5
    lab, n = ndimage.label(mask)
    dets = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        p = np.where(lab[sl] == i, lesion_prob[sl], 0.0)
        c = ndimage.center_of_mass(p)
        dets.append({"z": sl[0].start + c[0], "y": sl[1].start + c[1], "x": sl[2].start + c[2],
                     "score": float(p.max())})
    return volume_record(dets, ph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12, help="validation phantoms")
    ap.add_argument("--sigma-mm", type=float, default=2.0,
                    help="in-plane smoothing of the lesion map")
    ap.add_argument("--segmenter", default="segmenter", help="segmenter name or card path")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    det, det_card = load_model("detector")
    seg, seg_card = load_model(args.segmenter)
    fast = prepare_model(det)
    ways = ("detector", "segmenter", "components", "mean", "max", "geomean")
    records = {w: [] for w in ways}
    for seed in range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + args.seeds):
        ph = make_phantom(seed, eval_settings(seed))
        vol = ph.volume
        heat, size = maps(fast, ModelGridSlices(vol, det_card, det.in_slices // 2), vol.shape[0],
                          FLIPS["none"])
        logits = model_grid_logits(vol, seg, seg_card)
        on_det = lesion_probability(logits, heat.shape[1:])
        step_mm = vol.spacing[1] * vol.shape[1] / heat.shape[1]
        sigma = args.sigma_mm / step_mm
        smooth = ndimage.gaussian_filter(on_det, (0, sigma, sigma))
        records["detector"].append(matched_peaks(heat, size, ph, det_card))
        records["segmenter"].append(matched_peaks(smooth, size, ph, det_card))
        records["components"].append(components(lesion_probability(logits, vol.shape[1:]), ph))
        records["mean"].append(matched_peaks((heat + smooth) / 2, size, ph, det_card))
        records["max"].append(matched_peaks(np.maximum(heat, smooth), size, ph, det_card))
        records["geomean"].append(matched_peaks(np.sqrt(heat * smooth), size, ph, det_card))
        print(f"seed {seed}: {len(ph.lesions)} lesions", flush=True)
    report({"benchmark": "detector_from_segmenter", "segmenter": args.segmenter,
            "sigma_mm": args.sigma_mm, **sensitivity_table(records, args.seeds),
            "machine": machine()}, args.out)


if __name__ == "__main__":
    main()

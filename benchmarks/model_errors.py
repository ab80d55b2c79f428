"""Where the bundled classifier and detector go wrong, on 12 validation phantoms.

    .venv/bin/python benchmarks/model_errors.py [--seeds 12]     # ~1 min, one JSON object

- classifier: the share of NORMAL slices called "lesion", by their distance (in slices)
  to the nearest lesion slice. If the model saw lesions, the share would not depend on
  that distance; if it learnt "slices at the level of the liver often hold a lesion",
  it falls with it. For the same normal slices, the largest share of a lesion that the
  phantom's z blur carries onto them (the lesion mask blurred like the image): near 0
  means the lesion does not show there at all, so calling them "lesion" is the model's
  error, not a label that disagrees with the image.
- detector: for every lesion ≥ 5 mm, its matched score (0 when missed) next to a
  matched-filter signal-to-noise ratio |contrast| · √(lesion voxels) / noise: a lesion
  with a high ratio is plainly visible, so a low score there is the model's fault, not
  the image's.
- detector false positives scoring >= 0.5: what the phantom has where they sit (a
  "lesion" false positive is a second peak on a lesion already found).
  ``--nms-radius-fraction F`` overrides the card's (0: the 6 mm NMS alone).
- segmenter: each lesion's own Dice (the prediction within 3 voxels of it against its
  voxels), averaged by lesion diameter and by its contrast-to-noise ratio |contrast| /
  noise (one voxel's), with the label the model gave the lesion voxels it missed and the
  lesion-voxel totals: how much of the pooled lesion Dice small, and faint, lesions cost.
  ``--segmenter CARD`` scores another segmenter.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from scipy import ndimage

from napari_medseg.core import evaluation as ev
from napari_medseg.core.models.registry import load_model
from napari_medseg.core.phantom import LABEL_NAMES
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=12, help="validation phantoms")
    ap.add_argument("--nms-radius-fraction", type=float, default=None,
                    help="override the detector card's nms_radius_fraction")
    ap.add_argument("--segmenter", default="segmenter", help="segmenter name or card path")
    args = ap.parse_args()
    seeds = list(range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + args.seeds))
    det, dcard = load_model("detector")
    cls, ccard = load_model("classifier")
    seg, scard = load_model(args.segmenter)
    if args.nms_radius_fraction is not None:
        dcard = {**dcard, "nms_radius_fraction": args.nms_radius_fraction}
    fp_on = {}  # label name under a false positive scoring >= 0.5 → count
    per_lesion_dice = []  # (diameter mm, Dice, contrast-to-noise, voxels)
    missed_as: dict[str, int] = {}  # label given to lesion voxels the segmenter missed
    lesion_voxels = np.zeros(3)  # predicted ∩ true, predicted, true
    called_lesion = np.zeros(7)
    normal_slices = np.zeros(7)
    blurred_share = []  # per normal slice 1–2 slices from a lesion
    lesions = []
    for s in seeds:
        settings = eval_settings(s)
        ph = make_phantom(s, settings)
        spacing = ph.volume.spacing
        pred, _ = ev.predict_classifier(cls, ccard, ph.volume)
        seg_labels = ev.predict_segmenter(seg, scard, ph.volume)
        seg_lesion = seg_labels == 8
        true_lesion = ph.labels == 8
        lesion_voxels += [(seg_lesion & true_lesion).sum(), seg_lesion.sum(), true_lesion.sum()]
        for v, n in zip(*np.unique(seg_labels[true_lesion & ~seg_lesion], return_counts=True)):
            missed_as[LABEL_NAMES[int(v)]] = missed_as.get(LABEL_NAMES[int(v)], 0) + int(n)
        comp, _ = ndimage.label(true_lesion)
        for les in ph.lesions:
            k = comp[tuple(int(round(v)) for v in les.center_zyx)]
            if k:
                mask = comp == k
                near = seg_lesion & ndimage.binary_dilation(mask, iterations=3)
                per_lesion_dice.append((2 * les.radius_mm,
                                        2 * float((near & mask).sum()) / float(near.sum() + mask.sum()),
                                        abs(les.contrast_hu) / settings.noise_hu, int(mask.sum())))
        lesion_z = np.flatnonzero(ph.slice_classes == 2)
        sigma = [b / sp if b / sp > 0.05 else 0.0 for b, sp in zip(ph.blur_sigma_mm, spacing)]
        shown = ndimage.gaussian_filter((ph.labels == 8).astype(np.float32), sigma,
                                        mode="nearest", truncate=3.0)  # as the phantom blurs
        for z in np.flatnonzero(ph.slice_classes == 1):
            gap = int(np.abs(lesion_z - z).min()) if len(lesion_z) else 99
            if gap <= 2:
                blurred_share.append(float(shown[z].max()))
            b = min(gap, 6)
            normal_slices[b] += 1
            called_lesion[b] += pred[z] == 2
        dets, matched = ev.match_phantom_lesions(
            next(iter(ev.predict_detector(det, dcard, ph.volume, threshold=0.05).values())), ph)
        best = {j: d["score"] for d, j in zip(dets, matched) if j >= 0}  # one per lesion
        for d, j in zip(dets, matched):
            if j < 0 and d["score"] >= 0.5:
                name = LABEL_NAMES[int(ph.labels[tuple(int(round(d[k])) for k in "zyx")])]
                fp_on[name] = fp_on.get(name, 0) + 1
        voxel_mm3 = float(np.prod(spacing))
        for j, les in enumerate(ph.lesions):
            if 2 * les.radius_mm < ev.MIN_DIAMETER_MM:
                continue
            n_vox = 4 / 3 * math.pi * les.radius_mm ** 3 / voxel_mm3
            lesions.append({"seed": s, "diameter_mm": round(2 * les.radius_mm, 1),
                            "contrast_hu": round(les.contrast_hu, 1), "noise_hu": round(settings.noise_hu, 1),
                            "snr": round(abs(les.contrast_hu) * math.sqrt(n_vox) / settings.noise_hu, 1),
                            "score": round(best.get(j, 0.0), 3)})
    bins = ["1", "2", "3", "4", "5", ">=6"]
    by_snr = {}
    for lo, hi in ((0, 10), (10, 30), (30, 100), (100, math.inf)):
        sel = [r for r in lesions if lo <= r["snr"] < hi]
        by_snr[f"{lo}-{hi}"] = {"lesions": len(sel),
                                "found_at_card_threshold": sum(r["score"] >= dcard["peak_threshold"] for r in sel),
                                "median_score": round(float(np.median([r["score"] for r in sel])), 3) if sel else None}
    def dice_bins(key: int, edges, unit: str) -> dict:
        out = {}
        for lo, hi in edges:
            sel = [r for r in per_lesion_dice if lo <= r[key] < hi]
            out[f"{lo}-{hi}{unit}"] = {
                "lesions": len(sel),
                "mean_dice": round(float(np.mean([r[1] for r in sel])), 3) if sel else None,
                "share_of_lesion_voxels": round(sum(r[3] for r in sel) / max(lesion_voxels[2], 1), 3)}
        return out

    by_size = dice_bins(0, ((0, 5), (5, 10), (10, 20), (20, 60)), " mm")
    by_cnr = dice_bins(2, ((0, 0.5), (0.5, 1), (1, 2), (2, math.inf)), "")
    # of the lesions >= 10 mm: Dice by contrast-to-noise alone, size held out of the way
    large = [r for r in per_lesion_dice if r[0] >= 10]
    large_by_cnr = {f"{lo}-{hi}": round(float(np.mean([r[1] for r in large if lo <= r[2] < hi])), 3)
                    if any(lo <= r[2] < hi for r in large) else None
                    for lo, hi in ((0, 0.5), (0.5, 1), (1, 2), (2, math.inf))}
    print(json.dumps({
        "seeds": [seeds[0], seeds[-1]],
        "segmenter": args.segmenter,
        "segmenter_lesion_dice_pooled": round(2 * lesion_voxels[0] / max(lesion_voxels[1] + lesion_voxels[2], 1), 3),
        "segmenter_lesion_voxels_predicted_vs_true": [int(lesion_voxels[1]), int(lesion_voxels[2])],
        "segmenter_missed_lesion_voxels_labelled": missed_as,
        "segmenter_lesion_dice_by_diameter": by_size,
        "segmenter_lesion_dice_by_contrast_to_noise": by_cnr,
        "segmenter_lesions_ge_10mm_dice_by_contrast_to_noise": large_by_cnr,
        "classifier_normal_called_lesion_by_slices_to_nearest_lesion": {
            b: {"normal_slices": int(normal_slices[i + 1]),
                "called_lesion": round(float(called_lesion[i + 1] / max(normal_slices[i + 1], 1)), 3)}
            for i, b in enumerate(bins)},
        "normal_slices_1_to_2_from_a_lesion_blurred_lesion_share": {
            "slices": len(blurred_share), "max": round(max(blurred_share, default=0.0), 4),
            "over_0.1": sum(v > 0.1 for v in blurred_share)},
        "detector_by_snr": by_snr,
        "detector_nms_radius_fraction": dcard.get("nms_radius_fraction", 0.0),
        "detector_false_positives_ge_0.5_by_label_under_them": fp_on,
        "detector_card_threshold": dcard["peak_threshold"],
        "detector_lesions_ge_5mm": lesions,
    }))


if __name__ == "__main__":
    main()

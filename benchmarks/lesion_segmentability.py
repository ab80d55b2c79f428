"""How well could a generous local observer segment each lesion? A yardstick for lesion Dice.

    .venv/bin/python benchmarks/lesion_segmentability.py [--seeds 12] [--validation] [--model]

The segmenter target asks for Dice >= 0.90 on every structure, the lesion included. For
each lesion of each phantom this script builds an ORACLE observer from the phantom
itself: it knows the image without the lesion exactly (the same phantom drawn with no
lesion and no noise: texture, nonuniformity and blur as the image has them; the noise
is the same draw either way, so the difference is exactly the blurred lesion plus the
noise), the lesion's contrast (sign and size), its host organ, and where it is. It
smooths the signed difference with a Gaussian of sigma mm (the same in every axis),
calls "lesion" where that exceeds half the contrast, inside the host organ and the
lesion and within 5 mm of the lesion, and keeps the sigma in 0-4 mm that gives that
lesion its best Dice ("oracle"). "oracle_any_threshold" may also pick the threshold,
0.3-0.7 of the contrast, per lesion (with the truth in hand: more generous still).

What it does not have is a shape prior: it decides each voxel from the smoothed
evidence around it. A network trained on ellipsoids could do better than it on a large
faint lesion by fitting the shape; but it knows far more than any network (the
lesion-free image, the contrast, the place, the best smoothing per lesion), so a lesion
it cannot segment gives a network only its shape to go on. Read the figures as what
local evidence allows, not as a bound.

Reported: pooled lesion Dice (as ``napari-medseg evaluate`` pools), and per-lesion Dice by
contrast-to-noise |contrast| / noise (one voxel's). ``--model`` also runs the bundled
segmenter (or ``--segmenter CARD``) and reports its Dice for the same lesions (within 3
voxels of each) beside the oracle's. Default: the evaluation seeds 900000-900011, on
which the segmenter's card reports its held-out Dice (nothing is chosen with this
script); ``--validation`` uses 800000-800011.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import ndimage

from _common import emit
from napari_medseg.core import evaluation as ev
from napari_medseg.core.models.registry import load_model
from napari_medseg.core.phantom import LABEL_NAMES, LESION_LABEL, generate_phantom
from napari_medseg.core.training import EVAL_SEEDS, VALIDATION_SEEDS, eval_settings, make_phantom

SIGMAS_MM = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
REACH_MM = 5.0
CNR_BINS = ((0, 0.5), (0.5, 1), (1, 2), (2, math.inf))
#: the oracle's decision rules: threshold fractions of the contrast it may pick from
RULES = {"oracle": (0.5,), "oracle_any_threshold": (0.3, 0.4, 0.5, 0.6, 0.7)}
LABEL_OF = {name: value for value, name in LABEL_NAMES.items()}


def lesion_free_noise_free(seed: int, settings) -> np.ndarray:
    s = settings
    return generate_phantom(s.shape, s.spacing, seed, noise_hu=0.0, n_lesions=0,
                            contrast_scale=s.contrast_scale,
                            lesion_radius_mm=s.lesion_radius_mm).volume.array


def oracle_lesion(diff: np.ndarray, labels: np.ndarray, mask: np.ndarray, host: int,
                  contrast: float, spacing) -> dict[str, dict[str, float]]:
    """The oracle's best segmentation of one lesion under each rule of :data:`RULES`:
    {rule: {sigma_mm, threshold (fraction of the contrast), tp, predicted}}."""
    reach = [int(math.ceil(REACH_MM / s)) + 1 for s in spacing]
    pad = [int(math.ceil(3 * max(SIGMAS_MM) / s)) + 1 for s in spacing]
    idx = np.argwhere(mask)
    lo = [max(0, int(i) - r - p) for i, r, p in zip(idx.min(0), reach, pad)]
    hi = [min(n, int(i) + r + p + 1) for i, r, p, n in zip(idx.max(0), reach, pad, mask.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    m = mask[box]
    near = ndimage.distance_transform_edt(~m, sampling=spacing) <= REACH_MM
    allowed = near & ((labels[box] == host) | m)
    signed = np.sign(contrast) * diff[box]
    best = {rule: (-1.0, {}) for rule in RULES}
    for sigma in SIGMAS_MM:
        smooth = ndimage.gaussian_filter(signed, [sigma / s for s in spacing], mode="nearest") \
            if sigma else signed
        for fraction in sorted(set(f for fs in RULES.values() for f in fs)):
            pred = allowed & (smooth > abs(contrast) * fraction)
            tp, npred = int((pred & m).sum()), int(pred.sum())
            dice = 2 * tp / (npred + m.sum())
            for rule, fractions in RULES.items():
                if fraction in fractions and dice > best[rule][0]:
                    best[rule] = (dice, {"sigma_mm": sigma, "threshold": fraction, "tp": tp,
                                         "predicted": npred, "dice": round(dice, 3)})
    return {rule: found for rule, (_, found) in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--validation", action="store_true", help="seeds 800000+ instead of 900000+")
    ap.add_argument("--model", action="store_true", help="also score the segmenter on the same lesions")
    ap.add_argument("--segmenter", default="segmenter", help="with --model: name or card path")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    first = VALIDATION_SEEDS[0] if args.validation else EVAL_SEEDS[0]
    seeds = list(range(first, first + args.seeds))
    seg = load_model(args.segmenter) if args.model else None
    rows = []
    for s in seeds:
        settings = eval_settings(s)
        ph = make_phantom(s, settings)
        diff = ph.volume.array - lesion_free_noise_free(s, settings)
        comp, _ = ndimage.label(ph.labels == LESION_LABEL)
        predicted = ev.predict_segmenter(*seg, ph.volume) == LESION_LABEL if seg else None
        for les in ph.lesions:
            k = comp[tuple(int(round(v)) for v in les.center_zyx)]
            if not k:
                continue
            mask = comp == k
            ntrue = int(mask.sum())
            row = {"seed": s, "diameter_mm": round(2 * les.radius_mm, 1), "organ": les.organ,
                   "contrast_hu": round(les.contrast_hu, 1), "noise_hu": round(settings.noise_hu, 1),
                   "cnr": round(abs(les.contrast_hu) / settings.noise_hu, 2), "voxels": ntrue,
                   **oracle_lesion(diff, ph.labels, mask, LABEL_OF[les.organ], les.contrast_hu,
                                   ph.volume.spacing)}
            if predicted is not None:
                near = predicted & ndimage.binary_dilation(mask, iterations=3)
                mtp, mp = int((near & mask).sum()), int(near.sum())
                row["model"] = {"tp": mtp, "predicted": mp, "dice": round(2 * mtp / (mp + ntrue), 3)}
            rows.append(row)

    def pooled(sel, who):
        tp = sum(r[who]["tp"] for r in sel)
        return round(2 * tp / max(sum(r[who]["predicted"] + r["voxels"] for r in sel), 1), 3)

    who = [*RULES, "model"] if seg else list(RULES)
    by_cnr = {}
    for lo, hi in CNR_BINS:
        sel = [r for r in rows if lo <= r["cnr"] < hi]
        by_cnr[f"{lo}-{hi}"] = {"lesions": len(sel),
                                "share_of_lesion_voxels": round(sum(r["voxels"] for r in sel)
                                                                / max(sum(r["voxels"] for r in rows), 1), 3),
                                **{f"{w}_pooled_dice": pooled(sel, w) if sel else None for w in who}}
    emit({
        "benchmark": "lesion_segmentability",
        "seeds": [seeds[0], seeds[-1]],
        "observer": {"sigmas_mm": list(SIGMAS_MM), "reach_mm": REACH_MM,
                     "threshold_fractions_of_contrast": RULES, "region": "host organ or lesion"},
        "segmenter": args.segmenter if seg else None,
        "lesions": len(rows),
        **{f"{w}_pooled_lesion_dice": pooled(rows, w) for w in who},
        "by_contrast_to_noise": by_cnr,
        "per_lesion": rows,
    }, args.out)


if __name__ == "__main__":
    main()

"""Do the explanations point at the lesion? Measured on phantoms, trained vs randomised models.

    .venv/bin/python benchmarks/explain_sanity.py [--seeds 8] [--validation] [--out JSON]
        [--cam-method gradcam,hirescam] [--classifier CARD]

For every slice through a lesion (lesion area ≥ 20 voxels) of ``--seeds`` phantoms
(held-out seeds 900000+; ``--validation``: 800000+, where methods are chosen):

- **pointing game**: is the map's maximum on the slice within 5 mm of the lesion?
  (the classifier's map lives on a grid of 12 mm cells, the detector's on 1 mm ones);
- **inside / body**: the map's mean inside the lesion over its mean over the rest of the
  body (1 = no preference);

for the classifier's class-activation map of the "lesion" class (each ``--cam-method``),
the detector's centre heatmap and the segmenter's MC-dropout entropy; each also for a
model with re-initialised weights (model-randomisation check: a map that does not change
explains the image, not the model). Printed and in the JSON, per method and model:
the pointing-game hit rate and the median inside/body ratio.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from _common import emit, machine
from napari_medseg.core.explain import gradcam_volume, randomised_copy, segmentation_uncertainty
from napari_medseg.core.inference import detect_lesions
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import LESION_LABEL
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import EVAL_SEEDS, VALIDATION_SEEDS, eval_settings, make_phantom

TOLERANCE_MM = 5.0
MIN_LESION_VOXELS = 20


def slice_scores(maps: np.ndarray, labels: np.ndarray, spacing_yx) -> list[tuple[bool, float]]:
    """(pointing-game hit, inside/body ratio) for every lesion slice of a (z, y, x) map."""
    lesion = labels == LESION_LABEL
    sy, sx = spacing_yx
    out = []
    for z in np.flatnonzero(lesion.sum(axis=(1, 2)) >= MIN_LESION_VOXELS):
        m, les = maps[z], lesion[z]
        near = ndimage.distance_transform_edt(~les, sampling=(sy, sx)) <= TOLERANCE_MM
        body = (labels[z] > 0) & ~near
        if not body.any() or not np.isfinite(m).all():
            continue
        hit = bool(near.flat[int(np.argmax(m))])
        out.append((hit, float(m[les].mean() / max(m[body].mean(), 1e-12))))
    return out


def summarise(rows: list[tuple[bool, float]]) -> dict:
    return {"slices": len(rows),
            "pointing_game": round(float(np.mean([h for h, _ in rows])), 3) if rows else None,
            "inside_over_body_median":
                round(float(np.median([r for _, r in rows])), 2) if rows else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8, help="phantoms")
    ap.add_argument("--validation", action="store_true",
                    help="validation seeds (choose methods here)")
    ap.add_argument("--cam-method", default="gradcam,hirescam", help="comma-separated CAM methods")
    ap.add_argument("--classifier", default="classifier", help="classifier name or card path")
    ap.add_argument("--skip-uncertainty", action="store_true", help="the slowest arm (8 passes)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    first = (VALIDATION_SEEDS if args.validation else EVAL_SEEDS)[0]
    seeds = list(range(first, first + args.seeds))
    cls, cls_card = load_model(args.classifier)
    det, det_card = load_model("detector")
    seg, seg_card = load_model("segmenter")
    methods = [m.strip() for m in args.cam_method.split(",") if m.strip()]
    models = {"trained": (cls, det, seg),
              "randomised": tuple(map(randomised_copy, (cls, det, seg)))}
    rows: dict[str, list] = {}
    for seed in seeds:
        ph = make_phantom(seed, eval_settings(seed))
        vol, labels = ph.volume, ph.labels
        if not (labels == LESION_LABEL).any():
            continue
        for which, (c, d, s) in models.items():
            for method in methods:
                cam = run_to_completion(gradcam_volume(vol, c, cls_card, target="lesion",
                                                       method=method))
                rows.setdefault(f"classifier {method} {which}", []).extend(
                    slice_scores(cam.maps, labels, vol.spacing[1:]))
            heat = run_to_completion(detect_lesions(vol, d, det_card)).heatmap_on_input_grid()
            rows.setdefault(f"detector heatmap {which}", []).extend(
                slice_scores(heat, labels, vol.spacing[1:]))
            if not args.skip_uncertainty:
                unc = run_to_completion(segmentation_uncertainty(vol, s, seg_card, samples=4))
                rows.setdefault(f"segmenter entropy {which}", []).extend(
                    slice_scores(unc.entropy, labels, vol.spacing[1:]))
        print(f"seed {seed}: {int((labels == LESION_LABEL).any(axis=(1, 2)).sum())} lesion slices",
              flush=True)
    result = {"benchmark": "explain_sanity",
              "set": "validation" if args.validation else "evaluation",
              "seeds": [seeds[0], seeds[-1]], "classifier": args.classifier,
              "tolerance_mm": TOLERANCE_MM, "min_lesion_voxels": MIN_LESION_VOXELS,
              "maps": {k: summarise(v) for k, v in rows.items()}, "machine": machine()}
    for k, v in result["maps"].items():
        print(f"{k:40s} pointing {v['pointing_game']}  inside/body {v['inside_over_body_median']}"
              f"  ({v['slices']} slices)", flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()

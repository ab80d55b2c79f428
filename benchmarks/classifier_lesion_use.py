"""Does the slice classifier look at the lesion? A counterfactual test on phantoms.

    .venv/bin/python benchmarks/classifier_lesion_use.py [CARD ...] [--seeds 8]
        [--validation] [--out JSON]

Every phantom is drawn twice from its seed: as is, and without its lesions
(``generate_phantom(..., n_lesions=0)``: the same anatomy and the same noise, the images
differ only where a lesion was). For every slice through a lesion (≥ 20 lesion voxels),
the classifier's P(lesion) on the slice and on its lesion-free twin: a classifier that
uses the lesion gives the twin a much lower P(lesion); one that goes by the slice's level
in the body gives both the same. Also per model: balanced accuracy on the same phantoms,
and the lesion Grad-CAM's pointing game on the lesion slices (its maximum within 5 mm of
the lesion; ``explain_sanity.py``). Held-out seeds (900000+) by default; ``--validation``
uses 800000+, where variants are chosen.
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import emit, machine
from explain_sanity import slice_scores
from napari_medseg.core.evaluation import balanced_accuracy, confusion_matrix
from napari_medseg.core.explain import gradcam_volume
from napari_medseg.core.inference import classify_volume
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import LESION_LABEL
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import EVAL_SEEDS, VALIDATION_SEEDS, eval_settings, make_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cards", nargs="*", default=["classifier"],
                    help="classifier names or card paths")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--validation", action="store_true")
    ap.add_argument("--cam-method", default="gradcam")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    first = (VALIDATION_SEEDS if args.validation else EVAL_SEEDS)[0]
    seeds = list(range(first, first + args.seeds))
    pairs = []
    for seed in seeds:
        settings = eval_settings(seed)
        pairs.append((make_phantom(seed, settings), make_phantom(seed, settings, n_lesions=0)))
    rows = {}
    for path in args.cards:
        model, card = load_model(path)
        lesion = card["classes"].index("lesion")
        p_with, p_twin, cam_rows = [], [], []
        conf = np.zeros((3, 3), dtype=np.int64)
        for ph, twin in pairs:
            res = run_to_completion(classify_volume(ph.volume, model, card))
            conf += confusion_matrix(ph.slice_classes, res.predicted, 3)
            zs = (ph.labels == LESION_LABEL).sum(axis=(1, 2)) >= 20
            if not zs.any():
                continue
            p_with += res.probabilities[zs, lesion].tolist()
            p_twin += run_to_completion(classify_volume(twin.volume, model, card)).probabilities[
                zs, lesion].tolist()
            cam = run_to_completion(gradcam_volume(ph.volume, model, card, target="lesion",
                                                   method=args.cam_method))
            cam_rows += slice_scores(cam.maps, ph.labels, ph.volume.spacing[1:])
        a, b = np.array(p_with), np.array(p_twin)
        rows[path] = {
            "sha256": card["sha256"][:12], "arch_params": card["arch_params"],
            "balanced_accuracy": round(balanced_accuracy(conf), 4),
            "lesion_slices": int(a.size),
            "p_lesion_mean": {"slice": round(float(a.mean()), 3),
                              "twin": round(float(b.mean()), 3)},
            "called_lesion": {"slice": round(float((a > 0.5).mean()), 3),
                              "twin": round(float((b > 0.5).mean()), 3)},
            "twin_lower_share": round(float((b < a).mean()), 3),
            f"{args.cam_method}_pointing_game": round(float(np.mean([h for h, _ in cam_rows])), 3),
        }
        r = rows[path]
        print(f"{path}: BA {r['balanced_accuracy']}, P(lesion) slice {r['p_lesion_mean']['slice']}"
              f" twin {r['p_lesion_mean']['twin']}, called lesion {r['called_lesion']}, "
              f"pointing {r[f'{args.cam_method}_pointing_game']}", flush=True)
    emit({"benchmark": "classifier_lesion_use",
          "set": "validation" if args.validation else "evaluation",
          "seeds": [seeds[0], seeds[-1]], "models": rows, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()

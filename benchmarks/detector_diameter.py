"""How well the detector's diameter matches the lesion's, by lesion size.

    .venv/bin/python benchmarks/detector_diameter.py [--seeds 40] [--heldout] [--out JSON]

Each detection at the card's threshold that hits a phantom lesion (``match_phantom_lesions``)
gives a pair: the lesion's diameter (twice its equivalent-sphere radius) and the one the
detector reports (the ring Detect draws and its "NN mm" label). Per size bin: the count,
the means, the median ratio and the mean absolute error. Validation seeds (800000+) by
default; ``--heldout`` uses the evaluation seeds (900000+).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import emit, machine
from napari_medseg.core.evaluation import match_phantom_lesions
from napari_medseg.core.inference import card_peak_threshold, detect_lesions
from napari_medseg.core.models import load_model
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import EVAL_SEEDS, VALIDATION_SEEDS, eval_settings, make_phantom

BINS_MM = ((5.0, 10.0), (10.0, 15.0), (15.0, 20.0), (20.0, 40.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, card = load_model("detector")
    threshold = card_peak_threshold(card)
    first = (EVAL_SEEDS if args.heldout else VALIDATION_SEEDS)[0]
    seeds = list(range(first, first + args.seeds))
    t0 = time.perf_counter()
    pairs = []
    for seed in seeds:
        phantom = make_phantom(seed, eval_settings(seed))
        result = run_to_completion(detect_lesions(phantom.volume, model, card))
        found = [{"z": d.z, "y": d.y, "x": d.x, "score": d.score, "diameter_mm": d.diameter_mm}
                 for d in result.detections if d.score >= threshold]
        found, hits = match_phantom_lesions(found, phantom)
        pairs += [(2.0 * phantom.lesions[h].radius_mm, d["diameter_mm"])
                  for d, h in zip(found, hits) if h >= 0]
    p = np.asarray(pairs, dtype=float).reshape(-1, 2)
    bins = []
    for low, high in BINS_MM:
        sel = (p[:, 0] >= low) & (p[:, 0] < high)
        if sel.any():
            bins.append({"true_mm": [low, high], "n": int(sel.sum()),
                         "true_mean_mm": round(float(p[sel, 0].mean()), 2),
                         "reported_mean_mm": round(float(p[sel, 1].mean()), 2),
                         "median_ratio": round(float(np.median(p[sel, 1] / p[sel, 0])), 3),
                         "mae_mm": round(float(np.abs(p[sel, 1] - p[sel, 0]).mean()), 2)})
            b = bins[-1]
            print(f"{low:g}-{high:g} mm: {b['n']} lesions, reported {b['reported_mean_mm']} "
                  f"for {b['true_mean_mm']} (median ratio {b['median_ratio']}, MAE "
                  f"{b['mae_mm']} mm)", flush=True)
    emit({"benchmark": "detector_diameter", "model_sha256": card["sha256"][:12],
          "set": "evaluation" if args.heldout else "validation", "seeds": [seeds[0], seeds[-1]],
          "threshold": threshold, "matched": int(len(p)),
          "mae_mm": round(float(np.abs(p[:, 1] - p[:, 0]).mean()), 2) if len(p) else None,
          "bins": bins, "pairs_true_reported_mm": [[round(a, 2), round(b, 2)] for a, b in p],
          "seconds": round(time.perf_counter() - t0, 1), "machine": machine()}, args.out)


if __name__ == "__main__":
    main()

"""The slice classifier on wide fields of view, with and without the body window.

    .venv/bin/python benchmarks/classifier_field_of_view.py [--seeds 8] [--heldout]
        [--out JSON]

The phantom's body is the same size (about 133 × 165 mm) on any grid; the training
phantoms lie in fields of 185–245 mm. A real abdominal CT is reconstructed over
350–500 mm. Each phantom is drawn on grids of several fields of view (same seeds) and
classified twice: on the whole slice, and on the window :func:`core.inference.body_window`
cuts (the body's extent plus 10 mm, widened to 260 mm), which ``classify_volume`` uses.
Balanced accuracy and lesion-slice recall per field. Validation seeds (800000+) by
default, where the window was chosen; ``--heldout`` uses the evaluation seeds (900000+).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import emit, machine
from napari_medseg.core import inference
from napari_medseg.core.evaluation import balanced_accuracy, confusion_matrix
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import generate_phantom
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import EVAL_SEEDS, VALIDATION_SEEDS

#: (pixels per side, pixel size mm): 384, 461, 224 and 218 mm fields
GRIDS = ((512, 0.75), (512, 0.9), (320, 0.7), (256, 0.85))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    first = (EVAL_SEEDS if args.heldout else VALIDATION_SEEDS)[0]
    seeds = list(range(first, first + args.seeds))
    model, card = load_model("classifier")
    whole_slice = lambda volume, _card: (volume, None)  # noqa: E731 (the window off)
    windowed = inference.body_view
    t0 = time.perf_counter()
    rows = []
    for side, pixel in GRIDS:
        conf = {"whole_slice": np.zeros((3, 3), np.int64), "body_window": np.zeros((3, 3), np.int64)}
        windows = []
        for seed in seeds:
            ph = generate_phantom((args.slices, side, side), (2.5, pixel, pixel), seed=seed)
            window = inference.body_window(ph.volume, card)
            windows.append(None if window is None else
                           [round((w.stop - w.start) * pixel, 1) for w in window])
            for name, view in (("whole_slice", whole_slice), ("body_window", windowed)):
                inference.body_view = view
                try:
                    result = run_to_completion(inference.classify_volume(ph.volume, model, card))
                finally:
                    inference.body_view = windowed
                conf[name] += confusion_matrix(ph.slice_classes, result.predicted, 3)
        row = {"grid": side, "pixel_mm": pixel, "field_mm": round(side * pixel, 1),
               "window_mm": windows}
        for name, c in conf.items():
            row[name] = {"balanced_accuracy": round(balanced_accuracy(c), 4),
                         "lesion_recall": round(float(c[2, 2] / max(c[2].sum(), 1)), 4),
                         "confusion": c.tolist()}
        rows.append(row)
        print(f"field {row['field_mm']} mm: whole slice BA {row['whole_slice']['balanced_accuracy']}"
              f" (lesion recall {row['whole_slice']['lesion_recall']}), body window BA "
              f"{row['body_window']['balanced_accuracy']} (lesion recall "
              f"{row['body_window']['lesion_recall']})", flush=True)
    emit({"benchmark": "classifier_field_of_view", "model_sha256": card["sha256"][:12],
          "seeds": [seeds[0], seeds[-1]], "set": "evaluation" if args.heldout else "validation",
          "slices": args.slices, "slice_mm": 2.5, "view_mm": inference.CLASSIFIER_VIEW_MM,
          "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "machine": machine()},
         args.out)


if __name__ == "__main__":
    main()

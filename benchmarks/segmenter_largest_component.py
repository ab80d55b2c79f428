"""Tried, not adopted: keep only each organ's largest connected component (nnU-Net's
post-processing) after the segmenter, on the fine-tuning benchmark's domain shift.

    .venv/bin/python benchmarks/segmenter_largest_component.py [--out JSON]

The four VALIDATION phantoms of ``finetune_variants.py`` (850001–850004, the shift of
``bench_finetune.py``), segmented with the bundled segmenter; Dice over all slices (mean
over the structures present, and organs), as segmented and with the voxels outside each
organ's largest 3D component given to the body. Spine is left out (vertebrae are
separate components), and so are the body and lesions (several per volume). About 15 s.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from _common import emit, machine
from bench_finetune import SHIFT, segment, summary
from finetune_variants import SEEDS
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import generate_phantom

ORGANS_ONE_PIECE = (2, 3, 4, 5, 7)  # liver, spleen, kidneys, aorta
BODY = 1


def largest_components(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for c in ORGANS_ONE_PIECE:
        parts, n = ndimage.label(labels == c)
        if n > 1:
            sizes = np.bincount(parts.ravel())
            sizes[0] = 0
            out[(parts > 0) & (parts != sizes.argmax())] = BODY
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    model, card = load_model("segmenter")
    rows = []
    for seed in SEEDS:
        p = generate_phantom(seed=seed, **SHIFT)
        labels, _ = segment(p.volume, model, card)
        every = np.ones(len(labels), dtype=bool)
        plain, kept = summary(labels, p.labels, every, 9), summary(
            largest_components(labels), p.labels, every, 9)
        rows.append({"seed": seed, "mean": [plain["mean"], kept["mean"]],
                     "organs": [plain["organs"], kept["organs"]]})
    emit({"benchmark": "segmenter_largest_component", "seeds": list(SEEDS),
          "per_volume": rows,
          "mean_as_segmented": round(float(np.mean([r["mean"][0] for r in rows])), 4),
          "mean_largest_components": round(float(np.mean([r["mean"][1] for r in rows])), 4),
          "organs_as_segmented": round(float(np.mean([r["organs"][0] for r in rows])), 4),
          "organs_largest_components": round(float(np.mean([r["organs"][1] for r in rows])), 4),
          "machine": machine()}, args.out)


if __name__ == "__main__":
    main()

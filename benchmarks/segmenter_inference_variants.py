"""Cheap ways to get more out of trained segmenters at inference time, on validation.

    .venv/bin/python benchmarks/segmenter_inference_variants.py \\
        [--models segmenter [CARD ...]] [--lesion-bias 0.5,1,2,3] [--seeds 12] [--out JSON]

Every arm is scored on the same validation phantoms (seeds 800000+, never the evaluation
seeds), pooled Dice per structure on the native grid, as ``napari-medseg evaluate`` scores:

- ``MODEL``: each model alone, labels as the engine makes them
  (``inference.labels_from_logits`` on the model-grid logits);
- ``MODEL+zrev``: the mean of its logits on the volume and on the volume in reversed z
  order (the segmenter was trained on both orders; two passes);
- ``MODEL lesion_bias=B``: B added to the lesion logit before the argmax (the lesion
  under-segmented: does a lower decision threshold help?);
- ``ensemble``: with two or more models, the mean of their class probabilities, each
  model's resampled bilinearly onto the native grid (models on different grids combine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from napari_medseg.core.inference import (ModelGridSlices, labels_from_logits, prepare_model,
                                          resize_yx)
from napari_medseg.core.models.registry import load_model
from napari_medseg.core.phantom import LABEL_NAMES
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom
from napari_medseg.core.volume import Volume

LESION = 8


def model_grid_logits(volume: Volume, model, card, chunk: int = 4) -> torch.Tensor:
    """(z, classes, h, w) logits on the model grid, streamed as ``segment_volume`` does."""
    parts = []
    with torch.inference_mode():
        for item in prepare_model(model).iter_chunks(ModelGridSlices(volume, card), chunk):
            if item.logits is not None:
                parts.append(item.logits.float())
    return torch.cat(parts)


def native_probabilities(logits: torch.Tensor, size_yx) -> torch.Tensor:
    return torch.cat([resize_yx(p, size_yx).softmax(1) for p in logits.split(4)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["segmenter"],
                    help="segmenter names or card paths (two or more also score their ensemble)")
    ap.add_argument("--lesion-bias", default="", help="comma-separated lesion logit offsets")
    ap.add_argument("--seeds", type=int, default=12, help="validation phantoms")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    biases = [float(b) for b in args.lesion_bias.split(",") if b.strip()]
    models = [(name, *load_model(name)) for name in args.models]
    seeds = list(range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + args.seeds))
    counts: dict[str, np.ndarray] = {}  # arm → (3, classes): intersection, predicted, true

    def score(arm: str, labels: np.ndarray, truth: np.ndarray) -> None:
        c = counts.setdefault(arm, np.zeros((3, len(LABEL_NAMES))))
        for k in range(len(LABEL_NAMES)):
            p, t = labels == k, truth == k
            c[:, k] += [(p & t).sum(), p.sum(), t.sum()]

    for s in seeds:
        ph = make_phantom(s, eval_settings(s))
        vol, size = ph.volume, ph.volume.shape[1:]
        reversed_vol = Volume(vol.array[::-1].copy(), spacing=vol.spacing, origin=vol.origin)
        probs = []
        for name, model, card in models:
            lg = model_grid_logits(vol, model, card)
            score(name, labels_from_logits(lg, size).numpy(), ph.labels)
            rev = model_grid_logits(reversed_vol, model, card).flip(0)
            score(f"{name}+zrev", labels_from_logits((lg + rev) / 2, size).numpy(), ph.labels)
            for b in biases:
                shifted = lg.clone()
                shifted[:, LESION] += b
                score(f"{name} lesion_bias={b:g}", labels_from_logits(shifted, size).numpy(), ph.labels)
            if len(models) > 1:
                probs.append(native_probabilities(lg, size))
        if probs:
            score("ensemble", torch.stack(probs).mean(0).argmax(1).numpy(), ph.labels)
        print(f"seed {s} done", file=sys.stderr, flush=True)
    result = {
        "seeds": [seeds[0], seeds[-1]],
        "models": args.models,
        "dice_pooled": {arm: {LABEL_NAMES[k]: round(float(2 * c[0, k] / max(c[1, k] + c[2, k], 1)), 3)
                              for k in range(1, len(LABEL_NAMES))}
                        for arm, c in counts.items()},
        "lesion_voxels_predicted_vs_true": {arm: [int(c[1, LESION]), int(c[2, LESION])]
                                            for arm, c in counts.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

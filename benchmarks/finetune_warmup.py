"""Short Retrain rounds with and without the learning-rate warm-up of their first steps.

    .venv/bin/python benchmarks/finetune_warmup.py > benchmarks/results/finetune_warmup.json

A user found a 2-3 s round (about 25 steps) leave the bundled segmenter with almost no
liver. Each phantom here is the one `napari-medseg phantom OUT --shape 48 160 160`
writes (seed 0), then phantoms of the validation seeds (never used to train or to
evaluate); two slices are set to the ground truth on an otherwise empty annotation, as
a user does on a new Labels layer, and rounds of ``--steps`` (a round's steps depend on
the CPU and its load: a 3 s round made 14-26 steps on a loaded machine, 85 on a quiet
one) and of ``--seconds`` run with ``FINETUNE_WARMUP_STEPS`` 0 and 10, alternated, in
the same run. Reported per round:
steps, the mean Dice over the structures on the other slices before and after, the
liver's volume after (ml; the ground truth's beside it) and the held-out slice's Dice.
About 4 min at the defaults on 2 cores.

Result (``results/finetune_warmup.json``): the two validation phantoms lose nothing at
any of these step counts; on the seed-0 phantom a round of 25-60 steps can leave the
liver at 8-37 ml of 259 (mean Dice on the other slices 0.83 -> 0.66-0.71), and a ramp
only moves that dip to another step count, so no ramp is used. Rounds of 15 s (about
450 steps on a quiet 2-core machine) recover. The Retrain widget keeps a round whose
held-out slice's Dice falls by more than 0.05 out of the layer.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from napari_medseg.core import finetune as ft
from napari_medseg.core.inference import segment_volume
from napari_medseg.core.models.registry import BUNDLED_DIR, load_model
from napari_medseg.core.phantom import LABEL_NAMES, generate_phantom
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import VALIDATION_SEEDS

LIVER = next(v for v, name in LABEL_NAMES.items() if name == "liver")


def mean_dice(pred: np.ndarray, truth: np.ndarray, zs: list[int]) -> float:
    scores = []
    for c in np.unique(truth[zs]):
        if c == 0:
            continue
        a, b = pred[zs] == c, truth[zs] == c
        scores.append(2.0 * (a & b).sum() / max(1, a.sum() + b.sum()))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="*", default=[25, 40, 60])
    parser.add_argument("--seconds", type=float, nargs="*", default=[])
    parser.add_argument("--warmups", type=int, nargs="+", default=[0, 10, 20, 40])
    parser.add_argument("--validation-phantoms", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    seeds = [0] + [VALIDATION_SEEDS[0] + 51_000 + i for i in range(args.validation_phantoms)]
    rows = []
    for seed in seeds:
        phantom = generate_phantom((48, 160, 160), (2.5, 0.8, 0.8), seed=seed)
        volume, truth = phantom.volume, phantom.labels
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        model, card = load_model(BUNDLED_DIR / "segmenter.json")
        before = run_to_completion(segment_volume(volume, model, card)).labels
        slices = [16, 32]
        others = [z for z in range(volume.shape[0]) if z not in slices]
        annotation = np.zeros_like(truth)
        annotation[slices] = truth[slices]
        budgets = [("steps", n) for n in args.steps] + [("seconds", t) for t in args.seconds]
        for kind, amount in budgets:
            for warmup in args.warmups:
                ft.FINETUNE_WARMUP_STEPS = warmup
                model, card = load_model(BUNDLED_DIR / "segmenter.json")
                result = run_to_completion(ft.finetune_segmenter(
                    volume, model, card, annotation, slices, threads=args.threads,
                    **{kind: amount}))
                after = run_to_completion(segment_volume(volume, result.model,
                                                         result.card)).labels
                r = result.report
                rows.append({
                    "seed": seed, "budget": f"{amount:g} {kind}", "warmup_steps": warmup,
                    "steps": r.steps, "seconds": round(r.seconds, 1),
                    "dice_other_slices_before": round(mean_dice(before, truth, others), 4),
                    "dice_other_slices_after": round(mean_dice(after, truth, others), 4),
                    "liver_ml_after": round(float((after == LIVER).sum()) * voxel_ml, 1),
                    "liver_ml_truth": round(float((truth == LIVER).sum()) * voxel_ml, 1),
                    "holdout_dice": [round(r.holdout_dice_before, 4),
                                     round(r.holdout_dice_after, 4)],
                })
    summary = {}
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for warmup in args.warmups:
            picked = [r for r in rows if r["budget"] == budget and r["warmup_steps"] == warmup]
            summary[f"{budget}, warm-up {warmup}"] = {
                "mean_dice_after": round(float(np.mean(
                    [r["dice_other_slices_after"] for r in picked])), 4),
                "worst_dice_after": min(r["dice_other_slices_after"] for r in picked),
                "mean_dice_before": round(float(np.mean(
                    [r["dice_other_slices_before"] for r in picked])), 4)}
    print(json.dumps({"benchmark": "finetune_warmup", "rows": rows, "summary": summary},
                     indent=1))


if __name__ == "__main__":
    main()

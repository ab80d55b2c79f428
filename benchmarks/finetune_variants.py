"""Fine-tuning loss settings compared on VALIDATION phantoms (how the defaults were chosen).

    .venv/bin/python benchmarks/finetune_variants.py [NAME,NAME…] [--seconds 15 | --steps N]
                                                     [--new-structure] [--out FILE]
                                                     [--model CARD]

The domain shift and the simulated user of ``bench_finetune.py`` (3 or 5 slices spread
over the body set to the ground truth, one round of ``--seconds``), on four phantoms
from the validation seed range (850001–850004), so the benchmark's held-out volumes
(905001–905003) are never used to choose. Each variant passes its keyword arguments to
``finetune_segmenter``; printed and in the JSON: mean and organ Dice on the untouched
slices before and after, averaged over the volumes, and the steps per round. About
2.5 min per variant on 2 cores; a round is a time budget, so run nothing else meanwhile.

``--model``: start from another segmenter (a card path, e.g. a training variant kept
with ``model_variants.py --save``) instead of the bundled one.

``--new-structure``: instead, ``bench_finetune.py``'s new-structure case (the stomach
painted as a new value on 5 slices) on validation seeds 850001–850003: the stomach's Dice
on the other slices after one round. ``--steps N`` replaces the time budget by N steps
(deterministic; how many steps a new structure needs).
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import emit, machine
from bench_finetune import SHIFT, round_on, segment, spread, stomach_case, summary
from napari_medseg.core.evaluation import dice
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import generate_phantom

SEEDS = (850_001, 850_002, 850_003, 850_004)
NEW_STRUCTURE_SEEDS = (850_001, 850_002, 850_003)
#: the defaults before this comparison, and what it tried against them
VARIANTS = {
    "default": {},
    "before": {"keep_weight": 1.0, "dice_present_only": False},
    "lr3e-3": {"keep_weight": 1.0, "dice_present_only": False, "lr": 3e-3},
    "lr3e-4": {"keep_weight": 1.0, "dice_present_only": False, "lr": 3e-4},
    "keep0": {"keep_weight": 0.0, "dice_present_only": False},
    "keep3": {"keep_weight": 3.0, "dice_present_only": False},
    "keep10": {"keep_weight": 10.0, "dice_present_only": False},
    "corr0": {"keep_weight": 1.0, "dice_present_only": False, "correction_weight": 0.0},
    # the imbalance ablation: the default without class or correction weighting
    "plain": {"correction_weight": 0.0, "class_balance": False},
    "seq4-crop96": {"keep_weight": 1.0, "dice_present_only": False, "seq_len": 4, "crop": 96},
    "crop192": {"keep_weight": 1.0, "dice_present_only": False, "crop": 192},
    "present": {"keep_weight": 1.0, "dice_present_only": True},
    "keep10-present": {"keep_weight": 10.0, "dice_present_only": True},
    "keep3-present-lr2e-3": {"lr": 2e-3},
    "keep3-present-corr1": {"correction_weight": 1.0},
    "no-holdout": {"holdout": False},
    "keep-balance": {"keep_balance": True},
    "keep-balance10": {"keep_balance": True, "keep_weight": 10.0},
    "train-encoder": {"trainable": "encoder"},
    "train-early": {"trainable": "early"},
    "train-decoder": {"trainable": "decoder"},  # what the held-out slice's Dice costs the round
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="?", default="default,before",
                    help=f"comma-separated, or 'all' ({', '.join(VARIANTS)})")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--steps", type=int, help="a fixed number of steps instead of --seconds")
    ap.add_argument("--new-structure", action="store_true", help="the stomach case instead")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--model", default="segmenter", help="bundled name or card path")
    args = ap.parse_args()
    names = list(VARIANTS) if args.names == "all" else args.names.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    model, card = load_model(args.model)
    budget = ({"seconds": None, "steps": args.steps} if args.steps else {"seconds": args.seconds})
    if args.new_structure:
        return new_structures(names, model, card, budget, args.out)
    volumes = []
    for seed in SEEDS:
        p = generate_phantom(seed=seed, **SHIFT)
        before, _ = segment(p.volume, model, card)
        body = np.flatnonzero(p.labels.reshape(len(p.labels), -1).any(axis=1))
        volumes.append((p, before, body))
    results = {}
    for name in names:
        rows = {3: [], 5: []}
        for p, before, body in volumes:
            for k in (3, 5):
                zs = spread(body, k)
                annotation = before.copy()
                annotation[zs] = p.labels[zs]
                untouched = np.setdiff1d(np.arange(len(p.labels)), zs)
                res, after, _, _ = round_on(p.volume, model, card, annotation, zs,
                                            **budget, **VARIANTS[name])
                b, a = summary(before, p.labels, untouched, 9), summary(after, p.labels, untouched, 9)
                rows[k].append([b["mean"], a["mean"], b["organs"], a["organs"], res.report.steps,
                                b["dice"]["lesion"], a["dice"]["lesion"]])
        results[name] = {"kwargs": VARIANTS[name]}
        for k, r in rows.items():
            m = np.mean([x[:5] for x in r], axis=0)
            m = [float(x) for x in m]
            results[name][f"{k}_slices"] = {"mean_before": round(m[0], 4), "mean_after": round(m[1], 4),
                                            "organs_before": round(m[2], 4), "organs_after": round(m[3], 4),
                                            "steps": round(m[4], 1),
                                            "lesion_before": [x[5] for x in r],
                                            "lesion_after": [x[6] for x in r]}
        print(name, {k: (v["mean_after"], v["organs_after"], v["lesion_after"]) for k, v in results[name].items()
                     if k != "kwargs"}, flush=True)
    result = {"benchmark": "finetune_variants", "model": card.get("name"),
              "model_sha256": card.get("sha256"), "seeds": list(SEEDS), "budget": budget,
              "domain_shift": {k: list(v) if isinstance(v, tuple) else v for k, v in SHIFT.items()},
              "variants": results, "machine": machine()}
    emit(result, args.out)


def new_structures(names, model, card, budget, out) -> None:
    cases = [c for c in (stomach_case(seed, model, card) for seed in NEW_STRUCTURE_SEEDS) if c]
    results = {}
    for name in names:
        rows = []
        for p, truth, annotation, zs, untouched, _ in cases:
            res, after, _, _ = round_on(p.volume, model, card, annotation, zs, **budget,
                                        class_names={9: "stomach"}, **VARIANTS[name])
            d = dice(after[untouched], truth[untouched], 10)
            rows.append({"stomach_dice": round(float(d[9]), 4), "steps": res.report.steps,
                         "stomach_voxels_predicted": int((after[untouched] == 9).sum()),
                         "stomach_voxels_true": int((truth[untouched] == 9).sum())})
        results[name] = {"kwargs": VARIANTS[name], "per_volume": rows,
                         "stomach_dice_mean": round(float(np.mean([r["stomach_dice"] for r in rows])), 4)}
        print(name, [r["stomach_dice"] for r in rows], results[name]["stomach_dice_mean"], flush=True)
    emit({"benchmark": "finetune_variants_new_structure", "seeds": list(NEW_STRUCTURE_SEEDS),
          "budget": budget, "variants": results, "machine": machine()}, out)


if __name__ == "__main__":
    main()

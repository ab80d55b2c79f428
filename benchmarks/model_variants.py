"""Training variants of the bundled models, scored on VALIDATION phantoms only.

Each variant trains one model from scratch (seed 0, ``core.training.train`` with the
keyword arguments below) and is scored on 12 validation phantoms (seeds 800000–800011,
``eval_settings``), never on the evaluation seeds the model cards report: choosing a
variant on the evaluation set would make its card's figure optimistic. The bundled
models are scored the same way for reference.

    .venv/bin/python benchmarks/model_variants.py VARIANT [VARIANT ...] [--threads 1]
    .venv/bin/python benchmarks/model_variants.py --list
    .venv/bin/python benchmarks/model_variants.py --card DIR/segmenter.json
    .venv/bin/python benchmarks/model_variants.py VARIANT --save DIR   # keep the weights
    .venv/bin/python benchmarks/model_variants.py VARIANT --seed 1     # another training seed

``--save`` writes each trained variant as DIR/VARIANT.safetensors + card, so a long run
can be scored again (``--card``) or bundled without training it twice.

``--card`` scores a model already trained (``napari-medseg train MODEL --out DIR``), so
a candidate for the bundled weights is chosen on validation without training it twice.

Runs are deterministic for a given thread count. Costs on 2 shared cores: a classifier
variant 6–30 min, a detector variant ~9 min, a segmenter variant ~30 min.
Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from napari_medseg.core import evaluation as ev
from napari_medseg.core.models.registry import load_model, save_model
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import VALIDATION_SEEDS, train

#: the detector's training before soft_focal and σ_z = radius became the defaults
_FOCAL = {"loss": "focal", "z_sigma_fraction": 0.5, "context_slices": 1}

#: name → (model, training keyword arguments); "bundled-*" load the shipped weights
VARIANTS: dict[str, tuple[str, dict]] = {
    "bundled-classifier": ("classifier", {}),
    "classifier-2400": ("classifier", {"steps": 2400}),
    "classifier-2400-maxpool-noise": ("classifier", {"steps": 2400, "pooling": "max", "noise_hu": 20}),
    "classifier-1200-hardneg": ("classifier", {"steps": 1200, "hard_negatives": 0.5}),
    "classifier-1200-hardneg-context": ("classifier", {"steps": 1200, "hard_negatives": 0.5,
                                                       "context_slices": 1}),
    "classifier-1200-lesionmap": ("classifier", {"steps": 1200, "lesion_map_weight": 1.0}),
    # the kernel-size table ranked 7×7 and 5×5 ReLU above 3×3 after 150 steps
    "classifier-600-k5": ("classifier", {"steps": 600, "kernel_size": 5}),
    "classifier-600-k7": ("classifier", {"steps": 600, "kernel_size": 7}),
    # issue 4 asks for 32/64/128 filters; the explanation benchmark (explain_sanity.py)
    # found the 16/32/64 model's lesion Grad-CAM pointing at the lesion on 4 % of slices
    "classifier-600-f32": ("classifier", {"steps": 600, "filters": (32, 64, 128)}),
    "classifier-600-f32-maxpool": ("classifier", {"steps": 600, "filters": (32, 64, 128),
                                                  "pooling": "max"}),
    "classifier-600-f32-lesionmap": ("classifier", {"steps": 600, "filters": (32, 64, 128),
                                                    "lesion_map_weight": 1.0}),
    # lesion-free twins of lesion slices as negatives (classifier_lesion_use.py found the
    # bundled classifier's P(lesion) the same with and without the lesion)
    "classifier-600-twins": ("classifier", {"steps": 600, "lesion_twins": 0.5}),
    "classifier-600-f32-twins": ("classifier", {"steps": 600, "filters": (32, 64, 128),
                                                "lesion_twins": 0.5}),
    # with twins alone P(lesion) was still the same on a slice and its twin: an average
    # pool of 54 mm cells dilutes a 10 mm lesion; the max keeps it
    "classifier-600-twins-maxpool": ("classifier", {"steps": 600, "lesion_twins": 0.5,
                                                    "pooling": "max"}),
    "classifier-600-f32-twins-maxpool": ("classifier", {"steps": 600, "filters": (32, 64, 128),
                                                        "lesion_twins": 0.5, "pooling": "max"}),
    # twins + max pool still gave a slice and its twin the same P(lesion) after 600 steps:
    # does the dense lesion map teach the features where lesions are? (it did not)
    "classifier-1200-twins-maxpool-lesionmap": ("classifier", {
        "steps": 1200, "lesion_twins": 0.5, "pooling": "max", "lesion_map_weight": 1.0}),
    # a three-conv network (receptive field 27 mm) may be too shallow to tell a faint
    # lesion from its liver: two convs per block, with the lesion map and twins
    # (96² crops: a smaller view holds less of the anatomy level, and costs 0.44×)
    "classifier-2400-deep-twins-lesionmap-crop96": ("classifier", {
        "steps": 2400, "convs_per_block": 2, "lesion_twins": 0.5, "pooling": "max",
        "lesion_map_weight": 1.0, "crop": 96}),
    # the same on the detector's 1.0 mm grid (2.25× the pixels; run with --threads 2)
    "classifier-2400-deep-twins-lesionmap-crop96-1mm": ("classifier", {
        "steps": 2400, "convs_per_block": 2, "lesion_twins": 0.5, "pooling": "max",
        "lesion_map_weight": 1.0, "crop": 96, "spacing_yx": 1.0}),
    "classifier-2400-deep-twins025-lesionmap-crop96": ("classifier", {
        "steps": 2400, "convs_per_block": 2, "lesion_twins": 0.25, "pooling": "max",
        "lesion_map_weight": 1.0, "crop": 96}),
    "classifier-2400-twins-lesionmap-crop96": ("classifier", {
        "steps": 2400, "lesion_twins": 0.5, "pooling": "max", "lesion_map_weight": 1.0,
        "crop": 96}),
    "bundled-detector": ("detector", {}),
    # the bundled detector's recipe trained again (with --seed: its seed-to-seed spread)
    "detector-2400": ("detector", {"steps": 2400}),
    "detector-2400-zsigma1": ("detector", {**_FOCAL, "steps": 2400, "z_sigma_fraction": 1.0}),
    "detector-2400-wide": ("detector", {"steps": 2400, "widths": (32, 64, 128), **_FOCAL}),
    "detector-2400-noise20": ("detector", {"steps": 2400, "noise_hu": 20, **_FOCAL}),
    "detector-2400-softfocal": ("detector", {"steps": 2400, "loss": "soft_focal", "z_sigma_fraction": 0.5, "context_slices": 1}),
    "detector-6000-softfocal": ("detector", {"steps": 6000, "loss": "soft_focal", "z_sigma_fraction": 0.5, "context_slices": 1}),
    "detector-2400-softfocal-zsigma1": ("detector", {"steps": 2400, "loss": "soft_focal", "context_slices": 1,
                                                     "z_sigma_fraction": 1.0}),
    "detector-2400-softfocal-zsigma2": ("detector", {"steps": 2400, "loss": "soft_focal", "context_slices": 1,
                                                     "z_sigma_fraction": 2.0}),
    "detector-2400-softfocal-sigma075": ("detector", {"steps": 2400, "loss": "soft_focal", "context_slices": 1,
                                                      "z_sigma_fraction": 1.0,
                                                      "sigma_fraction": 0.75}),
    "detector-2400-softfocal-sigma1": ("detector", {"steps": 2400, "loss": "soft_focal", "context_slices": 1,
                                                    "z_sigma_fraction": 1.0,
                                                    "sigma_fraction": 1.0}),
    "detector-2400-softfocal-context2": ("detector", {"steps": 2400, "loss": "soft_focal",
                                                      "z_sigma_fraction": 1.0,
                                                      "context_slices": 2}),
    "detector-2400-softfocal-context3": ("detector", {"steps": 2400, "loss": "soft_focal",
                                                      "z_sigma_fraction": 1.0,
                                                      "context_slices": 3}),
    "detector-2400-softfocal-wide": ("detector", {"steps": 2400, "loss": "soft_focal", "context_slices": 1,
                                                  "z_sigma_fraction": 1.0, "widths": (32, 64, 128)}),
    # a deeper encoder (the change that made the classifier see lesions): 3 or 4 convs
    # per stage instead of 2 (1.35× / 1.7× the FLOPs)
    "detector-2400-deep3": ("detector", {"steps": 2400, "convs_per_stage": 3}),
    "detector-2400-deep4": ("detector", {"steps": 2400, "convs_per_stage": 4}),
    # small lesions weighted up: the soft focal loss sums over a lesion's target voxels,
    # so an 8 mm lesion pulled (4/10)² as hard as a 20 mm one
    "detector-2400-sizebalance10": ("detector", {"steps": 2400, "size_balance_mm": 10.0}),
    "detector-2400-sizebalance10-deep4": ("detector", {"steps": 2400, "size_balance_mm": 10.0,
                                                       "convs_per_stage": 4}),
    # held-out and validation slices reach 6 mm, training stopped at 5: on the 5–6 mm
    # validation volumes the bundled detector found 5 of 22 lesions at 1 FP/volume,
    # elsewhere 14 of 25 (benchmarks/detector_z_upsampling.py)
    "detector-2400-z1to7": ("detector", {"steps": 2400, "z_range_mm": (1.0, 7.0)}),
    # the held-out misses of the 1-7 mm detector are mostly faint (8-16 HU) lesions; the
    # phantom makes about one lesion in five faint: pick those 3x as often in balanced sampling
    "detector-2400-z1to7-faint3": ("detector", {"steps": 2400, "z_range_mm": (1.0, 7.0),
                                                "faint_weight": 3.0}),
    # the segmenter bundled before 6000 steps + noise augmentation: run "bundled-segmenter"
    # at commit 8450325 (its command: train segmenter --steps 2400, no added noise)
    "bundled-segmenter": ("segmenter", {}),
    # lesions of 5–10 mm are 3–7 pixels on the 1.5 mm grid (validation Dice 0.07 each);
    # the same 128-pixel crops at 1.0 mm (a smaller field of view), to compare with the
    # 6000-step model of commit a65f948
    "segmenter-6000-1mm": ("segmenter", {"steps": 6000, "spacing_yx": 1.0}),
    "segmenter-15000-1mm": ("segmenter", {"steps": 15000, "spacing_yx": 1.0}),
    "segmenter-30000-1mm": ("segmenter", {"steps": 30000, "spacing_yx": 1.0}),
}

SEEDS = list(range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + 12))
#: --card: which scoring a card gets, by its architecture (a fine-tuned card has its own name)
KIND = {"SliceClassifier": "classifier", "LesionDetector": "detector",
        "RecurrentSegmenter": "segmenter"}


def score(name: str, model, card) -> dict:
    if name == "classifier":
        res = ev.evaluate_classifier(model, card, SEEDS)
        return {k: res[k] for k in ("balanced_accuracy", "recall")}
    if name == "detector":
        records = ev.detector_records(model, card, SEEDS, 6.0)
        flat = ev._flatten(records, 6.0)
        return {"sensitivity_ge_5mm_at_fp_per_volume":
                {f"{f:g}": round(ev.froc_point(flat, f)["sensitivity"], 4) for f in (0.5, 1, 2)},
                "nms_mm": 6.0}
    return {"dice": ev.evaluate_segmenter(model, card, SEEDS)["dice"]}


def run(variant: str, save: str | None = None, seed: int = 0) -> dict:
    name, kwargs = VARIANTS[variant]
    t0 = time.perf_counter()
    if variant.startswith("bundled-"):
        model, card = load_model(name)
    else:
        model, card = run_to_completion(train(name, seed, **kwargs))
        card.setdefault("context_slices", 0)
        if save:
            save_model(model, save, variant if seed == 0 else f"{variant}-seed{seed}", card)
    seconds = time.perf_counter() - t0
    return {"variant": variant, "seed": seed, "model": name, "train_kwargs": kwargs,
            "train_seconds": round(seconds), "threads": torch.get_num_threads(),
            "validation_seeds": [SEEDS[0], SEEDS[-1]], "validation": score(name, model, card)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help="names from --list")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="training seed (0: the variants' own)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--save", metavar="DIR", help="also write each trained variant to DIR")
    ap.add_argument("--card", action="append", default=[],
                    help="score a trained model from its card (repeatable)")
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; see --list")
    torch.set_num_threads(args.threads)
    for path in args.card:
        t0 = time.perf_counter()
        model, card = load_model(path)
        kind = KIND.get(card["architecture"])
        if kind is None:
            ap.error(f"{path}: no validation score for a {card['architecture']}")
        print(json.dumps({"card": path, "model": card["name"],
                          "training_command": card.get("training", {}).get("command"),
                          "validation_seeds": [SEEDS[0], SEEDS[-1]],
                          "validation": score(kind, model, card),
                          "seconds": round(time.perf_counter() - t0)}), flush=True)
    if args.card and not args.variants:
        return
    if args.list or not args.variants:
        print("\n".join(f"{k}: {v[0]} {v[1]}" for k, v in VARIANTS.items()))
        return
    for v in args.variants:
        print(json.dumps(run(v, args.save, args.seed)), flush=True)


if __name__ == "__main__":
    main()

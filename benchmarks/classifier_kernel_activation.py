"""Classifier accuracy and speed for kernel sizes 3/5/7 × relu/tanh/sigmoid/gelu.

Every configuration trains the slice classifier from scratch with the same seed, the
same phantom pool and the same short step budget, then is scored on the same VALIDATION
phantoms (a table users choose from is a choice, so not on evaluation seeds; ``--heldout``
scores on evaluation seeds instead) and timed on the same slices. Speed: slices/s (batched, and one
slice at a time = the naive baseline) in eval mode under torch.inference_mode, the
achieved GFLOP/s from the counted conv + linear FLOPs, and its ratio to a float32 GEMM
measured in the same run. Prints one JSON object and writes it to
benchmarks/results/classifier_kernel_activation.json; writes docs/models-kernel-activation.md.

    python benchmarks/classifier_kernel_activation.py [--steps 150] [--seeds 6] [--heldout]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_medseg.core.evaluation import balanced_accuracy, confusion_matrix, predict_classifier
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.evaluation import seed_list
from napari_medseg.core.models.registry import BUNDLED_DIR, read_card
from napari_medseg.core.training import (
    DEFAULTS,
    EVAL_SEEDS,
    VALIDATION_SEEDS,
    PhantomPool,
    eval_settings,
    make_phantom,
    train_classifier,
    training_seeds,
)

KERNELS = (3, 5, 7)
ACTS = ("relu", "tanh", "sigmoid", "gelu")


def gemm_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def classifier_flops(model, h: int, w: int) -> float:
    """Multiply-adds × 2 of the convs and linear layers for one (1, h, w) slice."""
    flops = 0.0
    for i, block in enumerate(model.blocks):
        if i:
            h, w = h // 2, w // 2
        conv = block.conv
        k = conv.kernel_size[0]
        flops += 2.0 * h * w * k * k * conv.in_channels * conv.out_channels
    for layer in model.head:
        if isinstance(layer, torch.nn.Linear):
            flops += 2.0 * layer.in_features * layer.out_features
    return flops


@torch.inference_mode()
def time_inference(model, slices: np.ndarray, batch: int) -> float:
    model.eval()
    x = torch.from_numpy(slices[:, None])
    model(x[:batch])  # warm-up
    best = float("inf")
    for _ in range(5):  # best of five: the machine is shared
        t = time.perf_counter()
        for s in range(0, len(x), batch):
            model(x[s:s + batch])
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def _bundled_note(steps: int) -> str:
    """How the bundled classifier was trained, from its card (a fixed sentence here went
    stale when its recipe changed)."""
    card = read_card(BUNDLED_DIR / "classifier.json")
    training, arch = card["training"], card.get("arch_params", {})
    bundled = int(training["steps"])
    return (f"the bundled classifier trains {bundled / steps:.0f}× more steps ({bundled}) at "
            f"{card['input_spacing_mm'][-1]} mm, with {arch.get('convs_per_block', 1)} convs per "
            f"block and {arch.get('pool', 'max')} pooling (its card: `{training['command']}`).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=6, help="how many phantoms to score on")
    ap.add_argument("--heldout", action="store_true",
                    help="score on evaluation seeds instead of validation seeds")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results"
                                         / "classifier_kernel_activation.json"))
    ap.add_argument("--spacing", type=float, default=2.0, help="in-plane mm (bundled: 1.5)")
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"
                                        / "models-kernel-activation.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    card = {"classes": ["no_body", "normal", "lesion"],
            "input_spacing_mm": [1.0, args.spacing, args.spacing],
            "normalisation": DEFAULTS["classifier"]["normalisation"]}

    t0 = time.perf_counter()
    pool = PhantomPool(training_seeds(0), args.pool, args.spacing, 40, card["normalisation"])
    for _ in pool.fill():
        pass
    seeds = seed_list(args.seeds, EVAL_SEEDS if args.heldout else VALIDATION_SEEDS)
    phantom_set = "evaluation" if args.heldout else "validation"
    phantoms = [make_phantom(s, eval_settings(s)) for s in seeds]
    # timing input: 64 model-grid slices of a training phantom
    timing = pool.items[0].image
    timing = np.ascontiguousarray(np.concatenate([timing] * (64 // len(timing) + 1))[:64])
    data_seconds = time.perf_counter() - t0

    gemm_before = gemm_gflops()
    rows = []
    for k in KERNELS:
        for act in ACTS:
            t = time.perf_counter()
            model, tcard = run_to_completion(train_classifier(
                0, steps=args.steps, kernel_size=k, activation=act, spacing_yx=args.spacing,
                crop=args.crop, pool=pool, refresh_every=0))
            train_s = time.perf_counter() - t
            conf = np.zeros((3, 3), dtype=np.int64)
            for ph in phantoms:
                pred, _ = predict_classifier(model, card, ph.volume)
                conf += confusion_matrix(ph.slice_classes, pred, 3)
            # a GEMM right beside each row's timing: the load on a shared machine drifts
            # over the minutes of the run, so one GEMM for all rows skews their ratios
            gemm_row = gemm_gflops()
            sps_batched = time_inference(model, timing, 32)
            sps_single = time_inference(model, timing[:32], 1)
            flops = classifier_flops(model, *timing.shape[1:])
            rows.append({
                "kernel": k, "activation": act,
                "balanced_accuracy": round(balanced_accuracy(conf), 4),
                "lesion_recall": round(float(conf[2, 2] / max(conf[2].sum(), 1)), 4),
                "train_seconds": round(train_s, 1),
                "final_loss": tcard["training"]["loss_last20"],
                "slices_per_s_batch32": round(sps_batched, 1),
                "slices_per_s_batch1": round(sps_single, 1),
                "gflop_per_slice": round(flops / 1e9, 4),
                "gflops_achieved": round(flops * sps_batched / 1e9, 2),
                "gemm_gflops_beside": round(gemm_row, 2),
                "ratio_to_gemm": round(flops * sps_batched / 1e9 / gemm_row, 3),
            })
            print(json.dumps(rows[-1]), flush=True)
    gemm_after = gemm_gflops()
    gemm = (gemm_before + gemm_after) / 2
    result = {
        "benchmark": "classifier_kernel_activation",
        "steps_per_config": args.steps, "batch": 32, "seed": 0,
        "spacing_yx_mm": args.spacing, "crop": args.crop,
        "phantom_set": phantom_set, "seeds": [seeds[0], seeds[-1]],
        "eval_phantoms": len(seeds), "eval_slices": int(conf.sum()),
        "timing_slice_shape": list(timing.shape[1:]),
        "gemm_gflops_same_run": round(gemm, 2),
        "gemm_gflops_before_after": [round(gemm_before, 2), round(gemm_after, 2)],
        "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "data_seconds": round(data_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(json.dumps(result))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Classifier: kernel size × activation",
        "",
        "Made by `python benchmarks/classifier_kernel_activation.py"
        f" --steps {args.steps} --seeds {args.seeds}{' --heldout' if args.heldout else ''}`"
        " (do not edit by hand; JSON: `benchmarks/results/classifier_kernel_activation.json`).",
        "",
        f"Each row: the slice classifier (filters 16-32-64) trained from scratch, seed 0, "
        f"{args.steps} steps of 32 slices at {args.spacing} mm in-plane ({args.crop}² crops), "
        f"the same phantom pool for all; balanced accuracy on {int(conf.sum())} slices of "
        f"{len(seeds)} {phantom_set} phantoms (seeds {seeds[0]}–{seeds[-1]}). Speed: eval mode, "
        f"`torch.inference_mode`, {args.threads} threads, {timing.shape[1]}×{timing.shape[2]} "
        f"slices, best of 5; each row's ratio is to a GEMM (1024² fp32) measured just before"
        f" its timing ({min(r['gemm_gflops_beside'] for r in rows):.0f}–"
        f"{max(r['gemm_gflops_beside'] for r in rows):.0f} GFLOP/s in this run). "
        "These are short runs: accuracy differences of a few points are within seed noise; "
        + _bundled_note(args.steps),
        "",
        "| kernel | activation | balanced acc. | lesion recall | train s | slices/s (batch 32) "
        "| slices/s (1 at a time) | GFLOP/slice | GFLOP/s | ratio to GEMM |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['activation']} | {r['balanced_accuracy']:.3f} | "
            f"{r['lesion_recall']:.3f} | {r['train_seconds']:.0f} | {r['slices_per_s_batch32']:.0f} | "
            f"{r['slices_per_s_batch1']:.0f} | {r['gflop_per_slice']:.3f} | "
            f"{r['gflops_achieved']:.1f} | {r['ratio_to_gemm']:.2f} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()

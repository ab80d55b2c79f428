"""Where classify's end-to-end time goes, all in one run; print ONE JSON object.

    .venv/bin/python benchmarks/classify_breakdown.py [--slices 200] [--size 512] [--repeats 5]

The classify benchmark missed its ≥ 40 %-of-GEMM goal with the classifier before the
current one (a third of its FLOPs per slice); this splits the same job
(512×512×200 phantom, bundled classifier, batches of DEFAULT_BATCH) into

- **model input**: normalise + antialiased resample to the model grid, as the engine does
  it now (``inference._normalised_on_grid``: the clip and NaN handling at full size, the
  affine part after the resample) and as it did before (every step at full size, six
  full-size passes), with the largest difference between the two;
- **network**: the prepared model alone on inputs made beforehand;
- **end to end**: ``classify_volume``, alternating the two model-input paths;

each the best of ``--repeats`` (a timing on a shared machine is only a lower bound),
next to a GEMM measured in the same run: the network alone at its GFLOP/s over the GEMM
rate is the most the end-to-end ratio could reach with free input preparation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _timed, count_flops, emit, gemm_gflops, machine  # noqa: E402

from napari_medseg.core import inference  # noqa: E402
from napari_medseg.core.models.registry import load_model  # noqa: E402
from napari_medseg.core.phantom import generate_phantom  # noqa: E402
from napari_medseg.core.progress import run_to_completion  # noqa: E402


def full_size_input(array, z, spec, grid) -> torch.Tensor:
    """The model input as the engine made it before: every normalisation step at full size."""
    x = torch.from_numpy(np.array(array[z], dtype=np.float32, copy=True))
    low, high = float(spec["low"]), float(spec["high"])
    x.clamp_(low, high).sub_(low).div_(high - low)
    torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)
    return inference.resize_yx(x[:, None], grid, antialias=True)[:, 0]


def best_of(repeats: int, fn) -> float:
    return min(_timed(fn) for _ in range(repeats))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(inference.default_threads())
    model, card = load_model("classifier")
    if card["normalisation"]["type"] != "window":
        raise SystemExit("the reference path is written for a window normalisation")
    volume = generate_phantom((args.slices, args.size, args.size), (1.25, 0.7, 0.7), seed=0).volume
    spec, grid = card["normalisation"], inference.model_grid(volume, card)
    batches = [np.arange(a, min(a + inference.DEFAULT_BATCH, args.slices))
               for a in range(0, args.slices, inference.DEFAULT_BATCH)]
    paths = {"now": inference._normalised_on_grid, "before": full_size_input}
    made = {k: [f(volume.array, z, spec, grid) for z in batches] for k, f in paths.items()}
    max_diff = max(float((a - b).abs().max()) for a, b in zip(made["now"], made["before"]))

    gemm_before = gemm_gflops()
    input_s = {k: best_of(args.repeats, lambda f=f: [f(volume.array, z, spec, grid) for z in batches])
               for k, f in paths.items()}
    fast = inference.prepare_model(model)
    inputs = [x[:, None].contiguous(memory_format=torch.channels_last) for x in made["now"]]

    def network() -> None:
        with torch.inference_mode():
            for x in inputs:
                fast(x)

    network()
    network_s = best_of(args.repeats, network)
    end_to_end: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for _ in range(args.repeats):
            for k, f in paths.items():
                inference._normalised_on_grid = f
                t0 = time.perf_counter()
                run_to_completion(inference.classify_volume(volume, model, card, threads=0))
                end_to_end[k].append(time.perf_counter() - t0)
    finally:
        inference._normalised_on_grid = paths["now"]
    gemm_after = gemm_gflops()
    gemm = max(gemm_before, gemm_after)
    gflop = count_flops(lambda: fast(inputs[0])) / len(inputs[0]) * args.slices / 1e9
    emit({
        "benchmark": "classify_breakdown",
        "volume_zyx": [args.slices, args.size, args.size],
        "model_grid_yx": list(grid),
        "gflop_network": round(gflop, 3),
        "gemm_gflops_same_run": round(gemm, 1),
        "gemm_gflops_before_after": [round(gemm_before, 1), round(gemm_after, 1)],
        "model_input_seconds": {k: round(v, 4) for k, v in input_s.items()},
        # emit rounds to 4 decimals: in millionths so the (float-rounding) size shows
        "model_input_max_abs_difference_1e-6": round(max_diff * 1e6, 3),
        "network_seconds": round(network_s, 4),
        "network_ratio_to_gemm": round(gflop / network_s / gemm, 3),
        "end_to_end_seconds_best": {k: round(min(v), 4) for k, v in end_to_end.items()},
        "end_to_end_seconds_median": {k: round(float(np.median(v)), 4)
                                      for k, v in end_to_end.items()},
        "end_to_end_ratio_to_gemm": {k: round(gflop / min(v) / gemm, 3)
                                     for k, v in end_to_end.items()},
        "repeats": args.repeats,
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()

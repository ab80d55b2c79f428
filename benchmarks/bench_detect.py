"""Detect lesions in a 512×512×200 phantom CT end to end; print ONE JSON object.

    .venv/bin/python benchmarks/bench_detect.py [--slices 200] [--size 512]

End to end = normalise + resample in-plane to the model grid, 2.5D detector over batches
of slices, heatmap, 3D peak extraction with NMS, coordinates back on the input grid.
Same-run references: fp32 GEMM rate and the naive run (eager fp32, no BN folding, no
channels_last, one slice at a time through ``forward`` on the model grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    LoadMonitor,
    count_flops,
    emit,
    gemm_gflops,
    get_model,
    machine,
    naive_seconds_per_slice,
    setup_threads,
    timed,
)

from napari_medseg.core.inference import (  # noqa: E402
    DEFAULT_BATCH,
    _ModelGridSlices,
    cpu_supports_bf16,
    detect_lesions,
    model_grid,
    prepare_model,
)
from napari_medseg.core.phantom import generate_phantom  # noqa: E402
from napari_medseg.core.progress import run_to_completion  # noqa: E402

T0 = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7))
    ap.add_argument("--naive-slices", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    monitor = LoadMonitor()
    threads = setup_threads(args.threads)
    info = machine()
    gemm = gemm_gflops()
    model, card, weights = get_model("detector")
    phantom = generate_phantom((args.slices, args.size, args.size), args.spacing, seed=0)
    volume = phantom.volume
    seconds, result = timed(lambda: run_to_completion(
        detect_lesions(volume, model, card, threads=0)))
    gemm_after = gemm_gflops()
    gemm_ref = max(gemm, gemm_after)

    sample = _ModelGridSlices(volume, card, model.in_slices // 2)[0:DEFAULT_BATCH]
    fast = prepare_model(model)
    per_slice = count_flops(lambda: fast(sample)) / len(sample)
    gflops = per_slice * args.slices / seconds / 1e9
    naive_slice = naive_seconds_per_slice(model, sample[: args.naive_slices].contiguous())
    naive_total = naive_slice * args.slices
    out = {
        "benchmark": "detect",
        "volume_zyx": [args.slices, args.size, args.size],
        "spacing_mm": list(args.spacing),
        "model_grid_yx": list(model_grid(volume, card)),
        "model_spacing_mm": card["input_spacing_mm"],
        "weights": weights,
        "precision": result.precision,
        "batch": DEFAULT_BATCH,
        "detections": len(result.detections),
        "true_lesions": len(phantom.lesions),
        "seconds": seconds,
        "seconds_per_slice": seconds / args.slices,
        "gflop_per_slice": per_slice / 1e9,
        "gflops_achieved": gflops,
        "gemm_gflops_same_run": gemm_ref,
        "gemm_gflops_before_after": [gemm, gemm_after],
        "ratio": gflops / gemm_ref,
        "naive": {"seconds_scaled": naive_total, "slices_timed": args.naive_slices,
                  "seconds_per_slice": naive_slice, "scaled_to": args.slices,
                  "note": "model only (no resampling, no peak extraction), on the model grid"},
        "speedup_vs_naive": naive_total / seconds,
    }
    if cpu_supports_bf16():
        s16, r16 = timed(lambda: run_to_completion(
            detect_lesions(volume, model, card, precision="bf16", threads=0)))
        out["bf16"] = {
            "seconds": s16, "speedup_vs_fp32": seconds / s16,
            "max_heatmap_difference": float(abs(r16.heatmap - result.heatmap).max()),
            "detections": len(r16.detections),
        }
    out["threads"] = threads
    out["other_processes_busy_cores_during_run"] = monitor.others()
    out["machine"] = info
    out["wall_time_total_s"] = time.perf_counter() - T0
    emit(out)


if __name__ == "__main__":
    main()

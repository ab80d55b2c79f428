"""Detect lesions in a 512×512×200 phantom CT end to end; print ONE JSON object.

    .venv/bin/python benchmarks/bench_detect.py [--slices 200] [--size 512]

End to end = normalise + resample in-plane to the model grid, 2.5D detector over batches
of slices, heatmap, 3D peak extraction with NMS, coordinates back on the input grid.
Peak memory growth for 100 vs 400 slices as in bench_segment.py. Same-run references:
fp32 GEMM rate and the naive run (eager fp32, no BN folding, no channels_last, one slice
at a time through ``forward`` on the model grid).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    bf16_references,
    add_memory_options,
    add_memory_section,
    speed_goals,
    bench_parser,
    count_flops,
    finish,
    gemm_gflops,
    memory_child,
    result_head,
    start_run,
    timed,
    versus_references,
)

from napari_medseg.core.inference import (  # noqa: E402
    DEFAULT_BATCH,
    ModelGridSlices,
    cpu_supports_bf16,
    detect_lesions,
    prepare_model,
)
from napari_medseg.core.phantom import generate_phantom  # noqa: E402
from napari_medseg.core.progress import run_to_completion  # noqa: E402

T0 = time.perf_counter()


def main() -> None:
    ap = bench_parser(__doc__, naive_slices=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=(), choices=("memory",))
    add_memory_options(ap)
    args = ap.parse_args()
    if args.memory_child:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        memory_child("detect", args.memory_child, args.size, list(args.spacing))
        return

    run = start_run("detector", args.threads)
    model, card = run.model, run.card
    phantom = generate_phantom((args.slices, args.size, args.size), args.spacing, seed=0)
    volume = phantom.volume
    seconds, result = timed(lambda: run_to_completion(
        detect_lesions(volume, model, card, threads=0)))
    gemm_after = gemm_gflops()

    grid = ModelGridSlices(volume, card, model.in_slices // 2)
    sample = grid[0:DEFAULT_BATCH]
    fast = prepare_model(model)
    per_slice = count_flops(lambda: fast(sample)) / len(sample)  # slices are independent
    out = {
        **result_head("detect", args, volume, card, run.weights, result.precision),
        "batch": DEFAULT_BATCH,
        "detections": len(result.detections),
        "true_lesions": len(phantom.lesions),
        "seconds": seconds,
        "seconds_per_slice": seconds / args.slices,
        "gflop_per_slice": per_slice / 1e9,
        **versus_references(run, gemm_after, per_slice * args.slices, seconds,
                            grid[0:args.naive_slices], args,
                            "model only (no resampling, no peak extraction), on the model grid"),
    }
    if cpu_supports_bf16():
        s16, r16 = timed(lambda: run_to_completion(
            detect_lesions(volume, model, card, precision="bf16", threads=0)))
        out["bf16"] = {
            "seconds": s16, "speedup_vs_fp32": seconds / s16,
            "max_heatmap_difference": float(abs(r16.heatmap - result.heatmap).max()),
            "detections": len(r16.detections),
        }
        out["bf16"].update(bf16_references(out, s16))
    out["goals"] = speed_goals(out)
    if "memory" not in args.skip:
        add_memory_section(out, __file__, "detect", args, run.threads["threads"])
    finish(out, run, T0)


if __name__ == "__main__":
    main()

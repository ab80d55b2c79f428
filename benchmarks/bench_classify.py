"""Classify every slice of a 512×512×200 phantom CT end to end; print ONE JSON object.

    .venv/bin/python benchmarks/bench_classify.py [--slices 200] [--size 512]

End to end = normalise + resample in-plane to the model grid, batched slice classifier,
softmax. Peak memory growth for 100 vs 400 slices as in bench_segment.py. Same-run
references: fp32 GEMM rate and the naive run (eager fp32, no BN folding, no
channels_last, one slice at a time through ``forward`` on the model grid).
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
    classify_volume,
    cpu_supports_bf16,
    prepare_model,
)
from napari_medseg.core.phantom import generate_phantom  # noqa: E402
from napari_medseg.core.progress import run_to_completion  # noqa: E402

T0 = time.perf_counter()


def main() -> None:
    ap = bench_parser(__doc__, naive_slices=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=(), choices=("memory",))
    add_memory_options(ap)
    args = ap.parse_args()
    if args.memory_child:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        memory_child("classify", args.memory_child, args.size, list(args.spacing))
        return

    run = start_run("classifier", args.threads)
    model, card = run.model, run.card
    volume = generate_phantom((args.slices, args.size, args.size), args.spacing, seed=0).volume
    seconds, result = timed(lambda: run_to_completion(
        classify_volume(volume, model, card, threads=0)))
    gemm_after = gemm_gflops()

    context = (model.in_channels - 1) // 2
    grid = ModelGridSlices(volume, card, context)
    sample = grid[0:DEFAULT_BATCH]
    fast = prepare_model(model)
    per_slice = count_flops(lambda: fast(sample)) / len(sample)  # slices are independent
    out = {
        **result_head("classify", args, volume, card, run.weights, result.precision),
        "batch": DEFAULT_BATCH,
        "seconds": seconds,
        "seconds_per_slice": seconds / args.slices,
        "gflop_per_slice": per_slice / 1e9,
        **versus_references(run, gemm_after, per_slice * args.slices, seconds,
                            grid[0:args.naive_slices], args,
                            "model only (no resampling), on the model grid"),
    }
    if cpu_supports_bf16():
        s16, r16 = timed(lambda: run_to_completion(
            classify_volume(volume, model, card, precision="bf16", threads=0)))
        out["bf16"] = {
            "seconds": s16, "speedup_vs_fp32": seconds / s16,
            "max_probability_difference": float(
                abs(r16.probabilities - result.probabilities).max()),
            "class_agreement": float((r16.predicted == result.predicted).mean()),
        }
        out["bf16"].update(bf16_references(out, s16))
    out["goals"] = speed_goals(out)
    if "memory" not in args.skip:
        add_memory_section(out, __file__, "classify", args, run.threads["threads"])
    finish(out, run, T0)


if __name__ == "__main__":
    main()

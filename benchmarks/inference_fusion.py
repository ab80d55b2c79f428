"""What the inference copy's fused convs buy, end to end, in one run; print ONE JSON object.

    .venv/bin/python benchmarks/inference_fusion.py [--slices 200] [--size 512] [--repeats 3]
        [--out benchmarks/results/inference_fusion.json]

For classify, segment and detect on the 512×512×200 phantom (bundled models), in bf16 (on
a CPU with native bf16; fp32 too with ``--fp32``, where nothing is rewritten, as a check of
the noise): the engine's end-to-end time with its bf16 copy of the prepared model
(``core.models.fusion``: conv + activation as one oneDNN call, weights bfloat16 once) and
with the fp32 prepared model under autocast (as before: autocast casts the weights on
every call, activations run apart).
The two alternate, best of ``--repeats`` each (a shared machine only gives lower bounds),
with the naive run (eager fp32, one slice at a time, model only) and a GEMM measured in
the same run, and the largest output difference between fused and unfused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    _timed,
    emit,
    gemm_gflops,
    get_model,
    machine,
    naive_seconds_per_slice,
    per_slice_forward,
    per_slice_recurrent,
)

from napari_medseg.core import inference  # noqa: E402
from napari_medseg.core.models import fusion  # noqa: E402
from napari_medseg.core.phantom import generate_phantom  # noqa: E402
from napari_medseg.core.progress import run_to_completion  # noqa: E402

TASKS = {  # task → (model, engine job, naive per-slice run, output to compare)
    "classify": ("classifier", inference.classify_volume, per_slice_forward,
                 lambda r: r.probabilities),
    "segment": ("segmenter", inference.segment_volume, per_slice_recurrent,
                lambda r: r.labels),
    "detect": ("detector", inference.detect_lesions, per_slice_forward,
               lambda r: r.heatmap),
}


class Unfused:
    """The engine as before fusion: its bf16 runs use the fp32 prepared model (autocast
    casts the weights on every call)."""

    def __enter__(self):
        self.patches = [
            mock.patch.object(inference._Prepared, "model_for", lambda self, bf16: self.model),
        ]
        for p in self.patches:
            p.start()
        inference._PREPARED.clear()
        return self

    def __exit__(self, *exc):
        for p in self.patches:
            p.stop()
        inference._PREPARED.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-slices", type=int, default=12)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--fp32", action="store_true", help="time fp32 the same way (a noise check)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    volume = generate_phantom((args.slices, args.size, args.size), (1.25, 0.7, 0.7),
                              seed=0).volume
    precisions = (["fp32"] if args.fp32 else []) + (
        ["bf16"] if inference.cpu_supports_bf16() else [])
    if not precisions:
        sys.exit("this CPU has no native bf16: nothing is fused here (try --fp32)")
    out = {"benchmark": "inference_fusion", "volume_zyx": [args.slices, args.size, args.size],
           "fused_op_available": fusion.fused_conv_available(),
           "gemm_gflops_fp32_before": gemm_gflops(), "tasks": {}}
    if "bf16" in precisions:
        out["gemm_gflops_bf16_before"] = gemm_gflops(dtype=torch.bfloat16)
    for task in args.tasks:
        name, job, naive_run, output = TASKS[task]
        model, card, weights = get_model(name)
        context = (model.in_channels - 1) // 2 if task == "classify" else (
            model.in_slices // 2 if task == "detect" else 0)
        grid = inference.ModelGridSlices(volume, card, context)
        naive = naive_seconds_per_slice(model, grid[0:args.naive_slices].contiguous(),
                                        naive_run) * args.slices
        row = {"weights": weights, "naive_seconds_scaled": naive}
        for precision in precisions:
            results, best = {}, {"fused": np.inf, "unfused": np.inf}
            for _ in range(args.repeats):
                for variant in ("fused", "unfused"):
                    def run():
                        results[variant] = run_to_completion(
                            job(volume, model, card, precision=precision, threads=0))
                    if variant == "fused":
                        best[variant] = min(best[variant], _timed(run))
                    else:
                        with Unfused():
                            best[variant] = min(best[variant], _timed(run))
            a, b = output(results["fused"]), output(results["unfused"])
            row[precision] = {
                "seconds_fused": best["fused"], "seconds_unfused": best["unfused"],
                "speedup_fused_over_unfused": best["unfused"] / best["fused"],
                "speedup_vs_naive_fused": naive / best["fused"],
                "speedup_vs_naive_unfused": naive / best["unfused"],
                "precision_run": [results["fused"].precision, results["unfused"].precision],
                ("label_agreement" if task == "segment" else "max_difference"): (
                    float((a == b).mean()) if task == "segment"
                    else float(np.nanmax(np.abs(a.astype(np.float64) - b)))),
            }
        out["tasks"][task] = row
    out["gemm_gflops_fp32_after"] = gemm_gflops()
    if "bf16" in precisions:
        out["gemm_gflops_bf16_after"] = gemm_gflops(dtype=torch.bfloat16)
    out["machine"] = machine()
    out["wall_time_total_s"] = time.perf_counter() - t0
    emit(out, args.out)


if __name__ == "__main__":
    main()

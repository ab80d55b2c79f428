"""Shared pieces of the benchmarks: same-run GEMM reference, models, FLOP counting, memory.

Every figure is reported next to a reference measured in the same run (a bare time on a shared machine means little).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_medseg.core.inference import cpu_supports_bf16, default_threads, model_grid
from napari_medseg.core.models import build_model
from napari_medseg.core.models.registry import BUNDLED_DIR, load_model

#: card values used when no bundled weights exist yet (the training defaults)
FALLBACK = {
    "segmenter": {"architecture": "RecurrentSegmenter", "arch_params": {"n_classes": 9},
                  "classes": [f"class_{i}" for i in range(9)], "input_spacing_mm": [2.5, 1.5, 1.5],
                  "normalisation": {"type": "window", "low": -200.0, "high": 300.0}},
    "classifier": {"architecture": "SliceClassifier", "arch_params": {"n_classes": 3},
                   "classes": ["no_body", "normal", "lesion"], "input_spacing_mm": [5.0, 1.5, 1.5],
                   "normalisation": {"type": "window", "low": -150.0, "high": 250.0}},
    "detector": {"architecture": "LesionDetector", "arch_params": {"in_slices": 3},
                 "classes": ["lesion"], "input_spacing_mm": [2.5, 1.0, 1.0],
                 "normalisation": {"type": "window", "low": -150.0, "high": 250.0},
                 "peak_threshold": 0.3, "min_distance_mm": 6.0, "context_slices": 1},
}


def free_cores(sample_s: float = 0.5) -> tuple[int, float]:
    """(threads to use, cores other processes kept busy) measured over ``sample_s``.

    The benchmarks pin this many threads for every measurement of a run (ours, naive,
    MONAI, GEMM), so all figures share one setting; on a machine that another job keeps
    busy, 2 threads on 2 cores run small-op networks ~100× slower than 1 (OpenMP barriers).
    """
    from napari_medseg.core.inference import _cpu_jiffies

    a, t0 = _cpu_jiffies(), time.perf_counter()
    time.sleep(sample_s)
    b, t1 = _cpu_jiffies(), time.perf_counter()
    if a is None or b is None:
        return default_threads(), 0.0
    others = max(0.0, (b[0] - a[0]) / (t1 - t0))
    return max(1, min(default_threads(), int(default_threads() - others + 0.3))), others


class LoadMonitor:
    """Average number of cores OTHER processes kept busy between start and stop.

    Timings on a shared machine are only comparable when this is small: every JSON
    reports it (``other_processes_busy_cores_during_run``)."""

    def __init__(self) -> None:
        from napari_medseg.core.inference import _cpu_jiffies

        self._jiffies = _cpu_jiffies
        self.start = (time.perf_counter(), self._ours(), _cpu_jiffies())

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self) -> float | None:
        wall0, ours0, jiff0 = self.start
        jiff = self._jiffies()
        if jiff0 is None or jiff is None:
            return None
        wall = time.perf_counter() - wall0
        return max(0.0, (jiff[0] - jiff0[0]) - (self._ours() - ours0)) / wall


def gemm_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``repeats`` torch.mm rate on n×n (the machine's reference rate now); fp32
    unless ``dtype`` says otherwise."""
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def bf16_references(out: dict[str, Any], seconds_bf16: float) -> dict[str, Any]:
    """The bf16 run's rate next to a bf16 GEMM measured now, and the ceiling over the
    naive fp32 run at that rate: on a CPU with native bf16 (AMX: 6x the fp32 GEMM) the
    fp32 ceiling says nothing of what bf16 could reach."""
    gemm16 = gemm_gflops(dtype=torch.bfloat16)
    useful = out["gflops_achieved"] * out["seconds"] / seconds_bf16
    return {"speedup_vs_naive": out["naive"]["seconds_scaled"] / seconds_bf16,
            "gemm_gflops_same_run": gemm16, "gflops_achieved": useful,
            "ratio": useful / gemm16,
            "speedup_ceiling_at_gemm_rate": gemm16 / out["naive"]["gflops_achieved"]}


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def get_model(name: str) -> tuple[torch.nn.Module, dict, str]:
    """(model, card, "bundled" | "random-init"): bundled weights if present, else a random
    model with the same architecture parameters (speed does not depend on weights)."""
    if (BUNDLED_DIR / f"{name}.json").is_file():
        model, card = load_model(BUNDLED_DIR / f"{name}.json")
        return model, card, f"bundled ({name}.json, sha256 {card['sha256'][:12]})"
    card = dict(copy.deepcopy(FALLBACK[name]), name=name)
    torch.manual_seed(0)
    model = build_model(card).eval()
    for m in model.modules():  # realistic BN statistics, so folding is not a no-op
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, card, "random-init (no bundled weights yet; default architecture)"


def _fused_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """The fused conv + activation the prepared models run (``core.models.fusion``):
    counted as the conv it is (2 FLOPs per multiply-add; FlopCounterMode does not know the
    op and would count it as nothing)."""
    n, c_out = out_shape[0], out_shape[1]
    return 2 * n * c_out * math.prod(out_shape[2:]) * math.prod(w_shape[1:])


def count_flops(fn: Callable[[], Any]) -> int:
    fused = {}
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        fused[torch.ops.mkldnn._convolution_pointwise] = _fused_conv_flops
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=fused) as counter:
        fn()
    return int(counter.get_total_flops())


def per_slice_forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One slice at a time through ``model.forward``."""
    for i in range(len(x)):
        model(x[i : i + 1])


def per_slice_recurrent(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The recurrent segmenter one slice at a time: encoder and decoder per slice, each
    recurrent unit stepped slice by slice with its state carried (both directions), so
    it computes exactly ``model(x)``. (Each slice as a one-slice sequence would be
    another, cheaper network: no state passes between slices.)"""
    feats, size = [], None
    for i in range(len(x)):
        xi, size = model._pad(x[i : i + 1])
        feats.append(model.encode(xi))

    def states(gru, reverse: bool) -> list[torch.Tensor]:
        h, out = None, [None] * len(x)
        for i in (reversed(range(len(x))) if reverse else range(len(x))):
            h = out[i] = gru.step(gru.project(feats[i][2]), h)
        return out

    h_fwd, h_bwd = states(model.gru_fwd, False), states(model.gru_bwd, True)
    return [model.decode(s1, s2, e3, h_fwd[i], h_bwd[i], size)
            for i, (s1, s2, e3) in enumerate(feats)]


def naive_seconds_per_slice(model: torch.nn.Module, x: torch.Tensor,
                            run: Callable[[torch.nn.Module, torch.Tensor], Any] = per_slice_forward
                            ) -> float:
    """The naive baseline: eager fp32, BatchNorm not folded, contiguous (not channels_last),
    one slice at a time (``run``) on the model grid; best of 2 passes."""
    model = copy.deepcopy(model).eval()
    best = float("inf")
    with torch.no_grad():
        run(model, x[:2])  # warm-up
        for _ in range(2):
            t0 = time.perf_counter()
            run(model, x)
            best = min(best, (time.perf_counter() - t0) / len(x))
    return best


def setup_threads(requested: int | None) -> dict[str, Any]:
    """Pin torch's threads for the whole run; returns what was chosen and why."""
    if requested:
        threads, others = requested, None
    else:
        threads, others = free_cores()
    torch.set_num_threads(threads)
    return {"threads": threads, "chosen": "--threads" if requested else "free cores at start",
            "other_processes_busy_cores_at_start": others}


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus_usable": default_threads(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def emit(result: dict[str, Any], out: str | None = None) -> None:
    """Print ``result`` as one JSON line (floats to 4 decimals); with ``out``, also
    write it there in full, indented. NaN and infinities become null (bare NaN is not
    JSON; a mean over no structure is NaN)."""
    def clean(v: Any, digits: int | None) -> Any:
        if isinstance(v, dict):
            return {k: clean(x, digits) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, digits) for x in v]
        if isinstance(v, (float, np.floating)):
            f = float(v)
            if not math.isfinite(f):
                return None
            return f if digits is None else round(f, digits)
        if isinstance(v, np.integer):
            return int(v)
        return v

    print(json.dumps(clean(result, 4)))
    sys.stdout.flush()
    if out:
        with open(out, "w") as fh:
            json.dump(clean(result, None), fh, indent=1, default=float)


def bench_parser(doc: str, naive_slices: int) -> argparse.ArgumentParser:
    """Parser with the options every benchmark shares: volume size, spacing, naive subset."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.25, 0.7, 0.7))
    ap.add_argument("--naive-slices", type=int, default=naive_slices)
    return ap


@dataclass
class BenchRun:
    """What every benchmark measures before its job: load, threads, machine, GEMM, model."""

    monitor: LoadMonitor
    threads: dict[str, Any]
    info: dict[str, Any]
    gemm: float
    model: torch.nn.Module
    card: dict
    weights: str


def start_run(name: str, threads: int | None) -> BenchRun:
    """Start the load monitor, pin threads, note the machine, measure GEMM, get ``name``."""
    monitor = LoadMonitor()
    chosen = setup_threads(threads)
    info = machine()
    gemm = gemm_gflops()
    model, card, weights = get_model(name)
    return BenchRun(monitor, chosen, info, gemm, model, card, weights)


def result_head(name: str, args: Any, volume: Any, card: dict, weights: str,
                precision: str) -> dict[str, Any]:
    """The first keys of every benchmark's JSON: what was run, on what, with which model."""
    return {
        "benchmark": name,
        "volume_zyx": [args.slices, args.size, args.size],
        "spacing_mm": list(args.spacing),
        "model_grid_yx": list(model_grid(volume, card)),
        "model_spacing_mm": card["input_spacing_mm"],
        "weights": weights,
        "precision": precision,
    }


def versus_references(run: BenchRun, gemm_after: float, flops_total: float, seconds: float,
                      naive_sample: torch.Tensor, args: Any, note: str,
                      naive_run: Callable = per_slice_forward) -> dict[str, Any]:
    """Same-run GEMM and naive comparison keys; times the naive run on ``naive_sample``.

    ``flops_total``: the FLOPs of ONE plain forward of the network over the whole volume
    (the useful work; an engine that recomputes part of it does not get credit for the
    repeat). The naive run's rate counts the FLOPs it executes on its sample, which are
    the same network's. ``speedup_ceiling_at_gemm_rate``: the most any implementation
    could gain over the naive run doing the useful FLOPs at the same-run GEMM rate.
    """
    gemm_ref = max(run.gemm, gemm_after)
    sample = naive_sample.contiguous()
    naive_slice = naive_seconds_per_slice(run.model, sample, naive_run)
    with torch.no_grad():
        naive_flops = count_flops(lambda: naive_run(run.model, sample)) / len(sample)
    naive_total = naive_slice * args.slices
    naive_gflops = naive_flops / naive_slice / 1e9
    gflops = flops_total / seconds / 1e9
    return {
        "gflops_achieved": gflops,
        "gemm_gflops_same_run": gemm_ref,
        "gemm_gflops_before_after": [run.gemm, gemm_after],
        "ratio": gflops / gemm_ref,
        "naive": {"seconds_scaled": naive_total, "slices_timed": len(sample),
                  "seconds_per_slice": naive_slice, "scaled_to": args.slices,
                  "gflop_per_slice": naive_flops / 1e9,
                  "gflops_achieved": naive_gflops, "ratio_to_gemm": naive_gflops / gemm_ref,
                  "note": note},
        "speedup_vs_naive": naive_total / seconds,
        "speedup_ceiling_at_gemm_rate": gemm_ref / naive_gflops,
    }


#: task → (bundled model, the engine job, the bytes of its output arrays)
def _memory_tasks() -> dict[str, tuple[str, Callable, Callable]]:
    from napari_medseg.core import inference as inf

    return {
        "segment": ("segmenter", inf.segment_volume, lambda r: r.labels.nbytes),
        "classify": ("classifier", inf.classify_volume,
                     lambda r: r.probabilities.nbytes + r.predicted.nbytes),
        # the heatmap and diameter map on the model grid are part of the result
        "detect": ("detector", inf.detect_lesions,
                   lambda r: r.heatmap.nbytes + r.diameter_map.nbytes),
    }


def memory_child(task: str, n_slices: int, size: int, spacing: list[float]) -> None:
    """Run in a fresh process: peak RSS growth of one ``task`` run on n_slices (printed)."""
    from napari_medseg.core.phantom import generate_phantom
    from napari_medseg.core.progress import run_to_completion
    from napari_medseg.core.volume import Volume

    name, job, output_bytes = _memory_tasks()[task]
    model, card, _ = get_model(name)
    base = generate_phantom((8, size, size), spacing, seed=0).volume.array
    array = np.ascontiguousarray(np.resize(base, (n_slices, size, size)))  # tiled, cheap
    volume = Volume(array, spacing)
    warm = Volume(array[:8], spacing)
    run_to_completion(job(warm, model, card, threads=0))  # prepared model, thread pools
    del warm
    # the warm-up's freed heap pages stay resident and the job would reuse them without
    # raising the peak: hand them back first, so the peak counts the job's working set
    gc.collect()
    trimmed = _malloc_trim()
    exact = peak_rss_reset()
    before = rss_mb()
    seconds, result = timed(lambda: run_to_completion(job(volume, model, card, threads=0)))
    peak = rss_mb("VmHWM")
    print(json.dumps({
        "slices": n_slices, "seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
        "growth_mb": peak - before, "input_mb": array.nbytes / 2**20,
        "output_mb": output_bytes(result) / 2**20, "peak_counter_reset": exact,
        "heap_trimmed": trimmed,
    }))


def _malloc_trim() -> bool:
    """glibc's malloc_trim(0): return freed heap pages to the kernel; False elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def add_memory_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--memory-slices", type=int, nargs=2, default=(100, 400))
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)


# The speed goals for a 512×512×200 volume, checked the same way by every task
SPEED_GOALS = {"seconds_max": 10.0, "gemm_fraction_min": 0.40, "naive_speedup_min": 5.0}


def speed_goals(out: dict) -> dict:
    """The goals met or not, from this run's measured seconds, GEMM ratio and naive speed-up."""
    return {
        "seconds_le_10": out["seconds"] <= SPEED_GOALS["seconds_max"],
        "ratio_ge_0.40": out["ratio"] >= SPEED_GOALS["gemm_fraction_min"],
        "speedup_vs_naive_ge_5": out["speedup_vs_naive"] >= SPEED_GOALS["naive_speedup_min"],
    }


def add_memory_section(out: dict[str, Any], script: str, task: str, args: Any,
                       threads: int) -> None:
    """Put peak memory growth for ``args.memory_slices`` into ``out`` (each size in a
    fresh ``script`` subprocess: kernel peak-RSS counter reset right before the job) and
    its goal into ``out["goals"]``: bounded when, from the small to the large volume, peak
    growth rises by no more than the larger output arrays plus 10 % of the extra input
    (the working set is per chunk or batch, not per volume)."""
    mem: dict[str, Any] = {}
    for n in args.memory_slices:
        cmd = [sys.executable, script, "--memory-child", str(n), "--size", str(args.size),
               "--threads", str(threads), "--spacing", *map(str, args.spacing)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            mem[str(n)] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        mem[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["memory"] = mem
    ok = sorted((m for m in mem.values() if "growth_mb" in m), key=lambda m: m["slices"])
    if len(ok) == 2 and ok[0]["slices"] < ok[1]["slices"]:
        small, large = ok
        out["memory_growth_minus_output_mb"] = [m["growth_mb"] - m["output_mb"] for m in ok]
        allowed = (large["output_mb"] - small["output_mb"]
                   + 0.1 * (large["input_mb"] - small["input_mb"]))
        out.setdefault("goals", {})["memory_bounded_by_output_plus_chunk"] = (
            large["growth_mb"] - small["growth_mb"] <= allowed)


def finish(out: dict[str, Any], run: BenchRun, t0: float) -> None:
    """Add threads, load during the run, machine and total wall time; print the JSON."""
    out["threads"] = run.threads
    out["other_processes_busy_cores_during_run"] = run.monitor.others()
    out["machine"] = run.info
    out["wall_time_total_s"] = time.perf_counter() - t0
    emit(out)

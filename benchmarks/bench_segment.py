"""Segment a 512×512×200 phantom CT end to end; print ONE JSON object.

    .venv/bin/python benchmarks/bench_segment.py [--slices 200] [--size 512]

End to end = normalise + resample in-plane to the model grid, the chunked recurrent
segmenter (both passes), labels back on the input grid. Reported next to same-run
references: fp32 GEMM rate (torch.mm 2048²), against which the useful FLOPs (one plain
forward; the stream's recomputed part is reported apart, as ``ratio_executed``) are
rated; the same network run naively (eager fp32, no BN folding, no channels_last, one
slice at a time on the model grid: encoder and decoder per slice, the recurrent units
stepped slice by slice with their state carried; timed on a subset of slices and
scaled), MONAI's 2D BasicUNet through SliceInferer at the
native resolution (subset, scaled), and peak memory growth for 100 vs 400 slices (each in
a fresh subprocess: kernel peak-RSS counter reset right before the job).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    bench_parser,
    bf16_references,
    count_flops,
    finish,
    gemm_gflops,
    add_memory_options,
    per_slice_recurrent,
    add_memory_section,
    speed_goals,
    memory_child,
    result_head,
    start_run,
    timed,
    versus_references,
)

from napari_medseg.core.inference import (  # noqa: E402
    BOUNDARY_FRACTION_MAX,
    DEFAULT_CHUNK,
    labels_from_logits,
    ModelGridSlices,
    cpu_supports_bf16,
    prepare_model,
    segment_volume,
)
from napari_medseg.core.phantom import generate_phantom  # noqa: E402
from napari_medseg.core.progress import run_to_completion  # noqa: E402
from napari_medseg.core.resample import resample_yx  # noqa: E402
from napari_medseg.core.volume import Volume  # noqa: E402



def _boundary_fraction(logits: torch.Tensor) -> float:
    """Fraction of model-grid pixels whose right or lower neighbour has another argmax."""
    arg = logits.argmax(1)
    edge = torch.zeros_like(arg, dtype=torch.bool)
    edge[:, :-1] |= arg[:, :-1] != arg[:, 1:]
    edge[:, :, :-1] |= arg[:, :, :-1] != arg[:, :, 1:]
    return float(edge.float().mean())


def monai_seconds_per_slice(volume: Volume, n_slices: int, n_classes: int) -> dict:
    """MONAI BasicUNet (2D, default features) through SliceInferer at native resolution."""
    try:
        import monai
        from monai.inferers import SliceInferer
        from monai.networks.nets import BasicUNet
    except ImportError as exc:
        return {"skipped": f"monai not installed ({exc})"}
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=n_classes).eval()
    _, ny, nx = volume.shape
    inferer = SliceInferer(roi_size=(ny, nx), sw_batch_size=4, spatial_dim=0, progress=False)
    x = np.clip(volume.array[:n_slices], -200, 300) / 500.0
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    with torch.inference_mode():
        net(x[0, :, 0:1])  # warm-up
        seconds, out = timed(lambda: inferer(x, net).argmax(1))
    flops = count_flops(lambda: net(x[0, :, 0:1]))
    return {"monai_version": monai.__version__, "network": "BasicUNet(spatial_dims=2, default"
            " features (32, 32, 64, 128, 256, 32))", "inferer": "SliceInferer(roi_size=slice,"
            " sw_batch_size=4)", "slices_timed": n_slices, "seconds_per_slice": seconds / n_slices,
            "gflop_per_slice": flops / 1e9}


def main() -> None:
    ap = bench_parser(__doc__, naive_slices=12)
    ap.add_argument("--monai-slices", type=int, default=4)
    add_memory_options(ap)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every measurement (default: free cores at start)")
    ap.add_argument("--skip", nargs="*", default=(), choices=("bf16", "monai", "memory"))
    args = ap.parse_args()
    if args.memory_child:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        memory_child("segment", args.memory_child, args.size, list(args.spacing))
        return

    run = start_run("segmenter", args.threads)
    model, card, threads = run.model, run.card, run.threads
    phantom = generate_phantom((args.slices, args.size, args.size), args.spacing, seed=0)
    volume = phantom.volume

    # end to end, default settings (fp32), cold (includes prepare_model)
    seconds, result = timed(
        lambda: run_to_completion(segment_volume(volume, model, card, threads=0)))
    gemm_after = gemm_gflops()

    # FLOPs over the whole volume: of one plain forward (the useful work, which the GEMM
    # ratio and the naive comparison count) and executed by the chunked two-pass stream
    # (it recomputes the encoder and the backward unit: not credited in the ratio)
    grid = ModelGridSlices(volume, card)
    fast = prepare_model(model)
    with torch.inference_mode():
        everything = grid[0 : args.slices]
        forward_total = count_flops(lambda: model(everything))
        executed_total = count_flops(lambda: list(fast.iter_chunks(everything, DEFAULT_CHUNK)))
        del everything

    # where the time goes (first n slices, chunk by chunk as the engine does, scaled)
    n_part = min(args.slices, 6 * DEFAULT_CHUNK)
    part = ModelGridSlices(volume, card)
    t_prep, chunks = 0.0, []
    for a in range(0, n_part, DEFAULT_CHUNK):
        dt, x = timed(lambda: part[a : min(a + DEFAULT_CHUNK, n_part)])
        t_prep += dt
        chunks.append(x)
    prepped = torch.cat(chunks).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        t_net, logits = timed(lambda: [c.logits for c in fast.iter_chunks(prepped, DEFAULT_CHUNK)
                                       if c.logits is not None])
        t_back = sum(timed(lambda: labels_from_logits(lg, volume.shape[1:]))[0] for lg in logits)
    boundary = float(np.mean([_boundary_fraction(lg) for lg in logits]))
    # what a trained model's labels-back would cost: "ideal logits" from the phantom's
    # ground truth on the model grid (few boundary pixels, the fast exact path)
    t_ideal = 0.0
    n_cls = len(card["classes"])
    for a in range(0, n_part, DEFAULT_CHUNK):
        truth = phantom.labels[a : min(a + DEFAULT_CHUNK, n_part)]
        onehot = (truth[:, None] == np.arange(n_cls)[None, :, None, None]).astype(np.float32)
        ideal = torch.from_numpy(8 * resample_yx(onehot, volume.spacing[1:],
                                                 card["input_spacing_mm"][1:], order=1))
        t_ideal += timed(lambda: labels_from_logits(ideal, volume.shape[1:]))[0]
    scale = args.slices / n_part
    breakdown = {"slices_timed": n_part, "scaled_to": args.slices,
                 "input_prep_s_both_passes": 2 * t_prep * scale,
                 "network_s": t_net * scale,
                 "labels_back_s": t_back * scale,
                 "labels_back_s_ideal_logits": t_ideal * scale,
                 "boundary_pixel_fraction": boundary,
                 "labels_back_path": "all class maps interpolated (boundary fraction > "
                 f"{BOUNDARY_FRACTION_MAX})" if boundary > BOUNDARY_FRACTION_MAX
                 else "boundary pixels only"}
    del logits, prepped, chunks

    out = {
        **result_head("segment", args, volume, card, run.weights, result.precision),
        "chunk": DEFAULT_CHUNK,
        "seconds": seconds,
        "seconds_per_slice": seconds / args.slices,
        "gflop_per_slice_one_forward": forward_total / args.slices / 1e9,
        "gflop_per_slice_executed": executed_total / args.slices / 1e9,
        "gflops_executed": executed_total / seconds / 1e9,
        **versus_references(run, gemm_after, forward_total, seconds, grid[0:args.naive_slices],
                            args, "model only (no resampling), on the model grid; encoder and "
                            "decoder per slice, recurrent units stepped slice by slice with "
                            "their state carried", naive_run=per_slice_recurrent),
        "breakdown": breakdown,
    }
    out["ratio_executed"] = out["gflops_executed"] / out["gemm_gflops_same_run"]
    if "bf16" not in args.skip and cpu_supports_bf16():
        s16, r16 = timed(lambda: run_to_completion(
            segment_volume(volume, model, card, precision="bf16", threads=0)))
        sauto, rauto = timed(lambda: run_to_completion(
            segment_volume(volume, model, card, precision="auto", threads=0)))
        out["bf16"] = {"seconds": s16, "speedup_vs_fp32": seconds / s16,
                       "label_agreement_vs_fp32": float((r16.labels == result.labels).mean()),
                       "auto_chose": rauto.precision, "auto_seconds": sauto}
        out["bf16"].update(bf16_references(out, s16))
    if "monai" not in args.skip:
        mon = monai_seconds_per_slice(volume, args.monai_slices, len(card["classes"]))
        if "seconds_per_slice" in mon:
            mon["seconds_scaled"] = mon["seconds_per_slice"] * args.slices
            out["speedup_vs_monai"] = mon["seconds_scaled"] / seconds
            # most of that speed-up is less work (another network, at the native grid,
            # not the model's): say how much, and each side's rate per FLOP
            mon["flop_ratio_to_segmenter"] = (mon["gflop_per_slice"]
                                              / out["gflop_per_slice_one_forward"])
            mon["gflops_achieved"] = mon["gflop_per_slice"] / mon["seconds_per_slice"]
            mon["ratio_to_gemm"] = mon["gflops_achieved"] / out["gemm_gflops_same_run"]
        out["monai"] = mon
    out["goals"] = speed_goals(out)
    if "memory" not in args.skip:
        add_memory_section(out, __file__, "segment", args, threads["threads"])
    finish(out, run, T0)


T0 = time.perf_counter()
if __name__ == "__main__":
    main()

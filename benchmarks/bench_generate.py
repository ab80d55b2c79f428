"""Slice generation: PSNR/SSIM of regenerated slices, model vs linear vs cubic, same run.

    .venv/bin/python benchmarks/bench_generate.py [--volumes 12] [--model generator] > out.json
    .venv/bin/python benchmarks/bench_generate.py --validation --model DIR/generator.json
        [--residual-scale 1]   # the network's residual as it is, without the calibration
    .venv/bin/python benchmarks/bench_generate.py --speed-only   # the 512² speed part alone

``--validation`` scores on validation phantoms instead (seeds 800006 on: the first six
are the ones the residual scale is fitted on), to choose between training variants
without looking at the evaluation seeds the card and the docs report.

Slices are removed from a volume and regenerated; each method is scored against the
removed (acquired) slices with scikit-image's PSNR (over all removed slices of a volume;
data range = the volume's) and SSIM (mean of per-slice 2D SSIM):

- held-out phantoms (evaluation seeds and settings never used in training: z 1.25–6 mm,
  in-plane 0.55–1.3 mm, noise 5–35 HU, contrast 0.75–1.25), made 2× and 3× thicker by
  keeping every 2nd / 3rd slice, and a "gaps" pattern (runs of 1–3 missing slices);
- real MR volumes that ship with nibabel (its test data: ``anatomical.nii``, a
  33×41×25 structural brain image at 2 mm, and the first frame of ``example4d.nii.gz``,
  a 128×96×24 EPI brain at 2×2×2.2 mm), resliced along their own slice axis. No bundled
  pydicom file is a multi-slice image (CT_small and MR_small are single slices; the
  multi-frame ones are a 10×10 dose grid and colour ultrasound), so none is used. The
  model has only seen CT phantoms: these are out-of-domain checks.

Also the seconds per generated 512² slice, with the same-run linear interpolation time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _common import count_flops, emit, gemm_gflops, machine, setup_threads
from napari_medseg.core.evaluation import seed_list
from napari_medseg.core.generation import (
    compare_on,
    generate_slices,
    interpolate_slices,
    removal_pattern,
    summarise_scores,
)
from napari_medseg.core.models.registry import load_model
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom
from napari_medseg.core.volume import Volume


def gaps_pattern(n: int, seed: int) -> np.ndarray:
    """Runs of 1–3 missing slices, about a quarter of the volume, ends kept."""
    rng = np.random.default_rng([seed, 3])
    known = np.ones(n, dtype=bool)
    while (~known).sum() < n // 4:
        g = int(rng.integers(1, 4))
        z0 = int(rng.integers(1, n - g - 1))
        known[z0:z0 + g] = False
    return known


def nibabel_volumes() -> dict[str, tuple[np.ndarray, tuple[float, float, float]]]:
    """Real MR volumes from nibabel's test data, as (z, y, x) with z the slice axis."""
    import nibabel as nib

    folder = Path(nib.__file__).parent / "tests" / "data"
    out = {}
    for name in ("anatomical.nii", "example4d.nii.gz"):
        path = folder / name
        if not path.exists():
            continue
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = img.header.get_zooms()
        if data.ndim == 4:
            data = data[..., 0]
        # nibabel's arrays are (x, y, z): slices along the last axis
        out[name] = (np.ascontiguousarray(np.transpose(data, (2, 1, 0))),
                     (float(zooms[2]), float(zooms[1]), float(zooms[0])))
    return out


def speed_512(model, card, threads: int) -> dict:
    """512² slices, x2 on a 32-slice volume (31 generated), against the same-run GEMM
    rate and linear interpolation. The ratio counts ONE plain forward of the network over
    the output grid (the useful work, as every other benchmark's ratio); the stream
    recomputes its encoder and backward unit, reported apart as ``ratio_executed``."""
    from napari_medseg.core.generation import GeneratorInputs, plan_generation
    from napari_medseg.core.resample import resample_yx

    ph = make_phantom(900_000, eval_settings(900_000))
    big = resample_yx(ph.volume.array[:32], ph.volume.spacing[1:], (0.5, 0.5), order=1)
    pad = [(0, 0), (0, max(0, 512 - big.shape[1])), (0, max(0, 512 - big.shape[2]))]
    big = np.pad(big, pad, mode="edge")[:, :512, :512]
    vol = Volume(big, (5.0, 0.5, 0.5), (0, 0, 0), "CT")
    gemm_before = gemm_gflops()
    t1 = time.perf_counter()
    result = run_to_completion(generate_slices(vol, model, card, factor=2, threads=0))
    model_s = time.perf_counter() - t1
    gemm_after = gemm_gflops()
    t2 = time.perf_counter()
    interpolate_slices(vol, 2, True, "linear")
    linear_s = time.perf_counter() - t2
    executed = count_flops(lambda: run_to_completion(generate_slices(vol, model, card, factor=2,
                                                                     threads=0)))
    _, known, _ = plan_generation(vol, 2, True)
    n_out, (_, ny, nx) = known.size, vol.shape
    inputs = GeneratorInputs(np.zeros((n_out, ny, nx), np.float32), known,
                             (vol.spacing[0] / 2, *vol.spacing[1:]))
    with torch.inference_mode():  # the FLOPs do not depend on the values
        useful = count_flops(lambda: model(torch.from_numpy(inputs[0:n_out])))
    gemm_ref = max(gemm_before, gemm_after)
    n_gen = int(result.generated.sum())
    return {"shape": list(big.shape), "generated_slices": n_gen, "output_slices": n_out,
            "seconds": model_s, "seconds_per_generated_slice": model_s / n_gen,
            "linear_seconds_same_run": linear_s,
            "gflop_one_forward": useful / 1e9, "gflop_executed": executed / 1e9,
            "gflops_achieved": useful / model_s / 1e9,
            "gflops_executed": executed / model_s / 1e9,
            "gemm_gflops_same_run": gemm_ref, "gemm_gflops_before_after": [gemm_before, gemm_after],
            "ratio": useful / model_s / 1e9 / gemm_ref,
            "ratio_executed": executed / model_s / 1e9 / gemm_ref, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=12, help="held-out phantoms")
    ap.add_argument("--model", default="generator", help="bundled name or card path")
    ap.add_argument("--residual-scale", type=float, default=None, metavar="A",
                    help="override the card's residual_scale (1: the raw network)")
    ap.add_argument("--validation", action="store_true",
                    help="validation phantoms (for choosing a variant), not evaluation")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every measurement (default: free cores at start)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the 512² speed measurement (no phantoms, no real volumes)")
    args = ap.parse_args()
    threads = setup_threads(args.threads)
    if args.speed_only:
        model, card = load_model(args.model)
        emit({"benchmark": "generate_speed", "model": card.get("name"),
              "model_sha256": card.get("sha256"), "speed_512": speed_512(model, card, threads),
              "machine": machine()})
        return
    # calibrate_generator fits the residual scale on the first validation seeds (5 for the
    # bundled card: 800000-800004); the volumes scored here start after the sixth
    first = VALIDATION_SEEDS[0] + 6
    seeds = (list(range(first, first + args.volumes)) if args.validation
             else seed_list(args.volumes))
    model, card = load_model(args.model)
    if args.residual_scale is not None:
        card = {**card, "residual_scale": args.residual_scale}
    t0 = time.perf_counter()
    patterns = {"x2": lambda n, s: removal_pattern(n, 2), "x3": lambda n, s: removal_pattern(n, 3),
                "gaps": gaps_pattern}
    phantom_rows: dict[str, list] = {k: [] for k in patterns}
    per_volume = []
    for s in seeds:
        settings = eval_settings(s)
        ph = make_phantom(s, settings)
        row = {"seed": s, "z_mm": ph.volume.spacing[0], "noise_hu": settings.noise_hu}
        for key, pattern in patterns.items():
            known = pattern(ph.volume.shape[0], s)
            scores = compare_on(ph.volume.array, known, model, card, ph.volume.spacing)
            phantom_rows[key].append(scores)
            row[f"{key}_model_minus_linear_db"] = round(
                scores["model"]["psnr"] - scores["linear"]["psnr"], 3)
        per_volume.append(row)
    real = {}
    for name, (array, spacing) in nibabel_volumes().items():
        real[name] = {"shape": list(array.shape), "spacing_mm": list(spacing)}
        for key in ("x2", "x3"):
            real[name][key] = compare_on(array, patterns[key](array.shape[0], 0), model, card,
                                         spacing)
    summary = {k: summarise_scores(v) for k, v in phantom_rows.items()}
    emit({
        "benchmark": "generate",
        "model": card.get("name"), "model_sha256": card.get("sha256"),
        "residual_scale": card.get("residual_scale"),
        "phantom_set": "validation" if args.validation else "evaluation",
        "phantom_seeds": [seeds[0], seeds[-1]],
        "phantoms": summary,
        "phantoms_per_volume": per_volume,
        "real_mr_nibabel_testdata": real,
        "speed_512": speed_512(model, card, threads),
        "goal": "PSNR >= 1 dB above both linear and cubic interpolation",
        "goals": {f"{k}_psnr_1db_above_linear_and_cubic":
                  bool(v["psnr_gain_over_best_baseline_db"] >= 1.0) for k, v in summary.items()},
        "seconds_total": time.perf_counter() - t0,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()

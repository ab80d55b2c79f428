"""Other scores for the detector's peaks than the heatmap's value at the peak, on
VALIDATION phantoms: do faint lesions have broad, low peaks that an averaged score ranks
above narrow false positives?

Each phantom is detected once (threshold 0.05); the same peaks (6 mm NMS, the card's
radius rule) are re-scored by the mean heatmap over 3×3 or 5×5 pixels, over a disk of
0.25 or 0.5 × the predicted radius (on the peak slice, or on it and its two
neighbours), or found on the heatmap smoothed in-plane (σ 1 or 2 pixels); then matched
and summarised as sensitivity (lesions ≥ 5 mm) at 0.25 / 0.5 / 1 / 2 / 4 FP per volume.
``found_at_1fp_by_size_and_contrast``: with the plain peak score, which lesions ≥ 5 mm
are found at the 1 FP/volume threshold, by diameter (< 10 mm or not) and |contrast|
(< 20 HU or not).

    .venv/bin/python benchmarks/detector_peak_scoring.py [--model CARD ...] > out.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy import ndimage

from napari_medseg.core import evaluation as ev
from napari_medseg.core.inference import detect_lesions
from napari_medseg.core.models.detector import extract_peaks
from napari_medseg.core.models.registry import load_model
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.resample import map_index
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom

SEEDS = list(range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + 12))
SCORINGS = ("peak", "mean3", "mean5", "disk25", "disk50", "z3disk25", "smooth1", "smooth2")
FP_RATES = (0.25, 0.5, 1, 2, 4)


def _disk_mean(heat: np.ndarray, zs: list[int], y: int, x: int, r: float) -> float:
    ri = int(np.ceil(r))
    yy, xx = np.mgrid[-ri:ri + 1, -ri:ri + 1]
    disk = yy ** 2 + xx ** 2 <= r * r
    return float(np.mean([np.pad(heat[z], ri, mode="edge")[y:y + 2 * ri + 1, x:x + 2 * ri + 1][disk].mean()
                          for z in zs]))


def _score(kind: str, heat: np.ndarray, p, pixel_mm: float) -> float:
    if kind.startswith("mean"):
        k = int(kind[-1]) // 2
        return float(heat[p.z, max(0, p.y - k):p.y + k + 1, max(0, p.x - k):p.x + k + 1].mean())
    if "disk" in kind:
        r = max(1.0, int(kind[-2:]) / 100 * p.diameter_mm / 2 / pixel_mm)
        zs = [p.z] if not kind.startswith("z3") else [
            z for z in (p.z - 1, p.z, p.z + 1) if 0 <= z < heat.shape[0]]
        return _disk_mean(heat, zs, p.y, p.x, r)
    return p.score


def froc_by_scoring(model, card) -> dict[str, dict]:
    records: dict[str, list] = {k: [] for k in SCORINGS}
    lesions = []  # (diameter mm, |contrast| HU, best matched plain peak score)
    for s in SEEDS:
        ph = make_phantom(s, eval_settings(s))
        res = run_to_completion(detect_lesions(ph.volume, model, card, threshold=0.05, threads=0))
        heat, diam = res.heatmap, res.diameter_map
        (nz, ny, nx), (h, w) = ph.volume.shape, heat.shape[1:]
        sz, sy, sx = ph.volume.spacing
        grid = (sz, sy * ny / h, sx * nx / w)
        for kind in SCORINGS:
            source, thr = heat, 0.05
            if kind.startswith("smooth"):  # smoothing lowers peaks: a lower floor
                source, thr = ndimage.gaussian_filter(heat, (0, int(kind[-1]), int(kind[-1]))), 0.02
            peaks = extract_peaks(source, diam, grid, threshold=thr, min_distance_mm=6.0,
                                  radius_fraction=res.nms_radius_fraction)
            dets = []
            for p in peaks:
                y, x = map_index([p.y, p.x], (h, w), (ny, nx))
                dets.append({"z": float(p.z), "y": float(y), "x": float(x),
                             "score": _score(kind, heat, p, grid[1])})
            dets, matched = ev.match_phantom_lesions(dets, ph)
            records[kind].append({"scores": [d["score"] for d in dets], "matched": matched,
                                  "diameters": [2 * les.radius_mm for les in ph.lesions]})
            if kind == "peak":
                for i, les in enumerate(ph.lesions):
                    best = max((d["score"] for d, m in zip(dets, matched) if m == i), default=0.0)
                    lesions.append((2 * les.radius_mm, abs(les.contrast_hu), best))
    out: dict[str, dict] = {k: {f"{f:g}": round(ev.froc_point(records[k], f)["sensitivity"], 4)
                                for f in FP_RATES} for k in SCORINGS}
    thr = ev.froc_point(records["peak"], 1.0)["threshold"]
    groups: dict[str, list] = {}
    for d, c, best in lesions:
        if d >= ev.MIN_DIAMETER_MM:
            key = f"{'<10' if d < 10 else '>=10'} mm, |contrast| {'<20' if c < 20 else '>=20'} HU"
            groups.setdefault(key, []).append(thr is not None and best >= thr)
    out["found_at_1fp_by_size_and_contrast"] = {
        k: f"{sum(v)} of {len(v)}" for k, v in sorted(groups.items())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="card path or bundled name")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"validation_seeds": [SEEDS[0], SEEDS[-1]], "fp_per_volume": list(FP_RATES),
           "models": {}}
    for name in args.model or ["detector"]:
        model, card = load_model(name)
        out["models"][name] = froc_by_scoring(model, card)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

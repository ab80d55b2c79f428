"""Multi-scale test-time detection, measured on VALIDATION phantoms (tried, not adopted).

    .venv/bin/python benchmarks/detector_multiscale.py [--scale 2.0] [--seeds 12]

The bundled detector runs on its 1.0 mm grid and, with the same weights, on a coarser
``--scale`` mm grid (a large faint lesion then looks smaller and less noisy); the coarse
heatmap (and diameters × scale) is resized to the 1.0 mm grid and merged by max or mean,
then peaks are extracted with the card's NMS. Printed and in the JSON: sensitivity for
lesions ≥ 5 mm at 0.25 / 0.5 / 1 / 2 / 4 false positives per volume for each way.
About 1 min for 12 phantoms.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from _common import emit, machine
from napari_medseg.core.evaluation import _run, froc_point, match_phantom_lesions
from napari_medseg.core.inference import detect_lesions
from napari_medseg.core.models import load_model
from napari_medseg.core.models.detector import extract_peaks
from napari_medseg.core.resample import map_index
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0)


def matched_peaks(heat: np.ndarray, size: np.ndarray, ph, card: dict) -> dict:
    """Peaks of a model-grid heatmap (threshold 0.05, the card's NMS), in input voxels,
    matched to the phantom's lesions: one volume's record for ``froc_point``."""
    vol = ph.volume
    (nz, ny, nx), (sz, sy, sx), (h, w) = vol.shape, vol.spacing, heat.shape[1:]
    peaks = extract_peaks(heat, size, (sz, sy * ny / h, sx * nx / w), threshold=0.05,
                          min_distance_mm=card["min_distance_mm"],
                          radius_fraction=card["nms_radius_fraction"])
    dets = []
    for p in peaks:
        y, x = map_index([p.y, p.x], (h, w), (ny, nx))
        dets.append({"z": float(p.z), "y": float(y), "x": float(x), "score": p.score})
    return volume_record(dets, ph)


def volume_record(dets: list[dict], ph) -> dict:
    """``froc_point``'s record of one volume: detections (z, y, x, score in input voxels)
    matched to the phantom's lesions."""
    dets, matched = match_phantom_lesions(dets, ph)
    return {"scores": [d["score"] for d in dets], "matched": matched,
            "diameters": [2 * les.radius_mm for les in ph.lesions]}


def sensitivity_table(records: dict[str, list], n_seeds: int) -> dict:
    """Sensitivity ≥ 5 mm at :data:`FP_RATES` for each way's records."""
    first = next(iter(records.values()))
    return {"seeds": [VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + n_seeds],
            "n_lesions_ge_5mm": froc_point(first, 1.0)["n_lesions"],
            "fp_per_volume": list(FP_RATES),
            "sensitivity_ge_5mm": {w: [round(froc_point(r, f)["sensitivity"], 3) for f in FP_RATES]
                                   for w, r in records.items()}}


def report(result: dict, out: str | None) -> None:
    """Print each way's sensitivities, then the JSON (and write it to ``out``)."""
    for way, row in result["sensitivity_ge_5mm"].items():
        print(way, row, flush=True)
    emit(result, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=2.0, help="the coarse grid, mm")
    ap.add_argument("--seeds", type=int, default=12, help="validation phantoms")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    model, card = load_model("detector")
    ways = ("single", "coarse", "max", "mean")
    records = {w: [] for w in ways}
    for seed in range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + args.seeds):
        ph = make_phantom(seed, eval_settings(seed))
        vol = ph.volume
        heats, sizes = [], []
        for sc in (1.0, args.scale):
            c = {**card, "input_spacing_mm": [1.0, sc, sc]}
            r = _run(detect_lesions(vol, model, c, threshold=0.05, threads=0))
            heats.append(r.heatmap)
            sizes.append(np.nan_to_num(r.diameter_map, nan=10.0) * sc)
        h, w = heats[0].shape[1:]

        def fine(a):
            t = torch.from_numpy(a)[:, None]
            return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()

        hc, sc_ = fine(heats[1]), fine(sizes[1])
        size_max = np.where(hc > heats[0], sc_, sizes[0])
        maps = {"single": (heats[0], sizes[0]), "coarse": (hc, sc_),
                "max": (np.maximum(heats[0], hc), size_max), "mean": ((heats[0] + hc) / 2, size_max)}
        for way, (heat, size) in maps.items():
            records[way].append(matched_peaks(heat, size, ph, card))
    result = {"benchmark": "detector_multiscale", "scale_mm": args.scale,
              **sensitivity_table(records, args.seeds), "machine": machine()}
    report(result, args.out)


if __name__ == "__main__":
    main()

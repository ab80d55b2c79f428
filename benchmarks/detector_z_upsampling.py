"""Thick slices made thinner before detection, on VALIDATION phantoms.

The detector was trained on slices of 1–5 mm; validation and held-out volumes reach
6 mm. Each volume whose slice spacing exceeds TARGET mm is linearly interpolated along z
by the smallest whole factor that brings it to TARGET or below, detected, and the
detections mapped back (z / factor); sensitivity (lesions ≥ 5 mm) at 0.25 / 0.5 / 1 / 2 /
4 FP per volume, over all 12 phantoms and over those with slices ≥ 5 mm.

    .venv/bin/python benchmarks/detector_z_upsampling.py [--model CARD] > out.json
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from napari_medseg.core import evaluation as ev
from napari_medseg.core.models.registry import load_model
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom
from napari_medseg.core.volume import Volume

SEEDS = list(range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + 12))
TARGETS = (None, 3.0, 2.5, 2.0)  # None: the volume as it is
FP_RATES = (0.25, 0.5, 1, 2, 4)


def upsampled(volume: Volume, factor: int) -> Volume:
    a = volume.array
    n = a.shape[0]
    z = np.arange((n - 1) * factor + 1) / factor
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (z - lo)[:, None, None]
    dz, sy, sx = volume.spacing
    return Volume(((1 - w) * a[lo] + w * a[hi]).astype(np.float32), (dz / factor, sy, sx),
                  volume.origin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="detector", help="card path or bundled name")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, card = load_model(args.model)
    md = float(card.get("min_distance_mm", 6.0))
    records: dict = {t: [] for t in TARGETS}
    for s in SEEDS:
        ph = make_phantom(s, eval_settings(s))
        dz = ph.volume.spacing[0]
        for t in TARGETS:
            factor = 1 if t is None else max(1, math.ceil(dz / t - 1e-9))
            vol = ph.volume if factor == 1 else upsampled(ph.volume, factor)
            dets = ev.predict_detector(model, card, vol, threshold=0.05)[md]
            for d in dets:
                d["z"] /= factor
            dets, matched = ev.match_phantom_lesions(dets, ph)
            records[t].append({"scores": [d["score"] for d in dets], "matched": matched,
                               "diameters": [2 * les.radius_mm for les in ph.lesions], "dz": dz})

    def froc(recs):
        return {f"{f:g}": round(ev.froc_point(recs, f)["sensitivity"], 4) for f in FP_RATES}

    print(json.dumps({
        "model": args.model, "validation_seeds": [SEEDS[0], SEEDS[-1]],
        "by_target_spacing_mm": {
            "as is" if t is None else f"{t:g}": {
                "all": froc(records[t]),
                "slices_ge_5mm": froc([r for r in records[t] if r["dz"] >= 5])}
            for t in TARGETS}}, indent=1))


if __name__ == "__main__":
    main()

"""Why the slice generator gains so little over linear interpolation: three checks.

    .venv/bin/python benchmarks/generate_analysis.py > benchmarks/results/generate_analysis.json

On held-out phantoms (evaluation seeds 900000–900005, every 2nd slice removed):

1. where linear interpolation's squared error lies: the share in air voxels (< −500 HU,
   mostly bowel gas inside the body) and in bone (> 300 HU), on a 48×200×200 phantom at
   2.5 mm (seed 907002) and on the six evaluation phantoms;
2. classical motion-compensated interpolation: scikit-image TV-L1 optical flow between
   the two neighbours, both warped halfway and averaged, PSNR against linear;
3. in-plane Gaussian smoothing (σ 0.5 and 1 px) of the linear result: does removing
   noise help?
4. how much of linear interpolation's error is noise: the same phantom made without
   noise (same anatomy) is an estimate of the removed slices that is off by their noise
   only, the most any method could reach (PSNR against the noisy slices, as scored);
   and linear interpolation of the noise-free neighbours (what denoising the inputs
   would give).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from skimage.metrics import peak_signal_noise_ratio
from skimage.registration import optical_flow_tvl1
from skimage.transform import warp
from scipy.ndimage import gaussian_filter

from _common import emit, machine
from napari_medseg.core.generation import linear_fill, removal_pattern, scored_slices
from napari_medseg.core.phantom import generate_phantom
from napari_medseg.core.training import eval_settings, make_phantom


def flow_midpoint(a: np.ndarray, b: np.ndarray, lo: float = -1024.0, hi: float = 500.0):
    an, bn = ((np.clip(x, lo, hi) - lo) / (hi - lo) for x in (a, b))
    v, u = optical_flow_tvl1(an, bn)
    rr, cc = np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij")
    wa = warp(a, np.array([rr - 0.5 * v, cc - 0.5 * u]), mode="edge", order=1)
    wb = warp(b, np.array([rr + 0.5 * v, cc + 0.5 * u]), mode="edge", order=1)
    return 0.5 * (wa + wb)


def error_shares(array: np.ndarray, known: np.ndarray) -> dict:
    removed = scored_slices(known)
    e2 = (linear_fill(array, known) - array)[removed] ** 2
    truth = array[removed]
    return {"air_lt_-500HU": float(e2[truth < -500].sum() / e2.sum()),
            "bone_gt_300HU": float(e2[truth > 300].sum() / e2.sum())}


def main() -> None:
    ph = generate_phantom((48, 200, 200), (2.5, 1.0, 1.0), seed=907002)
    out = {"benchmark": "generate_analysis",
           "error_share_seed907002_2.5mm": error_shares(ph.volume.array, removal_pattern(48, 2)),
           "phantoms": []}
    for s in range(900_000, 900_006):
        settings = eval_settings(s)
        a = make_phantom(s, settings).volume.array
        known = removal_pattern(a.shape[0], 2)
        removed = scored_slices(known)
        rng = float(a.max() - a.min())
        lin = linear_fill(a, known)

        def psnr(est):
            return float(peak_signal_noise_ratio(a[removed], est[removed], data_range=rng))

        flow = lin.copy()
        for z in np.flatnonzero(removed):
            flow[z] = flow_midpoint(a[z - 1], a[z + 1])
        clean = make_phantom(s, replace(settings, noise_hu=0.0)).volume.array
        row = {"seed": s, "slice_mm": settings.spacing[0], "noise_hu": settings.noise_hu,
               "linear": psnr(lin), "tvl1_flow": psnr(flow),
               "noise_free_slices": psnr(clean),
               "linear_of_noise_free_neighbours": psnr(linear_fill(clean, known)),
               "error_share": error_shares(a, known)}
        for sigma in (0.5, 1.0):
            sm = lin.copy()
            for z in np.flatnonzero(removed):
                sm[z] = gaussian_filter(lin[z], sigma)
            row[f"linear_smoothed_{sigma}px"] = psnr(sm)
        out["phantoms"].append(row)
    gains = [r["tvl1_flow"] - r["linear"] for r in out["phantoms"]]
    out["tvl1_gain_db"] = {"mean": float(np.mean(gains)), "min": float(min(gains)),
                           "max": float(max(gains))}
    for key in ("noise_free_slices", "linear_of_noise_free_neighbours"):
        g = [r[key] - r["linear"] for r in out["phantoms"]]
        out[f"{key}_gain_db"] = {"mean": float(np.mean(g)), "min": float(min(g)),
                                 "max": float(max(g))}
    out["smoothing_ever_helps"] = any(r[f"linear_smoothed_{s}px"] > r["linear"]
                                      for r in out["phantoms"] for s in (0.5, 1.0))
    out["machine"] = machine()
    emit(out)


if __name__ == "__main__":
    main()

"""An organ-normalised blob detector beside the CNN detector (tried, not adopted).

    .venv/bin/python benchmarks/detector_blob.py [--heldout] [--seeds 12] [--outer 2]
        [--edge-mm 2.5] [--weight 4] [--out JSON]

About 3 min for 12 phantoms (the segmenter runs on each).

The oracle observer (``lesion_detectability.py``) says the held-out images allow far more
than the CNN detector finds. The oracle knows each lesion's shape, sign and host organ.
This observer knows none of them, only the host organs as the bundled segmenter labels
them (or, as a bound, the phantom's true organs): in each host organ it compares a
Gaussian-weighted mean around every voxel (σ ≈ 0.45 · r, the second moment of a ball of
radius r) with a wider one (σ = ``--outer`` · that), both over that organ's voxels only
(normalised convolution, so a neighbouring organ never enters; only voxels more than
``--edge-mm`` inside the organ, since its blurred border mixes in the neighbour), for radii
r of 2.5–14 mm.
Each difference is divided by its robust spread (1.4826 · MAD) over the organ; the score
of a voxel is the largest |z| over the radii. Peaks with the card's NMS, then scored like
``detector_tta.py`` (sensitivity ≥ 5 mm at 0.25 / 0.5 / 1 / 2 / 4 FP/volume). Arms:

- ``cnn``: the bundled detector (the product);
- ``blob``: this observer on the segmenter's organs; ``blob-truth``: on the true organs;
- ``fused``: the map z + ``--weight`` · (the CNN's heatmap on the native grid, max over
  5 × 5 pixels), peaks as above (the CNN's detections outside the organs stay).

``--heldout`` runs the held-out seeds (900000–900011) instead: scored once, after the
settings (``--outer 2 --edge-mm 2.5 --weight 4``) were chosen on validation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from _common import emit, machine
from detector_multiscale import FP_RATES, volume_record
from napari_medseg.core.evaluation import _run, froc_point, predict_segmenter
from napari_medseg.core.inference import detect_lesions
from napari_medseg.core.models import load_model
from napari_medseg.core.models.detector import extract_peaks
from napari_medseg.core.phantom import LESION_LABEL
from napari_medseg.core.training import EVAL_SEEDS, VALIDATION_SEEDS, eval_settings, make_phantom

HOSTS = (2, 3, 4, 5)  # liver, spleen, kidneys (phantom.LESION_HOSTS)
RADII_MM = (2.5, 3.5, 5.0, 7.0, 10.0, 14.0)


def host_masks(labels: np.ndarray, spacing, max_gap_mm: float = 8.0) -> dict[int, np.ndarray]:
    """Each host organ's voxels, with every lesion voxel given to its nearest host organ
    (a lesion is part of the organ it sits in; one farther than ``max_gap_mm`` is dropped)."""
    host_any = np.isin(labels, HOSTS)
    out = {k: labels == k for k in HOSTS}
    les = labels == LESION_LABEL
    if les.any() and host_any.any():
        dist, idx = ndimage.distance_transform_edt(~host_any, sampling=spacing, return_indices=True)
        owner = labels[tuple(idx)]
        for k in HOSTS:
            out[k] |= les & (owner == k) & (dist <= max_gap_mm)
    return out


def blob_score(image: np.ndarray, masks: dict[int, np.ndarray], spacing, outer: float = 2.0,
               radii=RADII_MM, min_support: float = 0.8, edge_mm: float = 2.5):
    """(score, diameter_mm) maps: max over radii of the robust z of inner − outer mean."""
    img = np.nan_to_num(image.astype(np.float32))
    score = np.zeros(img.shape, np.float32)
    diam = np.full(img.shape, 10.0, np.float32)
    sp = np.asarray(spacing, np.float64)
    for k, m in masks.items():
        if m.sum() < 50:
            continue
        box = ndimage.find_objects(m.astype(np.uint8))[0]
        pad = [int(np.ceil(3 * outer * 0.45 * max(radii) / s)) for s in sp]
        box = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
        # the organ's blurred border mixes in its neighbours: only voxels edge_mm inside count
        inner = ndimage.distance_transform_edt(m[box], sampling=sp) > edge_mm
        w = inner.astype(np.float32)
        iw = img[box] * w
        best = np.zeros(w.shape, np.float32)
        best_r = np.full(w.shape, 10.0, np.float32)
        for r in radii:
            s_in = 0.45 * r / sp
            a = ndimage.gaussian_filter(iw, s_in, truncate=3.0)
            na = ndimage.gaussian_filter(w, s_in, truncate=3.0)
            b = ndimage.gaussian_filter(iw, s_in * outer, truncate=3.0)
            nb = ndimage.gaussian_filter(w, s_in * outer, truncate=3.0)
            t = a / np.maximum(na, 1e-6) - b / np.maximum(nb, 1e-6)
            valid = inner & (na >= min_support)
            if valid.sum() < 50:
                continue
            vals = t[valid]
            med = np.median(vals)
            mad = 1.4826 * np.median(np.abs(vals - med)) + 1e-6
            z = np.where(valid, np.abs(t - med) / mad, 0.0).astype(np.float32)
            better = z > best
            best = np.where(better, z, best)
            best_r = np.where(better, 2 * r, best_r)
        sub = score[box]
        upd = best > sub
        score[box] = np.where(upd, best, sub)
        diam[box] = np.where(upd, best_r, diam[box])
    return score, diam


def native_heatmap(heat: np.ndarray, shape) -> np.ndarray:
    """The CNN's model-grid heatmap on the native grid (linear), max over 5 × 5 pixels so
    a blob peak a pixel or two off the CNN's peak still reads it."""
    nz, ny, nx = shape
    h, w = heat.shape[1:]
    out = ndimage.zoom(heat, (1, ny / h, nx / w), order=1)[:, :ny, :nx]
    out = np.pad(out, [(0, s - t) for s, t in zip(shape, out.shape)], mode="edge")
    return ndimage.maximum_filter(out, size=(1, 5, 5))


def peaks_record(score: np.ndarray, diam: np.ndarray, ph, card, threshold: float) -> dict:
    peaks = extract_peaks(score, diam, ph.volume.spacing, threshold=threshold,
                          min_distance_mm=card["min_distance_mm"],
                          radius_fraction=card["nms_radius_fraction"])
    return volume_record([{"z": float(p.z), "y": float(p.y), "x": float(p.x),
                           "score": float(p.score)} for p in peaks], ph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12, help="phantoms")
    ap.add_argument("--heldout", action="store_true", help="held-out seeds, not validation")
    ap.add_argument("--outer", type=float, default=2.0, help="outer σ ÷ inner σ")
    ap.add_argument("--edge-mm", type=float, default=2.5, help="organ border left out")
    ap.add_argument("--weight", type=float, default=4.0, help="the CNN heatmap's weight")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    det, card = load_model("detector")
    seg, seg_card = load_model("segmenter")
    first = EVAL_SEEDS[0] if args.heldout else VALIDATION_SEEDS[0]
    records = {w: [] for w in ("cnn", "blob", "blob-truth", "fused")}
    t0 = time.perf_counter()
    for seed in range(first, first + args.seeds):
        ph = make_phantom(seed, eval_settings(seed))
        vol = ph.volume
        r = _run(detect_lesions(vol, det, card, threshold=0.05, threads=0))
        records["cnn"].append(volume_record(
            [{"z": d.z, "y": d.y, "x": d.x, "score": d.score} for d in r.detections], ph))
        labels = predict_segmenter(seg, seg_card, vol)
        for arm, lab in (("blob", labels), ("blob-truth", ph.labels)):
            z, diam = blob_score(vol.array, host_masks(lab, vol.spacing), vol.spacing,
                                 args.outer, edge_mm=args.edge_mm)
            records[arm].append(peaks_record(z, diam, ph, card, 2.0))
            if arm == "blob":
                fused = z + args.weight * native_heatmap(r.heatmap, vol.shape)
                records["fused"].append(peaks_record(fused, diam, ph, card, 1.0))
        print(seed, vol.shape, f"{time.perf_counter() - t0:.0f} s", flush=True)
    result = {"seeds": [first, first + args.seeds], "heldout": args.heldout,
              "outer": args.outer, "edge_mm": args.edge_mm, "weight": args.weight,
              "n_lesions_ge_5mm": froc_point(records["cnn"], 1.0)["n_lesions"],
              "fp_per_volume": list(FP_RATES),
              "sensitivity_ge_5mm": {w: [round(froc_point(r, f)["sensitivity"], 3) for f in FP_RATES]
                                     for w, r in records.items()},
              "machine": machine()}
    for w, row in result["sensitivity_ge_5mm"].items():
        print(w, row, flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()

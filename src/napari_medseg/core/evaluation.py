"""Held-out evaluation of the three models on phantoms no training run ever used.

Evaluation phantoms come from :data:`~.training.EVAL_SEEDS` (900 000+) and are drawn
with :func:`~.training.eval_settings`: other shapes (non-square), spacings (z 1.25–6 mm,
in-plane 0.55–1.3 mm), noise (5–35 HU) and contrast (0.75–1.25) than training. Each model
runs on the native volume through the inference engine users run
(:mod:`~napari_medseg.core.inference`: the card's normalisation, in-plane resampling to
the card's spacing, results mapped back to the native grid), and is scored there against
the phantom's exact ground truth.

Metrics
-------
- segmenter: Dice per structure, pooled over all voxels of all volumes (and the mean of
  per-volume Dice where the structure is present).
- classifier: confusion matrix over slices, per-class recall, balanced accuracy (mean
  recall over the classes present).
- detector: a detection matches a lesion when its centre lies within the lesion's
  radius + ``tolerance_mm`` (default 2 mm + half the slice spacing); greedy by score, one
  detection per lesion. Sensitivity for lesions ≥ 5 mm in diameter at the best threshold
  with ≤ 1 false positive per volume (detections matching smaller lesions are neither hits
  nor false positives there), at the card's threshold, and for all lesions.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import MedsegInputError
from .phantom import LABEL_NAMES, SLICE_CLASSES
from .models.detector import at_or_above, extract_peaks
from .resample import map_index
from .training import EVAL_SEEDS, TRAIN_SEED_BASE, VALIDATION_SEEDS, eval_settings, make_phantom

MIN_DIAMETER_MM = 5.0


def seed_list(seeds: int | Iterable[int] | None, seed_range: tuple[int, int] = EVAL_SEEDS,
              default: int = 12) -> list[int]:
    """``None`` → the first ``default`` seeds of the range; an int n → the first n; or a list."""
    if seeds is None:
        seeds = default
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        n = int(seeds)
        if n < 1 or n > seed_range[1] - seed_range[0]:
            raise MedsegInputError(
                f"number of phantoms must be 1..{seed_range[1] - seed_range[0]}, got {n}")
        return list(range(seed_range[0], seed_range[0] + n))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        # a string iterated digit by digit: '900000' evaluated seed 0 five times
        raise MedsegInputError(f"seeds must be a count or a list of integers, got {seeds!r}")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):  # -0.5 became 0
            raise MedsegInputError(f"seeds must be integers, got {s!r}")
        out.append(int(s))
    repeated = sorted({s for s in out if out.count(s) > 1})
    if repeated:  # one phantom counted twice in the figures
        raise MedsegInputError(f"seeds {repeated[:3]} are given more than once")
    if not out:
        raise MedsegInputError("no evaluation seeds given")
    # a metric on a phantom the model trained on, or a threshold tuned on held-out ones,
    # is not honest: explicit seeds are checked against the ranges
    trained = [s for s in out if s < 0 or s >= TRAIN_SEED_BASE]
    if trained:
        raise MedsegInputError(f"seeds {trained[:3]} are training seeds (or negative); "
                               f"use validation {VALIDATION_SEEDS} or evaluation {EVAL_SEEDS} seeds")
    if tuple(seed_range) == tuple(VALIDATION_SEEDS):
        held = [s for s in out if EVAL_SEEDS[0] <= s < EVAL_SEEDS[1]]
        if held:
            raise MedsegInputError(f"seeds {held[:3]} are held-out evaluation seeds; tune on "
                                   f"validation seeds {VALIDATION_SEEDS}")
    return out


def _run(job):
    from .progress import run_to_completion

    return run_to_completion(job)


def predict_segmenter(model, card, volume) -> np.ndarray:
    """Labels (z, y, x) uint8 on the volume's native grid (``inference.segment_volume``)."""
    from .inference import segment_volume

    return _run(segment_volume(volume, model, card, threads=0)).labels


def predict_classifier(model, card, volume) -> tuple[np.ndarray, np.ndarray]:
    """(classes (z,), probabilities (z, n_classes)) per slice (``inference.classify_volume``)."""
    from .inference import classify_volume

    res = _run(classify_volume(volume, model, card, threads=0))
    return res.predicted, res.probabilities


def predict_detector(model, card, volume, threshold: float | None = None,
                     min_distances: Sequence[float] | None = None) -> dict[float, list[dict[str, Any]]]:
    """Detections on the native grid per NMS distance (``inference.detect_lesions``).

    The model runs once; for NMS distances other than the card's the peaks are
    re-extracted from the returned heatmap with the engine's grid geometry.
    """
    from .inference import detect_lesions

    md_card = float(card.get("min_distance_mm", 6.0))
    res = _run(detect_lesions(volume, model, card, threshold=threshold, threads=0))
    out = {md_card: [{"z": d.z, "y": d.y, "x": d.x, "score": d.score,
                      "diameter_mm": d.diameter_mm} for d in res.detections]}
    thr = res.threshold
    (_, ny, nx), (h, w) = volume.shape, res.heatmap.shape[1:]
    sz, sy, sx = volume.spacing
    grid_spacing = (sz, sy * ny / h, sx * nx / w)
    for md in min_distances or ():
        if float(md) in out:
            continue
        peaks = extract_peaks(res.heatmap, res.diameter_map, grid_spacing, threshold=thr, min_distance_mm=md,
                              radius_fraction=res.nms_radius_fraction)
        dets = []
        for p in peaks:
            y, x = map_index([p.y, p.x], (h, w), (ny, nx))
            dets.append({"z": float(p.z), "y": float(y), "x": float(x), "score": p.score,
                         "diameter_mm": p.diameter_mm})
        out[float(md)] = dets
    return out


# -------------------------------------------------------------------------------------
# Metrics on plain arrays
# -------------------------------------------------------------------------------------


def overlap_counts(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, 3) per class: |pred ∩ truth|, |pred|, |truth|."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    truth = np.asarray(truth).ravel().astype(np.int64)
    if pred.shape != truth.shape:
        raise MedsegInputError(f"prediction and truth differ in size: {pred.size} vs {truth.size}")
    inter = np.bincount(truth[pred == truth], minlength=n_classes)[:n_classes]
    return np.stack([inter, np.bincount(pred, minlength=n_classes)[:n_classes],
                     np.bincount(truth, minlength=n_classes)[:n_classes]], axis=1)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class from :func:`overlap_counts`; NaN where both are empty."""
    counts = np.asarray(counts, dtype=np.float64)
    denom = counts[:, 1] + counts[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * counts[:, 0] / denom, np.nan)


def dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    return dice_from_counts(overlap_counts(pred, truth, n_classes))


def confusion_matrix(truth: Sequence[int], pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class. A prediction of −1 (a missing slice,
    as ``classify_volume`` gives it) is left out: it fell into the previous row's last
    column, counting a "normal" slice as a "no_body" slice called "lesion"."""
    t = np.asarray(truth, dtype=np.int64).ravel()
    p = np.asarray(pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.size} true classes for {p.size} predictions")
    if np.any((t < 0) | (t >= n_classes)) or np.any(p >= n_classes) or np.any(p < -1):
        raise ValueError(f"classes must lie in 0..{n_classes - 1} (−1: no prediction)")
    made = p >= 0
    return np.bincount(t[made] * n_classes + p[made],
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean recall over the classes that occur (rows with any sample)."""
    c = np.asarray(confusion, dtype=np.float64)
    support = c.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(c)[present] / support[present]))


def match_detections(detections: Sequence[Mapping[str, float]], lesions: Sequence[Mapping[str, Any]],
                     spacing: Sequence[float], tolerance_mm: float | None = None) -> list[int]:
    """For each detection (by descending score), the index of the lesion it hits, or −1.

    ``lesions``: dicts with "center" (z, y, x voxels) and "radius_mm". A hit: centre
    distance (mm) ≤ radius + tolerance; the nearest unmatched lesion wins; one detection
    per lesion (later ones on the same lesion are −1, i.e. false positives).
    Returns indices aligned with ``sorted(detections, key=score, reverse=True)``.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    tol = (2.0 + 0.5 * sp[0]) if tolerance_mm is None else float(tolerance_mm)
    centers = np.array([les["center"] for les in lesions], dtype=np.float64).reshape(-1, 3) * sp
    radii = np.array([les["radius_mm"] for les in lesions], dtype=np.float64)
    taken = np.zeros(len(lesions), dtype=bool)
    result = []
    for det in sorted(detections, key=lambda d: -d["score"]):
        p = np.array([det["z"], det["y"], det["x"]], dtype=np.float64) * sp
        if len(centers) == 0:
            result.append(-1)
            continue
        dist = np.linalg.norm(centers - p, axis=1)
        ok = (dist <= radii + tol) & ~taken
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmin(dist[ok])])
            taken[j] = True
            result.append(j)
        else:
            result.append(-1)
    return result


def match_phantom_lesions(detections: Sequence[Mapping[str, float]], phantom: Any
                          ) -> tuple[list[Mapping[str, float]], list[int]]:
    """``detections`` strongest first, and the index of the ``phantom``'s lesion each
    hits or −1 (:func:`match_detections` against its ground-truth lesions)."""
    dets = sorted(detections, key=lambda d: -d["score"])
    lesions = [{"center": les.center_zyx, "radius_mm": les.radius_mm} for les in phantom.lesions]
    return dets, match_detections(dets, lesions, phantom.volume.spacing)


def froc_point(per_volume: Sequence[Mapping[str, Any]], max_fp_per_volume: float = 1.0,
               min_diameter_mm: float = MIN_DIAMETER_MM) -> dict[str, Any]:
    """Best sensitivity (lesions ≥ ``min_diameter_mm``) with mean FP/volume ≤ the limit.

    ``per_volume``: dicts with "scores" (sorted descending), "matched" (lesion index or
    −1 per detection) and "diameters" (mm per lesion). Sweeps the threshold over all
    detection scores. Of the thresholds reaching that sensitivity, "threshold" is the
    LOWEST within the limit (it spends the false-positive budget: a threshold fitted on a
    few dozen validation lesions sits right at the last one's score otherwise, and finds
    fewer on new volumes), with its "fp_per_volume"; "fp_per_volume_needed" is what the
    highest of them costs, the fair figure to compare two detectors' points by. When no
    threshold within the limit finds a lesion, "threshold" is None with 0 false positives.
    """
    n_vol = len(per_volume)
    events = []  # (score, is_tp_large, is_fp)
    n_large = 0
    for v in per_volume:
        diam = np.asarray(v["diameters"], dtype=np.float64)
        n_large += int((diam >= min_diameter_mm).sum())
        for s, m in zip(v["scores"], v["matched"]):
            if m < 0:
                events.append((s, 0, 1))
            elif diam[m] >= min_diameter_mm:
                events.append((s, 1, 0))
    events.sort(key=lambda e: -e[0])
    best = {"threshold": None, "sensitivity": 0.0, "fp_per_volume": 0.0,
            "fp_per_volume_needed": 0.0, "n_lesions": n_large}
    tp = fp = 0
    i = 0
    while i < len(events):
        s = events[i][0]
        while i < len(events) and events[i][0] == s:
            tp += events[i][1]
            fp += events[i][2]
            i += 1
        if fp / max(n_vol, 1) <= max_fp_per_volume:
            sens = tp / max(n_large, 1)
            if sens > best["sensitivity"]:
                best["fp_per_volume_needed"] = fp / max(n_vol, 1)
            # a threshold that finds nothing is no operating point: while sensitivity is
            # 0 the point stays "above every score" (None, no false positives)
            if sens > 0 and sens >= best["sensitivity"]:
                best.update(threshold=float(s), sensitivity=sens, fp_per_volume=fp / max(n_vol, 1))
    return best


def _at_threshold(per_volume, threshold: float, min_diameter_mm: float) -> dict[str, Any]:
    tp_l = tp_all = fp = n_l = n_all = 0
    for v in per_volume:
        diam = np.asarray(v["diameters"], dtype=np.float64)
        n_l += int((diam >= min_diameter_mm).sum())
        n_all += len(diam)
        kept = at_or_above(v["scores"], threshold)  # as detect_lesions keeps them
        for m, keep in zip(v["matched"], kept):
            if not keep:
                continue
            if m < 0:
                fp += 1
            else:
                tp_all += 1
                tp_l += int(diam[m] >= min_diameter_mm)
    n_vol = max(len(per_volume), 1)
    return {
        "threshold": threshold,
        "sensitivity_ge_5mm": tp_l / max(n_l, 1),
        "sensitivity_all": tp_all / max(n_all, 1),
        "fp_per_volume": fp / n_vol,
        "n_lesions_ge_5mm": n_l,
        "n_lesions_all": n_all,
    }


# -------------------------------------------------------------------------------------
# Evaluation drivers
# -------------------------------------------------------------------------------------


def _phantoms(seeds: list[int], on_progress: Callable | None, what: str):
    for i, s in enumerate(seeds):
        settings = eval_settings(s)
        yield s, settings, make_phantom(s, settings)
        if on_progress is not None:
            on_progress(i + 1, len(seeds), f"{what}: phantom {i + 1}/{len(seeds)}")


def _seed_set(seeds: list[int]) -> str:
    """"evaluation" (held out from tuning), "validation" (tuned on), "other" (seeds of
    neither range, given through the Python API), or "mixed"."""
    def kind(s: int) -> str:
        return ("evaluation" if EVAL_SEEDS[0] <= s < EVAL_SEEDS[1] else
                "validation" if VALIDATION_SEEDS[0] <= s < VALIDATION_SEEDS[1] else "other")

    kinds = {kind(s) for s in seeds}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _settings_summary(seeds: list[int]) -> dict[str, Any]:
    return {
        "eval_seeds": [min(seeds), max(seeds) + 1] if seeds == list(range(min(seeds), max(seeds) + 1)) else seeds,
        "n_volumes": len(seeds),
        # validation seeds are where thresholds were tuned (a detector's peak threshold, a
        # generator's residual scale): scored there, a metric is optimistic, and says so
        "seed_set": _seed_set(seeds),
        "distribution": "eval_settings: z 1.25/2/2.5/3/5/6 mm, in-plane 0.55-1.3 mm, FOV 170-260 mm "
                        "non-square, contrast 0.75-1.25, noise 5-35 HU, 16-64 slices",
        "path": "core.inference (segment_volume / classify_volume / detect_lesions, fp32): "
                "card normalisation, resampled to the card spacing, results on the native grid",
    }


def evaluate_segmenter(model, card, seeds: int | Iterable[int] | None = None,
                       on_progress: Callable | None = None) -> dict[str, Any]:
    seeds = seed_list(seeds)
    n = len(card["classes"])
    # scored by name: the phantoms' structures, in their label order; classes a fine-tuned
    # model gained (a painted "stomach") have no truth there (scored, one predicted
    # anywhere showed as Dice 0 and became the headline minimum)
    truth = _phantom_classes(card, LABEL_NAMES, "structures")
    total = np.zeros((n, 3), dtype=np.int64)
    per_volume: list[np.ndarray] = []
    for _s, _settings, ph in _phantoms(seeds, on_progress, "segmenter"):
        pred = predict_segmenter(model, card, ph.volume)
        counts = overlap_counts(pred, ph.labels, n)
        total += counts
        dice = dice_from_counts(counts)
        dice[counts[:, 2] == 0] = np.nan  # absent from this volume's truth: not scored here
        per_volume.append(dice)
    d = dice_from_counts(total)
    pv = np.array(per_volume)
    names = list(card["classes"])
    # a structure neither in any truth nor predicted anywhere has no Dice (None, not NaN:
    # strict JSON has no NaN, and min() would skip it and call the target met)
    structures = {names[i]: round(float(d[i]), 4) if np.isfinite(d[i]) else None
                  for i in range(truth)}
    mean_pv = {names[i]: round(float(np.nanmean(pv[:, i])), 4) for i in range(truth)
               if np.isfinite(pv[:, i]).any()}
    fg = [structures[names[i]] for i in range(1, truth)]
    scored = [v for v in fg if v is not None]
    extra = [name for name in names[truth:] if not name.startswith("unused_")]
    # the phantoms' structures the model has no output for (a card of fewer classes):
    # "every structure" includes them (the target was called met without the lesion)
    lacking = [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)][truth:]
    return {
        "model": "segmenter",
        "dice": structures,
        "dice_mean_per_volume": mean_pv,
        "min_dice_foreground": min(scored) if scored else None,
        "target": "Dice >= 0.90 on every structure",
        "meets_target": bool(scored and len(scored) == len(fg) and min(scored) >= 0.90
                             and not lacking),
        **({"not_predicted": {
            "classes": lacking,
            "why": "the model has no output for these structures of the phantoms",
        }} if lacking else {}),
        **({"not_scored": {
            "classes": extra,
            "why": "the phantoms hold no ground truth for them; voxels predicted as them "
                   "count as misses of the phantom's structure there",
            "voxels_predicted": {names[i]: int(total[i, 1]) for i in range(truth, n)
                                 if not names[i].startswith("unused_")},
        }} if extra else {}),
        **_settings_summary(seeds),
    }


def _phantom_classes(card: Mapping[str, Any], truth: Mapping[int, str], what: str) -> int:
    """How many of the card's classes the phantoms score: the classes both have, which
    must be the phantoms' ``truth`` names in label order (MedsegInputError otherwise:
    scored by position, another order would compare one structure with another)."""
    names = [str(c) for c in card["classes"]]
    expected = [truth[i] for i in sorted(truth)]
    shared = min(len(names), len(expected))
    if names[:shared] != expected[:shared]:
        raise MedsegInputError(
            f"the model's classes {names} are not the phantoms' {what} {expected} in that "
            "order: it cannot be scored on them")
    return shared


def evaluate_classifier(model, card, seeds: int | Iterable[int] | None = None,
                        on_progress: Callable | None = None) -> dict[str, Any]:
    seeds = seed_list(seeds)
    n = len(card["classes"])
    if [str(c) for c in card["classes"]] != list(SLICE_CLASSES):  # scored by position
        raise MedsegInputError(f"the model's classes {list(card['classes'])} are not the "
                               f"phantoms' slice classes {list(SLICE_CLASSES)}")
    conf = np.zeros((n, n), dtype=np.int64)
    for _s, _settings, ph in _phantoms(seeds, on_progress, "classifier"):
        pred, _ = predict_classifier(model, card, ph.volume)
        conf += confusion_matrix(ph.slice_classes, pred, n)
    support = conf.sum(axis=1)
    recall = {card["classes"][i]: (round(float(conf[i, i] / support[i]), 4) if support[i] else None)
              for i in range(n)}
    bacc = balanced_accuracy(conf)
    return {
        "model": "classifier",
        "balanced_accuracy": round(bacc, 4),
        "accuracy": round(float(np.trace(conf) / max(conf.sum(), 1)), 4),
        "recall": recall,
        "confusion_matrix": conf.tolist(),
        "confusion_rows_true_cols_pred": list(card["classes"]),
        "n_slices": int(conf.sum()),
        "target": "balanced accuracy >= 0.95",
        "meets_target": bool(bacc >= 0.95),
        **_settings_summary(seeds),
    }


def detector_records(model, card, seeds: list[int], min_distance_mm: float | Sequence[float] | None = None,
                     low_threshold: float = 0.05, on_progress: Callable | None = None,
                     settings_fn: Callable = eval_settings) -> list[dict[str, Any]]:
    """Per-volume detections at a low threshold, matched to the lesions (for sweeps)."""
    if min_distance_mm is None:
        mds = [float(card.get("min_distance_mm", 6.0))]
    elif isinstance(min_distance_mm, (list, tuple)):
        mds = [float(m) for m in min_distance_mm]
    else:
        mds = [float(min_distance_mm)]
    records = []
    for i, s in enumerate(seeds):
        ph = make_phantom(s, settings_fn(s))
        by_md = predict_detector(model, card, ph.volume, threshold=low_threshold, min_distances=mds)
        rec = {"seed": s, "diameters": [2 * les.radius_mm for les in ph.lesions], "by_md": {}}
        for md in mds:
            dets, matched = match_phantom_lesions(by_md[md], ph)
            rec["by_md"][md] = {"scores": [d["score"] for d in dets], "matched": matched}
        records.append(rec)
        if on_progress is not None:
            on_progress(i + 1, len(seeds), f"detector: phantom {i + 1}/{len(seeds)}")
    return records


def _flatten(records, md):
    return [{"scores": r["by_md"][md]["scores"], "matched": r["by_md"][md]["matched"],
             "diameters": r["diameters"]} for r in records]


def tune_detector(model, card, seeds: int | Iterable[int] | None = 10,
                  min_distances: Sequence[float] = (6.0, 10.0, 15.0),
                  max_fp_per_volume: float = 0.7, on_progress: Callable | None = None) -> dict[str, Any]:
    """Pick ``peak_threshold`` and ``min_distance_mm`` on VALIDATION seeds (never eval)."""
    seeds = seed_list(seeds, VALIDATION_SEEDS, 10)
    records = detector_records(model, card, seeds, list(min_distances), on_progress=on_progress,
                               settings_fn=eval_settings)
    best = None
    for md in min_distances:
        point = froc_point(_flatten(records, md), max_fp_per_volume)
        if point["threshold"] is None:
            continue
        key = (point["sensitivity"], -point["fp_per_volume_needed"])
        if best is None or key > best[0]:
            best = (key, md, point)
    if best is None:
        return {"peak_threshold": 0.5, "min_distance_mm": 10.0, "validation": None}
    _, md, point = best
    thr = float(max(point["threshold"], 0.05))
    return {
        # rounded DOWN: detections are kept at score ≥ threshold, so rounding up past the
        # weakest lesion found on validation lost it (0.54978 → 0.5498 did)
        "peak_threshold": math.floor(thr * 1e4) / 1e4,
        "min_distance_mm": md,
        "validation": {"seeds": [min(seeds), max(seeds) + 1], "sensitivity_ge_5mm": round(point["sensitivity"], 4),
                       "fp_per_volume": round(point["fp_per_volume"], 3),
                       "fp_per_volume_needed": round(point["fp_per_volume_needed"], 3),
                       "max_fp_per_volume": max_fp_per_volume},
    }


def evaluate_detector(model, card, seeds: int | Iterable[int] | None = None,
                      on_progress: Callable | None = None) -> dict[str, Any]:
    from .inference import card_peak_threshold

    seeds = seed_list(seeds)
    md = float(card.get("min_distance_mm", 6.0))
    # detections are collected down to the card's threshold when it is below the sweep's
    # floor, or its false positives would be undercounted
    low = min(0.05, card_peak_threshold(card))
    records = detector_records(model, card, seeds, md, low_threshold=low, on_progress=on_progress)
    flat = _flatten(records, md)
    point = froc_point(flat, 1.0)
    at_card = _at_threshold(flat, card_peak_threshold(card), MIN_DIAMETER_MM)
    sweep = {f"{f:g}": round(froc_point(flat, f)["sensitivity"], 4) for f in (0.25, 0.5, 1, 2, 4)}
    sens = point["sensitivity"]
    return {
        "model": "detector",
        "sensitivity_ge_5mm_at_1fp": round(sens, 4),
        "threshold_at_1fp": point["threshold"],
        "fp_per_volume_at_that_threshold": round(point["fp_per_volume"], 3),
        "at_card_threshold": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in at_card.items()},
        "froc_sensitivity_ge_5mm": sweep,
        "match_rule": "centre within lesion radius + (2 mm + half the slice spacing); greedy by score",
        "target": "sensitivity >= 0.90 at <= 1 FP/volume for lesions >= 5 mm",
        # met only at the threshold chosen on validation (the card's): the FROC point above
        # picks its threshold on these held-out volumes, which a user cannot do
        "meets_target": bool(at_card["sensitivity_ge_5mm"] >= 0.90 and at_card["fp_per_volume"] <= 1.0),
        **_settings_summary(seeds),
    }


def evaluate_generator(model, card, seeds=None, on_progress=None) -> dict[str, Any]:
    from .generation import evaluate_generator as run  # generation builds on training

    return run(model, card, seeds, on_progress)


EVALUATORS = {
    "classifier": evaluate_classifier,
    "segmenter": evaluate_segmenter,
    "detector": evaluate_detector,
    "generator": evaluate_generator,
}


def evaluate(model, card, seeds=None, on_progress=None) -> dict[str, Any]:
    """Dispatch on the card's architecture."""
    kind = {"SliceClassifier": "classifier", "RecurrentSegmenter": "segmenter",
            "LesionDetector": "detector", "SliceGenerator": "generator"}.get(card.get("architecture", type(model).__name__))
    if kind is None:
        kind = card.get("name")
    if kind not in EVALUATORS:
        raise MedsegInputError(f"cannot evaluate a model of architecture {card.get('architecture')!r}")
    return EVALUATORS[kind](model, card, seeds, on_progress)

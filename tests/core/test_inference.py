"""The inference engine: outputs on the input grid, resampling, gaps, progress/cancel.

Models are random-init (geometry, not accuracy, is under test); no timings here.
"""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_medseg.core import inference
from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.inference import (
    ClassificationResult,
    DetectionResult,
    SegmentationResult,
    classify_volume,
    cpu_supports_bf16,
    detect_lesions,
    labels_from_logits,
    model_grid,
    prepare_model,
    segment_volume,
)
from napari_medseg.core.models import LesionDetector, RecurrentSegmenter, SliceClassifier
from napari_medseg.core.models.detector import DetectorOutput
from napari_medseg.core.phantom import generate_phantom
from napari_medseg.core.progress import Progress, run_to_completion
from napari_medseg.core.resample import resample_yx
from napari_medseg.core.volume import Volume

WINDOW = {"type": "window", "low": -200.0, "high": 300.0}
SEG_CLASSES = ["background", "body", "liver", "spleen"]


def _init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and non-trivial BatchNorm statistics (so folding is exercised)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def seg():
    model = _init(RecurrentSegmenter(n_classes=len(SEG_CLASSES), widths=(8, 16, 16), hidden=8))
    card = {"name": "seg", "classes": SEG_CLASSES, "input_spacing_mm": [2.5, 1.5, 1.5],
            "normalisation": WINDOW, "resample_axes": "yx"}
    return model, card


@pytest.fixture(scope="module")
def cls():
    model = _init(SliceClassifier(n_classes=3, filters=(8, 16, 16), hidden=16))
    card = {"name": "cls", "classes": ["no_body", "normal", "lesion"],
            "input_spacing_mm": [5.0, 2.0, 2.0], "normalisation": WINDOW}
    return model, card


@pytest.fixture(scope="module")
def det():
    model = _init(LesionDetector(in_slices=3, widths=(8, 16, 16)))
    card = {"name": "det", "classes": ["lesion"], "input_spacing_mm": [2.5, 1.5, 1.5],
            "normalisation": WINDOW, "peak_threshold": 0.0, "min_distance_mm": 4.0,
            "context_slices": 1}
    return model, card


def _volume(shape, spacing, seed=0, **kw) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.normal(40.0, 120.0, size=shape).astype(np.float32)
    if len(shape) == 2:
        return Volume.from_array(array, spacing, **kw)
    return Volume(array, spacing, **kw)


# (input shape, spacing): 2D image, odd sizes, anisotropic, one slice, at/above the
# model's resolution, non-integer ratios
CASES = [
    ((40, 33), (0.9, 1.1)),
    ((5, 37, 29), (3.0, 0.7, 1.3)),
    ((1, 48, 48), (2.5, 1.5, 1.5)),
    ((3, 20, 24), (1.0, 2.2, 2.0)),
    ((7, 17, 64), (2.0, 0.45, 0.8)),
    ((2, 9, 8), (5.0, 3.0, 3.0)),
]


@pytest.mark.parametrize("shape,spacing", CASES)
def test_outputs_come_back_on_the_input_grid(seg, cls, det, shape, spacing):
    volume = _volume(shape, spacing)
    zyx = volume.shape
    s = run_to_completion(segment_volume(volume, *seg, chunk=2))
    assert isinstance(s, SegmentationResult)
    assert s.labels.shape == zyx and s.labels.dtype == np.uint8
    assert s.labels.max() < len(SEG_CLASSES) and s.class_names == tuple(SEG_CLASSES)
    assert s.voxels_per_class.shape == (zyx[0], len(SEG_CLASSES))
    assert (s.voxels_per_class.sum(axis=1) == zyx[1] * zyx[2]).all()
    assert s.spacing == volume.spacing and s.labelled.all()

    c = run_to_completion(classify_volume(volume, *cls, batch=2))
    assert isinstance(c, ClassificationResult)
    assert c.probabilities.shape == (zyx[0], 3) and c.probabilities.dtype == np.float32
    np.testing.assert_allclose(c.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert c.predicted.shape == (zyx[0],) and ((c.predicted >= 0) & (c.predicted < 3)).all()

    d = run_to_completion(detect_lesions(volume, *det, batch=3))
    assert isinstance(d, DetectionResult)
    assert d.heatmap.shape == (zyx[0], *model_grid(volume, det[1]))
    assert d.heatmap_on_input_grid().shape == zyx
    for hit in d.detections:
        assert 0 <= hit.z < zyx[0] and -0.5 <= hit.y <= zyx[1] - 0.5
        assert -0.5 <= hit.x <= zyx[2] - 0.5 and np.isfinite(hit.diameter_mm)


def test_model_grid_follows_the_card_spacing(seg):
    volume = _volume((2, 100, 50), (2.5, 0.75, 1.5))
    assert model_grid(volume, seg[1]) == (50, 50)
    # a damaged card is named as such, not the image (it said "more than any body")
    with pytest.raises(MedsegInputError, match=r"model card 'seg' asks for 0\.0001 × 0\.0001"):
        model_grid(volume, {**seg[1], "input_spacing_mm": [1.0, 1e-4, 1e-4]})
    huge = Volume(np.zeros((1, 64, 64), np.float32), (1.0, 100.0, 100.0))  # cm read as mm
    with pytest.raises(MedsegInputError, match="more than any body"):
        model_grid(huge, seg[1])
    # a 200-digit field of view was printed; 1e308 mm pixels raised OverflowError
    absurd = Volume(np.zeros((1, 10, 10), np.float32), (2.5, 1e200, 1e200))
    with pytest.raises(MedsegInputError, match=r"covers 1e\+201 × 1e\+201 mm"):
        model_grid(absurd, seg[1])
    infinite = Volume(np.zeros((1, 10, 10), np.float32), (2.5, 1e308, 1e308))
    with pytest.raises(MedsegInputError, match="no finite field of view"):
        model_grid(infinite, seg[1])


def test_values_that_overflow_the_cards_normalisation_are_refused_not_classified(cls):
    """float32-max fill voxels under a z-score card with a small scale became inf, the
    network gave NaN and argmax called the slice class 0 with no probabilities."""
    model, card = cls
    zscore = {**card, "normalisation": {"type": "zscore", "mean": 0.0, "std": 1e-3}}
    array = np.zeros((2, 32, 32), np.float32)
    array[1] = np.finfo(np.float32).max
    with pytest.raises(MedsegInputError, match="overflow once normalised"):
        run_to_completion(classify_volume(Volume(array, (1.0, 1.0, 1.0)), model, zscore))
    array[1] = 1e3  # large but finite once normalised: runs
    result = run_to_completion(classify_volume(Volume(array, (1.0, 1.0, 1.0)), model, zscore))
    assert np.isfinite(result.probabilities).all()


def test_a_percentile_card_samples_the_volume_without_copying_it(monkeypatch):
    """The range was taken from ``array[~missing]``: a copy of every acquired slice at
    the start of a job whose memory otherwise follows its batch."""
    import tracemalloc

    from napari_medseg.core.models import registry
    from napari_medseg.core.models.registry import percentile_range

    monkeypatch.setattr(registry, "PERCENTILE_SAMPLES", 50_000)  # a large volume's share

    rng = np.random.default_rng(2)
    volume = Volume(rng.normal(size=(40, 128, 128)).astype(np.float32), (2.0, 1.0, 1.0),
                    missing=np.arange(40) % 7 == 3)
    spec = {"type": "percentile", "low_percentile": 1.0, "high_percentile": 99.0}
    card = {"input_spacing_mm": [2.0, 1.0, 1.0], "normalisation": spec}
    tracemalloc.start()
    try:
        slices = inference.ModelGridSlices(volume, card)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < volume.array.nbytes / 4, f"{peak / volume.array.nbytes:.2f} of the volume"
    low, high = percentile_range(volume.array[~volume.missing], spec)  # the same range
    assert (slices.norm["mean"], slices.norm["std"]) == (low, high - low)


def test_resize_uses_the_shared_resample_grid():
    """The engine's tensor resize and core.resample.resample_yx are the same grid."""
    x = np.random.default_rng(1).normal(size=(3, 37, 29)).astype(np.float32)
    ours = inference.resize_yx(torch.from_numpy(x)[:, None], (20, 51), antialias=True)[:, 0].numpy()
    theirs = resample_yx(x, (1.0, 1.0), (37 / 20, 29 / 51), order=1, out_shape_yx=(20, 51))
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    volume = Volume(x * 100.0, (2.0, 0.9, 1.3))
    card = {"input_spacing_mm": [2.0, 1.5, 1.5], "normalisation": WINDOW}
    batch = inference.ModelGridSlices(volume, card)[0:3][:, 0].numpy()
    want = resample_yx(inference.apply_normalisation(volume.array, WINDOW), (0.9, 1.3),
                       (1.5, 1.5), order=1)
    np.testing.assert_allclose(batch, want, atol=1e-6)


@pytest.mark.parametrize("context", [1, 2])
def test_grid_slices_reused_between_batches_equal_fresh_ones(context):
    """Consecutive, overlapping, repeated and backward batches (and a gap filled from a
    neighbour) give exactly what a fresh ModelGridSlices computes for that batch alone."""
    rng = np.random.default_rng(2)
    array = rng.normal(0, 200, size=(11, 23, 19)).astype(np.float32)
    missing = np.zeros(11, dtype=bool)
    missing[5] = True
    volume = Volume(array, (2.0, 0.9, 1.3), missing=missing)
    card = {"input_spacing_mm": [2.0, 1.5, 1.5], "normalisation": WINDOW}
    reused = inference.ModelGridSlices(volume, card, context)
    for a, b in [(0, 4), (4, 8), (8, 11), (8, 11), (2, 6), (0, 3), (6, 11)]:
        fresh = inference.ModelGridSlices(volume, card, context)[a:b]
        assert torch.equal(reused[a:b], fresh), (a, b)


@pytest.mark.parametrize("size", [(64, 64), (75, 53), (33, 96), (32, 32)])
def test_boundary_only_labels_equal_full_bilinear_argmax(size):
    torch.manual_seed(0)
    logits = F.avg_pool2d(torch.randn(3, 5, 32, 32), 3, 1, 1)
    fast = labels_from_logits(logits, size)
    full = inference.resize_yx(logits, size).argmax(1).to(torch.uint8)
    assert fast.dtype == torch.uint8 and fast.shape == (3, *size)
    assert (fast == full).float().mean() >= 0.9999


@pytest.mark.parametrize("boundary_max", [1.0, 0.0], ids=["boundary-pixels", "all-pixels"])
@pytest.mark.parametrize("grid", [(60, 60), (37, 23), (1, 9), (9, 1)])
@pytest.mark.parametrize("size", [(128, 128), (101, 75), (20, 60), (1, 1)])
def test_both_label_paths_equal_full_bilinear_argmax(grid, size, boundary_max, monkeypatch):
    """Each path forced by the boundary-fraction switch: output grids finer and coarser
    than the model's, and one-row / one-column inputs where the bilinear corners clamp."""
    monkeypatch.setattr(inference, "BOUNDARY_FRACTION_MAX", boundary_max)
    torch.manual_seed(1)
    logits = F.interpolate(torch.randn(2, 6, 4, 4), size=grid, mode="bicubic",
                           align_corners=True) * 5
    fast = labels_from_logits(logits, size)
    full = inference.resize_yx(logits, size).argmax(1).to(torch.uint8)
    assert fast.dtype == torch.uint8 and fast.shape == (2, *size)
    # exact ties may round either way; nothing else differs
    assert (fast != full).sum() <= max(1, fast.numel() // 100_000)


def test_labels_round_trip_through_a_coarser_grid_is_accurate():
    """Ideal probabilities at 1.4 mm, back to 0.7 mm: linear-then-argmax (the engine's
    choice) recovers the labels better than nearest-neighbour on the argmax."""
    ph = generate_phantom((3, 160, 160), (2.5, 0.7, 0.7), seed=3, n_lesions=2,
                          body_z_fraction=1.0)
    onehot = (ph.labels[:, None] == np.arange(9)[None, :, None, None]).astype(np.float32)
    coarse = torch.from_numpy(resample_yx(onehot, (0.7, 0.7), (1.4, 1.4), order=1))
    linear = labels_from_logits(coarse, (160, 160)).numpy()
    nearest = resample_yx(coarse.argmax(1).numpy().astype(np.uint8), (1.4, 1.4), (0.7, 0.7),
                          order=0, out_shape_yx=(160, 160))
    acc_linear, acc_nearest = (linear == ph.labels).mean(), (nearest == ph.labels).mean()
    assert acc_linear > 0.995 and acc_linear > acc_nearest + 0.001


def test_missing_slices_are_left_alone(seg, cls, det):
    missing = np.array([False, True, False, False, True, True, False])
    volume = _volume((7, 30, 30), (2.5, 1.5, 1.5), missing=missing)
    volume.array[missing] = np.nan
    s = run_to_completion(segment_volume(volume, *seg, chunk=3))
    assert (s.labels[missing] == 0).all() and (s.voxels_per_class[missing] == 0).all()
    assert (s.labelled == ~missing).all()
    c = run_to_completion(classify_volume(volume, *cls))
    assert np.isnan(c.probabilities[missing]).all() and (c.predicted[missing] == -1).all()
    assert np.isfinite(c.probabilities[~missing]).all()
    assert c.predicted_names()[1] is None
    d = run_to_completion(detect_lesions(volume, *det, threshold=0.0, min_distance_mm=0.0))
    assert d.detections, "threshold 0 must give peaks on acquired slices"
    assert not any(missing[int(hit.z)] for hit in d.detections)
    assert (d.heatmap[missing] == 0).all()


def test_missing_slices_borrow_their_nearest_neighbour_as_context():
    idx = inference._fill_index(np.array([True, False, True, True, True, False, True]))
    assert idx.tolist() == [1, 1, 1, 1, 5, 5, 5]


def test_all_missing_volume_runs_no_model(seg):
    volume = _volume((3, 16, 16), (2.5, 1.5, 1.5), missing=np.ones(3, bool))
    s = run_to_completion(segment_volume(volume, *seg))
    assert (s.labels == 0).all() and not s.labelled.any()


def test_nan_voxels_in_acquired_slices(seg, cls, det):
    volume = _volume((4, 24, 24), (2.5, 1.5, 1.5))
    volume.array[1, 3:9, 5:20] = np.nan
    volume = Volume(np.where(np.arange(4)[:, None, None] == 2, np.nan, volume.array),
                    volume.spacing)  # an all-NaN slice not flagged missing: the Volume flags it
    assert volume.missing_slices() == [2]
    s = run_to_completion(segment_volume(volume, *seg))
    assert s.labels.shape == (4, 24, 24) and s.labels.max() < len(SEG_CLASSES)
    assert s.labelled.tolist() == [True, True, False, True]
    c = run_to_completion(classify_volume(volume, *cls))
    assert np.isfinite(c.probabilities[[0, 1, 3]]).all() and c.predicted[2] == -1
    d = run_to_completion(detect_lesions(volume, *det))
    assert np.isfinite(d.heatmap).all() and np.isfinite(d.diameter_map[[0, 1, 3]]).all()
    assert all(np.isfinite([p.z, p.y, p.x, p.score, p.diameter_mm]).all() for p in d.detections)
    assert all(round(p.z) != 2 for p in d.detections)


def test_progress_is_reported_and_a_job_can_be_cancelled(seg, det):
    volume = _volume((9, 32, 32), (2.5, 1.5, 1.5))
    reports: list[Progress] = []
    run_to_completion(segment_volume(volume, *seg, chunk=2), reports.append)
    assert all(isinstance(r, Progress) for r in reports)
    assert reports[-1].step == reports[-1].total == 10  # 2 passes × 5 chunks
    assert [r.step for r in reports] == sorted(r.step for r in reports)

    threads = torch.get_num_threads()
    job = segment_volume(volume, *seg, chunk=2, threads=1)
    next(job)
    next(job)
    # between two reports the caller is in its own grad mode and thread setting
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert torch.get_num_threads() == 1
    job.close()  # cancel: no error, settings restored
    assert torch.get_num_threads() == threads
    job = detect_lesions(volume, *det)
    next(job)
    job.close()


def test_results_are_deterministic(seg, cls, det):
    volume = _volume((5, 40, 36), (2.0, 1.1, 0.9))
    a = run_to_completion(segment_volume(volume, *seg, chunk=2))
    b = run_to_completion(segment_volume(volume, *seg, chunk=2))
    np.testing.assert_array_equal(a.labels, b.labels)
    p = run_to_completion(classify_volume(volume, *cls))
    q = run_to_completion(classify_volume(volume, *cls))
    np.testing.assert_array_equal(p.probabilities, q.probabilities)
    d = run_to_completion(detect_lesions(volume, *det))
    e = run_to_completion(detect_lesions(volume, *det))
    assert d.detections == e.detections


def test_chunk_size_does_not_change_the_labels(seg):
    volume = _volume((7, 30, 30), (2.5, 1.5, 1.5))
    a = run_to_completion(segment_volume(volume, *seg, chunk=1)).labels
    b = run_to_completion(segment_volume(volume, *seg, chunk=7)).labels
    assert (a == b).mean() > 0.999


def test_engine_matches_the_plain_model(seg):
    """At the model's own spacing the engine equals eval-mode forward + argmax."""
    model, card = seg
    volume = _volume((6, 32, 40), (2.5, 1.5, 1.5))
    got = run_to_completion(segment_volume(volume, model, card, chunk=4)).labels
    x = torch.from_numpy(inference.apply_normalisation(volume.array, WINDOW))[:, None]
    with torch.no_grad():
        want = model(x).argmax(1).numpy()
    assert (got == want).mean() > 0.999


def test_prepare_model_folds_a_cached_copy_and_refreshes_after_training(seg):
    model, _ = seg
    keys = set(model.state_dict())
    fast = prepare_model(model)
    assert fast is not model and prepare_model(model) is fast
    assert set(model.state_dict()) == keys  # the caller's model is untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(3, 1, 24, 24)
    with torch.no_grad():
        np.testing.assert_allclose(fast(x).numpy(), model(x).numpy(), atol=1e-4)
        model.head.bias.add_(1.0)  # "fine-tuning" changes the weights in place
    assert prepare_model(model) is not fast
    with torch.no_grad():
        model.head.bias.sub_(1.0)
    fresh = prepare_model(model)
    model.head.bias.data[0] += 5.0  # through .data: its own version counter, same pointer
    assert prepare_model(model) is not fresh
    model.head.bias.data[0] -= 5.0


def test_an_ensemble_of_one_network_twice_detects_what_it_does():
    """The ensemble's averaged score goes through the engine (folding, channels_last,
    sigmoid) like one network's: two copies of a network give its heatmap and detections."""
    from napari_medseg.core.models import load_model
    from napari_medseg.core.phantom import generate_phantom

    model, card = load_model("detector")
    twice = LesionDetector.ensemble([model, model]).eval()
    vol = generate_phantom((12, 120, 120), (2.5, 1.6, 1.6), seed=906003, n_lesions=2,
                           lesion_radius_mm=(8.0, 12.0)).volume
    one = run_to_completion(detect_lesions(vol, model, card, threshold=0.05))
    two = run_to_completion(detect_lesions(vol, twice, card, threshold=0.05))
    np.testing.assert_allclose(two.heatmap, one.heatmap, atol=2e-6)
    np.testing.assert_allclose(two.diameter_map, one.diameter_map, rtol=1e-5)
    # weak peaks of a near-flat heatmap may swap at 1e-7; the lesions' peaks may not
    strong = [(d.z, d.y, d.x) for d in one.detections if d.score > 0.3]
    assert strong and strong == [(d.z, d.y, d.x) for d in two.detections if d.score > 0.3]


def test_detections_map_back_to_input_voxels():
    """A detector that fires on bright voxels finds a blob at its input coordinates,
    through anisotropic, non-integer resampling."""

    class BrightSpot(LesionDetector):
        def forward(self, x):
            middle = x[:, self.in_slices // 2 : self.in_slices // 2 + 1]
            return DetectorOutput(40.0 * (middle - 0.5), torch.full_like(middle, np.log(7.0)))

    model = BrightSpot(widths=(4, 4, 4)).eval()
    card = {"name": "spot", "classes": ["lesion"], "input_spacing_mm": [2.5, 1.5, 1.5],
            "normalisation": WINDOW, "peak_threshold": 0.5, "min_distance_mm": 5.0}
    spacing = (2.0, 0.7, 1.1)
    z, y, x = np.mgrid[0:6, 0:90, 0:60]
    centre = (3, 41, 22)
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip((z, y, x), centre, spacing)))
    array = np.where(dist <= 4.0, 400.0, -300.0).astype(np.float32)
    result = run_to_completion(detect_lesions(Volume(array, spacing), model, card))
    assert len(result.detections) == 1
    hit = result.detections[0]
    assert hit.z == 3 and abs(hit.y - 41) <= 1.5 and abs(hit.x - 22) <= 1.0
    assert hit.diameter_mm == pytest.approx(7.0, rel=1e-4) and hit.score > 0.5


def test_the_cards_nms_radius_fraction_merges_peaks_inside_a_large_lesion():
    class TwoSpots(LesionDetector):  # bright voxels score high; every voxel says 30 mm
        def forward(self, x):
            middle = x[:, self.in_slices // 2 : self.in_slices // 2 + 1]
            return DetectorOutput(40.0 * (middle - 0.5), torch.full_like(middle, np.log(30.0)))

    model = TwoSpots(widths=(4, 4, 4)).eval()
    card = {"name": "spots", "classes": ["lesion"], "input_spacing_mm": [2.0, 1.0, 1.0],
            "normalisation": WINDOW, "peak_threshold": 0.5, "min_distance_mm": 5.0}
    array = np.full((3, 40, 40), -300.0, dtype=np.float32)
    array[1, 10, 10] = array[1, 10, 20] = 400.0  # 10 mm apart, inside one "30 mm lesion"
    volume = Volume(array, (2.0, 1.0, 1.0))
    apart = run_to_completion(detect_lesions(volume, model, card))
    assert len(apart.detections) == 2 and apart.nms_radius_fraction == 0.0
    merged = run_to_completion(detect_lesions(volume, model, dict(card, nms_radius_fraction=1.0)))
    assert len(merged.detections) == 1
    assert merged.diameter_map.shape == merged.heatmap.shape
    assert np.allclose(merged.diameter_map, 30.0, rtol=1e-4)
    for bad in (-1, "wide", float("nan")):
        with pytest.raises(MedsegInputError, match="nms_radius_fraction"):
            next(detect_lesions(volume, model, dict(card, nms_radius_fraction=bad)))


def test_bad_arguments_are_refused(seg, cls):
    volume = _volume((2, 16, 16), (2.5, 1.5, 1.5))
    with pytest.raises(MedsegInputError, match="RecurrentSegmenter"):
        next(segment_volume(volume, cls[0], seg[1]))
    with pytest.raises(MedsegInputError, match="classes"):
        next(segment_volume(volume, seg[0], dict(seg[1], classes=["a", "b"])))
    with pytest.raises(MedsegInputError, match="chunk"):
        next(segment_volume(volume, *seg, chunk=0))
    with pytest.raises(MedsegInputError, match="batch must be a positive integer"):
        next(classify_volume(volume, *cls, batch=True))  # was taken as 1
    with pytest.raises(MedsegInputError, match="precision"):
        next(segment_volume(volume, *seg, precision="fp16"))
    with pytest.raises(MedsegInputError, match="Volume"):
        next(classify_volume(volume.array, *cls))


def test_bf16_is_refused_without_native_support(seg, monkeypatch):
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: False)
    volume = _volume((2, 16, 16), (2.5, 1.5, 1.5))
    with pytest.raises(MedsegInputError, match="bf16"):
        next(segment_volume(volume, *seg, precision="bf16"))
    result = run_to_completion(segment_volume(volume, *seg, precision="auto"))
    assert result.precision == "fp32"


def test_bf16_where_onednn_refuses_it_is_refused_not_a_crash(tmp_path):
    """The CPU flags offer bf16 but oneDNN is capped below it: "auto" runs fp32 and "bf16"
    says why it is refused (the fused bf16 copy raised a RuntimeError mid-job)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "capped.py"
    script.write_text(
        "from napari_medseg.core.inference import classify_volume\n"
        "from napari_medseg.core.errors import MedsegInputError\n"
        "from napari_medseg.core.models import load_model\n"
        "from napari_medseg.core.phantom import generate_phantom\n"
        "from napari_medseg.core.progress import run_to_completion\n"
        "volume = generate_phantom((3, 48, 48), (2.5, 1.5, 1.5), seed=1).volume\n"
        "model, card = load_model('classifier')\n"
        "print(run_to_completion(classify_volume(volume, model, card, precision='auto')).precision)\n"
        "try:\n"
        "    run_to_completion(classify_volume(volume, model, card, precision='bf16'))\n"
        "    print('bf16 ran')\n"
        "except MedsegInputError as exc:\n"
        "    print('refused:', exc)\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "fp32"
    assert lines[1].startswith("refused:") and "bf16" in lines[1]


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_agrees_with_fp32(seg, cls):
    volume = Volume(generate_phantom((6, 64, 64), (2.5, 1.2, 1.2), seed=2).volume.array,
                    (2.5, 1.2, 1.2))
    a = run_to_completion(segment_volume(volume, *seg))
    b = run_to_completion(segment_volume(volume, *seg, precision="bf16"))
    assert b.precision == "bf16" and (a.labels == b.labels).mean() > 0.98
    p = run_to_completion(classify_volume(volume, *cls))
    q = run_to_completion(classify_volume(volume, *cls, precision="bf16"))
    assert np.abs(p.probabilities - q.probabilities).max() < 0.05


@pytest.mark.parametrize("spec", [WINDOW, {"type": "zscore", "mean": 40.0, "std": 250.0}])
def test_model_input_equals_the_registry_normalisation_then_resample(spec):
    """Normalising after the resampling (fewer full-size passes) gives what training's
    apply_normalisation → resample_yx gives: exactly on the same grid, to float
    rounding on another; NaN and ±inf included; the caller's array untouched."""
    x = np.random.default_rng(3).normal(0, 400, size=(3, 17, 13)).astype(np.float32)
    x[0, 0, :3] = (np.nan, np.inf, -np.inf)
    before = x.copy()
    z = np.array([0, 2])
    want = inference.apply_normalisation(x[z], spec)
    same = inference._normalised_on_grid(x, z, spec, (17, 13)).numpy()
    np.testing.assert_array_equal(same, want)
    other = inference._normalised_on_grid(x, z, spec, (9, 20)).numpy()
    want = resample_yx(want, (1.0, 1.0), (17 / 9, 13 / 20), order=1, out_shape_yx=(9, 20))
    np.testing.assert_allclose(other, want, atol=2e-6)
    np.testing.assert_array_equal(x, before)
    # a contiguous run (read through a view), a read-only, a reversed and an int16 array
    run = inference._normalised_on_grid(x, np.arange(3), spec, (9, 20)).numpy()
    np.testing.assert_array_equal(run[[0, 2]], other)
    frozen = x.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(inference._normalised_on_grid(frozen, np.arange(3), spec,
                                                                (9, 20)).numpy(), run)
    np.testing.assert_array_equal(inference._normalised_on_grid(
        x[::-1], np.arange(1, 3), spec, (9, 20)).numpy(), run[1::-1])
    ints = np.nan_to_num(x, posinf=0, neginf=0).astype(np.int16)
    np.testing.assert_allclose(inference._normalised_on_grid(ints, np.arange(3), spec, (17, 13)),
                               inference.apply_normalisation(ints, spec), atol=1e-6)
    np.testing.assert_array_equal(x, before)


def test_thread_governor_stays_within_the_cpus_and_restores(monkeypatch):
    before = torch.get_num_threads()
    with inference.ThreadGovernor(None) as gov:
        assert 1 <= torch.get_num_threads() <= inference.default_threads()
        monkeypatch.setattr(gov, "MIN_INTERVAL_S", 0.0)
        sum(i * i for i in range(200_000))  # some CPU time of our own
        gov.update()
        assert 1 <= torch.get_num_threads() <= inference.default_threads()
    assert torch.get_num_threads() == before
    with inference.ThreadGovernor(0):
        assert torch.get_num_threads() == before
    with pytest.raises(MedsegInputError, match="threads"):
        inference.ThreadGovernor(-1)


def _cgroup_tree(tmp_path, proc_lines, files):
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    (tmp_path / "cgroup").write_text("".join(line + "\n" for line in proc_lines))
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


@pytest.mark.parametrize("proc_lines,files,expected", [
    # cgroup v2 in a container (docker --cpus=1.5): rounded up
    (["0::/"], {"cpu.max": "150000 100000"}, 2),
    (["0::/"], {"cpu.max": "max 100000"}, None),
    # v2 on a host: the tightest of the process's cgroup and its ancestors
    (["0::/user.slice/job"], {"user.slice/cpu.max": "300000 100000",
                              "user.slice/job/cpu.max": "max 100000"}, 3),
    # v1, hybrid layout like this machine's: no quota (-1), then a quota of 4 CPUs
    (["4:memory:/x", "1:cpu:/", "0::/"], {"cpu/cpu.cfs_quota_us": "-1",
                                          "cpu/cpu.cfs_period_us": "100000"}, None),
    (["3:cpu,cpuacct:/docker/abc"], {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "400000",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 4),
    # a quota under one CPU still leaves one thread; unreadable values are no limit
    (["0::/"], {"cpu.max": "20000 100000"}, 1),
    (["0::/"], {"cpu.max": "garbage"}, None),
])
def test_a_cgroup_cpu_quota_caps_the_threads(tmp_path, monkeypatch, proc_lines, files,
                                             expected):
    """The affinity mask does not show a quota: a container limited to 2 CPUs on a
    64-core host started 64 threads, run 2 at a time."""
    root, proc = _cgroup_tree(tmp_path, proc_lines, files)
    assert inference._cgroup_cpu_limit(root, proc) == expected
    monkeypatch.setattr(inference, "_cgroup_cpu_limit", lambda: expected)
    monkeypatch.setattr(inference.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert inference.default_threads() == (64 if expected is None else expected)
    assert inference.ThreadGovernor(None).cpus == inference.default_threads()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_main_thread_cpu_is_seen_from_a_worker_thread():
    """A GUI job runs in a worker thread: the main thread's (event loop's) CPU time is
    read from /proc, and is 0 when asked from the main thread itself."""
    assert inference._main_thread_seconds() == 0.0
    seen, go, done = [], threading.Event(), threading.Event()

    def worker():
        seen.append(inference._main_thread_seconds())
        go.set()
        done.wait(10)
        seen.append(inference._main_thread_seconds())

    thread = threading.Thread(target=worker)
    thread.start()
    go.wait(10)
    start = time.thread_time()
    while time.thread_time() - start < 0.3:  # the "event loop" busy for 0.3 s of CPU
        sum(i * i for i in range(1000))
    done.set()
    thread.join()
    assert 0.15 <= seen[1] - seen[0] <= 2.0


def test_thread_governor_counts_the_busy_main_thread_as_another_process(monkeypatch):
    """In a worker thread, CPU the main thread used (napari drawing) is not the job's:
    with the event loop busy one core of two, the job drops to one torch thread
    (measured: the retrain round's p99 event-loop gap fell from ~100 to ~70 ms)."""
    clock = {"wall": 0.0, "busy": 0.0, "ours": 0.0, "main": 0.0}
    monkeypatch.setattr(inference, "default_threads", lambda: 2)
    monkeypatch.setattr(inference, "_runnable_others", lambda: 0)
    monkeypatch.setattr(inference, "_cpu_jiffies", lambda: (clock["busy"], 1e6))
    monkeypatch.setattr(inference, "_main_thread_seconds", lambda: clock["main"])
    # the governor's own clocks (inference's module attributes, not the global modules)
    monkeypatch.setattr(inference, "time", SimpleNamespace(perf_counter=lambda: clock["wall"]))
    monkeypatch.setattr(inference, "os", SimpleNamespace(times=lambda: SimpleNamespace(
        user=clock["ours"], system=0.0)))
    counts = []

    def job():
        with inference.ThreadGovernor(None) as gov:
            counts.append(torch.get_num_threads())
            # one second: the machine was busy 1.9 s of CPU, all of it this process,
            # 0.9 s of it the main thread
            clock.update(wall=1.0, busy=1.9, ours=1.9, main=0.9)
            gov.update()
            counts.append(torch.get_num_threads())
            # the next second the main thread idles: the job gets both cores back
            clock.update(wall=2.0, busy=3.9, ours=3.9, main=0.9)
            gov.update()
            counts.append(torch.get_num_threads())

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert counts == [2, 1, 2]


def test_nan_voxels_are_left_unlabelled_and_undetected(seg, det):
    """A turned coronal series' gap planes (NaN along y) were labelled, lesion included:
    only all-NaN z slices were treated as missing."""
    import copy

    model, card = seg
    everywhere = copy.deepcopy(model)
    with torch.no_grad():  # class 1 wins everywhere, so every label is a decision
        everywhere.head.bias[:] = -50.0
        everywhere.head.bias[1] = 50.0
    volume = _volume((6, 32, 32), (2.5, 1.5, 1.5))
    array = volume.array.copy()
    array[:, 10:12, :] = np.nan  # two planes along y
    array[2, 20:24, 5:9] = np.nan  # a masked patch
    gapped = Volume(array, volume.spacing)
    labels = run_to_completion(segment_volume(gapped, everywhere, card)).labels
    assert (labels[np.isnan(array)] == 0).all() and (labels[~np.isnan(array)] == 1).all()
    dmodel, dcard = det
    found = run_to_completion(detect_lesions(gapped, dmodel, dcard)).detections
    for d in found:
        at = tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip((d.z, d.y, d.x), array.shape))
        assert not np.isnan(array[at])


def test_detector_heatmap_is_zero_where_nothing_was_measured(det):
    """A masked patch and a coronal series' gap planes showed the model's heat, which on
    the filled-in values could glow like a lesion and suppress a real peak beside it."""
    import copy

    model, card = det
    hot = copy.deepcopy(model)
    with torch.no_grad():  # heat ≈ 1 everywhere measured
        hot.head.bias[0] = 50.0
    volume = _volume((5, 60, 60), (2.5, 0.7, 0.7))  # the model grid (1.5 mm) is coarser
    array = volume.array.copy()
    array[:, 17:21, :] = np.nan  # gap planes along y
    array[2, 34:48, 6:20] = np.nan  # a masked patch
    result = run_to_completion(detect_lesions(Volume(array, volume.spacing), hot, card))
    on_input = result.heatmap_on_input_grid()
    # every NaN voxel, its edges included (bilinear resampling gave the edge voxels heat
    # from the measured cells beside them where the input is finer than the model grid)
    assert (on_input[np.isnan(array)] == 0).all()
    assert on_input[~np.isnan(array)].mean() > 0.9
    assert (result.heatmap == 0).sum() > 0 and result.heatmap.max() > 0.99


def test_the_unmeasured_mask_holds_only_the_slices_with_nan():
    """A whole-volume mask added a byte per input voxel to a detection's peak memory
    (bench_detect: 338 MB growth for 293 MB more output, over its bound)."""
    from napari_medseg.core.inference import _unmeasured_voxels

    array = np.zeros((40, 6, 7), np.float32)
    assert _unmeasured_voxels(Volume(array, (1, 1, 1))) is None
    array[3, 1, 2] = array[33, 0, 0] = np.nan
    zs, nan = _unmeasured_voxels(Volume(array, (1, 1, 1)))
    assert zs.tolist() == [3, 33] and nan.shape == (2, 6, 7) and nan.sum() == 2
    assert nan[0, 1, 2] and nan[1, 0, 0]


@pytest.mark.parametrize("axis", [1, 2])
def test_nan_planes_read_as_the_tissue_beside_them_not_as_air(axis):
    """A coronal series' gap planes (NaN rows in every axial slice) were fed to the
    network as air: labels changed far from the gap. They now read as the nearest
    measured voxels, which changes the labels around them less than air does."""
    from napari_medseg.core.models import load_model

    model, card = load_model("segmenter")  # trained: it reads context, as a random one does not
    p = generate_phantom((8, 96, 96), (2.5, 1.6, 1.6), seed=4, n_lesions=1)
    whole = run_to_completion(segment_volume(p.volume, model, card)).labels
    gapped, air = p.volume.array.copy(), p.volume.array.copy()
    gap = tuple(slice(44, 47) if a == axis else slice(None) for a in range(3))  # y or x planes
    gapped[gap] = np.nan
    air[gap] = -1000.0
    outside = np.ones(whole.shape, bool)
    outside[gap] = False
    changed = {}
    for name, array in (("filled", gapped), ("air", air)):
        labels = run_to_completion(segment_volume(Volume(array, p.volume.spacing), model, card)).labels
        changed[name] = int((labels != whole)[outside].sum())
    assert changed["filled"] < changed["air"], changed


def test_all_nan_slices_are_missing_whichever_reader_made_the_volume(seg, cls, det):
    """A .npy or NIfTI volume with NaN gap slices gives the same results as the same
    volume with those slices flagged missing (they were read as air and labelled)."""
    array = _volume((6, 32, 32), (2.5, 1.5, 1.5)).array
    array[[0, 5]] = np.nan
    plain = Volume(array, (2.5, 1.5, 1.5))
    flagged = Volume(array, (2.5, 1.5, 1.5), missing=[True, False, False, False, False, True])
    np.testing.assert_array_equal(plain.missing, flagged.missing)
    c = run_to_completion(classify_volume(plain, *cls))
    assert c.predicted[[0, 5]].tolist() == [-1, -1]
    np.testing.assert_array_equal(run_to_completion(segment_volume(plain, *seg)).labels,
                                  run_to_completion(segment_volume(flagged, *seg)).labels)


def test_threshold_zero_puts_no_detection_on_missing_slices(det):
    missing = np.zeros(12, bool)
    missing[[0, 1, 11]] = True
    volume = _volume((12, 30, 30), (2.5, 1.5, 1.5), missing=missing)
    volume.array[missing] = np.nan
    d = run_to_completion(detect_lesions(volume, *det, threshold=0.0, min_distance_mm=0.0))
    assert d.detections and not any(missing[int(round(p.z))] for p in d.detections)


def test_overlapping_jobs_restore_the_thread_count_of_before_the_first(monkeypatch):
    monkeypatch.setattr(inference, "default_threads", lambda: 4)  # any machine: 2 ≠ 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = inference.ThreadGovernor(2).__enter__()
        second = inference.ThreadGovernor(3).__enter__()  # starts while the first runs
        assert torch.get_num_threads() == 3
        first.__exit__(None, None, None)  # the first job ends while the second runs
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_percentile_card_runs_on_the_volumes_own_range(seg):
    """A card may normalise by the volume's own percentiles (the registry allows it):
    the engine runs it as that fixed affine map (it raised a bare KeyError)."""
    model, card = seg
    volume = _volume((4, 24, 24), (2.5, 1.5, 1.5))
    spec = {"type": "percentile", "low_percentile": 1.0, "high_percentile": 99.0}
    got = run_to_completion(segment_volume(volume, model, {**card, "normalisation": spec}))
    low, high = np.percentile(volume.array, [1.0, 99.0])
    same = {"type": "zscore", "mean": float(low), "std": float(high - low)}
    want = run_to_completion(segment_volume(volume, model, {**card, "normalisation": same}))
    np.testing.assert_array_equal(got.labels, want.labels)


def test_a_field_of_view_no_body_has_is_refused_before_any_allocation(seg):
    """Pixel spacing in cm read as mm (here 40 mm pixels) asked for a model grid of
    thousands of pixels per side: gigabytes per chunk. One clear line instead."""
    volume = _volume((2, 512, 512), (5.0, 40.0, 40.0))
    with pytest.raises(MedsegInputError, match="check the pixel spacing"):
        run_to_completion(segment_volume(volume, *seg))


def test_jobs_overlapping_on_two_threads_each_leave_their_thread_as_it_was(monkeypatch):
    """With OpenMP the count is per thread: a job ending while another ran on another
    thread left its own thread pinned (the restore waited for the last job, elsewhere)."""
    import threading

    monkeypatch.setattr(inference, "default_threads", lambda: 4)
    before = torch.get_num_threads()
    started, finish_a, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def job_a():
        seen["a_before"] = torch.get_num_threads()
        with inference.ThreadGovernor(1):
            started.set()
            finish_a.wait(10)
        seen["a_after"] = torch.get_num_threads()
        a_done.set()

    def job_b():
        started.wait(10)
        with inference.ThreadGovernor(1):
            finish_a.set()
            a_done.wait(10)  # A ends while B still runs
        seen["b_after"] = torch.get_num_threads()

    _on_threads(job_a, job_b)
    assert seen["a_after"] == seen["a_before"] == before
    assert seen["b_after"] == before and torch.get_num_threads() == before


def test_an_all_missing_volume_gets_empty_results_whatever_the_normalisation(seg):
    model, card = seg
    volume = Volume(np.full((3, 16, 16), np.nan, np.float32), (2.5, 1.5, 1.5),
                    missing=np.ones(3, bool))
    spec = {"type": "percentile", "low_percentile": 1.0, "high_percentile": 99.0}
    for c in (card, {**card, "normalisation": spec}):  # the percentile card raised
        labels = run_to_completion(segment_volume(volume, model, c)).labels
        assert not labels.any()


def test_more_than_255_classes_are_refused_before_any_work():
    model = RecurrentSegmenter(n_classes=300, widths=(8, 16, 16), hidden=8).eval()
    card = {"name": "big", "classes": [f"c{i}" for i in range(300)],
            "input_spacing_mm": [2.5, 1.5, 1.5], "normalisation": WINDOW, "resample_axes": "yx"}
    job = segment_volume(_volume((4, 16, 16), (2.5, 1.5, 1.5)), model, card)
    with pytest.raises(MedsegInputError, match="at most 255"):
        next(job)  # it ran the whole backward pass first


def test_a_worker_thread_first_used_during_a_pinned_job_is_set_back_to_the_process_count(
        monkeypatch):
    """OpenMP starts a new thread at the count the last set_num_threads call left: a
    pool thread first used while another job had pinned 1 started at 1, and its own job
    then restored 1 for good (and handed 1 to every thread made after)."""
    import threading

    monkeypatch.setattr(inference, "default_threads", lambda: 4)
    before = torch.get_num_threads()
    a_in, b_started, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def job_a():
        with inference.ThreadGovernor(1):
            a_in.set()
            b_started.wait(10)
        a_out.set()

    def job_b():
        a_in.wait(10)
        seen["b_first"] = torch.get_num_threads()  # first torch use while A pins 1
        b_started.set()
        a_out.wait(10)
        with inference.ThreadGovernor(None):
            pass
        seen["b_after"] = torch.get_num_threads()

    _on_threads(job_a, job_b)
    later = []
    _on_threads(lambda: later.append(torch.get_num_threads()))  # a thread made afterwards
    assert seen["b_after"] == before and later == [before], (seen, later, before)


def test_the_gui_thread_keeps_its_thread_count_after_a_job_pinned_one(tmp_path):
    """The GUI thread's first torch work during a pinned job (OpenMP) left it at the
    job's count for good; the plugin's widgets package asks for the count at import."""
    import subprocess
    import sys

    script = tmp_path / "gui_thread.py"
    script.write_text(
        "import threading, torch\n"
        "import napari_medseg._widgets  # what napari imports in the GUI thread\n"
        "seen = []  # the count, asked in another thread: asking here would fix this one's\n"
        "probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))\n"
        "probe.start(); probe.join(); before = seen[0]\n"
        "pinned, done = threading.Event(), threading.Event()\n"
        "def job():\n"
        "    torch.set_num_threads(1); pinned.set(); done.wait(10); torch.set_num_threads(before)\n"
        "t = threading.Thread(target=job); t.start(); pinned.wait(10)\n"
        "torch.nn.functional.interpolate(torch.rand(1, 4, 64, 64), size=(256, 256))\n"
        "during = torch.get_num_threads(); done.set(); t.join()\n"
        "print(before, during, torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    before, during, after = map(int, out.stdout.split())
    assert during == after == before, out.stdout


def _on_threads(*jobs) -> None:
    """Run each job on its own thread, all at once, and wait for them."""
    import threading

    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)


def test_input_warnings_say_when_a_result_is_doubtful(seg):
    """Raw uint16 CT or MR gave organ volumes, a pixel size in cm "0 detections", both
    in silence."""
    from napari_medseg.core.inference import input_warnings
    from napari_medseg.core.volume import guess_modality

    _, card = seg
    array = np.full((2, 64, 64), -1000.0, np.float32)  # air around a body
    array[:, 16:48, 16:48] = 40.0
    ct = Volume.from_array(array, spacing=(2.5, 1.5, 1.5), modality=guess_modality(array))
    assert ct.modality == "CT" and input_warnings(ct, card) == []
    stored = array + 1024  # raw stored values, no rescale
    raw = Volume.from_array(stored, spacing=ct.spacing, modality=guess_modality(stored))
    assert raw.modality != "CT" and "Hounsfield" in input_warnings(raw, card)[0]
    in_cm = Volume.from_array(array, spacing=(0.25, 0.15, 0.15), modality="CT")
    assert any("in cm" in w for w in input_warnings(in_cm, card))
    # an MR series says so: the model does not apply (not "raw DICOM values need a rescale")
    mr = Volume.from_array(stored, spacing=ct.spacing, modality="MR")
    said = input_warnings(mr, card)
    assert said == ["the image is MR, not CT: this model was trained on CT in Hounsfield "
                    "units, so its result on it is meaningless"]
    percentile = {**card, "normalisation": {"type": "percentile", "low_percentile": 0.5,
                                            "high_percentile": 99.5}}
    assert input_warnings(raw, percentile) == []
    # air below -500 passed for CT at any scale: HU × 1e27 got organ volumes in silence;
    # padding (-3024) and metal (to 30 000 on extended scales) are no reason to warn
    scaled = Volume.from_array(array * 1e27, spacing=ct.spacing, modality="CT")
    assert any("far outside the Hounsfield units" in w for w in input_warnings(scaled, card))
    padded = array.copy()
    padded[:, :4] = -3024.0
    padded[:, 20:24, 20:24] = 30_000.0
    assert input_warnings(Volume.from_array(padded, spacing=ct.spacing, modality="CT"), card) == []


def test_a_job_closed_from_another_thread_leaves_the_thread_counts_restorable():
    """A job entered on a worker and closed from the main thread counted the main
    thread's jobs down to -1: no later job there restored its thread count again."""
    import threading

    from napari_medseg.core.inference import segment_volume
    from napari_medseg.core.models import load_model
    from napari_medseg.core.phantom import generate_phantom

    model, card = load_model("segmenter")
    volume = generate_phantom((6, 32, 32), (2.5, 2.0, 2.0), seed=3, n_lesions=0).volume
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_to_completion(segment_volume(volume, model, card, threads=1))  # one as usual
        assert torch.get_num_threads() == 2
        job = segment_volume(volume, model, card, threads=1)
        worker = threading.Thread(target=lambda: [next(job), next(job)])
        worker.start()
        worker.join()
        job.close()  # from the main thread
        for _ in range(2):
            run_to_completion(segment_volume(volume, model, card, threads=1))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_small_structure_is_not_said_to_be_zero():
    """A found lesion of 0.04 ml read "lesion 0 ml" (one fixed precision)."""
    from napari_medseg.core.inference import format_measure

    assert [format_measure(v) for v in (0.0441, 0.004, 3.14159, 327.7)] == [
        "0.04", "< 0.01", "3.1", "328"]
    # the digits follow the value as shown: 9.96 → "10" as 10.0 is, not "10.0"
    assert [format_measure(v) for v in (9.96, 10.0, 0.996, 1.0, 0.9949)] == [
        "10", "10", "1.0", "1.0", "0.99"]


@pytest.mark.parametrize("threads", [1.7, True, "2", -1])
def test_a_thread_count_that_is_no_whole_number_is_refused(threads):
    """1.7, True and "2" were taken as 1, 1 and 2 threads."""
    from napari_medseg.core.inference import ThreadGovernor

    with pytest.raises(MedsegInputError, match="threads must be ≥ 1"):
        ThreadGovernor(threads)
    assert ThreadGovernor(np.int64(2)).fixed == 2 and ThreadGovernor(0).leave


def _wide_field(nz=3, n=200, spacing=2.0, body=(slice(80, 130), slice(60, 110))):
    """A 400 mm field of air with a 100 mm 'body' off centre."""
    array = np.full((nz, n, n), -1000.0, np.float32)
    array[:, body[0], body[1]] = 40.0
    return Volume(array, (5.0, spacing, spacing))


def test_the_classifier_sees_a_window_around_the_body_of_a_wide_field(cls):
    """On a 384 mm field (an abdominal CT's) the whole slice's air cut the bundled
    classifier's lesion-slice recall from 0.77 to 0.57: it is shown the body, widened to
    the widest field it was evaluated on."""
    model, card = cls
    volume = _wide_field()
    ys, xs = inference.body_window(volume, card)
    for window, (lo, hi) in zip((ys, xs), ((80, 130), (60, 110))):
        assert window.start <= lo and window.stop >= hi  # the body inside
        assert (window.stop - window.start) * 2.0 == pytest.approx(
            inference.CLASSIFIER_VIEW_MM, abs=4.0)
    # classify and Grad-CAM read the window: the same as the cut volume's classes
    cut = volume.replace(array=np.ascontiguousarray(volume.array[:, ys, xs]))
    whole = run_to_completion(classify_volume(volume, model, card))
    alone = run_to_completion(classify_volume(cut, model, card))
    np.testing.assert_allclose(whole.probabilities, alone.probabilities, atol=1e-5)
    from napari_medseg.core.explain import gradcam_volume

    cam = run_to_completion(gradcam_volume(volume, model, card))
    np.testing.assert_array_equal(cam.target, whole.predicted)
    outside = np.ones(volume.shape[1:], bool)
    outside[ys, xs] = False
    assert cam.maps.shape == volume.shape and not cam.maps[:, outside].any()


@pytest.mark.parametrize("case", ["evaluated field", "not HU", "all air", "a cut slice",
                                  "barely wider"])
def test_no_window_where_it_does_not_apply(cls, case):
    model, card = cls
    volume = _wide_field()
    if case == "evaluated field":  # 240 mm: shown whole, as evaluated
        volume = _wide_field(n=120, body=(slice(40, 90), slice(30, 80)))
    elif case == "not HU":
        card = {**card, "normalisation": {"type": "zscore", "mean": 0.0, "std": 1.0}}
    elif case == "all air":
        volume = Volume(np.full((2, 200, 200), -1000.0, np.float32), (5.0, 2.0, 2.0))
    elif case == "a cut slice":  # measured only in a corner the window leaves out
        array = volume.array.copy()
        array[1] = np.nan
        array[1, :5, :5] = -1000.0
        volume = Volume(array, volume.spacing)
    else:  # 270 mm: a cut of a few mm changed classes for nothing
        volume = _wide_field(n=135, body=(slice(40, 90), slice(30, 80)))
    assert inference.body_window(volume, card) is None

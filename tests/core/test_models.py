"""Model architectures and the weights registry: shapes, streaming, gradients, file I/O.

Random weights only, small widths and images: the whole file runs in seconds on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import safetensors.torch
import pytest
import torch

from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.models import (
    ACTIVATIONS,
    ARCHITECTURES,
    BUNDLED_DIR,
    KERNEL_SIZES,
    LesionDetector,
    RecurrentSegmenter,
    SliceClassifier,
    apply_normalisation,
    extract_peaks,
    fold_batchnorm,
    gaussian_heatmap_targets,
    list_models,
    load_model,
    make_activation,
    save_model,
    stack_neighbours,
    user_models_dir,
)
from napari_medseg.core.models import registry
from napari_medseg.core.models.segmenter import ConvGRUCell

SMALL_SEG = dict(widths=(4, 8, 8), hidden=4, n_classes=3)
SMALL_DET = dict(widths=(4, 8, 8))
SMALL_CLS = dict(filters=(4, 8, 8), hidden=8, n_classes=3)


def _seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights AND random BatchNorm statistics, so eval mode is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


# -- shapes (table-driven) -------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 7, 9), (2, 1, 64, 64), (1, 1, 100, 37), (3, 1, 224, 224), (1, 1, 1, 1), (2, 1, 8, 3)],
)
def test_classifier_output_shape(shape):
    model = SliceClassifier(n_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "z, hw", [(1, (8, 8)), (3, (13, 20)), (17, (33, 7)), (2, (1, 1)), (4, (16, 9)), (1, (5, 40))]
)
def test_segmenter_output_shape(z, hw):
    model = RecurrentSegmenter(**SMALL_SEG).eval()
    with torch.no_grad():
        out = model(torch.randn(z, 1, *hw))
    assert out.shape == (z, 3, *hw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "shape", [(1, 3, 8, 8), (2, 3, 13, 20), (1, 3, 1, 1), (4, 3, 33, 7), (1, 3, 64, 48)]
)
def test_detector_output_shape(shape):
    model = LesionDetector(**SMALL_DET).eval()
    with torch.no_grad():
        heat, size = model(torch.randn(shape))
    assert heat.shape == size.shape == (shape[0], 1, *shape[2:])


def test_default_sizes_build_and_run():
    with torch.no_grad():
        assert RecurrentSegmenter().eval()(torch.randn(2, 1, 24, 24)).shape == (2, 9, 24, 24)
        assert LesionDetector().eval()(torch.randn(1, 3, 24, 24)).heatmap.shape == (1, 1, 24, 24)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
def test_every_activation_and_kernel_builds_and_runs(activation, kernel_size):
    model = SliceClassifier(kernel_size=kernel_size, activation=activation, **SMALL_CLS).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 12)).shape == (2, 3)
    assert model.last_conv.conv.kernel_size == (kernel_size, kernel_size)


def test_classifier_without_batchnorm():
    model = SliceClassifier(batch_norm=False, **SMALL_CLS).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(1, 1, 10, 10)).shape == (1, 3)


def test_classifier_max_pooling_keeps_a_small_blob_at_any_slice_size():
    """With "max" the pooled evidence of one bright spot does not shrink as the slice
    grows around it; with "avg" it is divided by the bin area."""
    avg = SliceClassifier(pool="avg", **SMALL_CLS).eval()
    mx = SliceClassifier(pool="max", **SMALL_CLS).eval()
    mx.load_state_dict(avg.state_dict())
    assert "pool" not in avg.arch_params and mx.arch_params["pool"] == "max"
    peaks = {}
    for size in (64, 160):
        x = torch.zeros(1, 1, size, size)
        x[..., 20:24, 20:24] = 5.0
        for name, model in (("avg", avg), ("max", mx)):
            with torch.no_grad():
                feats = model.pool(model.features(x))
                peaks[name, size] = float(model.gap(feats).amax())
    assert peaks["max", 160] == pytest.approx(peaks["max", 64], rel=1e-5)
    assert peaks["avg", 160] < 0.5 * peaks["avg", 64]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(activation="swish"), ["swish", "relu", "leaky_relu", "silu"]),
        (dict(kernel_size=4), ["kernel_size", "3, 5, 7"]),
        (dict(filters=(4, 0, 8)), ["filters"]),
        (dict(dropout=1.0), ["dropout"]),
        (dict(pool="median"), ["pool", "avg, max"]),
    ],
)
def test_classifier_rejects_bad_arguments(kwargs, words):
    with pytest.raises(MedsegInputError) as err:
        SliceClassifier(**kwargs)
    assert "\n" not in str(err.value)
    assert all(w in str(err.value) for w in words)


def test_make_activation_names():
    assert isinstance(make_activation("LeakY-ReLU"), torch.nn.LeakyReLU)
    with pytest.raises(MedsegInputError, match="choose one of relu, tanh"):
        make_activation("mish")


def test_models_reject_wrong_input_channels():
    with pytest.raises(MedsegInputError, match=r"\(N, 1, H, W\)"):
        SliceClassifier()(torch.randn(1, 3, 8, 8))
    with pytest.raises(MedsegInputError, match=r"\(N, 3, H, W\)"):
        LesionDetector(**SMALL_DET)(torch.randn(1, 1, 8, 8))
    with pytest.raises(MedsegInputError):
        RecurrentSegmenter(**SMALL_SEG)(torch.randn(4, 8, 8))


def test_two_convs_per_block_add_layers_and_leave_one_conv_models_as_they_were():
    one = SliceClassifier(**SMALL_CLS)
    two = SliceClassifier(**SMALL_CLS, convs_per_block=2)
    # cards written before the option load into the same keys and arch_params
    assert "convs_per_block" not in one.arch_params and two.arch_params["convs_per_block"] == 2
    assert not any(k.startswith("pre_convs") for k in one.state_dict())
    # per block: its extra conv (channels in → out), then its last conv (out → out)
    assert [(p[0].conv.in_channels, p[0].conv.out_channels, b.conv.in_channels, b.conv.out_channels)
            for p, b in zip(two.pre_convs, two.blocks)] == [(1, 4, 4, 4), (4, 8, 8, 8), (8, 8, 8, 8)]
    assert set(one.state_dict()) < set(two.state_dict())
    assert two.last_conv is two.blocks[-1]  # Grad-CAM still hooks the last conv before pooling
    assert two(torch.randn(2, 1, 9, 13)).shape == (2, 3)


def test_detector_convs_per_stage_appends_convs_and_leaves_default_detectors_as_they_were():
    base = LesionDetector(**SMALL_DET)
    deep = LesionDetector(**SMALL_DET, convs_per_stage=4)
    # cards written before the option load into the same keys and arch_params
    assert "convs_per_stage" not in base.arch_params and deep.arch_params["convs_per_stage"] == 4
    assert [len(s) for s in (base.enc1, base.enc2, base.enc3)] == [2, 2, 2]
    assert [len(s) for s in (deep.enc1, deep.enc2, deep.enc3)] == [4, 4, 4]
    assert set(base.state_dict()) < set(deep.state_dict())
    out = deep(torch.randn(2, 3, 13, 9))
    assert out.heatmap.shape == out.log_diameter.shape == (2, 1, 13, 9)
    ens = LesionDetector(**SMALL_DET, convs_per_stage=3, members=2)
    assert len(ens.others[0].enc3) == 3  # every member has the layout
    with pytest.raises(MedsegInputError, match="convs_per_stage"):
        LesionDetector(**SMALL_DET, convs_per_stage=1)


def test_classifier_last_conv_is_the_grad_cam_hook_point():
    model = SliceClassifier(**SMALL_CLS).eval()
    seen = {}
    model.last_conv.register_forward_hook(lambda m, i, o: seen.setdefault("act", o))
    x = torch.randn(2, 1, 32, 24)
    logits = model(x)
    assert seen["act"].shape == (2, 8, 8, 6)  # two poolings before the last block
    assert torch.equal(model.features(x), seen["act"])
    assert torch.allclose(model.classify_features(seen["act"]), logits)
    keys = list(model.state_dict())
    assert not any(k.startswith("last_conv") for k in keys) and len(keys) == len(set(keys))


# -- segmenter: recurrence and streaming ------------------------------------------------
def test_conv_gru_cell_matches_the_equations():
    torch.manual_seed(0)
    cell = ConvGRUCell(3, 2, kernel_size=3)
    x, h = torch.randn(1, 3, 5, 6), torch.randn(1, 2, 5, 6)
    wz, wr, wn = cell.w(x).split(2, dim=1)
    uz, ur = cell.u_zr(h).split(2, dim=1)
    z, r = torch.sigmoid(wz + uz), torch.sigmoid(wr + ur)
    n = torch.tanh(wn + cell.u_n(r * h))
    expected = (1 - z) * h + z * n
    assert torch.allclose(cell(x, h), expected, atol=1e-6)
    # zero state shortcut equals an explicit zero state
    assert torch.allclose(cell(x, None), cell(x, torch.zeros_like(h)), atol=1e-6)


@pytest.fixture(scope="module")
def seg_and_volume():
    model = _seeded(RecurrentSegmenter(**SMALL_SEG), seed=1)
    volume = torch.randn(11, 1, 12, 19, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(volume)
    return model, volume, full


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 16])
def test_segmenter_chunked_equals_full(seg_and_volume, chunk):
    model, volume, full = seg_and_volume
    with torch.inference_mode():
        chunked = model.forward_chunked(volume, chunk=chunk)
    assert chunked.shape == full.shape
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=0)


def test_segmenter_iter_chunks_reports_both_passes(seg_and_volume):
    model, volume, full = seg_and_volume
    with torch.inference_mode():
        items = list(model.iter_chunks(volume, chunk=4))
    assert len(items) == RecurrentSegmenter.n_steps(11, 4) == 6
    assert [i.step for i in items] == list(range(1, 7)) and {i.total for i in items} == {6}
    backward, forward = items[:3], items[3:]
    assert all(i.logits is None for i in backward)
    assert [(i.start, i.stop) for i in backward] == [(8, 11), (4, 8), (0, 4)]
    assert [(i.start, i.stop) for i in forward] == [(0, 4), (4, 8), (8, 11)]
    for item in forward:
        torch.testing.assert_close(item.logits, full[item.start : item.stop], atol=1e-4, rtol=0)


def test_segmenter_streams_a_numpy_zyx_array(seg_and_volume):
    model, volume, full = seg_and_volume
    array = volume[:, 0].numpy().astype(np.float64)  # (z, y, x), not float32
    with torch.inference_mode():
        out = model.forward_chunked(array, chunk=6)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=0)


def test_hidden_state_crosses_chunk_boundaries(seg_and_volume):
    model, volume, _ = seg_and_volume
    volume = volume[:9]
    first_changed, last_changed = volume.clone(), volume.clone()
    first_changed[0] += 5.0
    last_changed[-1] += 5.0

    def effects(m):
        with torch.inference_mode():
            base = m.forward_chunked(volume, chunk=4)
            out_first = m.forward_chunked(first_changed, chunk=4)
            out_last = m.forward_chunked(last_changed, chunk=4)
        # slice 0 (chunk 0) → slice 8 (chunk 2) forward; slice 8 → slice 0 backward
        return (out_first[-1] - base[-1]).abs().max(), (out_last[0] - base[0]).abs().max()

    # Same input and chunk shapes give bit-identical results on CPU, so any difference
    # is information carried by the GRU states across two chunk boundaries.
    forward_effect, backward_effect = effects(model)
    assert forward_effect > 0 and backward_effect > 0
    # control: cut the GRU states out of the decoder and the effect vanishes exactly
    cut = _seeded(RecurrentSegmenter(**SMALL_SEG), seed=1)
    with torch.no_grad():
        cut.up2.weight[SMALL_SEG["widths"][2] :] = 0
    assert effects(cut) == (0, 0)


def test_segmenter_rejects_bad_chunk(seg_and_volume):
    model, volume, _ = seg_and_volume
    with pytest.raises(MedsegInputError, match="chunk"):
        next(model.iter_chunks(volume, chunk=0))
    with pytest.raises(MedsegInputError, match="no slices"):
        next(model.iter_chunks(volume[:0], chunk=4))


def test_channels_last_and_folded_batchnorm_give_the_same_logits(seg_and_volume):
    model, volume, full = seg_and_volume
    fast = _seeded(RecurrentSegmenter(**SMALL_SEG), seed=1)
    fast = fold_batchnorm(fast).to(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    with torch.inference_mode():
        torch.testing.assert_close(fast(volume), full, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.forward_chunked(volume, 4), full, atol=1e-4, rtol=1e-4)


def test_segmenter_dropout_is_there_for_mc_dropout(seg_and_volume):
    model = _seeded(RecurrentSegmenter(**{**SMALL_SEG, "dropout": 0.5}), seed=3)
    volume = seg_and_volume[1][:3]
    for m in model.modules():  # MC dropout: dropout on, BatchNorm frozen
        if isinstance(m, torch.nn.Dropout):
            m.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = model(volume), model(volume)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 4, 2, 2), (2, 5, 3, 6)])
def test_max_pool_2x2_is_max_pool2d(shape):
    from napari_medseg.core.models.classifier import max_pool_2x2

    x = torch.randn(shape)
    x[0, 0, 0, 0] = float("nan")
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        got, want = max_pool_2x2(t), torch.nn.functional.max_pool2d(t, 2)
        assert got.shape == want.shape
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        assert torch.isnan(got).sum() == torch.isnan(want).sum() >= 1
        if got.shape[-2] * got.shape[-1] > 1:  # a 1×1 map is contiguous in both formats
            assert got.is_contiguous(memory_format=torch.channels_last) == t.is_contiguous(
                memory_format=torch.channels_last)


@pytest.mark.parametrize("convs_per_block", [1, 2])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "tanh"])
def test_the_inference_copy_pools_first_with_the_same_result(activation, convs_per_block):
    """The prepared copy pools before ReLU / LeakyReLU (exact: they are monotone) and
    never before GELU (not monotone) or tanh; the module itself keeps the plain forward."""
    from napari_medseg.core.inference import prepare_model

    model = _seeded(SliceClassifier(activation=activation, convs_per_block=convs_per_block,
                                    **SMALL_CLS), seed=3).eval()
    gen = torch.Generator().manual_seed(1)
    # negative inputs too, where GELU is not monotone; channels_last as the engine runs it
    x = (torch.randn(3, 1, 27, 22, generator=gen) * 3).contiguous(memory_format=torch.channels_last)
    fast = prepare_model(model)
    assert fast._pool_first() == (activation in ("relu", "leaky_relu"))
    assert not model._pool_first()
    with torch.inference_mode():
        plain = fast.classify_features(fast.features(x))  # the plain path on the same folded copy
        assert torch.equal(fast(x), plain)
        torch.testing.assert_close(model(x), plain, rtol=1e-4, atol=1e-5)  # BN folding


# -- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: SliceClassifier(**SMALL_CLS), torch.randn(4, 1, 20, 18)),
        (lambda: RecurrentSegmenter(**SMALL_SEG), torch.randn(3, 1, 16, 10)),
        (lambda: LesionDetector(**SMALL_DET), torch.randn(2, 3, 16, 10)),
    ],
    ids=["classifier", "segmenter", "detector"],
)
def test_one_backward_pass_changes_every_parameter(make, x):
    torch.manual_seed(0)
    model = make().train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = model(x)
    loss = sum((o.float() ** 2).mean() for o in (out if isinstance(out, tuple) else [out]))
    loss.backward()
    no_grad = [
        k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not no_grad, no_grad
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged, unchanged


# -- detector: targets and peaks ----------------------------------------------------------
def test_gaussian_targets_peak_at_centres():
    centers = [(4, 10, 12), (10.4, 25.6, 30)]
    target = gaussian_heatmap_targets((16, 40, 48), centers, [(1, 3, 3), 2.0])
    assert target.dtype == np.float32 and target.shape == (16, 40, 48)
    assert 0.0 <= target.min() and target.max() == 1.0
    assert target[4, 10, 12] == 1.0 and target[10, 26, 30] == 1.0
    assert np.count_nonzero(target == 1.0) == 2
    # anisotropic: narrower along z (radius 1) than along y (radius 3)
    assert target[5, 10, 12] < target[4, 11, 12]
    assert target[0, 0, 47] == 0.0


def test_gaussian_targets_edge_cases():
    assert not gaussian_heatmap_targets((4, 5, 6), [], []).any()
    edge = gaussian_heatmap_targets((4, 8, 8), [(0, 0, 0)], [2.0])
    assert edge[0, 0, 0] == 1.0
    outside = gaussian_heatmap_targets((4, 8, 8), [(1, -2, 3)], [2.0])  # tail only
    assert 0 < outside.max() < 1
    far = gaussian_heatmap_targets((4, 8, 8), [(100, 100, 100)], [1.0])
    assert not far.any()
    with pytest.raises(MedsegInputError):
        gaussian_heatmap_targets((4, 8, 8), [(1, 2, 3)], [0.0])
    with pytest.raises(MedsegInputError):
        gaussian_heatmap_targets((4, 8, 8), [(1, 2, 3), (1, 1, 1)], [[1, 2], [3, 4]])


def test_extract_peaks_finds_two_blobs_with_their_sizes():
    heat = 0.9 * gaussian_heatmap_targets((12, 40, 40), [(3, 8, 9), (8, 30, 28)], [2.0, 2.0])
    heat[8, 30, 28] = 0.95
    size = np.full(heat.shape, 4.0, dtype=np.float32)
    size[8, 30, 28] = 12.5
    peaks = extract_peaks(heat, size, spacing=(2.0, 1.0, 1.0), threshold=0.3, min_distance_mm=5)
    assert [(p.z, p.y, p.x) for p in peaks] == [(8, 30, 28), (3, 8, 9)]  # by score
    assert peaks[0].score == pytest.approx(0.95) and peaks[0].diameter_mm == 12.5
    assert peaks[1].diameter_mm == 4.0
    assert all(isinstance(p.z, int) for p in peaks)


def test_extract_peaks_plateau_is_one_peak():
    heat = np.zeros((5, 20, 20), dtype=np.float32)
    heat[1:4, 5:10, 6:13] = 0.8  # flat top
    peaks = extract_peaks(heat, None, spacing=(1, 1, 1), min_distance_mm=1.0)
    assert len(peaks) == 1
    p = peaks[0]
    assert (p.z, p.y, p.x) == (2, 7, 9) and np.isnan(p.diameter_mm)


def _reference_peak_voxels(heat, threshold):
    """The plain definition: a 3×3×3 maximum filter and a label pass over the whole
    heatmap, each plateau's member nearest its centroid (first on a tie)."""
    from scipy import ndimage

    clean = np.where(np.isfinite(heat), heat, -np.inf)
    local_max = ndimage.maximum_filter(clean, size=3, mode="constant", cval=-np.inf)
    labels, n = ndimage.label((clean >= threshold) & (clean == local_max), np.ones((3, 3, 3)))
    points = []
    for index in range(1, n + 1):
        coords = np.argwhere(labels == index)
        points.append(coords[np.argmin(((coords - coords.mean(axis=0)) ** 2).sum(axis=1))])
    return np.asarray(points).reshape(-1, 3)


@pytest.mark.parametrize("sparse", [True, False])
def test_peak_voxels_match_the_maximum_filter_on_both_paths(sparse):
    from napari_medseg.core.models import detector

    rng = np.random.default_rng(3)
    heat = np.round(rng.random((7, 23, 19)) * 0.9, 1).astype(np.float32)  # many equal values
    if sparse:  # few voxels over the threshold: the neighbour comparison, k-d tree groups
        heat *= 0.5
        heat[rng.random(heat.shape) < 0.005] = 0.9
    threshold = 0.6
    heat[0, 0, 0] = heat[-1, -1, -1] = heat[0, -1, 0] = 1.0  # maxima on the corners
    heat[3, 4:7, 5:8] = 1.0  # a plateau
    heat[6, 0:2, 10:12] = 0.95  # a plateau on the border
    heat[5, 10, 10], heat[5, 10, 11], heat[1, 1, 1] = np.nan, np.inf, -np.inf  # count as −inf
    heat[4, 15, 15], heat[4, 15, 16] = 0.97, np.nan  # a maximum next to NaN
    share = np.count_nonzero(heat >= threshold) / heat.size
    assert (share <= detector._DENSE_SHARE) == sparse  # the path this case is about
    expected = _reference_peak_voxels(heat, threshold)
    found = detector._peak_voxels(heat, threshold)
    assert sorted(map(tuple, found)) == sorted(map(tuple, expected))
    assert (4, 15, 15) in map(tuple, found) and (3, 5, 6) in map(tuple, found)  # plateau centre
    assert (5, 10, 11) not in map(tuple, found)


def test_peaks_of_a_flat_noisy_heatmap_cost_a_few_maximum_filters():
    """A barely trained detector's heatmap is noise: 10⁵ single-voxel maxima, each picked
    by its own Python loop step, made one detection take 17 s (timed against one 3×3×3
    maximum filter over the same heatmap in this run; it was ≈ 20 of them, now ≈ 3)."""
    import time

    from scipy import ndimage

    from napari_medseg.core.models import detector

    heat = np.random.default_rng(5).random((32, 128, 128)).astype(np.float32)

    def best_of_three(call):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    one_filter = best_of_three(lambda: ndimage.maximum_filter(heat, size=3))
    peaks = best_of_three(lambda: detector._peak_voxels(heat, 0.0))
    assert peaks < 8 * one_filter, f"{peaks / one_filter:.1f} maximum filters"


def test_voxels_above_the_threshold_slab_by_slab_are_the_whole_mask():
    from napari_medseg.core.models import detector

    heat = np.random.default_rng(4).random((37, 9, 8)).astype(np.float32)
    heat[20, 3, 3], heat[33, 1, 1] = np.nan, np.inf
    found = detector._voxels_above(heat, 0.8, slab=5)
    np.testing.assert_array_equal(found, np.argwhere((heat >= 0.8) & np.isfinite(heat)))
    assert detector._voxels_above(heat[:0], 0.8).shape == (0, 3)


def test_a_flat_heatmap_is_one_peak_without_pairing_every_voxel():
    heat = np.full((20, 60, 60), 0.5, dtype=np.float32)  # e.g. a low threshold on a plateau
    peaks = extract_peaks(heat, None, (1.0, 1.0, 1.0), threshold=0.3)
    assert [(p.z, p.y, p.x) for p in peaks] == [(9, 29, 29)]  # nearest the centroid, first


def test_extract_peaks_threshold_nms_and_limits():
    heat = np.zeros((3, 30, 30), dtype=np.float32)
    heat[1, 5, 5] = 0.9
    heat[1, 5, 9] = 0.6  # 4 mm from the strongest peak
    heat[1, 20, 20] = 0.29  # below threshold
    heat[1, 25, 5] = np.nan
    spacing = (1.0, 1.0, 1.0)
    strongest = extract_peaks(heat, None, spacing, 0.3, min_distance_mm=6)
    assert [(p.y, p.x) for p in strongest] == [(5, 5)]
    both = extract_peaks(heat, None, spacing, 0.3, min_distance_mm=3)
    assert [(p.y, p.x) for p in both] == [(5, 5), (5, 9)]
    # anisotropic spacing: 4 voxels along x are 8 mm
    assert len(extract_peaks(heat, None, (1.0, 1.0, 2.0), 0.3, min_distance_mm=6)) == 2
    assert len(extract_peaks(heat, None, spacing, 0.25, min_distance_mm=3)) == 3
    assert len(extract_peaks(heat, None, spacing, 0.25, min_distance_mm=3, max_peaks=1)) == 1
    assert extract_peaks(heat, None, spacing, threshold=0.95) == []
    with pytest.raises(MedsegInputError, match="size map"):
        extract_peaks(heat, np.zeros((3, 30, 29)), spacing)
    with pytest.raises(MedsegInputError, match="spacing"):
        extract_peaks(heat, None, (1.0, 0.0, 1.0))


def test_radius_nms_drops_a_second_peak_inside_a_large_lesion_only():
    heat = np.zeros((3, 40, 40), dtype=np.float32)
    size = np.full(heat.shape, 4.0, dtype=np.float32)
    heat[1, 10, 10], size[1, 10, 10] = 0.9, 20.0  # a 20 mm lesion ...
    heat[1, 10, 17] = 0.6  # ... with a weaker peak 7 mm from its centre
    heat[1, 30, 30], size[1, 30, 30] = 0.8, 4.0  # a small lesion
    heat[1, 30, 36] = 0.7  # and another small one 6 mm from it
    spacing = (1.0, 1.0, 1.0)
    fixed = extract_peaks(heat, size, spacing, 0.3, min_distance_mm=5)
    assert len(fixed) == 4
    by_radius = extract_peaks(heat, size, spacing, 0.3, min_distance_mm=5, radius_fraction=1.0)
    assert [(p.y, p.x) for p in by_radius] == [(10, 10), (30, 30), (30, 36)]
    # half the radius (5 mm) is below the 7 mm: the second peak stays
    assert len(extract_peaks(heat, size, spacing, 0.3, min_distance_mm=5, radius_fraction=0.5)) == 4
    # without a size map the fraction has nothing to act on
    assert len(extract_peaks(heat, None, spacing, 0.3, min_distance_mm=5, radius_fraction=1.0)) == 4
    with pytest.raises(MedsegInputError, match="radius_fraction"):
        extract_peaks(heat, size, spacing, radius_fraction=-1)


def test_stack_neighbours_clamps_at_the_ends():
    vol = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), dtype=np.float32)
    stack = stack_neighbours(vol, 0, 4)
    assert stack.shape == (4, 3, 2, 3) and stack.dtype == np.float32
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    with pytest.raises(MedsegInputError):
        stack_neighbours(vol, 3, 6)


def test_detector_starts_at_the_centernet_prior():
    model = LesionDetector(**SMALL_DET)
    torch.nn.init.zeros_(model.head.weight)
    heat, size = model.eval()(torch.randn(1, 3, 8, 8))
    assert torch.allclose(torch.sigmoid(heat), torch.full_like(heat, 0.1), atol=2e-3)
    assert torch.allclose(size.exp(), torch.full_like(size, 10.0), atol=1e-3)


def test_detector_ensemble_averages_its_members_scores_and_diameters():
    nets = [_seeded(LesionDetector(**SMALL_DET), seed).eval() for seed in range(3)]
    ens = LesionDetector.ensemble(nets)
    assert ens.members == 3 and ens.arch_params["members"] == 3 and not ens.training
    assert "members" not in nets[0].arch_params  # single detectors' cards stay as they were
    x = torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        outs = [n(x) for n in nets]
        heat, log_d = ens(x)
    mean_score = torch.stack([torch.sigmoid(o.heatmap) for o in outs]).mean(0)
    mean_d = torch.stack([o.log_diameter.exp() for o in outs]).mean(0)
    assert torch.allclose(torch.sigmoid(heat), mean_score, atol=1e-6)
    assert torch.allclose(log_d.exp(), mean_d, rtol=1e-5)
    assert not torch.allclose(torch.sigmoid(outs[0].heatmap), mean_score, atol=1e-3)
    with torch.no_grad():  # an ensemble of one is that network
        assert torch.equal(LesionDetector.ensemble(nets[:1])(x).heatmap, outs[0].heatmap)


def test_detector_ensemble_refuses_mixed_layouts():
    with pytest.raises(MedsegInputError, match="differ in layout"):
        LesionDetector.ensemble([LesionDetector(**SMALL_DET), LesionDetector(widths=(4, 8, 16))])
    with pytest.raises(MedsegInputError, match="single-network"):
        LesionDetector.ensemble([LesionDetector(**SMALL_DET, members=2)])
    with pytest.raises(MedsegInputError, match="members"):
        LesionDetector(members=0)


# -- registry ---------------------------------------------------------------------------------
CARD = {
    "classes": ["no_body", "normal", "lesion"],
    "input_spacing_mm": [5.0, 1.5, 1.5],
    "normalisation": {"type": "window", "low": -200, "high": 300},
    "training_command": "napari-medseg train classifier --seed 0",
    "seed": 0,
    "metrics": {"accuracy": 0.9},
}

MODELS = {
    "classifier": (lambda: SliceClassifier(**SMALL_CLS), (2, 1, 20, 18), CARD["classes"]),
    "segmenter": (
        lambda: RecurrentSegmenter(**SMALL_SEG), (3, 1, 12, 10), ["bg", "liver", "spleen"]
    ),
    "detector": (lambda: LesionDetector(**SMALL_DET), (2, 3, 12, 10), ["lesion"]),
    "classifier_two_convs": (lambda: SliceClassifier(**SMALL_CLS, convs_per_block=2),
                             (2, 1, 20, 18), CARD["classes"]),
    "detector_deep": (lambda: LesionDetector(**SMALL_DET, convs_per_stage=3), (2, 3, 12, 10),
                      ["lesion"]),
    "detector_ensemble": (lambda: LesionDetector(**SMALL_DET, members=3), (2, 3, 12, 10), ["lesion"]),
}


def _save(tmp_path, kind="classifier", seed=0):
    make, shape, classes = MODELS[kind]
    model = _seeded(make(), seed)
    path = save_model(model, tmp_path, kind, {**CARD, "classes": classes})
    return model, path, torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _as_saved_before_the_card_was_stored(card_path):
    """Rewrite a saved model as save_model wrote it before it stored the card's meaning
    (arch_params, classes, …) in the weights file: such files (the bundled ones) load
    with only the architecture checked against the file."""
    card = json.loads(card_path.read_text())
    weights = card_path.parent / card["weights_file"]
    tensors = safetensors.torch.load(weights.read_bytes())
    meta = {"napari_medseg": json.dumps({"format": card["format"], "name": card["name"],
                                         "architecture": card["architecture"]}, sort_keys=True)}
    data = safetensors.torch.save(tensors, metadata=meta)
    weights.write_bytes(data)
    card_path.write_text(json.dumps({**card, "sha256": hashlib.sha256(data).hexdigest()}))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_registry_round_trip(tmp_path, kind):
    model, card_path, x = _save(tmp_path, kind)
    weights = tmp_path / f"{kind}.safetensors"
    assert card_path == tmp_path / f"{kind}.json" and weights.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kind}.json", f"{kind}.safetensors"]
    card = json.loads(card_path.read_text())
    for key in ("name", "architecture", "arch_params", "classes", "input_spacing_mm",
                "normalisation", "version", "sha256", "training_command", "seed", "metrics"):
        assert key in card, key
    assert card["architecture"] == type(model).__name__
    assert card["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    loaded, loaded_card = load_model(card_path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_card["metrics"] == {"accuracy": 0.9}
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for ta, tb in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
        assert torch.equal(ta, tb)
    # by name, through search_dirs
    again, _ = load_model(kind, search_dirs=[tmp_path / "nope", tmp_path])
    pairs = zip(loaded.state_dict().values(), again.state_dict().values())
    assert all(torch.equal(p, q) for p, q in pairs)


def test_registry_saves_channels_last_and_reloads(tmp_path):
    model = _seeded(SliceClassifier(**SMALL_CLS)).to(memory_format=torch.channels_last)
    path = save_model(model, tmp_path, "cl", CARD)
    loaded, _ = load_model(path)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)


def test_registry_refuses_a_changed_byte(tmp_path):
    _save(tmp_path)
    weights = tmp_path / "classifier.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MedsegInputError) as err:
        load_model(tmp_path / "classifier.json")
    msg = str(err.value)
    assert msg.startswith("classifier.safetensors: checksum mismatch (file changed or truncated)")
    assert "expected " in msg and "got " in msg and "\n" not in msg


def test_registry_refuses_a_truncated_file(tmp_path):
    _save(tmp_path)
    weights = tmp_path / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(MedsegInputError, match=r"^classifier\.safetensors: checksum mismatch"):
        load_model(tmp_path / "classifier.json")


def test_registry_refuses_missing_weights(tmp_path):
    _save(tmp_path)
    (tmp_path / "classifier.safetensors").unlink()
    with pytest.raises(MedsegInputError, match=r"^classifier\.safetensors: weights file missing"):
        load_model(tmp_path / "classifier.json")


def test_registry_refuses_weights_that_do_not_fit(tmp_path):
    _, card_path, _ = _save(tmp_path)
    _as_saved_before_the_card_was_stored(card_path)
    card = json.loads(card_path.read_text())
    card["arch_params"]["n_classes"] = 4  # checksum still fine, shapes are not
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedsegInputError) as err:
        load_model(card_path)
    msg = str(err.value)
    assert msg.startswith("classifier.safetensors: weights do not fit SliceClassifier")
    assert "2 with wrong shape" in msg and "head.4." in msg and "\n" not in msg


def test_a_later_minor_card_format_loads(tmp_path):
    """napari-medseg-model/1.1 is format 1 with additions: it was refused as "not a
    napari-medseg model card"."""
    _, card_path, _ = _save(tmp_path)
    _as_saved_before_the_card_was_stored(card_path)
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "format": "napari-medseg-model/1.1"}))
    load_model(card_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(architecture="ResNet"), "unknown architecture 'ResNet'"),
        (lambda c: c["arch_params"].update(activation="swish"), "bad arch_params.*swish"),
        (lambda c: c["arch_params"].update(bogus=1), "bad arch_params.*bogus"),
        (lambda c: c.pop("sha256"), "lacks sha256"),
        (lambda c: c.update(weights_file="../elsewhere.safetensors"), "beside the card"),
        # refused before building: a damaged count took minutes and 10 GB to build
        (lambda c: c["arch_params"].update(convs_per_block=100000),
         r"arch_params \(convs_per_block = 100000\) cannot describe these weights"),
        (lambda c: c["arch_params"].update(filters=[8] * 100000), "filters lists 100000 values"),
        # a float: the constructors take 3000.0 as 3000 (11 s and 450 MB to build)
        (lambda c: c["arch_params"].update(convs_per_block=100000.0),
         r"arch_params \(convs_per_block = 100000.0\) cannot describe"),
        (lambda c: c["arch_params"].update(hidden=float("inf")), r"\(hidden = inf\) cannot"),
        # a number past float's range, a nesting past json's depth: one line, no traceback
        (lambda c: c.update(peak_threshold=10 ** 400), "number too large"),
        (lambda c: c["normalisation"].update(low=-(10 ** 400)), "needs numbers"),
        # a newer napari-medseg's card loaded without a word, what it adds ignored
        (lambda c: c.update(format="napari-medseg-model/2"),
         r"saved by a newer napari-medseg \(card format napari-medseg-model/2"),
        (lambda c: c.update(format="monai-bundle/1"), "not a napari-medseg model card"),
    ],
)
def test_registry_refuses_bad_cards(tmp_path, edit, match):
    _, card_path, _ = _save(tmp_path)
    _as_saved_before_the_card_was_stored(card_path)  # checks that do not need the stored card
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedsegInputError, match=match):
        load_model(card_path)


@pytest.mark.parametrize("edit", [
    lambda c: c["arch_params"].update(activation="gelu"),   # same shapes, other predictions
    lambda c: c.update(classes=c["classes"][::-1]),          # every slice named wrong
    lambda c: c.update(input_spacing_mm=[2.5, 1.5, 1.5]),
    lambda c: c["normalisation"].update(high=400),
])
def test_a_card_edited_after_saving_is_refused(tmp_path, edit):
    """The checksum covers the weights file only; what the card says the tensors mean is
    stored in that file too, and an edited card no longer loads as if nothing changed."""
    _, card_path, _ = _save(tmp_path)
    load_model(card_path)
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedsegInputError, match=r"^classifier\.json: the card's \w+ differ from "
                                               r"what the weights were saved with"):
        load_model(card_path)


def test_the_weights_file_or_a_name_ending_in_a_suffix_is_handled(tmp_path):
    """A unique-named save's weights file names its card (the docstring promised the
    .safetensors beside the card works); a name ending .json could never be found."""
    model = _seeded(SliceClassifier(**SMALL_CLS))
    card_path = save_model(model, tmp_path, "mine", CARD, unique_weights=True)
    weights = tmp_path / json.loads(card_path.read_text())["weights_file"]
    assert weights.name != "mine.safetensors"
    assert load_model(weights)[1]["card_path"] == str(card_path)
    with pytest.raises(MedsegInputError, match="file suffix"):
        save_model(model, tmp_path, "other.json", CARD)


def test_a_width_torch_cannot_allocate_is_one_line():
    """torch's message carries a C++ stack of 40 lines; the CLI printed it all."""
    with pytest.raises(MedsegInputError, match=r"^bad arch_params for RecurrentSegmenter: "
                                               r"[^\n]*Overflow[^\n]*$"):
        registry.build_model({"architecture": "RecurrentSegmenter",
                              "arch_params": {"hidden": 10 ** 30}})


def test_a_card_too_deep_to_parse_is_one_line(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(MedsegInputError, match=r"^deep\.json: not a readable model card"):
        load_model(tmp_path / "deep.json")
    assert registry.list_models([tmp_path]) == []


def test_a_load_during_a_save_reads_the_new_card(tmp_path, monkeypatch):
    """A load that read the card just before a save replaced the model found its weights
    deleted; it reads the card again."""
    model = _seeded(SliceClassifier(**SMALL_CLS))
    card_path = save_model(model, tmp_path, "m", CARD, unique_weights=True)
    old = json.loads(card_path.read_text())
    real_read_card, calls = registry.read_card, []

    def read_card_then_resave(path):
        card = real_read_card(path)
        if not calls:  # the save lands between this load's card and weights reads
            save_model(_seeded(SliceClassifier(**SMALL_CLS), 1), tmp_path, "m", CARD,
                       unique_weights=True)
        calls.append(path)
        return card

    monkeypatch.setattr(registry, "read_card", read_card_then_resave)
    _, card = load_model(card_path)
    assert len(calls) == 2 and card["sha256"] != old["sha256"]


def test_registry_refuses_unreadable_card_and_unknown_name(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(MedsegInputError, match=r"^broken\.json: not a readable model card"):
        load_model(tmp_path / "broken.json")
    _save(tmp_path)
    with pytest.raises(MedsegInputError, match=r"'segmenter' in .*available: broken, classifier"):
        load_model("segmenter", search_dirs=[tmp_path])
    with pytest.raises(MedsegInputError, match=r"^missing\.json: model card not found"):
        load_model(tmp_path / "missing.json")


def test_registry_loads_without_pickle(tmp_path, monkeypatch):
    _save(tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    load_model(tmp_path / "classifier.json")


@pytest.mark.parametrize(
    "card, match",
    [
        ({k: v for k, v in CARD.items() if k != "classes"}, "lacks classes"),
        ({**CARD, "classes": ["a", "b"]}, "2 classes, the model has 3"),
        ({**CARD, "normalisation": {"type": "window", "low": 300, "high": -200}}, "low < high"),
        ({**CARD, "normalisation": {"type": "minmax"}}, "window, zscore"),
        ({**CARD, "input_spacing_mm": [1.0, 1.0]}, "input_spacing_mm"),
        ({**CARD, "arch_params": {"n_classes": 5}}, "differ from the model"),
        ({**CARD, "metrics": {"dice": float("nan")}}, "not plain JSON"),
        ({**CARD, "seed": object()}, "not plain JSON"),
    ],
)
def test_save_validates_the_card(tmp_path, card, match):
    with pytest.raises(MedsegInputError, match=match):
        save_model(SliceClassifier(**SMALL_CLS), tmp_path, "clf", card)
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_bad_names(tmp_path):
    for name in ("", "../up", "a/b", ".hidden"):
        with pytest.raises(MedsegInputError, match="model name"):
            save_model(SliceClassifier(**SMALL_CLS), tmp_path, name, CARD)


def test_crash_while_writing_the_card_leaves_the_old_model_intact(tmp_path, monkeypatch):
    model, card_path, x = _save(tmp_path)
    old_card = card_path.read_text()
    real_write = registry._atomic_write

    def crash_on_card(path, data):
        if path.suffix == ".json":
            real_write(path.with_suffix(".partial"), data[:10])  # simulate: never completes
            (path.with_suffix(".partial")).unlink()
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(registry, "_atomic_write", crash_on_card)
    with pytest.raises(OSError):
        save_model(_seeded(SliceClassifier(**SMALL_CLS), seed=5), tmp_path, "classifier", CARD)
    # the card was not replaced, and the old weights were put back: the old model, whole
    # (it used to be left naming the new weights, refused by every load as a mismatch)
    assert card_path.read_text() == old_card
    loaded, _ = load_model(card_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_write_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        registry._atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """The file was fsynced, its new directory entry not: a power cut after the rename
    could bring back the old weights or autosave."""
    import stat

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), (tmp_path / "x.bin").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    registry._atomic_write(tmp_path / "x.bin", b"new")
    assert synced == [(False, False), (True, True)]  # the data, then the folder renamed into


def test_list_models_skips_bad_cards(tmp_path):
    _save(tmp_path, "classifier")
    _save(tmp_path, "detector")
    (tmp_path / "junk.json").write_text("[]")
    cards = list_models([tmp_path, tmp_path / "absent"])
    assert [c["name"] for c in cards] == ["classifier", "detector"]
    assert all(c["card_path"].endswith(".json") for c in cards)


def test_user_models_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    assert user_models_dir() == tmp_path / "home" / "models"
    assert not (tmp_path / "home").exists()
    assert user_models_dir(create=True).is_dir()
    monkeypatch.delenv("NAPARI_MEDSEG_HOME")
    assert user_models_dir().parts[-2:] == (".napari-medseg", "models")


def test_bundled_folder_and_every_bundled_card_loads():
    assert BUNDLED_DIR.is_dir() and (BUNDLED_DIR / "README.md").is_file()
    assert set(ARCHITECTURES) >= {"SliceClassifier", "RecurrentSegmenter", "LesionDetector"}
    for card in list_models([BUNDLED_DIR]):  # empty until models are trained
        model, loaded = load_model(card["card_path"])
        assert loaded["sha256"] == card["sha256"]


def test_apply_normalisation():
    hu = np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0, np.nan], dtype=np.float32)
    out = apply_normalisation(hu, {"type": "window", "low": -200, "high": 300})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1, 0])
    z = apply_normalisation(hu[:3], {"type": "zscore", "mean": 50.0, "std": 250.0})
    np.testing.assert_allclose(z, [-4.2, -1.0, 0.0], rtol=1e-6)


def test_a_loaded_card_can_be_saved_again_as_a_new_model(tmp_path):
    _, card_path, x = _save(tmp_path)
    model, card = load_model(card_path)
    card["metrics"] = {"accuracy": 0.95}
    new_path = save_model(model, tmp_path / "user", "classifier-finetuned", card)
    saved = json.loads(new_path.read_text())
    assert saved["name"] == "classifier-finetuned" and "card_path" not in saved
    assert saved["weights_file"] == "classifier-finetuned.safetensors"
    reloaded, reloaded_card = load_model("classifier-finetuned", search_dirs=[tmp_path / "user"])
    assert reloaded_card["metrics"] == {"accuracy": 0.95}
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_a_card_whose_layers_cannot_be_allocated_is_an_input_error():
    from napari_medseg.core.models.registry import build_model

    card = {"architecture": "SliceClassifier",
            "arch_params": {"n_classes": 3, "filters": (8, 8, 8), "hidden": 10**13}}
    with pytest.raises(MedsegInputError, match="cannot be built"):
        build_model(card)


def test_a_card_naming_another_architecture_than_its_file_is_refused(tmp_path):
    """The card is not under the checksum; the file's own header says what it holds."""
    _, card_path, _ = _save(tmp_path, "segmenter")
    card = json.loads(card_path.read_text())
    card["architecture"] = "SliceGenerator"  # builds, and would load the same tensors
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedsegInputError, match="saved from a 'RecurrentSegmenter'"):
        load_model(card_path)


@pytest.mark.parametrize("field, value", [("architecture", ["SliceClassifier"]),
                                          ("architecture", {"a": 1}),
                                          ("weights_file", "classifier\u0000.safetensors"),
                                          ("weights_file", 3)])
def test_a_card_field_of_the_wrong_kind_is_a_one_line_refusal(tmp_path, field, value):
    """A list as architecture raised TypeError (and broke list_models, so every model
    picker); a NUL in weights_file a bare ValueError."""
    _, card_path, _ = _save(tmp_path)
    card = json.loads(card_path.read_text())
    card[field] = value
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedsegInputError):
        load_model(card_path)
    if field == "architecture":  # skipped (logged), not a crash of every model list
        assert registry.list_models([tmp_path]) == []


def test_saving_a_version_deletes_only_its_own_old_weights(tmp_path):
    """unique_weights deleted whatever file the old card named: a damaged card naming
    another model's weights (or the card itself) got them deleted."""
    model, other_card, _ = _save(tmp_path, "classifier")
    card = {**CARD, "classes": MODELS["classifier"][2]}
    mine = save_model(model, tmp_path, "mine", card, unique_weights=True)
    for named in ("classifier.safetensors", "mine.json"):
        spoilt = json.loads(mine.read_text())
        spoilt["weights_file"] = named
        mine.write_text(json.dumps(spoilt))
        save_model(model, tmp_path, "mine", card, unique_weights=True)
        assert mine.is_file() and load_model(other_card)[0] is not None
    first = json.loads(mine.read_text())["weights_file"]
    with torch.no_grad():
        next(iter(model.parameters())).add_(1.0)
    save_model(model, tmp_path, "mine", card, unique_weights=True)
    assert not (tmp_path / first).exists()  # its own superseded weights still go


@pytest.mark.parametrize("spoil", ["nan", "int"])
def test_weights_that_are_not_finite_floats_are_refused(tmp_path, spoil):
    import safetensors.torch

    model, card_path, _ = _save(tmp_path)
    with torch.no_grad():
        first = next(iter(model.parameters()))
        first[0] = float("nan")
    with pytest.raises(MedsegInputError, match="NaN or infinite"):  # a diverged run
        save_model(model, tmp_path / "other", "bad", {**CARD, "classes": MODELS["classifier"][2]})
    weights = tmp_path / "classifier.safetensors"
    tensors = safetensors.torch.load(weights.read_bytes())
    key = next(k for k in tensors if k.endswith("weight"))
    tensors[key] = (tensors[key].fill_(float("nan")) if spoil == "nan"
                    else tensors[key].to(torch.int64))
    data = safetensors.torch.save(tensors, metadata={"napari_medseg": json.dumps(
        {"architecture": "SliceClassifier"})})
    weights.write_bytes(data)
    card = json.loads(card_path.read_text())
    card["sha256"] = hashlib.sha256(data).hexdigest()  # someone re-signed the file
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedsegInputError, match="NaN or infinite" if spoil == "nan" else "not floating"):
        load_model(card_path)


@pytest.mark.parametrize("killed_after", [1, 2, 3])
def test_a_save_killed_between_its_writes_leaves_a_loadable_model(tmp_path, monkeypatch,
                                                                   killed_after):
    """`train --overwrite` killed after the weights were replaced and before the card
    followed left the old card beside new weights: refused by every load (checksum)."""
    import shutil

    folder = tmp_path / "models"
    model, card_path, x = _save(folder)
    new_model = _seeded(SliceClassifier(**SMALL_CLS), seed=5)
    real_write = registry._atomic_write
    writes = []
    at_kill = tmp_path / "at_kill"  # the folder as a kill at that instant leaves it

    def write(path, data):
        if len(writes) == killed_after:
            shutil.copytree(folder, at_kill)
        writes.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(registry, "_atomic_write", write)
    save_model(new_model, folder, "classifier", CARD)
    assert len(writes) == 4 and at_kill.is_dir()
    loaded, _ = load_model(at_kill / "classifier.json")  # the old model or the new, whole
    with torch.no_grad():
        out = loaded.eval()(x)
        assert (torch.allclose(out, model.eval()(x))
                or torch.allclose(out, new_model.eval()(x)))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert json.loads(card_path.read_text())["weights_file"] == "classifier.safetensors"
    # a save after a kill sweeps the staged file that kill left
    stale = [p for p in at_kill.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(registry, "_atomic_write", real_write)
    save_model(new_model, at_kill, "classifier", CARD)
    assert not [p for p in at_kill.iterdir() if p.name.startswith(".")], stale


@pytest.mark.parametrize("unique", [False, True])
def test_an_interrupt_after_any_rename_of_a_save_leaves_a_loadable_model(tmp_path, monkeypatch,
                                                                          unique):
    """Ctrl-C just after a rename (while the folder was synced) reached the save's clean-up
    as if that write had failed: the new card's weights were deleted ("weights file
    missing"), or the old card went back beside the new weights (checksum mismatch)."""
    folder = tmp_path / "models"
    model, _card_path, x = _save(folder)
    if unique:
        save_model(model, folder, "classifier", CARD, unique_weights=True)
    new_model = _seeded(SliceClassifier(**SMALL_CLS), seed=5)
    real_sync = registry._fsync_folder
    for interrupted_at in range(1, 5 if not unique else 3):
        syncs = []

        def sync_then_ctrl_c(path):
            real_sync(path)
            syncs.append(path)
            if len(syncs) == interrupted_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(registry, "_fsync_folder", sync_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            save_model(new_model, folder, "classifier", CARD, unique_weights=unique)
        monkeypatch.setattr(registry, "_fsync_folder", real_sync)
        loaded, card = load_model(folder / "classifier.json")  # the old model or the new
        with torch.no_grad():
            out = loaded.eval()(x)
            assert (torch.allclose(out, model.eval()(x))
                    or torch.allclose(out, new_model.eval()(x))), interrupted_at
        named = {card["weights_file"], "classifier.json"}
        left = {p.name for p in folder.iterdir()} - named
        assert not left, (interrupted_at, left)  # nothing orphaned beside it
        save_model(model, folder, "classifier", CARD, unique_weights=unique)  # the old again


def test_a_failed_replace_names_the_target_not_the_temp_file(tmp_path):
    """os.replace onto a folder said '.classifier.json.x1y2.tmp: Is a directory'."""
    from napari_medseg.core.models.registry import _atomic_write

    (tmp_path / "classifier.json").mkdir()
    with pytest.raises(OSError) as err:
        _atomic_write(tmp_path / "classifier.json", b"{}")
    assert err.value.filename == str(tmp_path / "classifier.json") and ".tmp" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.json"]


def test_a_save_error_names_the_file_once_not_a_second_none(tmp_path, monkeypatch):
    """"No space left on device: '.../x.safetensors' -> None": filename2 was set to None."""
    import errno
    import os

    from napari_medseg.core.models.registry import _atomic_write

    def full(fd):  # where a full disk is found on a network or delayed-allocation one
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        _atomic_write(tmp_path / "m.safetensors", b"x" * 10)
    assert str(err.value) == f"[Errno 28] No space left on device: '{tmp_path / 'm.safetensors'}'"
    assert list(tmp_path.iterdir()) == []


def test_a_save_without_write_access_names_the_file_not_a_temp_file(tmp_path, monkeypatch):
    import errno
    import tempfile

    from napari_medseg.core.models.registry import _atomic_write

    def refused(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x1y2{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as err:
        _atomic_write(tmp_path / "m.json", b"{}")
    assert err.value.filename == str(tmp_path / "m.json") and ".tmp" not in str(err.value)


def test_weights_a_killed_unique_save_left_are_deleted_by_the_next_save(tmp_path):
    """A save killed between its weights and its card left <name>.<sha>.safetensors that
    no card named, and every later save kept it."""
    model = _seeded(SliceClassifier(**SMALL_CLS), seed=5)
    save_model(model, tmp_path, "mine", CARD, unique_weights=True)
    orphan = tmp_path / "mine.0123456789ab.safetensors"  # as a kill leaves it
    orphan.write_bytes(b"weights of a save that never wrote its card")
    copied = tmp_path / "mine.abcdefabcdef.safetensors"  # named by another card: kept
    copied.write_bytes(b"x")
    (tmp_path / "copy.json").write_text('{"weights_file": "mine.abcdefabcdef.safetensors"}')
    other = tmp_path / "mine2.0123456789ab.safetensors"  # another model's name: kept
    other.write_bytes(b"x")
    in_flight = tmp_path / "mine.fedcba987654.safetensors"  # another process's save, its
    in_flight.write_bytes(b"y")  # card about to follow: too new to be an orphan
    old = time.time() - 2 * registry.ORPHAN_AGE_S
    for path in (orphan, copied, other):
        os.utime(path, (old, old))
    save_model(_seeded(SliceClassifier(**SMALL_CLS), seed=6), tmp_path, "mine", CARD,
               unique_weights=True)
    assert not orphan.exists() and copied.exists() and other.exists() and in_flight.exists()
    assert len(list(tmp_path.glob("mine.*.safetensors"))) == 3  # new, the copy's, in flight
    load_model(tmp_path / "mine.json")


@pytest.mark.parametrize("unique", [False, True])
def test_temp_files_a_killed_save_left_are_deleted_by_the_next_save(tmp_path, unique):
    """A save killed inside _atomic_write left its hidden mkstemp file (up to a whole
    weights file), and no later save removed it."""
    long = "m" * 45  # a target name cut to 40 characters in the temp name
    left = [".mine.json.ab12cd_3.tmp", ".mine.safetensors.zz99yy00.tmp",
            ".mine.0123456789ab.safetensors.q1w2e3r4.tmp",
            "..mine.0123456789ab.safetensors.a1b2c3d4.tmp"]
    kept = [".mine2.json.ab12cd_3.tmp",  # another model's
            ".mine.json.ab12cd_3.tmp.bak", ".notes.txt.ab12cd_3.tmp",
            f".{('other' + long)[:40]}.ab12cd_3.tmp"]
    for name in left + kept:
        (tmp_path / name).write_bytes(b"partial")
    fresh = tmp_path / ".mine.json.newnew00.tmp"  # another process writing now: kept
    fresh.write_bytes(b"partial")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # spoiled the whole sweep
    old = time.time() - 2 * registry.ORPHAN_AGE_S
    for name in left + kept:
        os.utime(tmp_path / name, (old, old))
    save_model(_seeded(SliceClassifier(**SMALL_CLS), seed=5), tmp_path, "mine", CARD,
               unique_weights=unique)
    assert [n for n in left if (tmp_path / n).exists()] == []
    assert all((tmp_path / n).exists() for n in kept) and fresh.exists()
    load_model(tmp_path / "mine.json")
    assert registry._our_temp(f".{(long + '.json')[:40]}.ab12cd_3.tmp", long)
    assert not registry._our_temp(f".{(long + '.json')[:40]}.ab12cd_3.tmp", "mm")


def test_a_weights_file_without_tensors_is_said_to_be_one(tmp_path):
    """A valid safetensors file holding no tensor (checksum matching) was refused as a
    card that 'cannot describe these weights'."""
    import safetensors.torch

    card_path = save_model(_seeded(SliceClassifier(**SMALL_CLS), seed=5), tmp_path, "mine",
                           CARD)
    card = json.loads(card_path.read_text())
    empty = safetensors.torch.save({})
    (tmp_path / card["weights_file"]).write_bytes(empty)
    card["sha256"] = hashlib.sha256(empty).hexdigest()
    card_path.write_text(json.dumps(card))
    with pytest.raises(MedsegInputError, match="the weights file holds no tensors"):
        load_model(card_path)


def test_a_save_that_fails_on_a_full_disk_leaves_no_folders_and_names_the_model_file(
        tmp_path, monkeypatch):
    """Only the deepest folder the save made was removed ("out/n1" stayed from
    "out/n1/n2"), and the error named the hidden staged file."""
    import errno

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(registry, "_atomic_write", full)
    model = _seeded(SliceClassifier(**SMALL_CLS), seed=5)
    with pytest.raises(OSError) as info:
        save_model(model, tmp_path / "n1" / "n2", "classifier", CARD)
    assert info.value.filename == str(tmp_path / "n1" / "n2" / "classifier.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_model_for_weights_is_built_without_waiting_for_a_seeded_job():
    """Building drew its random initialisation from torch's global generator, which a
    seeded job holds (core.rng) while each step runs: Retrain's Save waited ~0.4 s on
    napari's thread for an Uncertainty step. Built on the meta device it draws nothing."""
    import threading

    from napari_medseg.core import rng
    from napari_medseg.core.models.registry import BUNDLED_DIR, build_for_weights, load_model

    _, card = load_model(BUNDLED_DIR / "segmenter.json")
    held, release = threading.Event(), threading.Event()

    def a_seeded_step():
        with rng._LOCK:
            held.set()
            release.wait(30)

    step = threading.Thread(target=a_seeded_step)
    step.start()
    held.wait(10)
    built = []
    state = torch.get_rng_state()
    builder = threading.Thread(target=lambda: built.append(build_for_weights(card)))
    builder.start()
    builder.join(10)
    waited = builder.is_alive()
    release.set()
    step.join()
    builder.join()
    assert not waited and len(built) == 1
    assert torch.equal(torch.get_rng_state(), state)  # no draw from the global generator
    assert all(p.device.type == "cpu" for p in built[0].parameters())

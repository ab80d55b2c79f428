"""Explanations: sanity checks on the bundled models and on held-out phantoms."""

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.explain import gradcam_volume, randomised_copy, segmentation_uncertainty
from napari_medseg.core.models import SliceClassifier, load_model
from napari_medseg.core.phantom import generate_phantom
from napari_medseg.core.progress import run_to_completion


@pytest.fixture(scope="module")
def lesion_phantom():
    # held-out seed range (evaluation.py: 900000+), a lesion big enough to look at
    return generate_phantom((40, 220, 220), (3.0, 1.05, 1.05), seed=906001, n_lesions=1,
                            lesion_radius_mm=(9.0, 12.0))


@pytest.fixture(scope="module")
def lesion_free_twin():
    # the same seed without lesions: identical anatomy and noise, no lesion
    return generate_phantom((40, 220, 220), (3.0, 1.05, 1.05), seed=906001, n_lesions=0,
                            lesion_radius_mm=(9.0, 12.0))


def test_the_classifier_gives_a_lesion_free_twin_a_lower_lesion_probability(lesion_phantom,
                                                                             lesion_free_twin):
    from napari_medseg.core.inference import classify_volume

    model, card = load_model("classifier")
    zs = (lesion_phantom.labels == 8).sum(axis=(1, 2)) >= 20
    lesion = card["classes"].index("lesion")
    p = [run_to_completion(classify_volume(ph.volume, model, card)).probabilities[zs, lesion]
         for ph in (lesion_phantom, lesion_free_twin)]
    assert np.abs(lesion_free_twin.volume.array - lesion_phantom.volume.array)[
        ~ndimage.binary_dilation(lesion_phantom.labels == 8, iterations=4)].max() < 1e-3
    assert p[0].mean() - p[1].mean() > 0.2, p


def test_gradcam_of_lesion_slices_peaks_at_the_lesion(lesion_phantom):
    model, card = load_model("classifier")
    res = run_to_completion(gradcam_volume(lesion_phantom.volume, model, card, target="lesion"))
    lesion = lesion_phantom.labels == 8
    zs = np.flatnonzero(lesion.sum(axis=(1, 2)) >= 20)
    near = ndimage.binary_dilation(lesion, iterations=5)
    hits = [near[z].flat[int(np.argmax(res.maps[z]))] for z in zs]
    assert np.mean(hits) > 0.5, hits


def test_gradcam_of_lesion_slices_is_higher_in_the_lesion_than_in_the_slice(lesion_phantom):
    model, card = load_model("classifier")
    res = run_to_completion(gradcam_volume(lesion_phantom.volume, model, card, target="lesion"))
    lesion = lesion_phantom.labels == 8
    zs = np.flatnonzero(lesion.any(axis=(1, 2)))
    ratio = [res.maps[z][lesion[z]].mean() / res.maps[z].mean() for z in zs]
    # the map inside the lesion is on average above the slice's average
    assert np.median(ratio) > 2.0, ratio
    assert res.maps.shape == lesion.shape and 0 <= res.maps.min() and res.maps.max() <= 1
    assert set(res.target[zs]) == {card["classes"].index("lesion")}
    # model-randomisation check: a randomised network's map no longer picks out the lesion
    rnd = run_to_completion(gradcam_volume(lesion_phantom.volume, randomised_copy(model), card,
                                           target="lesion"))
    rnd_ratio = [rnd.maps[z][lesion[z]].mean() / max(rnd.maps[z].mean(), 1e-9) for z in zs]
    print("lesion / slice mean CAM: trained", np.median(ratio), "randomised", np.median(rnd_ratio))
    assert np.median(ratio) > 2 * np.median(rnd_ratio), (ratio, rnd_ratio)
    assert not np.allclose(res.maps[zs], rnd.maps[zs], atol=0.1)


def test_uncertainty_is_high_where_the_segmenter_errs(lesion_phantom):
    model, card = load_model("segmenter")
    res = run_to_completion(segmentation_uncertainty(lesion_phantom.volume, model, card, samples=4))
    truth = lesion_phantom.labels
    body = truth > 0
    wrong = (res.labels != truth) & body
    assert res.entropy[wrong].mean() > 2 * res.entropy[body & ~wrong].mean()
    lesion = ndimage.binary_dilation(truth == 8, iterations=2)
    assert res.entropy[lesion].mean() > 2 * res.entropy[body & ~lesion].mean()
    assert len(res.most_uncertain(5)) == 5
    rnd = run_to_completion(segmentation_uncertainty(lesion_phantom.volume, randomised_copy(model),
                                                     card, samples=2))
    assert np.corrcoef(res.entropy[body], rnd.entropy[body])[0, 1] < 0.5


def test_hirescam_is_gradient_times_activation_per_position():
    from napari_medseg.core.inference import resize_yx
    from napari_medseg.core.models import SliceClassifier
    from napari_medseg.core.volume import Volume

    torch.manual_seed(0)
    model = SliceClassifier(filters=(4, 8, 8), hidden=8).eval()
    card = {"classes": ["no_body", "normal", "lesion"], "input_spacing_mm": [5.0, 2.0, 2.0],
            "normalisation": {"type": "window", "low": -200.0, "high": 300.0}}
    volume = Volume(np.random.default_rng(0).normal(0, 150, (2, 40, 40)).astype(np.float32),
                    (5.0, 2.0, 2.0))
    grad_cam = run_to_completion(gradcam_volume(volume, model, card, target=2))
    hires = run_to_completion(gradcam_volume(volume, model, card, target=2, method="hirescam"))
    assert not np.allclose(grad_cam.maps, hires.maps, atol=1e-3)
    # by hand on slice 0: ReLU(Σ_c ∂score/∂A_c · A_c) per position, scaled to its maximum
    x = torch.from_numpy(np.clip((volume.array[:1] + 200) / 500, 0, 1))[:, None]
    feats = model.features(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.classify_features(feats)[0, 2], feats)
    cam = resize_yx(torch.relu((grad * feats.detach()).sum(1, keepdim=True)), (40, 40))[0, 0]
    np.testing.assert_allclose(hires.maps[0], (cam / cam.max()).numpy(), atol=1e-5)
    with pytest.raises(MedsegInputError, match="method"):
        run_to_completion(gradcam_volume(volume, model, card, method="lime"))


def test_bad_requests_are_refused(lesion_phantom):
    model, card = load_model("classifier")
    with pytest.raises(MedsegInputError, match="unknown class"):
        run_to_completion(gradcam_volume(lesion_phantom.volume, model, card, target="tumour"))
    seg, seg_card = load_model("segmenter")
    with pytest.raises(MedsegInputError, match="at least 2"):
        run_to_completion(segmentation_uncertainty(lesion_phantom.volume, seg, seg_card, samples=1))
    no_dropout = copy.deepcopy(seg)
    for m in no_dropout.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with pytest.raises(MedsegInputError, match="no dropout"):
        run_to_completion(segmentation_uncertainty(lesion_phantom.volume, no_dropout, seg_card))


@pytest.mark.parametrize("case", ["gaps and a NaN block", "single slice"])
def test_explanations_run_on_incomplete_volumes_and_leave_gaps_empty(case):
    from napari_medseg.core.volume import Volume

    p = generate_phantom((8, 64, 64), (3.0, 2.0, 2.0), seed=906010, n_lesions=0)
    array = p.volume.array.copy()
    missing = np.zeros(8, dtype=bool)
    if case == "single slice":
        array, missing = array[4:5], np.zeros(1, dtype=bool)
    else:
        missing[[2, 5]] = True
        array[missing] = np.nan
        array[6, 10:30, 10:30] = np.nan  # masked voxels inside an acquired slice
    volume = Volume.from_array(array, spacing=p.volume.spacing, modality="CT", missing=missing)
    cls, cls_card = load_model("classifier")
    cam = run_to_completion(gradcam_volume(volume, cls, cls_card))
    seg, seg_card = load_model("segmenter")
    unc = run_to_completion(segmentation_uncertainty(volume, seg, seg_card, samples=2))
    for maps in (cam.maps, unc.entropy):
        assert maps.shape == volume.shape and np.isfinite(maps).all()
        assert (maps[missing] == 0).all()
        assert (maps[np.isnan(array)] == 0).all()  # the masked block too: nothing measured
    assert (unc.labels[np.isnan(array)] == 0).all()
    peaks = cam.maps.reshape(len(cam.maps), -1).max(1)  # still 1 per explained slice
    assert np.allclose(peaks[cam.target >= 0], 1.0)
    assert (cam.target[missing] == -1).all() and np.isnan(unc.per_slice[missing]).all()
    assert all(not missing[z] for z in unc.most_uncertain(8))


def test_detector_heatmap_peaks_on_the_lesion(lesion_phantom):
    """The detector's explanation is its centre heatmap: on a held-out phantom it is far
    higher inside the lesion than over the rest of the body, and a randomised network's
    heatmap is not (model-randomisation check)."""
    from napari_medseg.core.inference import detect_lesions

    model, card = load_model("detector")
    lesion = lesion_phantom.labels == 8
    body = (lesion_phantom.labels > 0) & ~ndimage.binary_dilation(lesion, iterations=3)

    def lesion_to_body(m):
        res = run_to_completion(detect_lesions(lesion_phantom.volume, m, card))
        heat = res.heatmap_on_input_grid()
        return heat[lesion].mean() / max(heat[body].mean(), 1e-9), res

    ratio, res = lesion_to_body(model)
    rnd_ratio, _ = lesion_to_body(randomised_copy(model))
    print("lesion / body heatmap: trained", ratio, "randomised", rnd_ratio)
    assert ratio > 5.0 and ratio > 3 * rnd_ratio, (ratio, rnd_ratio)
    assert all(0.0 <= d.score <= 1.0 for d in res.detections)


def _pooling_classifier():
    """A classifier whose features are its input, max-pooled twice (stride 4), and
    whose score is their sum: its Grad-CAM is the pooled image, so it shows where each
    feature cell is placed on the image."""
    from napari_medseg.core.models import SliceClassifier

    m = SliceClassifier(n_classes=2, filters=(1, 1, 1), hidden=2, batch_norm=False, dropout=0.0)
    with torch.no_grad():
        for b in m.blocks:
            b.conv.weight.zero_()
            b.conv.weight[0, 0, 1, 1] = 1
            b.conv.bias.zero_()
        l1, l2 = m.head[1], m.head[4]
        l1.weight.fill_(1 / 16)
        l1.bias.zero_()
        l2.weight.fill_(1.0)
        l2.bias.zero_()
    return m.eval()


@pytest.mark.parametrize("n", [64, 63, 61])
def test_gradcam_lies_on_the_image_whatever_the_grid_size(n):
    """At a grid side that is not a multiple of the pooling stride, the map was
    stretched over the whole grid: a square near the far edge came out 3 px off."""
    from napari_medseg.core.volume import Volume

    card = {"name": "c", "classes": ["a", "b"], "input_spacing_mm": [1, 1, 1],
            "normalisation": {"type": "percentile", "low_percentile": 0.0, "high_percentile": 100.0}}
    a = np.zeros((1, n, n), np.float32)
    a[:, 52:56, 52:56] = 1.0  # near the far corner, on one 4 × 4 pooling cell
    a[:, 4:8, 4:8] = 1.0
    maps = run_to_completion(gradcam_volume(Volume(a, (1, 1, 1)), _pooling_classifier(), card,
                                            target=0)).maps[0]
    for lo in (4, 52):
        box = maps[lo - 4:lo + 8, lo - 4:lo + 8]
        rows = np.arange(lo - 4, lo + 8)
        centre = (box.sum(1) * rows).sum() / box.sum()
        assert abs(centre - (lo + 1.5)) < 0.6, (lo, centre)


@pytest.mark.parametrize("n", [6, 5, 3])
def test_gradcam_lies_on_a_grid_smaller_than_the_classifier_pads_to(n):
    """Below 8 pixels a side the classifier pads evenly on both ends; the map kept that
    padding's offset and guessed a stride of 2 instead of 4 (0.4 px off)."""
    from napari_medseg.core.volume import Volume

    card = {"name": "c", "classes": ["a", "b"], "input_spacing_mm": [1, 1, 1],
            "normalisation": {"type": "percentile", "low_percentile": 0.0, "high_percentile": 100.0}}
    model = _pooling_classifier()
    img = np.zeros((n, n), np.float32)
    img[0, 0] = 1.0
    pad = model.min_size - n
    big = np.pad(img, ((pad // 2, pad - pad // 2),) * 2, mode="edge")  # as the classifier pads
    small = run_to_completion(gradcam_volume(Volume.from_array(img, spacing=(1, 1)), model, card,
                                             target=0)).maps[0]
    padded = run_to_completion(gradcam_volume(Volume.from_array(big, spacing=(1, 1)), model, card,
                                              target=0)).maps[0]
    want = padded[pad // 2:pad // 2 + n, pad // 2:pad // 2 + n]
    np.testing.assert_allclose(small, want / want.max(), atol=1e-5)


def test_explanations_restore_each_modules_mode():
    """A model with its BatchNorm frozen (eval) inside a training model, or its dropout
    switched on, comes back exactly so (only the top module's mode was restored)."""
    clf, clf_card = load_model("classifier")
    seg, seg_card = load_model("segmenter")
    vol = generate_phantom((3, 48, 48), (5.0, 2.0, 2.0), seed=1).volume
    clf.train()
    for m in clf.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    before = {name: m.training for name, m in clf.named_modules()}
    run_to_completion(gradcam_volume(vol, clf, clf_card))
    assert {name: m.training for name, m in clf.named_modules()} == before
    seg.eval()
    for m in seg.modules():
        if isinstance(m, torch.nn.Dropout2d | torch.nn.Dropout):
            m.train()
    before = {name: m.training for name, m in seg.named_modules()}
    run_to_completion(segmentation_uncertainty(vol, seg, seg_card, samples=2))
    assert {name: m.training for name, m in seg.named_modules()} == before


def test_gradcam_never_switches_the_callers_model_even_between_its_steps():
    """Grad-CAM put the caller's model in eval for the whole job: a second job started
    meanwhile recorded eval as the mode to restore, and the model, being fine-tuned by
    its user, stayed in eval (no dropout, frozen BatchNorm statistics) for good."""
    clf, card = load_model("classifier")
    vol = generate_phantom((8, 48, 48), (5.0, 2.0, 2.0), seed=1).volume
    clf.train()
    first, second = gradcam_volume(vol, clf, card, batch=2), gradcam_volume(vol, clf, card, batch=2)
    next(first), next(second), next(first)
    assert clf.training
    run_to_completion(first), run_to_completion(second)
    assert all(m.training for m in clf.modules())


def test_gradcam_runs_inside_a_callers_inference_mode():
    """torch.enable_grad does not lift inference mode: a notebook's
    ``with torch.inference_mode():`` got a raw "does not require grad" error."""
    clf, card = load_model("classifier")
    vol = generate_phantom((3, 48, 48), (5.0, 2.0, 2.0), seed=1).volume
    expected = run_to_completion(gradcam_volume(vol, clf, card))
    with torch.inference_mode():
        found = run_to_completion(gradcam_volume(vol, clf, card))
    np.testing.assert_allclose(found.maps, expected.maps, atol=1e-6)
    np.testing.assert_array_equal(found.target, expected.target)


def test_uncertainty_turned_into_entropy_slab_by_slab_is_the_whole_volume_s(monkeypatch):
    """Entropy and labels are made a few slices at a time (whole-volume temporaries took
    several times the memory of segmentation); a slab boundary changes nothing."""
    from napari_medseg.core import explain

    seg, card = load_model("segmenter")
    vol = generate_phantom((11, 48, 48), (5.0, 2.0, 2.0), seed=1).volume
    whole = run_to_completion(segmentation_uncertainty(vol, seg, card, samples=2))
    monkeypatch.setattr(explain, "_POSTPROCESS_SLAB", 3)
    slabs = run_to_completion(segmentation_uncertainty(vol, seg, card, samples=2))
    np.testing.assert_array_equal(slabs.entropy, whole.entropy)
    np.testing.assert_array_equal(slabs.labels, whole.labels)
    np.testing.assert_array_equal(slabs.per_slice, whole.per_slice)
    assert whole.entropy.dtype == np.float32 and whole.labels.dtype == np.uint8


def test_more_bad_requests_are_refused():
    clf, clf_card = load_model("classifier")
    seg, seg_card = load_model("segmenter")
    vol = generate_phantom((2, 32, 32), (5.0, 2.0, 2.0), seed=1).volume
    for target in (True, 1.7):
        with pytest.raises(MedsegInputError, match="class name or index"):
            run_to_completion(gradcam_volume(vol, clf, clf_card, target=target))
    with pytest.raises(MedsegInputError, match="outputs but its card names"):
        run_to_completion(gradcam_volume(vol, clf, {**clf_card, "classes": ["a", "b"]}))
    with pytest.raises(MedsegInputError, match="outputs but its card names"):
        run_to_completion(segmentation_uncertainty(vol, seg, {**seg_card, "classes": ["a"] * 5}))
    result = run_to_completion(segmentation_uncertainty(vol, seg, seg_card, samples=2))
    with pytest.raises(MedsegInputError, match="k must be"):
        result.most_uncertain(-1)
    assert result.most_uncertain(0) == []
    even = SliceClassifier(n_classes=3, filters=(8, 8, 8), hidden=16, in_channels=2)
    with pytest.raises(MedsegInputError, match="in_channels must be odd"):  # a shape error
        run_to_completion(gradcam_volume(vol, even, clf_card))


def test_uncertainty_never_leaves_the_callers_model_sampling_nor_rewinds_others_random_draws():
    seg, seg_card = load_model("segmenter")
    vol = generate_phantom((4, 40, 40), (5.0, 2.0, 2.0), seed=2).volume

    def dropout_on():
        return [n for n, m in seg.named_modules() if isinstance(m, torch.nn.Dropout2d | torch.nn.Dropout)
                and m.training]

    for bad in (0, None):  # it switched dropout on, then failed before restoring it
        with pytest.raises(MedsegInputError, match="chunk"):
            run_to_completion(segmentation_uncertainty(vol, seg, seg_card, samples=2, chunk=bad))
        assert dropout_on() == []
    alone = run_to_completion(segmentation_uncertainty(vol, seg, seg_card, samples=2, seed=1))
    first = segmentation_uncertainty(vol, seg, seg_card, samples=2, seed=1)
    second = segmentation_uncertainty(vol, seg, seg_card, samples=2, seed=1)
    next(first), next(second), next(first)  # two jobs interleaved, as two widgets would
    assert dropout_on() == []  # the caller's model is never the one sampling
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    next(first)  # paused mid-job: the user's own draws are their own
    assert torch.rand(1) == expected
    a, b = run_to_completion(first), run_to_completion(second)
    np.testing.assert_array_equal(a.entropy, alone.entropy)  # same seed, same result
    np.testing.assert_array_equal(b.entropy, alone.entropy)
    assert a.most_uncertain(5, exclude=iter([0, 1])) == [z for z in alone.most_uncertain(5)
                                                          if z not in (0, 1)]


def test_a_model_loaded_in_another_thread_does_not_draw_from_a_seeded_job():
    """load_model builds the network (random init) before loading its weights; built
    while an uncertainty job's seeded state was swapped in, it took that job's draws
    and the same seed gave another result."""
    import threading

    seg, seg_card = load_model("segmenter")
    vol = generate_phantom((8, 64, 64), (2.5, 2.0, 2.0), seed=3).volume

    def entropy():
        return run_to_completion(segmentation_uncertainty(vol, seg, seg_card, samples=3, chunk=2,
                                                          seed=0)).entropy

    alone = entropy()
    stop = threading.Event()

    def loading():  # another widget's job starting meanwhile
        while not stop.is_set():
            load_model("detector")

    other = threading.Thread(target=loading)
    other.start()
    try:
        busy = entropy()
    finally:
        stop.set()
        other.join(60)
    np.testing.assert_array_equal(busy, alone)


def test_gradcam_masks_unmeasured_voxels_before_scaling_each_slice_to_one():
    """Masked after the per-slice scaling, a NaN patch over a slice's peak left that
    slice's map below 1 (the docs and the layer say per-slice max = 1)."""
    from napari_medseg.core.volume import Volume

    p = generate_phantom((6, 64, 64), (3.0, 2.0, 2.0), seed=906011, n_lesions=1)
    cls, card = load_model("classifier")
    clean = run_to_completion(gradcam_volume(p.volume, cls, card)).maps
    z = 3
    y, x = np.unravel_index(np.argmax(clean[z]), clean[z].shape)
    array = p.volume.array.copy()
    array[z, max(0, y - 4): y + 5, max(0, x - 4): x + 5] = np.nan  # over the peak
    cam = run_to_completion(gradcam_volume(Volume(array, p.volume.spacing), cls, card))
    assert (cam.maps[np.isnan(array)] == 0).all() and cam.maps[z].max() == pytest.approx(1.0)


def test_a_slice_without_evidence_gets_an_empty_map_not_stretched_rounding_noise():
    """A raw map of float rounding (about 1e-8) divided by its own peak spanned 0.14–1.0:
    noise drawn as a full-strength finding."""
    from napari_medseg.core.volume import Volume

    _, card = load_model("classifier")
    card = dict(card, classes=["a", "b"], input_spacing_mm=[1.0, 1.0, 1.0])
    model = SliceClassifier(n_classes=2, filters=(1, 1, 1), batch_norm=False, hidden=1,
                            dropout=0.0, pool_size=1)
    with torch.no_grad():  # the features are the windowed image itself
        for conv in model.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.zero_()
                conv.weight[0, 0, 1, 1] = 1
                conv.bias.zero_()
        model.head[1].weight.fill_(1)
        model.head[1].bias.zero_()
        model.head[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.head[4].bias.zero_()
    flat = np.full((1, 5, 40), -150.0)  # at the window's low end: features 0 (up to rounding)
    bright = flat.copy()
    bright[0, 2, 20] = 200.0
    cam = run_to_completion(gradcam_volume(Volume(np.concatenate([flat, bright]), (1, 0.7, 1.3)),
                                           model.eval(), card, target=0)).maps
    assert cam[0].max() == 0.0
    assert cam[1].max() == pytest.approx(1.0)


def test_uncertainty_runs_no_model_on_a_volume_with_nothing_acquired_and_samples_the_decoder():
    """Every slice missing: the segmenter ran samples x every chunk for an empty result.
    Dropout is in the decoder only, yet every sample ran the whole network over the whole
    volume and kept the volume's class probabilities (36 bytes a model-grid voxel): now
    the encoder runs once per chunk and pass, the decoder once per chunk and sample."""
    from napari_medseg.core.volume import Volume

    seg, card = load_model("segmenter")
    calls = []
    hook = seg.register_forward_hook(lambda *a: calls.append(1))
    try:
        empty = Volume(np.full((6, 40, 40), np.nan, np.float32), (5.0, 2.0, 2.0),
                       missing=np.ones(6, bool))
        result = run_to_completion(segmentation_uncertainty(empty, seg, card, samples=2))
    finally:
        hook.remove()
    assert calls == [] and not result.entropy.any() and np.isnan(result.per_slice).all()
    vol = generate_phantom((12, 40, 40), (5.0, 2.0, 2.0), seed=1).volume
    encoded, decoded = [], []
    hooks = [seg.enc1.register_forward_hook(lambda *a: encoded.append(1)),
             seg.dec1.register_forward_hook(lambda *a: decoded.append(1))]
    try:  # (the job's private copy of the model carries the hooks)
        run_to_completion(segmentation_uncertainty(vol, seg, card, samples=5, chunk=4))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(encoded) == 2 * 3 and len(decoded) == 5 * 3  # 3 chunks


def test_most_uncertain_takes_a_per_slice_mask_to_exclude():
    """volume.missing passed as it is was read as the indices 0 and 1."""
    from napari_medseg.core.explain import UncertaintyResult

    per_slice = np.array([0.1, 0.5, 0.9, 0.3, 0.7], np.float32)
    result = UncertaintyResult(np.zeros((5, 2, 2), np.float32), per_slice,
                               np.zeros((5, 2, 2), np.uint8), 2)
    mask = np.array([False, False, True, False, True])
    assert result.most_uncertain(5, exclude=mask) == [1, 3, 0]
    assert result.most_uncertain(2, exclude=[1]) == [2, 4]


def test_a_grown_models_untrained_slots_do_not_lower_its_uncertainty():
    """The map was divided by log(classes) counting a grown model's unused_N slots: with
    the same predictions, v1's uncertainty read 8 % lower than v0's."""
    seg, card = load_model("segmenter")
    vol = generate_phantom((6, 48, 48), (5.0, 2.0, 2.0), seed=3).volume
    n = len(card["classes"])
    grown = seg.with_classes(n + 2)
    grown_card = {**card, "classes": [*card["classes"], f"unused_{n}", f"unused_{n + 1}"]}
    torch.manual_seed(0)
    before = run_to_completion(segmentation_uncertainty(vol, seg, card, samples=2))
    torch.manual_seed(0)
    after = run_to_completion(segmentation_uncertainty(vol, grown, grown_card, samples=2))
    np.testing.assert_array_equal(after.labels, before.labels)
    assert abs(float(after.entropy.mean()) / float(before.entropy.mean()) - 1) < 0.02

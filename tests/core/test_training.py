"""Training, losses, evaluation metrics, resampling and the train/evaluate CLI (fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_medseg.cli import main
from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.evaluation import (
    balanced_accuracy,
    confusion_matrix,
    dice,
    froc_point,
    match_detections,
)
from napari_medseg.core.models.classifier import SliceClassifier
from napari_medseg.core.models.detector import LesionDetector
from napari_medseg.core.models.registry import BUNDLED_DIR, load_model, save_model, sha256_file
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.resample import map_index, resample_yx, resampled_shape_yx
from napari_medseg.core import training
from napari_medseg.core.training import (
    EVAL_SEEDS,
    VALIDATION_SEEDS,
    cross_entropy,
    dice_ce_loss,
    focal_loss,
    soft_dice_loss,
    train_classifier,
    train_detector,
    train_segmenter,
    training_seeds,
)

TINY_SEG = dict(pool_size=1, max_slices=12, seq_len=4, crop=48, refresh_every=0)
TINY_CLS = dict(pool_size=1, filters=(8, 8, 8), batch_size=8, crop=64, max_slices=8)


# -- losses -----------------------------------------------------------------------------
def test_dice_loss_of_perfect_prediction_is_about_zero():
    target = torch.randint(0, 4, (2, 16, 16))
    logits = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).float() * 50.0
    assert soft_dice_loss(logits, target).item() < 1e-3
    assert dice_ce_loss(logits, target).item() < 1e-3
    assert soft_dice_loss(-logits, target).item() > 0.9


def test_dice_present_only_has_no_term_for_an_absent_class():
    # classes 0 and 1 in the target; class 2 absent but predicted on a few voxels
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[:, 4:12, 4:12] = 1
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 10.0
    logits[:, 2, :2, :2] = 30.0
    logits.requires_grad_(True)
    plain = soft_dice_loss(logits, target)
    present = soft_dice_loss(logits, target, present_only=True)
    assert plain.item() > 0.3  # the absent class's smoothed Dice ~ 1 / (4 + 1)
    assert present.item() < 1e-3  # only class 1 counts, and it is perfect
    present.backward()
    assert float(logits.grad[:, 2].abs().max()) < 1e-6
    # nothing present but background: a zero loss that still backpropagates
    empty = soft_dice_loss(logits, torch.zeros_like(target), present_only=True)
    assert empty.item() == 0.0 and empty.requires_grad


def test_focal_is_at_most_ce_and_equals_it_at_gamma_zero():
    torch.manual_seed(0)
    logits, target = torch.randn(64, 3), torch.randint(0, 3, (64,))
    ce = cross_entropy(logits, target)
    assert focal_loss(logits, target, gamma=2.0) <= ce
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), ce, atol=1e-6)


@pytest.mark.parametrize("loss", [cross_entropy, focal_loss, soft_dice_loss, dice_ce_loss])
def test_ignored_voxels_get_no_gradient(loss):
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (1, 8, 8))
    target[:, :, :4] = 255
    loss(logits, target).backward()
    assert torch.all(logits.grad[..., :4] == 0)
    assert torch.any(logits.grad[..., 4:] != 0)
    # the ignored voxels' logits do not change the loss either
    other = logits.detach().clone()
    other[..., :4] = torch.randn(1, 3, 8, 4) * 10
    assert torch.allclose(loss(logits.detach(), target), loss(other, target), atol=1e-6)


def test_all_ignored_gives_zero_loss_with_a_graph():
    logits = torch.randn(2, 3, requires_grad=True)
    value = cross_entropy(logits, torch.full((2,), 255))
    value.backward()
    assert value.item() == 0.0


# -- seeds ------------------------------------------------------------------------------
def test_training_validation_and_eval_seeds_are_disjoint():
    # validation (thresholds, choices) never touches the held-out evaluation range
    assert VALIDATION_SEEDS[1] <= EVAL_SEEDS[0] or EVAL_SEEDS[1] <= VALIDATION_SEEDS[0]
    for s in (0, 1, 7, 8, 123, training.MAX_SEED):
        r = training_seeds(s, n=10**9)  # every seed a run may use, not only its first
        for lo, hi in (EVAL_SEEDS, VALIDATION_SEEDS):
            assert r.stop <= lo or r.start >= hi, (s, lo, hi)
        if s < training.MAX_SEED:
            assert r.stop <= training_seeds(s + 1).start  # runs of other seeds never share
    with pytest.raises(MedsegInputError):
        training_seeds(-1)


# -- training ---------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss():
    _, card = run_to_completion(train_segmenter(0, steps=40, lr=5e-3, **TINY_SEG))
    stats = card["training"]  # mean loss of the first 20 steps vs the last 20
    assert stats["steps"] == 40
    assert stats["loss_last20"] < stats["loss_first20"]


def test_init_continues_from_a_saved_segmenter_and_the_card_says_so(tmp_path):
    first, card0 = run_to_completion(train_segmenter(3, steps=4, **TINY_SEG))
    save_model(first, tmp_path, "first", card0)
    init = str(tmp_path / "first.json")
    cont, card = run_to_completion(train_segmenter(4, steps=2, lr=1e-4, init=init, **TINY_SEG))
    fresh, _ = run_to_completion(train_segmenter(4, steps=2, lr=1e-4, **TINY_SEG))
    def distance(m):
        return sum(float((a - b).abs().sum()) for a, b in
                   zip(m.state_dict().values(), first.state_dict().values()) if a.is_floating_point())
    assert distance(cont) < 0.1 * distance(fresh)  # two small steps away from the start
    assert card["training"]["command"].endswith(f"--init {init}")
    assert card["training"]["init_from"]["sha256"] == load_model(init)[1]["sha256"]
    with pytest.raises(MedsegInputError, match="widths"):
        run_to_completion(train_segmenter(4, steps=1, init=init, widths=(8, 16, 16), **TINY_SEG))


def test_same_seed_gives_identical_weights():
    a, _ = run_to_completion(train_segmenter(3, steps=4, **TINY_SEG))
    b, _ = run_to_completion(train_segmenter(3, steps=4, **TINY_SEG))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_trainers_yield_progress_and_cards():
    job = train_detector(0, steps=2, pool_size=1, max_slices=12, crop=48, batch_size=2)
    reports = []
    model, card = run_to_completion(job, reports.append)
    assert reports and all(r.total >= r.step for r in reports)
    assert card["classes"] == ["lesion"] and card["context_slices"] == 1
    # fine-tuning reads it
    assert card["heatmap"] == {"loss": "soft_focal", "sigma_fraction": 0.5, "z_sigma_fraction": 1.0}
    assert card["resample_axes"] == "yx"
    assert "--seed 0" in card["training"]["command"]
    wider, wide_card = run_to_completion(train_detector(0, steps=1, pool_size=1, max_slices=12, crop=48,
                                                        batch_size=2, context_slices=2))
    assert wider.in_slices == 5 and wide_card["context_slices"] == 2


def test_detector_members_are_the_single_runs_of_their_seeds():
    tiny = dict(steps=2, pool_size=1, max_slices=12, crop=48, batch_size=2)
    reports = []
    ens, card = run_to_completion(train_detector(4, members=2, **tiny), reports.append)
    singles = [run_to_completion(train_detector(seed, **tiny))[0] for seed in (4, 5)]
    assert ens.members == 2 and card["training"]["command"].endswith("--members 2")
    assert [m["seed"] for m in card["training"]["members"]] == [4, 5]
    assert any(r.message.startswith("network 2/2: ") for r in reports)
    expected = LesionDetector.ensemble(singles).state_dict()
    for key, value in ens.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(MedsegInputError, match="members"):
        run_to_completion(train_detector(0, members=0, **tiny))


def test_noise_augmentation_level_and_off_switch():
    from napari_medseg.core.training import _add_noise

    norm = {"low": -150.0, "high": 250.0}
    x = np.full((64, 64), 0.5, dtype=np.float32)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert _add_noise(rng, x, norm, 0.0) is x
    assert rng.bit_generator.state == state  # off draws nothing: old runs reproduce
    stds = [float(_add_noise(rng, x, norm, 20.0).std()) * 400.0 for _ in range(400)]
    noisy = [s for s in stds if s > 0]
    assert 120 < len(noisy) < 280  # about half the samples
    assert max(noisy) <= 20.0 * 1.2 and np.mean(noisy) == pytest.approx(10.0, abs=2.0)


def test_near_lesion_normal_slices_are_the_hard_negatives():
    from types import SimpleNamespace

    from napari_medseg.core.training import near_lesion_normal_slices

    classes = np.array([0, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    item = SimpleNamespace(slice_classes=classes, spacing=(2.5, 1.5, 1.5))
    # ≥ 2 slices and 3–25 mm away from slices 6–7: not the neighbours 5 and 8, not no_body
    assert near_lesion_normal_slices(item).tolist() == [1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    no_lesion = SimpleNamespace(slice_classes=np.ones(8, dtype=int), spacing=(2.0, 1.0, 1.0))
    assert near_lesion_normal_slices(no_lesion).size == 0


def test_classifier_with_context_slices_trains_and_runs_through_the_engine():
    from napari_medseg.core.inference import classify_volume
    from napari_medseg.core.phantom import generate_phantom

    job = train_classifier(0, steps=2, pool_size=1, max_slices=12, crop=48, batch_size=4,
                           context_slices=1, hard_negatives=0.5, pooling="max", noise_hu=10)
    model, card = run_to_completion(job)
    assert model.in_channels == 3 and card["context_slices"] == 1
    assert model.arch_params["pool"] == "max"
    volume = generate_phantom((6, 40, 40), (3.0, 4.0, 4.0), 1).volume
    res = run_to_completion(classify_volume(volume, model, card, threads=1))
    assert res.probabilities.shape == (6, 3) and np.isfinite(res.probabilities).all()


def test_classifier_lesion_head_learns_the_mask_and_survives_a_save(tmp_path):
    from napari_medseg.core.models.registry import load_model, save_model
    from napari_medseg.core.training import lesion_map_loss

    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 4:6, 8:10] = True
    right = torch.full((2, 1, 4, 4), -8.0)
    right[0, 0, 1, 2] = 8.0  # the 4×4 cell that holds the lesion pixels
    wrong = -right
    assert lesion_map_loss(right, mask) < 0.05 < 1.0 < lesion_map_loss(wrong, mask)

    job = train_classifier(0, steps=2, pool_size=1, max_slices=12, crop=48, batch_size=4,
                           lesion_map_weight=1.0)
    model, card = run_to_completion(job)
    assert model.arch_params["lesion_head"] is True
    feats = model.features(torch.rand(1, 1, 48, 48))
    assert model.lesion_logits(feats).shape == (1, 1, 12, 12)
    save_model(model, tmp_path, "cls_map", card)
    loaded, _ = load_model(tmp_path / "cls_map.json")
    assert loaded.lesion_head is not None
    plain = SliceClassifier(filters=(4, 8, 8))  # built without the option: no head
    assert plain.lesion_head is None and "lesion_head" not in plain.arch_params
    with pytest.raises(MedsegInputError, match="lesion head"):
        plain.lesion_logits(feats)


def test_lesion_twin_is_the_same_slice_without_its_lesion():
    from napari_medseg.core.training import (DEFAULTS, PhantomPool, attach_lesion_twin,
                                             training_seeds)
    import functools

    norm = DEFAULTS["classifier"]["normalisation"]
    seeds = list(training_seeds(0))[:6]
    pool = PhantomPool(range(seeds[0], seeds[-1] + 1), 6, 3.0, 16, norm,
                       prepare=functools.partial(attach_lesion_twin, max_slices=16,
                                                 spacing_yx=3.0, normalisation=norm))
    run_to_completion(pool.fill())
    with_lesions = [it for it in pool.items if (it.slice_classes == 2).any()]
    assert with_lesions and all(it.twin is None for it in pool.items
                                if not (it.slice_classes == 2).any())
    for it in with_lesions:
        assert it.twin.shape == it.image.shape
        near = ndimage.binary_dilation(it.labels == 8, iterations=3)
        assert np.abs(it.twin - it.image)[~near].max() < 1e-3  # same anatomy and noise
        assert np.abs(it.twin - it.image)[it.labels == 8].mean() > 0.01  # the lesion is gone
    # a training run with twins, and the options it refuses
    model, _ = run_to_completion(train_classifier(0, steps=2, pool_size=1, max_slices=12, crop=48,
                                                  batch_size=8, lesion_twins=0.5))
    assert model.arch_params["n_classes"] == 3
    with pytest.raises(MedsegInputError, match="lesion_twins"):
        run_to_completion(train_classifier(0, steps=1, lesion_twins=1.5))
    # every normal sample wants a twin and no volume has a lesion: the sampler gives up
    # after its tries and uses a slice as is instead of failing
    for item in pool.items:
        item.twin = None
        item.slice_classes = np.where(item.slice_classes == 2, 1, item.slice_classes)
    run_to_completion(train_classifier(0, steps=1, pool=pool, spacing_yx=3.0, crop=48,
                                       batch_size=8, lesion_twins=1.0))


def test_soft_focal_loss_is_lowest_at_the_soft_target():
    from napari_medseg.core.training import soft_focal_loss

    target = torch.tensor([[[[0.0, 0.3, 1.0, 0.6]]]])
    exact = torch.logit(target.clamp(1e-4, 1 - 1e-4))
    assert soft_focal_loss(exact, target) < 1e-3
    for other in (torch.zeros_like(target), exact + 1.0, exact - 1.0):
        assert soft_focal_loss(other, target) > soft_focal_loss(exact, target) + 0.01
    ignored = torch.tensor([[[[-1.0, 1.0]]]])  # negative targets are ignored
    assert soft_focal_loss(torch.tensor([[[[50.0, 9.0]]]]), ignored) < 1e-3


def test_size_balance_weights_small_lesions_up_and_leaves_the_rest_at_one():
    from types import SimpleNamespace

    from napari_medseg.core.training import detector_targets, soft_focal_loss

    lesions = [{"center": (5.0, 10.0, 10.0), "radius_mm": 4.0, "diameter_mm": 8.0},
               {"center": (5.0, 40.0, 40.0), "radius_mm": 12.0, "diameter_mm": 24.0}]
    sample = SimpleNamespace(image=np.zeros((10, 64, 64), np.float32), lesions=lesions,
                             spacing=(2.0, 1.0, 1.0), labels=np.ones((10, 64, 64), np.uint8))
    detector_targets(sample, 0.5, 1.0)
    assert not hasattr(sample, "heat_weight")  # off by default: the bundled recipe
    detector_targets(sample, 0.5, 1.0, size_balance_mm=10.0)
    w = sample.heat_weight
    assert w[5, 10, 10] == pytest.approx((10 / 4) ** 2, rel=1e-3)  # an 8 mm lesion: 6.25
    assert w[5, 40, 40] == 1.0 and w[5, 62, 2] == 1.0 and w[5, 10, 20] == 1.0
    # the loss near a weighted lesion grows by its weight; the normaliser does not change
    heat = torch.from_numpy(sample.heat[5, 4:17, 4:17].astype(np.float32))[None, None]
    logits = torch.zeros_like(heat)
    plain = soft_focal_loss(logits, heat)
    weighted = soft_focal_loss(logits, heat, weight=torch.full_like(heat, float(w[5, 10, 10])))
    assert float(weighted) == pytest.approx(6.25 * float(plain), rel=1e-3)


def test_training_slice_range_is_an_option_and_its_default_draws_as_before():
    from napari_medseg.core.training import training_settings

    for seed in range(20):
        default, wide = training_settings(seed), training_settings(seed, z_range_mm=(1.0, 7.0))
        assert 1.0 <= default.spacing[0] <= 5.0 and 1.0 <= wide.spacing[0] <= 7.0
        # the same draw, scaled: the rest of the phantom's settings are unchanged
        assert (wide.spacing[0] - 1.0) == pytest.approx(1.5 * (default.spacing[0] - 1.0))
        assert wide.spacing[1:] == default.spacing[1:]


def test_bad_options_are_input_errors():
    with pytest.raises(MedsegInputError, match="loss"):
        run_to_completion(train_classifier(0, steps=1, loss="dice_ce"))
    with pytest.raises(MedsegInputError, match="lesion_map_weight"):
        run_to_completion(train_classifier(0, steps=1, lesion_map_weight=float("nan")))
    for bad in ({"context_slices": 0}, {"sigma_fraction": 0.0}, {"z_sigma_fraction": 11.0}):
        with pytest.raises(MedsegInputError, match=next(iter(bad))):
            run_to_completion(train_detector(0, steps=1, **bad))
    with pytest.raises(MedsegInputError, match="steps"):
        run_to_completion(train_classifier(0, steps=0))
    for bad in ({"size_balance_mm": -1.0}, {"size_balance_mm": 10.0, "loss": "focal"},
                {"convs_per_stage": 1}, {"z_range_mm": (5.0, 1.0)}, {"z_range_mm": (0.0, 5.0)},
                {"faint_weight": 0.0}, {"faint_weight": 3.0, "sampling": "uniform"}):
        with pytest.raises(MedsegInputError, match="size_balance_mm|convs_per_stage|z_range_mm|faint_weight"):
            run_to_completion(train_detector(0, steps=1, **bad))


def test_faint_weight_picks_faint_lesions_more_often_and_off_draws_as_before():
    from types import SimpleNamespace

    from napari_medseg.core.training import detector_sample

    nz = 30
    heat = np.broadcast_to(np.arange(nz, dtype=np.float32)[:, None, None], (nz, 16, 16)).copy()
    item = SimpleNamespace(  # heat[z] holds z, so a sample tells which slice it came from
        image=np.zeros((nz, 16, 16), np.float32), heat=heat, size=np.zeros_like(heat),
        size_mask=np.zeros(heat.shape, bool), spacing=(10.0, 1.0, 1.0), body_slices=np.arange(nz),
        lesions=[{"center": (5.0, 8.0, 8.0), "radius_mm": 4.0, "contrast_hu": -10.0},   # faint
                 {"center": (25.0, 8.0, 8.0), "radius_mm": 4.0, "contrast_hu": -40.0}])
    norm = {"type": "window", "low": -150.0, "high": 250.0}

    def near_faint(**kw):
        rng = np.random.default_rng(0)
        zs = [float(detector_sample(rng, item, 1, 16, norm, True, 0.0, **kw)[1].max()) for _ in range(400)]
        zs = np.array(zs)
        return int(np.sum(np.abs(zs - 5) <= 1)), int(np.sum(np.abs(zs - 25) <= 1)), zs

    faint, strong, off = near_faint(faint_weight=9.0)
    # half the samples are lesion draws (9 : 1), half any body slice (about 20 near each)
    assert faint > 3.5 * strong
    f1, s1, default = near_faint()
    assert 0.5 < f1 / s1 < 2.0
    assert np.array_equal(default, near_faint(faint_weight=1.0)[2])  # 1: the draws of before


# -- metrics ----------------------------------------------------------------------------
def test_dice_of_known_overlaps():
    truth = np.zeros((10, 10), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[:, :4] = 1  # 40 voxels
    pred[:, 2:6] = 1  # 40 voxels, 20 shared
    d = dice(pred, truth, 3)
    assert d[1] == pytest.approx(0.5)
    assert np.isnan(d[2])  # absent in both


def test_balanced_accuracy_and_confusion():
    truth = [0, 0, 1, 1, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 1, 1, 2, 0]
    c = confusion_matrix(truth, pred, 3)
    assert c.tolist() == [[1, 1, 0], [0, 4, 0], [1, 0, 1]]
    assert balanced_accuracy(c) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # a missing slice (−1, as classify_volume gives it) fell into the row above's last
    # column: a "normal" slice counted as "no_body" called "lesion"
    assert confusion_matrix([1, 2, 1], [-1, -1, 1], 3).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="classes must lie in"):
        confusion_matrix([0, 3], [0, 0], 3)


def test_detection_matching_and_froc():
    lesions = [{"center": (10, 10, 10), "radius_mm": 4.0}, {"center": (30, 30, 30), "radius_mm": 1.5}]
    dets = [
        {"z": 10, "y": 13, "x": 10, "score": 0.9},  # 3 mm away: hit lesion 0
        {"z": 10, "y": 11, "x": 10, "score": 0.8},  # second on lesion 0: false positive
        {"z": 30, "y": 30, "x": 31, "score": 0.7},  # hits the small lesion
        {"z": 50, "y": 50, "x": 50, "score": 0.6},  # nowhere: false positive
    ]
    matched = match_detections(dets, lesions, (1.0, 1.0, 1.0), tolerance_mm=0.5)
    assert matched == [0, -1, 1, -1]
    vol = {"scores": [0.9, 0.8, 0.7, 0.6], "matched": matched, "diameters": [8.0, 3.0]}
    point = froc_point([vol], max_fp_per_volume=1.0)
    # only lesion 0 is >= 5 mm; the small lesion's hit is neither TP nor FP
    assert point["sensitivity"] == 1.0 and point["fp_per_volume"] == 1.0
    assert froc_point([vol], max_fp_per_volume=0.0)["threshold"] == 0.9


def test_froc_point_says_what_its_sensitivity_needs_and_tuning_compares_by_that(monkeypatch):
    from napari_medseg.core import evaluation as ev

    hit_hit_fp = {"scores": [0.9, 0.9, 0.3], "matched": [0, 1, -1], "diameters": [8.0, 8.0]}
    point = froc_point([hit_hit_fp, {"scores": [], "matched": [], "diameters": []}], 1.0)
    # the lowest threshold within the budget (it spends it) …
    assert point["threshold"] == pytest.approx(0.3) and point["fp_per_volume"] == 0.5
    # … and what the same sensitivity costs at its highest threshold
    assert point["fp_per_volume_needed"] == 0.0
    # tuning: two NMS distances with the same sensitivity; the one needing no false
    # positive wins (it lost before: its lower threshold spent more of the budget)
    records = [{"seed": 800000, "diameters": [8.0, 8.0], "by_md": {
        6.0: {"scores": [0.9, 0.9, 0.3], "matched": [0, 1, -1]},
        10.0: {"scores": [0.9, 0.6, 0.5], "matched": [0, -1, 1]}}}]
    monkeypatch.setattr(ev, "detector_records", lambda *a, **k: records)
    tuned = ev.tune_detector(None, {}, seeds=[800000], min_distances=(10.0, 6.0),
                             max_fp_per_volume=1.0)
    assert tuned["min_distance_mm"] == 6.0
    # the card's threshold keeps the weakest lesion found on validation (it was rounded
    # up past it: 0.56537 → 0.5654 dropped that lesion)
    weak = float(np.float32(0.56537))
    records[0]["by_md"] = {6.0: {"scores": [0.9, weak], "matched": [0, 1]}}
    tuned = ev.tune_detector(None, {}, seeds=[800000], min_distances=(6.0,), max_fp_per_volume=1.0)
    assert tuned["peak_threshold"] <= weak
    at = ev._at_threshold(ev._flatten(records, 6.0), tuned["peak_threshold"], 5.0)
    assert at["sensitivity_ge_5mm"] == 1.0


def test_froc_point_of_a_detector_that_finds_nothing_spends_no_false_positive():
    """No lesion found within the limit: no threshold and 0 FP/volume (it reported the
    top score's threshold and what its false positive cost)."""
    point = froc_point([{"scores": [0.9], "matched": [-1], "diameters": [10.0]},
                        {"scores": [], "matched": [], "diameters": []}], 1.0)
    assert point["sensitivity"] == 0.0 and point["threshold"] is None
    assert point["fp_per_volume"] == 0.0 and point["fp_per_volume_needed"] == 0.0
    # found only past the limit: the same
    late = {"scores": [0.9, 0.8, 0.7], "matched": [-1, -1, 0], "diameters": [10.0]}
    assert froc_point([late], 1.0)["threshold"] is None
    assert froc_point([late], 2.0)["threshold"] == pytest.approx(0.7)


def test_segmenter_scores_per_volume_only_where_the_structure_is_and_never_calls_nan_met(
        monkeypatch):
    from types import SimpleNamespace

    from napari_medseg.core import evaluation as ev

    body = np.zeros((1, 4, 4), np.int64)
    body[0, :2] = 1
    stray = np.zeros((1, 4, 4), np.int64)
    stray[0, 0, 0] = 1  # one voxel predicted where the truth has none
    volumes = [SimpleNamespace(volume=None, labels=body, pred=body),
               SimpleNamespace(volume=None, labels=np.zeros_like(body), pred=stray)]
    monkeypatch.setattr(ev, "_phantoms", lambda seeds, *a: ((s, None, v) for s, v in zip(seeds, volumes)))
    preds = iter(v.pred for v in volumes)
    monkeypatch.setattr(ev, "predict_segmenter", lambda *a: next(preds))
    out = ev.evaluate_segmenter(None, {"classes": ["background", "body", "liver"]},
                                seeds=[900000, 900001])
    assert out["dice_mean_per_volume"]["body"] == 1.0  # volume 2 has no body to score
    assert out["dice"]["body"] == pytest.approx(2 * 8 / 17, abs=1e-4)  # pooled: its stray voxel counts
    # the liver is in no volume and predicted nowhere: no Dice, and the target not met
    assert out["dice"]["liver"] is None and out["meets_target"] is False
    import json
    json.loads(json.dumps(out), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_a_segmenter_without_some_phantom_structures_does_not_meet_the_target(monkeypatch):
    """A card of fewer classes was scored "as far as both go": without a lesion output it
    met "Dice >= 0.90 on every structure", the lesion never mentioned."""
    from types import SimpleNamespace

    from napari_medseg.core import evaluation as ev

    truth = np.zeros((1, 4, 4), np.int64)
    truth[0, :2] = 1
    monkeypatch.setattr(ev, "_phantoms", lambda seeds, *a: ((s, None, SimpleNamespace(
        volume=None, labels=truth)) for s in seeds))
    monkeypatch.setattr(ev, "predict_segmenter", lambda *a: truth)
    out = ev.evaluate_segmenter(None, {"classes": ["background", "body"]}, seeds=[900000])
    assert out["dice"]["body"] == 1.0 and out["meets_target"] is False
    assert out["not_predicted"]["classes"][0] == "liver" and "lesion" in out["not_predicted"]["classes"]


# -- resampling -------------------------------------------------------------------------
def test_resample_round_trip_and_labels():
    img = np.random.default_rng(0).random((2, 50, 40)).astype(np.float32)
    small = resample_yx(img, (0.8, 0.8), (1.6, 1.6))
    assert small.shape == (2, 25, 20) == (2, *resampled_shape_yx((50, 40), (0.8, 0.8), (1.6, 1.6)))
    back = resample_yx(small, (1.6, 1.6), (0.8, 0.8), out_shape_yx=(50, 40))
    assert back.shape == img.shape and back.dtype == np.float32
    labels = np.zeros((1, 40, 40), dtype=np.uint8)
    labels[0, 10:30, 10:30] = 7
    lab = resample_yx(labels, (1.0, 1.0), (2.0, 2.0), order=0)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 7}
    assert (lab == 7).sum() == 100
    assert np.allclose(map_index(map_index([[3.0, 5.0]], (40, 40), (20, 20)), (20, 20), (40, 40)), [[3.0, 5.0]])
    with pytest.raises(MedsegInputError):
        resample_yx(np.zeros(5), (1, 1), (2, 2))


# -- bundled weights --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["classifier", "segmenter", "detector"])
def test_bundled_cards_load_and_verify(name):
    card_path = BUNDLED_DIR / f"{name}.json"
    if not card_path.exists():
        pytest.skip(f"{name} weights not bundled yet")
    card = json.loads(card_path.read_text())
    assert sha256_file(BUNDLED_DIR / card["weights_file"]) == card["sha256"]
    model, card = load_model(card_path)
    for key in ("classes", "input_spacing_mm", "normalisation", "training", "metrics"):
        assert key in card
    assert card["resample_axes"] == "yx"
    assert "napari-medseg train" in card["training"]["command"]


# -- CLI --------------------------------------------------------------------------------
def test_train_cli_writes_a_loadable_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the suite's threads
    rc = main(["train", "classifier", "--seed", "1", "--out", str(tmp_path), "--steps", "2",
               "--eval-seeds", "0", "--pool-size", "1", "--threads", "1", "--quiet"])
    assert rc == 0
    model, card = load_model(tmp_path / "classifier.json")
    assert card["training"]["seed"] == 1 and card["training"]["steps"] == 2
    assert "--threads 1" in card["training"]["command"]  # float sums depend on it
    assert "wrote" in capsys.readouterr().out
    assert isinstance(card["training"]["cpu"], str)  # where the file was made
    rc = main(["train", "classifier", "--seed", "1", "--out", str(tmp_path / "b"), "--steps", "2",
               "--eval-seeds", "0", "--pool-size", "1", "--quiet"])
    card = load_model(tmp_path / "b" / "classifier.json")[1]
    # the thread count used is in the command even when not given: it changes the floats
    assert f"--threads {card['training']['threads']}" in card["training"]["command"]


def test_train_cli_saves_into_the_folder_it_checked_for_an_earlier_model(tmp_path, monkeypatch):
    """"--out=~/m" (bash leaves that "~" alone): the check looked in $HOME/m, the save
    wrote ./~/m, replacing a model there without --overwrite."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    argv = ["train", "classifier", "--out=~/m", "--steps", "1", "--eval-seeds", "0",
            "--pool-size", "1", "--quiet"]
    assert main(argv) == 0
    assert (home / "m" / "classifier.json").is_file() and not (cwd / "~").exists()
    assert main(argv) == 2  # the model is found, and kept, the second time


def test_a_thread_count_beyond_any_machine_is_refused(capsys):
    """--threads 100000 went to torch as it was: 32 000 threads, then a crash."""
    assert main(["evaluate", "segmenter", "--seeds", "1", "--threads", "100000"]) == 2
    assert "--threads must be at most 256" in capsys.readouterr().err


def test_train_cli_refuses_a_write_protected_model_before_training(tmp_path, capsys,
                                                                   monkeypatch):
    """--overwrite onto a read-only card trained to the end, then failed at the save."""
    import os

    import napari_medseg.core.training as training

    (tmp_path / "classifier.json").write_text("{}")
    os.chmod(tmp_path / "classifier.json", 0o444)
    monkeypatch.setattr(training, "train_classifier",
                        lambda *a, **k: pytest.fail("trained first"), raising=False)
    assert main(["train", "classifier", "--out", str(tmp_path), "--overwrite", "--steps", "1",
                 "--eval-seeds", "0", "--pool-size", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == ("napari-medseg: error: classifier.json: the file"
                                               " is read-only; --overwrite cannot replace it")


def test_train_cli_passes_the_classifier_recipe_and_writes_it_into_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    rc = main(["train", "classifier", "--out", str(tmp_path), "--steps", "2", "--eval-seeds", "0",
               "--pool-size", "1", "--quiet", "--convs-per-block", "2", "--pooling", "max",
               "--crop", "64", "--lesion-twins", "0.5", "--lesion-map-weight", "1"])
    assert rc == 0
    model, card = load_model(tmp_path / "classifier.json")
    assert card["arch_params"]["convs_per_block"] == 2 and card["arch_params"]["pool"] == "max"
    assert card["arch_params"]["lesion_head"] is True
    # the command reproduces the recipe (its flags parse back to the same options)
    assert ("--convs-per-block 2 --pooling max --crop 64 --lesion-twins 0.5"
            " --lesion-map-weight 1.0") in card["training"]["command"]


def test_train_cli_classifier_recipe_is_for_the_classifier_only(tmp_path, capsys):
    assert main(["train", "detector", "--lesion-twins", "0.5", "--out", str(tmp_path)]) == 2
    assert "--lesion-twins: classifier options" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["train", "classifier", "--crop", "0", "--out", str(tmp_path)]) == 2
    assert "crop must be 8..1024 pixels, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    # a 100 000-pixel crop asked for 37 GiB after the phantom pool was filled
    assert main(["train", "classifier", "--crop", "100000", "--out", str(tmp_path)]) == 2
    assert "crop must be 8..1024 pixels, got 100000" in capsys.readouterr().err


def test_train_cli_passes_the_detector_z_range_and_writes_it_into_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    rc = main(["train", "detector", "--out", str(tmp_path), "--steps", "1", "--eval-seeds", "0",
               "--validation-seeds", "1", "--pool-size", "1", "--quiet", "--z-range-mm", "1", "7"])
    assert rc == 0
    model, card = load_model(tmp_path / "detector.json")
    assert card["training_z_range_mm"] == [1.0, 7.0]
    assert "--z-range-mm 1.0 7.0 --out" in card["training"]["command"]


def test_train_cli_detector_recipe_is_for_the_detector_only(tmp_path, capsys):
    assert main(["train", "classifier", "--z-range-mm", "1", "7", "--out", str(tmp_path)]) == 2
    assert "--z-range-mm: detector options; not available for classifier" in capsys.readouterr().err
    assert main(["train", "detector", "--z-range-mm", "7", "1", "--out", str(tmp_path),
                 "--steps", "1", "--eval-seeds", "0"]) == 2
    assert "z_range_mm must be (low, high)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_evaluate_cli_json_reports_held_out_metrics(capsys):
    assert main(["evaluate", "classifier", "--json", "--seeds", "1", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    # held-out seeds only (a lower bound let training seeds, 1 000 000 on, through)
    lo, hi = out["eval_seeds"]
    assert EVAL_SEEDS[0] <= lo < hi <= EVAL_SEEDS[1] and out["n_volumes"] == 1 == hi - lo
    assert 0.0 <= out["balanced_accuracy"] <= 1.0 and out["card"].endswith("classifier.json")
    assert set(out["recall"]) == {"no_body", "normal", "lesion"}


def test_the_ablation_arms_train_on_the_runs_phantom_pool(tmp_path, monkeypatch):
    """The arms built the default 40-phantom pool whatever --pool-size said (minutes of
    phantoms for a two-step check, and not the recipe the card says)."""
    from napari_medseg import cli_train

    calls, real = [], cli_train._train_once

    def recording(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) > 1:  # the first arm: enough seen
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_train, "_train_once", recording)
    main(["train", "classifier", "--out", str(tmp_path / "m"), "--steps", "1", "--eval-seeds",
          "0", "--pool-size", "1", "--threads", "1", "--quiet", "--ablation-steps", "1"])
    assert [c.get("pool_size") for c in calls] == [1, 1]


def test_a_seconds_budget_is_recorded_as_given():
    from napari_medseg.core.training import _command

    assert "--seconds 1234567.0 " in _command("classifier", 0, None, 1234567, "ce", "uniform")
    assert "--seconds 0.01234567 " in _command("classifier", 0, None, 0.01234567, "ce", "uniform")


def test_evaluate_cli_rejects_an_unknown_model(capsys):
    assert main(["evaluate", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_train_cli_rejects_an_unknown_model(tmp_path, capsys):
    assert main(["train", "unet", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_train_cli_init_is_for_the_segmenter_only(tmp_path, capsys):
    assert main(["train", "detector", "--init", "segmenter", "--out", str(tmp_path)]) == 2
    assert "--init continues a segmenter run" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_train_cli_members_is_for_the_detector_only(tmp_path, capsys):
    assert main(["train", "classifier", "--members", "3", "--out", str(tmp_path)]) == 2
    assert "--members makes a detector ensemble" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_saving_the_same_weights_twice_gives_the_same_sha256(tmp_path):
    from napari_medseg.core.models import SliceClassifier, save_model

    torch.manual_seed(0)
    model = SliceClassifier(filters=(4, 4, 4), hidden=4)
    card = {"classes": ["a", "b", "c"], "input_spacing_mm": [1, 1, 1],
            "normalisation": {"type": "window", "low": 0, "high": 1}}
    a = json.loads(save_model(model, tmp_path / "a", "m", card).read_text())["sha256"]
    b = json.loads(save_model(model, tmp_path / "b", "m", card).read_text())["sha256"]
    assert a == b


def test_the_detector_target_is_met_only_at_the_validation_threshold(monkeypatch):
    """The FROC point picks its threshold on the held-out volumes themselves; a user gets
    the card's (validation) threshold. Here the FROC point reaches 1.0 at 1 FP/volume but
    the card's threshold lets 2 FP/volume through: the target is not met."""
    from napari_medseg.core import evaluation

    def records(model, card, seeds, md, **kw):  # one lesion of 10 mm per volume, found at 0.9
        return [{"by_md": {6.0: {"scores": [0.9, 0.5, 0.4], "matched": [0, -1, -1]}},
                 "diameters": [10.0]} for _ in seeds]

    monkeypatch.setattr(evaluation, "detector_records", records)
    monkeypatch.setattr(evaluation, "_settings_summary", lambda seeds: {})
    card = {"min_distance_mm": 6.0, "peak_threshold": 0.3}
    out = evaluation.evaluate_detector(None, card, 3)
    assert out["sensitivity_ge_5mm_at_1fp"] == 1.0 and out["at_card_threshold"]["fp_per_volume"] == 2.0
    assert out["meets_target"] is False
    out = evaluation.evaluate_detector(None, {**card, "peak_threshold": 0.6}, 3)
    assert out["meets_target"] is True


def test_explicit_seeds_are_never_training_seeds_and_tuning_never_uses_held_out_ones():
    from napari_medseg.core.evaluation import seed_list
    from napari_medseg.core.training import EVAL_SEEDS, VALIDATION_SEEDS, training_seeds

    with pytest.raises(MedsegInputError, match="training seeds"):
        seed_list([training_seeds(0)[5]])
    with pytest.raises(MedsegInputError, match="training seeds"):
        seed_list([-1])
    with pytest.raises(MedsegInputError, match="held-out evaluation seeds"):
        seed_list([EVAL_SEEDS[0]], VALIDATION_SEEDS)
    assert seed_list([VALIDATION_SEEDS[0] + 3]) == [VALIDATION_SEEDS[0] + 3]  # scoring on validation
    assert seed_list([EVAL_SEEDS[0] + 1]) == [EVAL_SEEDS[0] + 1]
    # not quietly something else: a string read digit by digit (seed 0 five times), a
    # fraction rounded past the negative check, one phantom counted twice
    for bad, said in [(str(EVAL_SEEDS[0]), "a count or a list"), ([-0.5], "integers"),
                      ([True], "integers"), (3.0, "a count or a list"),
                      ([EVAL_SEEDS[0]] * 2, "more than once")]:
        with pytest.raises(MedsegInputError, match=said):
            seed_list(bad)
    # … and a result says which it was: on validation seeds (tuned there) it is optimistic
    from napari_medseg.core.evaluation import _settings_summary

    assert _settings_summary([EVAL_SEEDS[0], EVAL_SEEDS[0] + 1])["seed_set"] == "evaluation"
    assert _settings_summary([VALIDATION_SEEDS[0]])["seed_set"] == "validation"
    assert _settings_summary([VALIDATION_SEEDS[0], EVAL_SEEDS[0]])["seed_set"] == "mixed"
    assert _settings_summary([5])["seed_set"] == "other"  # was called "validation"


def test_evaluate_cli_prints_the_seeds_it_used():
    """It printed the JSON's half-open range: "(seeds [900000, 900001])" for one phantom."""
    from napari_medseg.cli_train import _seeds_text

    assert _seeds_text({"eval_seeds": [900000, 900001], "n_volumes": 1}) == "900000"
    assert _seeds_text({"eval_seeds": [900000, 900012], "n_volumes": 12}) == "900000–900011"
    assert _seeds_text({"eval_seeds": [900000, 900005], "n_volumes": 2}) == "[900000, 900005]"


def test_detections_are_collected_down_to_a_card_threshold_below_the_sweep_floor(monkeypatch):
    """A card threshold of 0.01 counted only the detections above 0.05 as false positives."""
    from napari_medseg.core import evaluation

    asked = []

    def records(model, card, seeds, md, low_threshold=0.05, **kw):
        asked.append(low_threshold)
        scores = [s for s in (0.9, 0.03, 0.02) if s >= low_threshold]
        return [{"by_md": {6.0: {"scores": scores, "matched": [0] + [-1] * (len(scores) - 1)}},
                 "diameters": [10.0]} for _ in seeds]

    monkeypatch.setattr(evaluation, "detector_records", records)
    monkeypatch.setattr(evaluation, "_settings_summary", lambda seeds: {})
    out = evaluation.evaluate_detector(None, {"min_distance_mm": 6.0, "peak_threshold": 0.01}, 2)
    assert asked == [0.01] and out["at_card_threshold"]["fp_per_volume"] == 2.0
    assert out["meets_target"] is False


def test_every_bundled_command_names_its_thread_count():
    for card_path in sorted(BUNDLED_DIR.glob("*.json")):
        command = json.loads(card_path.read_text())["training"]["command"]
        assert " --threads " in command, card_path.name  # float sums depend on it


def test_the_recorded_command_parses_back_to_the_run_s_arguments(tmp_path, monkeypatch):
    import shlex

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "my models"  # a space: the command must quote it
    rc = main(["train", "generator", "--seed", "2", "--out", str(out), "--steps", "2",
               "--eval-seeds", "0", "--validation-seeds", "2", "--pool-size", "1",
               "--threads", "1", "--quiet"])
    assert rc == 0
    card = load_model(out / "generator.json")[1]
    argv = shlex.split(card["training"]["command"])
    assert argv[argv.index("--out") + 1] == str(out)
    # the residual scale is fitted on them: without the flag a re-run fits on others
    assert argv[argv.index("--validation-seeds") + 1] == "2"
    assert card["calibration"]["validation_seeds"] == [800000, 800001]


@pytest.mark.parametrize("model,extra,match", [
    ("detector", ["--validation-seeds", "0"], "--validation-seeds must be 1..100000"),
    ("classifier", ["--eval-seeds", "100001"], "--eval-seeds must be 1..100000"),
    ("classifier", ["--seed", str(2**63)], "seed must be an integer 0.."),
])
def test_train_refuses_phantom_counts_and_seeds_out_of_range_before_training(
        tmp_path, capsys, monkeypatch, model, extra, match):
    from napari_medseg import cli_train

    def no_training(*a, **k):
        raise AssertionError("trained before checking its arguments")

    monkeypatch.setattr(cli_train, "_train_once", no_training)
    assert main(["train", model, "--steps", "1", "--out", str(tmp_path / "o"), *extra]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_init_by_name_records_the_card_it_resolved_to(tmp_path, monkeypatch):
    """A user model named like the bundled one shadows it here, not on another machine."""
    from napari_medseg.core.models import user_models_dir

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    first, card0 = run_to_completion(train_segmenter(3, steps=2, **TINY_SEG))
    path = save_model(first, user_models_dir(create=True), "segmenter", card0)
    _, card = run_to_completion(train_segmenter(4, steps=1, init="segmenter", **TINY_SEG))
    assert card["training"]["command"].endswith(f"--init {path}")
    assert card["training"]["init_from"]["card"] == str(path)


def test_training_neither_moves_the_callers_torch_state_nor_shares_it_with_another_run():
    """The trainers seeded torch's global generator and held it across every yield: a
    caller's draws changed, and two runs stepped in turn gave other weights than alone."""
    from napari_medseg.core.progress import run_to_completion
    from napari_medseg.core.training import train

    def weights(model):
        return torch.cat([v.flatten().float() for v in model.state_dict().values()])

    def flags():
        return (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    alone, _ = run_to_completion(train("classifier", 3, 3, None, **TINY_CLS))
    assert torch.equal(torch.rand(3), expected)
    # deterministic algorithms: on while a run's steps run, the caller's setting between
    # them (it stayed on between steps, and two runs in turn left it on for good)
    before = flags()
    jobs = [train("classifier", 3, 3, None, **TINY_CLS), train("classifier", 4, 3, None, **TINY_CLS)]
    results = [None, None]
    while any(r is None for r in results):
        for i, job in enumerate(jobs):
            if results[i] is None:
                try:
                    next(job)
                except StopIteration as stop:
                    results[i] = stop.value
                assert flags() == before
    assert torch.equal(weights(results[0][0]), weights(alone))
    assert not torch.equal(weights(results[1][0]), weights(alone))
    torch.use_deterministic_algorithms(True, warn_only=True)  # a user's own setting
    try:
        run_to_completion(train("classifier", 3, 1, None, **TINY_CLS))
        assert flags() == (True, True)
    finally:
        torch.use_deterministic_algorithms(*before[:1], warn_only=before[1])


def test_class_weights_stay_under_their_cap_with_many_classes():
    """Capping then renormalising lifted the capped weights over the cap again (24.3 for
    a cap of 20 with 25 classes, one rare)."""
    from napari_medseg.core.training import class_weights

    for counts in ([1e6] * 24 + [1], [1e6] * 30 + [1, 2], [5, 1, 1e4]):
        w = class_weights(counts).numpy()
        assert w.max() <= 20.0 + 1e-4 and abs(w.mean() - 1.0) < 1e-5, w
        assert np.all(np.diff(w[np.argsort(counts)]) <= 1e-6)  # rarer: never lighter


def test_a_shared_pool_s_seeds_are_the_ones_the_card_names():
    """With a pool shared between runs (benchmarks) the card named this seed's phantoms
    and a command that would train on them, not the pool's it trained on."""
    from napari_medseg.core.progress import run_to_completion
    from napari_medseg.core.training import (DEFAULTS, PhantomPool, train_classifier,
                                             training_seeds)

    pool = PhantomPool(training_seeds(0), 1, 1.5, 12, DEFAULTS["classifier"]["normalisation"])
    _, card = run_to_completion(train_classifier(5, steps=2, pool=pool, crop=48, batch_size=2,
                                                 refresh_every=1))
    first, end = card["training"]["train_seeds"]
    assert first == training_seeds(0).start and all(first <= it.seed < end for it in pool.items)
    assert card["training"]["command_reproduces"] is False


def test_a_class_a_fine_tuned_segmenter_gained_is_not_scored_on_the_phantoms():
    """A painted "stomach" has no truth in the phantoms: predicted anywhere, it was scored
    Dice 0 and became the headline minimum, in silence."""
    import torch

    from napari_medseg.core.evaluation import evaluate_classifier, evaluate_segmenter
    from napari_medseg.core.models import load_model

    model, card = load_model("segmenter")
    grown = model.with_classes(len(card["classes"]) + 1).eval()
    with torch.no_grad():  # the new class wins a little of the spleen's voxels
        grown.head.weight[:, -1] = grown.head.weight[:, 3]  # (in, out, k, k): transposed conv
        grown.head.bias[-1] = grown.head.bias[3] + 0.01
    grown_card = dict(card, classes=[*card["classes"], "stomach"])
    out = evaluate_segmenter(grown, grown_card, seeds=[EVAL_SEEDS[0]])
    assert "stomach" not in out["dice"] and out["not_scored"]["classes"] == ["stomach"]
    assert out["not_scored"]["voxels_predicted"]["stomach"] > 0
    # the voxels it took are misses of the spleen, whose Dice says so
    assert out["dice"]["spleen"] == out["min_dice_foreground"]
    # classes in another order cannot be scored by position: said, not scored
    swapped = list(card["classes"])
    swapped[2], swapped[3] = swapped[3], swapped[2]
    with pytest.raises(MedsegInputError, match="in that order"):
        evaluate_segmenter(model, dict(card, classes=swapped), seeds=[EVAL_SEEDS[0]])
    classifier, cls_card = load_model("classifier")
    with pytest.raises(MedsegInputError, match="slice classes"):
        evaluate_classifier(classifier, dict(cls_card, classes=["normal", "no_body", "lesion"]),
                            seeds=[EVAL_SEEDS[0]])

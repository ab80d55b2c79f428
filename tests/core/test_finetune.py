"""Fine-tuning on partial annotations (core, no Qt): what is learned from, what is kept."""

import json

import numpy as np
import pytest
import torch

from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.finetune import (
    keep_loss,
    VersionHistory,
    check_annotations,
    finetune_segmenter,
    plan_updates,
    planned_updates,
    slice_dice,
    unannotated_updates,
)
from napari_medseg.core.inference import segment_volume
from napari_medseg.core.models import RecurrentSegmenter, load_model
from napari_medseg.core.models import registry
from napari_medseg.core.phantom import LABEL_NAMES, generate_phantom
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core import session as session_mod
from napari_medseg.core.session import (
    AnnotationSession,
    discard_session,
    image_fingerprint,
    load_session,
    save_session,
    session_key,
)

CARD = {
    "name": "tiny", "classes": [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)],
    "input_spacing_mm": [2.5, 2.0, 2.0], "resample_axes": "yx",
    "normalisation": {"type": "window", "low": -200.0, "high": 300.0},
}


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return RecurrentSegmenter(n_classes=len(LABEL_NAMES), widths=(8, 16, 16)).eval()


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom((10, 64, 64), (2.5, 2.0, 2.0), seed=11, n_lesions=1)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finetune(model, phantom, labels, slices, card=CARD, **kw):
    kw = {"steps": 3, "holdout": False, "threads": 1, **kw}
    return run_to_completion(finetune_segmenter(phantom.volume, model, card, labels, slices, **kw))


def test_only_annotated_slices_are_learned_from_and_the_input_model_is_untouched(tiny, phantom):
    original = _weights(tiny)
    labels = phantom.labels.copy()
    a = _finetune(tiny, phantom, labels, [3, 6])
    scrambled = labels.copy()
    scrambled[[0, 1, 2, 4, 5, 7, 8, 9]] = np.random.default_rng(0).integers(0, 9, (8, 64, 64))
    b = _finetune(tiny, phantom, scrambled, [3, 6])
    for k, v in a.model.state_dict().items():  # other slices' labels do not matter at all
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert any(not torch.equal(v, original[k]) for k, v in a.model.state_dict().items())
    for k, v in tiny.state_dict().items():  # the caller's model is never modified
        assert torch.equal(v, original[k]), k
    changed = labels.copy()
    changed[3, 20:30, 20:30] = 4  # ... but the annotated slices' labels do
    c = _finetune(tiny, phantom, changed, [3, 6])
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_a_one_slice_volume_can_be_fine_tuned(tiny):
    """A 2D image is a one-slice volume; a flipped one-slice crop must still reach torch."""
    one = generate_phantom((1, 64, 64), (2.5, 2.0, 2.0), seed=3)
    for seed in range(3):  # each draws its flips differently
        result = _finetune(tiny, one, one.labels, [0], seed=seed, steps=6)
        assert result.report.steps == 6


def test_trainable_part_is_the_only_one_updated(tiny, phantom):
    original = _weights(tiny)
    res = _finetune(tiny, phantom, phantom.labels.copy(), [3, 6], trainable="decoder")
    after = res.model.state_dict()
    moved = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, original[k])}
    assert moved and moved <= {"up2", "dec2", "up1", "dec1", "head"}, moved
    assert all(p.requires_grad for p in res.model.parameters())  # a next round trains it all
    with pytest.raises(MedsegInputError, match="trainable"):
        _finetune(tiny, phantom, phantom.labels.copy(), [3, 6], trainable="gru")


def test_training_moves_the_prediction_towards_the_annotation():
    """The bundled segmenter on a domain-shifted phantom (flat contrast, heavy noise):
    15 steps on three corrected slices raise its Dice on those slices (by 0.08 here)."""
    model, card = load_model("segmenter")
    shifted = generate_phantom((16, 128, 128), (4.0, 1.6, 1.6), seed=77, contrast_scale=0.6,
                               noise_hu=45.0)
    before = run_to_completion(segment_volume(shifted.volume, model, card)).labels
    zs = [4, 8, 12]
    res = run_to_completion(finetune_segmenter(shifted.volume, model, card, shifted.labels, zs,
                                               steps=15, threads=1))
    after = run_to_completion(segment_volume(shifted.volume, res.model, res.card)).labels
    gain = [slice_dice(after[z], shifted.labels[z]) - slice_dice(before[z], shifted.labels[z])
            for z in zs]
    assert np.mean(gain) > 0.02, gain
    r = res.report
    assert r.holdout_slice == 4 and r.holdout_dice_before is not None
    assert len(r.loss_curve) == r.steps == 15
    assert res.card["finetune_history"][-1]["slices"] == zs
    assert "metrics" not in res.card  # the base model's held-out metrics do not describe it


def test_new_label_value_grows_the_head_and_keeps_old_predictions(tiny, phantom):
    grown = tiny.with_classes(12)
    x = torch.from_numpy(np.random.default_rng(1).random((4, 1, 40, 40), dtype=np.float32))
    with torch.no_grad():
        old, new = tiny(x), grown(x)
    assert new.shape[1] == 12
    torch.testing.assert_close(new[:, :9], old)
    assert torch.equal(new.argmax(1), old.argmax(1))
    labels = phantom.labels.copy()
    labels[5][phantom.labels[5] == 6] = 10  # the spine painted as a new value 10
    original = _weights(tiny)
    res = _finetune(tiny, phantom, labels, [5], class_names={10: "vertebra"})
    assert res.model.n_classes == 11
    # the whole network learns the new structure, not only the grown head
    after = res.model.state_dict()
    moved = {k.split(".")[0] for k, v in original.items()
             if k.split(".")[0] != "head" and not torch.equal(v, after[k])}
    assert moved >= {"enc1", "dec1"}, moved
    grown_tuned = _finetune(tiny, phantom, labels, [5], trainable="decoder").model.state_dict()
    assert all(torch.equal(v, grown_tuned[k]) for k, v in original.items() if k.startswith("enc1."))
    assert res.card["classes"][9:] == ["unused_9", "vertebra"]
    # slot 9 is an empty placeholder, not a structure learnt (it was listed as one)
    assert res.report.new_classes == ("vertebra",)
    out = run_to_completion(segment_volume(phantom.volume, res.model, res.card))
    assert out.labels.shape == phantom.labels.shape


def test_new_structure_advice_scales_the_round_to_the_steps_it_needs():
    from napari_medseg.core.finetune import NEW_STRUCTURE_STEPS, FinetuneReport, new_structure_advice

    def report(steps, new=("stomach",)):
        return FinetuneReport(slices=(1,), steps=steps, seconds=15.0, loss_curve=(), holdout_slice=None,
                              holdout_dice_before=None, holdout_dice_after=None, new_classes=new,
                              corrections=0)
    assert NEW_STRUCTURE_STEPS == 300
    assert "round made 75: " in new_structure_advice(report(75))
    assert new_structure_advice(report(75)).endswith("Seconds ≥ 60")  # 15 s × 300 / 75
    assert new_structure_advice(report(140)).endswith("Seconds ≥ 35")  # 32.1 rounded up to 5 s
    assert new_structure_advice(report(290)) is None
    assert new_structure_advice(report(75, new=())) is None


def test_default_round_is_longer_for_a_new_structure(tiny, phantom, monkeypatch):
    import napari_medseg.core.finetune as ft

    asked = []
    real = ft._budget
    monkeypatch.setattr(ft, "_budget", lambda st, se, default: (asked.append(default), real(3, None, default))[1])
    labels = phantom.labels.copy()
    run_to_completion(finetune_segmenter(phantom.volume, tiny, CARD, labels, [5], threads=1, holdout=False))
    labels[5][phantom.labels[5] == 6] = 9  # a new value
    run_to_completion(finetune_segmenter(phantom.volume, tiny, CARD, labels, [5], threads=1, holdout=False))
    assert asked == [ft.DEFAULT_SECONDS, ft.NEW_STRUCTURE_SECONDS]


@pytest.mark.parametrize("labels_shape, slices, message", [
    ((10, 64, 63), [1], "shape"),
    ((10, 64, 64), [], "no annotated slices"),
    ((10, 64, 64), [10], "outside the volume"),
    ((10, 64, 64), [2], "only background"),
])
def test_bad_annotations_are_refused(tiny, phantom, labels_shape, slices, message):
    labels = np.zeros(labels_shape, np.uint8)
    with pytest.raises(MedsegInputError, match=message):
        check_annotations(phantom.volume, labels, slices)
    with pytest.raises(MedsegInputError, match=message):
        _finetune(tiny, phantom, labels, slices)


def test_missing_slices_and_float_labels_are_refused(phantom):
    vol = phantom.volume
    gappy = type(vol)(vol.array, vol.spacing, vol.origin, vol.modality,
                      missing=np.arange(10) == 4)
    with pytest.raises(MedsegInputError, match="not acquired"):
        check_annotations(gappy, phantom.labels, [4])
    with pytest.raises(MedsegInputError, match="integers"):
        check_annotations(vol, phantom.labels.astype(float), [3])


def test_keep_loss_balanced_weighs_a_rare_class_up():
    # the teacher calls one voxel of 100 class 2 (a lesion), the rest background; the model
    # differs from it only there: the balanced average must weigh that voxel far more
    teacher = torch.full((1, 3, 10, 10), -8.0)
    teacher[0, 0] = 0.0
    teacher[0, :, 4, 4] = torch.tensor([-8.0, -8.0, 0.0])
    teacher = teacher.log_softmax(1)
    model = teacher.clone()
    model[0, :, 4, 4] = torch.tensor([0.0, -8.0, -8.0])
    free = torch.ones((1, 10, 10), dtype=torch.bool)
    plain, balanced = keep_loss(model, teacher, free), keep_loss(model, teacher, free, True)
    assert plain > 0 and balanced > 5 * plain
    assert float(keep_loss(model, teacher, torch.zeros_like(free))) == 0.0
    assert float(keep_loss(teacher, teacher, free, True)) == pytest.approx(0.0, abs=1e-6)


def test_unannotated_updates_never_touch_protected_slices():
    rng = np.random.default_rng(0)
    current = rng.integers(0, 3, (5, 8, 8)).astype(np.uint8)
    predicted = rng.integers(0, 3, (5, 8, 8)).astype(np.uint8)
    protected = np.array([False, True, False, True, False])
    idx, values = unannotated_updates(current, predicted, protected)
    out = current.copy()
    out[idx] = values
    np.testing.assert_array_equal(out[protected], current[protected])
    np.testing.assert_array_equal(out[~protected], predicted[~protected])


@pytest.mark.parametrize("seed", range(6))
def test_a_plan_made_earlier_gives_the_same_updates_as_comparing_now(seed):
    """The worker plans the write on the layer as it was; napari's thread compares again
    only the slices changed since (touched) and those the plan left out that are free now."""
    rng = np.random.default_rng(seed)
    nz = 12
    before = rng.integers(0, 4, (nz, 9, 7)).astype(np.uint8)
    predicted = before.copy()
    predicted[rng.random(before.shape) < 0.3] = 2
    planned_protected = rng.random(nz) < 0.3
    plan = plan_updates(before, predicted, planned_protected)
    assert plan.max_label == int(predicted.max())
    # the user paints, undoes and redoes meanwhile, on some slices only
    now = before.copy()
    touched = rng.random(nz) < 0.3
    for z in np.flatnonzero(touched):
        now[z][rng.random(now[z].shape) < 0.5] = rng.integers(0, 4)
    protected = rng.random(nz) < 0.3  # listed or unlisted meanwhile too
    idx, values = planned_updates(now, predicted, protected, plan, touched)
    want_idx, want_values = unannotated_updates(now, predicted, protected)
    order = np.lexsort(idx[::-1])
    want_order = np.lexsort(want_idx[::-1])
    for axis, want_axis in zip(idx, want_idx):
        np.testing.assert_array_equal(axis[order], want_axis[want_order])
    np.testing.assert_array_equal(values[order], want_values[want_order])
    out = now.copy()
    out[idx] = values
    np.testing.assert_array_equal(out[protected], now[protected])
    np.testing.assert_array_equal(out[~protected], predicted[~protected])


def test_a_plan_with_a_changed_slice_not_marked_touched_is_stale_there():
    """The touched flags are what makes a plan exact: a slice changed without them keeps
    the plan's updates (so the widget must flag every slice a history step moved)."""
    before = np.zeros((3, 4, 4), np.uint8)
    predicted = np.ones_like(before)
    plan = plan_updates(before, predicted, np.zeros(3, bool))
    now = before.copy()
    now[1] = 1  # painted to the prediction's value, then not flagged
    none = np.zeros(3, bool)
    idx, _ = planned_updates(now, predicted, none, plan, none)
    assert (idx[0] == 1).sum() == 16  # a no-op write of 16 voxels: the plan's view
    idx, _ = planned_updates(now, predicted, none, plan, np.array([False, True, False]))
    assert (idx[0] == 1).sum() == 0
    with pytest.raises(MedsegInputError, match="one protected and one touched flag"):
        planned_updates(now, predicted, np.zeros(2, bool), plan, none)


def test_versions_revert_and_save_crash_safely(tiny, phantom, tmp_path, monkeypatch):
    history = VersionHistory.start(tiny, CARD)
    res = _finetune(tiny, phantom, phantom.labels, [3])
    history.add(res)
    assert history.current == 1 and "v1" in history.versions[1].describe()
    history.revert(0)
    m0, _ = history.model()
    for k, v in tiny.state_dict().items():
        assert torch.equal(m0.state_dict()[k], v)
    with pytest.raises(MedsegInputError):
        history.revert(5)
    for bad in (-1, 2):  # -1 was the last version, as a Python index
        with pytest.raises(MedsegInputError, match="no version"):
            history.model(bad)
        with pytest.raises(MedsegInputError, match="no version"):
            history.save(bad, "other", tmp_path)
    assert history.unsaved == [1]  # the widget says so when it is closed
    path = history.save(1, "mine", tmp_path)
    assert history.unsaved == []
    loaded, card = load_model(path)
    assert card["version"].endswith("+ft1")
    for k, v in res.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # a crash while replacing "mine" with v0: the card on disk still loads the old model
    real = registry._atomic_write

    def crash_on_card(target, data):
        if target.suffix == ".json":
            raise OSError("disk full")
        real(target, data)

    monkeypatch.setattr(registry, "_atomic_write", crash_on_card)
    with pytest.raises(OSError):
        history.save(0, "mine", tmp_path)
    monkeypatch.setattr(registry, "_atomic_write", real)
    again, _ = load_model(path)
    for k, v in res.model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    assert len(list(tmp_path.glob("mine.*.safetensors"))) == 1  # the orphan was removed
    history.save(0, "mine", tmp_path)  # a completed replace drops the old weights file
    assert len(list(tmp_path.glob("mine.*.safetensors"))) == 1
    assert torch.equal(load_model(path)[0].head.bias, tiny.head.bias)


def test_session_autosave_round_trip_and_damage(tmp_path):
    labels = np.random.default_rng(0).integers(0, 9, (4, 16, 16)).astype(np.uint8)
    save_session(tmp_path / "s", AnnotationSession("ct", labels.shape, labels, [1, 2], [3], [2]))
    back = load_session(tmp_path / "s")
    np.testing.assert_array_equal(back.labels, labels)
    assert back.annotated == [1, 2, 3] and back.excluded == [2]
    meta = json.loads((tmp_path / "s" / "session.json").read_text())
    meta["annotations_sha256"] = "0" * 64
    (tmp_path / "s" / "session.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegInputError, match="do not match"):
        load_session(tmp_path / "s")
    with pytest.raises(MedsegInputError, match="no autosave"):
        load_session(tmp_path / "none")


def test_an_autosave_keeps_structure_names_is_compressed_and_sweeps_killed_saves(tmp_path):
    """A structure the user named (not in the model) came back unnamed; every autosave
    held the whole volume uncompressed; a killed save's temp file stayed until Discard."""
    labels = np.zeros((40, 128, 128), np.int32)
    labels[5, 10:20, 10:20] = 9
    (tmp_path / ".annotations-x.npz.abc.tmp").write_bytes(b"half")  # a killed save's
    save_session(tmp_path, AnnotationSession("ct", labels.shape, labels, [5],
                                             label_names={0: "background", 9: "stomach"}))
    back = load_session(tmp_path)
    assert back.label_names == {0: "background", 9: "stomach"}
    np.testing.assert_array_equal(back.labels, labels)
    (data,) = tmp_path.glob("annotations*.npz")
    assert data.stat().st_size < labels.nbytes / 100
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_long_name_in_any_script_still_gets_an_autosave_folder(tmp_path):
    """82 CJK characters made a 261-byte folder name: every autosave of that image failed
    (File name too long)."""
    for name in ("肝" * 82, "é" * 300, "x" * 300):
        key = session_key(name, (4, 16, 16))
        assert len(key.encode("utf-8")) <= 120, key
        labels = np.zeros((4, 16, 16), np.uint8)
        save_session(tmp_path / key / "s", AnnotationSession(name, labels.shape, labels, [1]))
        assert load_session(tmp_path / key / "s").image_name == name
    assert session_key("肝" * 82, (1, 2, 3)) != session_key("肝" * 83, (1, 2, 3))


def test_a_live_autosave_is_locked_against_discard_until_its_writer_lets_go(tmp_path):
    from napari_medseg.core.session import SessionLock, session_in_use

    labels = np.zeros((2, 8, 8), np.uint8)
    folder = save_session(tmp_path / "s", AnnotationSession("ct", labels.shape, labels, [1]))
    assert not session_in_use(folder)
    lock = SessionLock(folder)
    assert lock.acquire() and lock.held and session_in_use(folder)
    assert not SessionLock(folder).acquire()  # one writer per folder, even in one process
    with pytest.raises(MedsegInputError, match="window that is still open"):
        discard_session(folder)
    assert load_session(folder).annotated == [1]
    lock.release()
    assert not session_in_use(folder)
    discard_session(folder)
    assert not folder.exists()


@pytest.mark.parametrize("errno_name", ["ENOLCK", "ENOSYS"])
def test_an_autosave_on_a_filesystem_without_locks_is_not_taken_for_in_use(
        tmp_path, monkeypatch, errno_name):
    """NFS without its lock service, Lustre without -o flock: flock fails with ENOLCK or
    ENOSYS, and every autosave read as held by an open window: after a crash none was
    offered, and Discard refused it."""
    import errno
    import fcntl

    from napari_medseg.core.session import SessionLock, session_in_use

    labels = np.zeros((2, 8, 8), np.uint8)
    folder = save_session(tmp_path / "s", AnnotationSession("ct", labels.shape, labels, [1]))

    def no_locks(*_args):
        raise OSError(getattr(errno, errno_name), "no locks here")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert not SessionLock(folder).acquire()  # what a crashed window left: its lock file
    assert (folder / ".in-use.lock").exists()
    assert not session_in_use(folder)
    discard_session(folder)
    assert not folder.exists()


def test_an_autosave_of_the_first_format_restores_and_discards(tmp_path):
    """labels.npy with its checksum in the record (before 2026-11-26), under the same
    format name: it was offered, then "cannot restore: … annotations.npz"."""
    import hashlib
    import io
    import json

    from napari_medseg.core.session import FORMAT

    labels = np.zeros((4, 8, 8), np.int32)
    labels[2, 1:3, 1:3] = 5
    buf = io.BytesIO()
    np.save(buf, labels, allow_pickle=False)
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "labels.npy").write_bytes(buf.getvalue())
    (folder / "session.json").write_text(json.dumps({
        "format": FORMAT, "image_name": "ct", "shape": [4, 8, 8], "edited": [2],
        "checked": [3], "excluded": [], "saved_at": "2026-11-25 12:00:00",
        "labels_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}))
    session = load_session(folder)
    np.testing.assert_array_equal(session.labels, labels)
    assert session.annotated == [2, 3]
    (folder / "labels.npy").write_bytes(buf.getvalue()[:-4])  # still checked
    with pytest.raises(MedsegInputError, match="do not match their record"):
        load_session(folder)
    discard_session(folder)
    assert not folder.exists()


def test_a_save_killed_between_its_two_files_keeps_the_previous_autosave(tmp_path, monkeypatch):
    """The new data file lands, then the process dies before the record naming it is
    written (a quit kills the daemon autosave thread): the previous autosave must still
    restore (it used to be rejected as mismatched, losing both)."""
    first = np.zeros((3, 8, 8), np.uint8)
    first[1] = 2
    save_session(tmp_path, AnnotationSession("ct", first.shape, first, [1]))
    real = session_mod._write_atomic

    def dies_at_the_record(path, data):
        if path.name == "session.json":
            raise KeyboardInterrupt  # the process stops here
        real(path, data)

    monkeypatch.setattr(session_mod, "_write_atomic", dies_at_the_record)
    second = np.full((3, 8, 8), 3, np.uint8)
    with pytest.raises(KeyboardInterrupt):
        save_session(tmp_path, AnnotationSession("ct", second.shape, second, [0, 1, 2]))
    monkeypatch.setattr(session_mod, "_write_atomic", real)
    back = load_session(tmp_path)
    np.testing.assert_array_equal(back.labels, first)
    assert back.edited == [1]
    save_session(tmp_path, AnnotationSession("ct", second.shape, second, [0, 1, 2]))
    np.testing.assert_array_equal(load_session(tmp_path).labels, second)
    assert len(list(tmp_path.glob("annotations*.npz"))) == 1  # the superseded data went
    (tmp_path / ".annotations.npz.abc123.tmp").write_bytes(b"half")  # a killed write's leftover
    discard_session(tmp_path)
    assert not tmp_path.exists()


def test_session_keys_and_fingerprints_tell_images_apart():
    assert session_key("Müller", (2, 3, 4)) != session_key("Mäller", (2, 3, 4))
    assert session_key("肝脏 CT", (2, 3, 4)) != session_key("肺部 CT", (2, 3, 4))
    assert session_key("ct", (2, 3, 4)) == session_key("ct", (2, 3, 4))
    assert session_key("a/b\\c" + "x" * 300, (1, 2, 3)).endswith("-1x2x3")
    rng = np.random.default_rng(0)
    one, two = rng.normal(size=(20, 32, 32)), rng.normal(size=(20, 32, 32))
    assert image_fingerprint(one) == image_fingerprint(one.copy())
    assert image_fingerprint(one) != image_fingerprint(two)
    assert image_fingerprint(one[0]) != image_fingerprint(two[0])  # 2D images too


@pytest.mark.parametrize("members", [1, 2])
def test_detector_learns_only_from_reviewed_slices_and_from_deleted_points(members):
    from napari_medseg.core.finetune import finetune_detector
    from napari_medseg.core.models import LesionDetector

    torch.manual_seed(0)
    model = LesionDetector(widths=(8, 16, 16), members=members).eval()
    card = {**CARD, "classes": ["lesion"], "context_slices": 1, "peak_threshold": 0.5,
            "min_distance_mm": 8.0}
    p = generate_phantom((12, 64, 64), (4.0, 2.0, 2.0), seed=11, n_lesions=1)
    original = _weights(model)

    def run(points, slices):
        return run_to_completion(finetune_detector(p.volume, model, card, points, [10.0] * len(points),
                                                   slices, steps=3, threads=1))
    a = run([[3.0, 30.0, 30.0]], [3, 4])
    b = run([[3.0, 30.0, 30.0], [10.0, 20.0, 40.0]], [3, 4])  # far from the reviewed slices
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    empty = run([], [3, 4])  # all points deleted: "no lesion here" is still a lesson
    assert any(not torch.equal(v, empty.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    # an ensemble learns through its averaged output: every network moves
    tuned = a.model.state_dict()
    assert a.model.members == members
    for prefix in ["enc1."] + [f"others.{i}.enc1." for i in range(members - 1)]:
        assert any(not torch.equal(v, tuned[k]) for k, v in original.items() if k.startswith(prefix)), prefix
    assert a.card["finetune_history"][-1]["slices"] == [3, 4] and a.card["peak_threshold"] == 0.5
    with pytest.raises(MedsegInputError, match="no reviewed slices"):
        run([[3.0, 30.0, 30.0]], [])
    with pytest.raises(MedsegInputError, match="outside the image"):
        run([[3.0, 300.0, 30.0]], [3])


def test_detector_rounds_rehearse_training_phantoms(monkeypatch):
    """A quarter of each batch from training phantoms (half when every slice is reviewed),
    made once per recipe; rehearsal=0 draws none."""
    from napari_medseg.core import finetune
    from napari_medseg.core.models import LesionDetector

    torch.manual_seed(0)
    model = LesionDetector(widths=(8, 16, 16)).eval()
    card = {**CARD, "classes": ["lesion"], "context_slices": 1}
    drawn = []
    real_sample = finetune.detector_sample
    monkeypatch.setattr(finetune, "detector_sample", lambda *a, **k: (drawn.append(a[1]), real_sample(*a, **k))[1])
    monkeypatch.setattr(finetune, "_REHEARSAL_POOLS", {})
    p = generate_phantom((8, 48, 48), (4.0, 2.0, 2.0), seed=11, n_lesions=1)

    def run(slices, **kw):
        drawn.clear()
        return run_to_completion(finetune.finetune_detector(p.volume, model, card, [[3.0, 24.0, 24.0]],
                                                            [10.0], slices, steps=2, threads=1, **kw))
    a = run([3])
    assert len(drawn) == 2 * 2  # 2 steps × a quarter of 8
    pool = next(iter(finetune._REHEARSAL_POOLS.values()))
    assert len(pool.items) == finetune.REHEARSAL_PHANTOMS
    assert all(any(d is item for item in pool.items) for d in drawn)
    run(range(8))
    assert len(drawn) == 2 * 4 and len(finetune._REHEARSAL_POOLS) == 1  # the pool is reused
    b = run([3], rehearsal=0)
    assert not drawn
    with pytest.raises(MedsegInputError, match="rehearsal"):
        run([3], rehearsal=-1)
    assert any(not torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_detector_rehearsal_phantoms_have_the_slice_spacings_it_was_trained_on(monkeypatch):
    from napari_medseg.core import finetune

    monkeypatch.setattr(finetune, "REHEARSAL_MAX_SLICES", 16)
    monkeypatch.setattr(finetune, "_REHEARSAL_POOLS", {})
    card = {**CARD, "classes": ["lesion"], "context_slices": 1}
    default = run_to_completion(finetune.rehearsal_pool(card, 2))
    assert all(1.0 <= item.native_spacing[0] <= 5.0 for item in default.items)
    thick = run_to_completion(finetune.rehearsal_pool({**card, "training_z_range_mm": [6.0, 7.0]}, 2))
    assert thick is not default and all(6.0 <= item.native_spacing[0] <= 7.0 for item in thick.items)
    with pytest.raises(MedsegInputError, match="the card's training_z_range_mm"):
        run_to_completion(finetune.rehearsal_pool({**card, "training_z_range_mm": [7.0]}, 2))


def test_detector_fine_tuning_keeps_the_heatmap_it_was_trained_with(monkeypatch):
    from napari_medseg.core import finetune
    from napari_medseg.core.models import LesionDetector

    torch.manual_seed(0)
    model = LesionDetector(widths=(8, 16, 16)).eval()
    base = {**CARD, "classes": ["lesion"], "context_slices": 1}
    assert finetune.detector_heatmap(base) == {"loss": "focal", "sigma_fraction": 0.5,
                                               "z_sigma_fraction": 0.5}
    card = {**base, "heatmap": {"loss": "soft_focal", "sigma_fraction": 0.75, "z_sigma_fraction": 1.0}}
    targets, losses = [], []
    real_targets, real_loss = finetune.detector_targets, finetune.detector_loss
    monkeypatch.setattr(finetune, "detector_targets", lambda t, **kw: (targets.append(kw), real_targets(t, **kw)))
    monkeypatch.setattr(finetune, "detector_loss", lambda o, t, kind: (losses.append(kind), real_loss(o, t, kind))[1])
    monkeypatch.setattr(finetune, "_REHEARSAL_POOLS", {})  # the training phantoms' targets too
    p = generate_phantom((8, 48, 48), (4.0, 2.0, 2.0), seed=11, n_lesions=1)
    v1 = run_to_completion(finetune.finetune_detector(p.volume, model, card, [[3.0, 24.0, 24.0]],
                                                      [10.0], [3], steps=2, threads=1))
    assert len(targets) == 1 + finetune.REHEARSAL_PHANTOMS
    assert all(kw == {"sigma_fraction": 0.75, "z_sigma_fraction": 1.0} for kw in targets)
    assert set(losses) == {"soft_focal"} and len(losses) == 2
    assert v1.card["heatmap"] == card["heatmap"]  # a v2 from v1 is trained the same way
    for bad in ({"loss": "mse"}, {"z_sigma_fraction": 0}, {"sigma_fraction": "wide"}):
        with pytest.raises(MedsegInputError, match="card's"):
            finetune.detector_heatmap({**base, "heatmap": bad})


def test_plain_adamw_matches_torch_adamw():
    from napari_medseg.core.training import PlainAdamW

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=1e-4)
    ob = PlainAdamW(b.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(20):
        x = torch.randn(4, 8)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            (m(x) ** 2).sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_the_held_out_slice_does_not_shape_the_phase_it_is_held_out_of(tiny, phantom):
    """A one-step round is the held-out phase alone (slice 3 held out of [3, 6, 8]): its
    result must not depend on slice 3's labels (their class counts weighted the loss)."""
    labels = phantom.labels.copy()
    other = labels.copy()
    other[3] = np.where(other[3] > 0, 8, 0)  # the held-out slice says "lesion" everywhere
    a = _finetune(tiny, phantom, labels, [3, 6, 8], steps=1, holdout=True)
    b = _finetune(tiny, phantom, other, [3, 6, 8], steps=1, holdout=True)
    assert a.report.holdout_slice == 3 and a.report.steps == 1
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_a_later_round_never_holds_out_a_slice_an_earlier_round_trained_on(tiny, phantom):
    """Round 2 starts from round 1's model, which trained on slices 3, 6 and 7 (3 held
    out for part of it): its "held-out" Dice on 6 scored a slice it had learnt."""
    labels = phantom.labels.copy()
    first = _finetune(tiny, phantom, labels, [3, 6, 7], holdout=True, version=1)
    assert first.report.holdout_slice == 3
    same = _finetune(first.model, phantom, labels, [3, 6, 7], holdout=True, version=2,
                     card=first.card)
    assert same.report.holdout_slice is None and same.report.holdout_dice_after is None
    more = _finetune(first.model, phantom, labels, [3, 6, 7, 8], holdout=True, version=2,
                     card=first.card)
    assert more.report.holdout_slice == 8
    third = _finetune(more.model, phantom, labels, [1, 3, 6, 7, 8], holdout=True, version=3,
                      card=more.card)  # the lineage: rounds 1 and 2
    assert third.report.holdout_slice == 1
    # two annotated slices: none held out (the first phase trained on ONE slice, and a
    # short round could leave the segmenter without most of its liver)
    two = _finetune(tiny, phantom, labels, [3, 6], holdout=True, version=1)
    assert two.report.holdout_slice is None and two.report.holdout_dice_after is None


def test_the_only_slice_showing_a_new_structure_is_not_held_out(tiny, phantom):
    """Held out, it grew the head for a structure 75 % of the round never saw."""
    labels = phantom.labels.copy()
    labels[3, 10:20, 10:20] = 11  # only on slice 3, the slice round 1 would hold out
    r = _finetune(tiny, phantom, labels, [3, 6, 8], steps=2, holdout=True, version=1)
    assert r.report.holdout_slice == 6
    labels[6, 10:20, 10:20] = 11  # shown on two slices: either may be held out
    r = _finetune(tiny, phantom, labels, [3, 6, 8], steps=2, holdout=True, version=1)
    assert r.report.holdout_slice == 3


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_a_step_budget_is_the_number_of_steps_run(tiny, phantom, steps):
    r = _finetune(tiny, phantom, phantom.labels, [3, 6], steps=steps, holdout=True)
    assert r.report.steps == steps


def test_a_slot_made_as_a_gap_becomes_a_new_structure_when_painted(tiny, phantom):
    """Painting 11 on a 9-class model makes slots 9 and 10 ('unused_9', 'unused_10');
    painting 9 later is a new structure: named, listed and given the longer round."""
    labels = phantom.labels.copy()
    labels[3, 10:20, 10:20] = 11
    first = _finetune(tiny, phantom, labels, [3], class_names={11: "gallbladder"})
    assert first.card["classes"][9:] == ["unused_9", "unused_10", "gallbladder"]
    labels[6, 10:20, 10:20] = 9
    second = run_to_completion(finetune_segmenter(
        phantom.volume, first.model, first.card, labels, [3, 6], steps=3, holdout=False,
        threads=1, class_names={9: "pancreas"}))
    assert second.card["classes"][9] == "pancreas" and second.report.new_classes == ("pancreas",)


def test_a_names_table_from_a_card_neither_names_gaps_nor_keeps_placeholders():
    """A layer's names table copied from a card holds 'unused_9': the painted slot kept
    that name and was "new" in every round. A name given for a gap never painted named a
    structure the model never learnt (and painting it later was no longer new)."""
    from napari_medseg.core.finetune import _class_names

    old = [f"c{i}" for i in range(9)] + ["unused_9", "unused_10", "gallbladder"]
    names = _class_names(old, 12, {9}, dict(enumerate(old)))
    assert names[9:] == ["structure_9", "unused_10", "gallbladder"]
    grown = _class_names([f"c{i}" for i in range(9)], 12, {11}, {10: "spleen2", 11: "gb"})
    assert grown[9:] == ["unused_9", "unused_10", "gb"]


@pytest.mark.parametrize("kw,match", [
    ({"slices": [2.7]}, "whole numbers"),
    ({"slices": [True]}, "whole numbers"),
    ({"seq_len": 0}, "seq_len"),
    ({"lr": -1.0}, "lr"),
    ({"keep_weight": float("nan")}, "keep_weight"),
])
def test_bad_fine_tuning_arguments_are_refused(tiny, phantom, kw, match):
    slices = kw.pop("slices", [3])
    with pytest.raises(MedsegInputError, match=match):
        _finetune(tiny, phantom, phantom.labels, slices, **kw)


def test_an_unreviewed_point_teaches_nothing_on_a_reviewed_slice():
    """Reviewed slices 3 and 4; a 10 mm point on unreviewed slice 6 (8 mm away) used to
    put a lesion target of about 0.28 on slice 4. Now those voxels are left out (−1),
    and a reviewed point's target is as before."""
    from napari_medseg.core.finetune import reviewed_targets

    reviewed = np.zeros(10, bool)
    reviewed[[3, 4]] = True
    heatmap = {"sigma_fraction": 0.5, "z_sigma_fraction": 1.0}
    args = ((64, 64), (64, 64), (4.0, 1.0, 1.0), heatmap)
    pts, diam = np.array([[3.0, 20.0, 20.0], [6.0, 40.0, 40.0]]), np.array([10.0, 10.0])
    lesions, heat, size, mask = reviewed_targets(pts, diam, reviewed, *args)
    assert len(lesions) == 1 and heat[3, 20, 20] == pytest.approx(1.0)
    assert heat[4, 40, 40] == -1.0 and not mask[4, 38:43, 38:43].any()
    assert (heat[4] >= 0).sum() > 0.9 * heat[4].size  # the rest of slice 4 still teaches
    _, alone, _, _ = reviewed_targets(pts[:1], diam[:1], reviewed, *args)
    kept = heat[3] != -1.0  # outside the unreviewed point's reach, slice 3 is as without it
    np.testing.assert_array_equal(alone[3][kept], heat[3][kept])
    assert kept[10:31, 10:31].all()


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("shape"),
    lambda m: m.update(edited=["a"]),
    lambda m: m.update(edited=5),
    lambda m: m.update(checked=[99]),
    lambda m: m.update(excluded=[1.5]),
    lambda m: m.update(label_names=["liver"]),
    lambda m: m.update(label_names={"one": "liver"}),
])
def test_a_damaged_session_record_is_an_input_error(tmp_path, edit):
    """The checksum covers the data, not the record: a hand-edited or damaged record
    raised KeyError / TypeError / ValueError, which the widget did not catch."""
    labels = np.zeros((4, 8, 8), np.uint8)
    save_session(tmp_path, AnnotationSession("ct", labels.shape, labels, [1]))
    meta = json.loads((tmp_path / "session.json").read_text())
    edit(meta)
    (tmp_path / "session.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegInputError):
        load_session(tmp_path)


def _npz_bytes(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _zip_with_a_text_member() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("labels", b"not an array")
    return buffer.getvalue()


@pytest.mark.parametrize("data, record", [
    (b"PK\x03\x04 truncated", {}),  # not a zip
    (lambda good: good[:30] + bytes(len(good) - 30), {}),  # its stream damaged
    (_zip_with_a_text_member(), {}),  # np.load gives bytes for a non-.npy member
    (None, {"shape": [float("inf"), 8, 8]}),
    (_npz_bytes(other=np.zeros(3)), {}),  # neither labels nor points
    (_npz_bytes(labels=np.zeros((4, 8, 8), np.float64)), {}),
])
def test_damaged_data_under_a_matching_checksum_is_an_input_error(tmp_path, data, record):
    """A data file whose checksum the record carries may still be damaged or foreign:
    BadZipFile, zlib.error, AttributeError and OverflowError reached the widget, which
    catches input errors only (a traceback, no "cannot restore" message)."""
    import hashlib

    labels = np.zeros((4, 8, 8), np.uint8)
    save_session(tmp_path, AnnotationSession("ct", labels.shape, labels, [1]))
    meta = json.loads((tmp_path / "session.json").read_text())
    data_path = tmp_path / meta["annotations_file"]
    if callable(data):
        data = data(data_path.read_bytes())
    if data is not None:
        data_path.write_bytes(data)
    meta.update(record, annotations_sha256=hashlib.sha256(data_path.read_bytes()).hexdigest())
    (tmp_path / "session.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegInputError):
        load_session(tmp_path)
    assert data_path.exists()  # never deleted


def test_a_session_whose_points_and_diameters_disagree_is_refused(tmp_path):
    save_session(tmp_path, AnnotationSession("ct", (4, 8, 8), points=np.zeros((2, 3)),
                                             diameters=np.full(2, 8.0)))
    assert len(load_session(tmp_path).points) == 2
    data = np.load(next(tmp_path.glob("annotations*.npz")))
    bad = tmp_path / "bad"
    save_session(bad, AnnotationSession("ct", (4, 8, 8), points=data["points"][:, :2],
                                        diameters=data["diameters"]))
    with pytest.raises(MedsegInputError, match="do not fit"):
        load_session(bad)
    assert load_session(tmp_path).shown is None  # an autosave from before: all shown
    flags = tmp_path / "flags"
    save_session(flags, AnnotationSession("ct", (4, 8, 8), points=np.zeros((2, 3)),
                                          diameters=np.full(2, 8.0), shown=np.array([True, False])))
    assert load_session(flags).shown.tolist() == [True, False]
    save_session(bad, AnnotationSession("ct", (4, 8, 8), points=np.zeros((2, 3)),
                                        diameters=np.full(2, 8.0), shown=np.ones(3, bool)))
    with pytest.raises(MedsegInputError, match="shown flags do not fit"):
        load_session(bad)
    assert load_session(flags).scores is None  # no score column: none saved
    save_session(flags, AnnotationSession("ct", (4, 8, 8), points=np.zeros((2, 3)),
                                          diameters=np.full(2, 8.0), scores=np.array([0.5, np.nan])))
    np.testing.assert_array_equal(load_session(flags).scores, [0.5, np.nan])
    for scores in (np.ones(3), np.array(["0.5", "x"])):
        save_session(bad, AnnotationSession("ct", (4, 8, 8), points=np.zeros((2, 3)),
                                            diameters=np.full(2, 8.0), scores=scores))
        with pytest.raises(MedsegInputError, match="scores do not fit"):
            load_session(bad)


def test_a_round_draws_from_its_own_seeded_state_whatever_runs_between_its_steps(phantom):
    """Dropout draws from torch's global generator. A round held its seed there across
    every yield: another job's draws between its steps changed what it learnt, and the
    user's own draws were rewound when it ended."""
    torch.manual_seed(0)
    model = RecurrentSegmenter(n_classes=len(LABEL_NAMES), widths=(8, 16, 16), dropout=0.5).eval()
    truth = phantom.labels
    torch.manual_seed(1)
    alone = _finetune(model, phantom, truth, [2, 5], steps=4).model.state_dict()
    torch.manual_seed(2)  # another global state: the round must not depend on it
    job = finetune_segmenter(phantom.volume, model, CARD, truth, [2, 5], steps=4,
                             holdout=False, threads=1)
    draws = []
    try:
        while True:
            next(job)
            draws.append(torch.rand(1).item())  # another job's (or the user's) draws
    except StopIteration as stop:
        busy = stop.value.model.state_dict()
    for key in alone:
        torch.testing.assert_close(busy[key], alone[key], rtol=0, atol=0, msg=key)
    torch.manual_seed(2)
    assert draws == [torch.rand(1).item() for _ in draws]  # theirs, not the round's


@pytest.mark.parametrize("pixel_mm", [1.6, 0.9])
def test_a_slice_left_as_the_model_labelled_it_holds_no_corrections(pixel_mm):
    """Corrections were found on the model grid, against the user's labels resampled to
    it: every structure edge counted (310 at 1.6 mm pixels, with nothing painted), and
    those voxels got the correction weight. They are found where the user saw them."""
    model, card = load_model("segmenter")
    p = generate_phantom((12, 96, 96), (2.5, pixel_mm, pixel_mm), seed=5, n_lesions=1)
    shown = run_to_completion(segment_volume(p.volume, model, card, threads=1)).labels
    result = run_to_completion(finetune_segmenter(p.volume, model, card, shown, [3, 6, 9],
                                                  steps=1, holdout=False, threads=1))
    assert result.report.corrections <= 5  # the round sees a 6-slice window, not the volume
    painted = shown.copy()
    painted[6, 40:46, 40:46] = 8  # a 6 × 6 px lesion the user adds
    result = run_to_completion(finetune_segmenter(p.volume, model, card, painted, [3, 6, 9],
                                                  steps=1, holdout=False, threads=1))
    model_px = 36 * (pixel_mm / 1.5) ** 2
    assert 0.5 * model_px <= result.report.corrections <= 2 * model_px + 5


def test_voxels_never_measured_are_no_training_target():
    """A turned coronal series' gap planes (NaN rows of each axial slice) read as the
    plane beside them: the 0 or the stroke left there taught that tissue a class."""
    from napari_medseg.core.finetune import IGNORE_INDEX, _annotation_targets
    from napari_medseg.core.volume import Volume

    array = np.zeros((3, 8, 10), np.float32)
    array[:, 3:5, :] = np.nan
    labels = np.full((3, 8, 10), 2, np.int64)
    card = {"input_spacing_mm": [1.0, 1.0, 1.0], "resample_axes": "yx"}
    target = _annotation_targets(Volume(array, (1.0, 1.0, 1.0)), labels, [1], card, (8, 10))
    assert (target[1, 3:5] == IGNORE_INDEX).all() and (target[1, :3] == 2).all()
    assert (target[[0, 2]] == IGNORE_INDEX).all()


def test_fine_tuning_runs_on_annotated_slices_with_unmeasured_planes():
    """IGNORE on an annotated slice's NaN voxels indexed the class weights out of range:
    every round on a turned coronal series with a gap crashed (IndexError)."""
    from napari_medseg.core.volume import Volume

    p = generate_phantom((6, 64, 64), (2.5, 1.5, 1.5), seed=3, n_lesions=1)
    array = p.volume.array.copy()
    array[:, 30:32, :] = np.nan
    labels = p.labels.astype(np.int64)
    labels[2, 30:32, 10:40] = 3  # a stroke across the gap plane
    model, card = load_model("segmenter")
    res = run_to_completion(finetune_segmenter(Volume(array, p.volume.spacing), model, card,
                                               labels, [1, 2, 4], steps=2))
    assert res.report.steps == 2 and res.report.holdout_dice_before is not None


def test_a_layer_left_as_segmented_holds_no_corrections():
    """The prediction corrections are measured against came from a window of ±3 slices,
    not the whole-volume pass that segments: the model's own output, untouched, counted
    78 "corrections" (weighted 5x) and a held-out Dice of 0.94 before any training."""
    model, card = load_model(registry.BUNDLED_DIR / "segmenter.json")
    phantom = generate_phantom((16, 96, 96), (2.5, 1.5, 1.5), seed=5)
    shown = run_to_completion(segment_volume(phantom.volume, model, card)).labels
    res = run_to_completion(finetune_segmenter(phantom.volume, model, card, shown, [2, 5, 8],
                                               steps=1, threads=1))
    assert res.report.corrections == 0
    assert res.report.holdout_dice_before == 1.0


def test_the_whole_volume_pass_reports_per_chunk_and_stops_after_the_slices_it_needs(tiny):
    """The pass over every slice ran without a yield (no progress, no Cancel for 8 s on a
    300-slice series) and decoded every chunk, where the annotated slices were at the top."""
    phantom = generate_phantom((40, 48, 48), (2.5, 2.0, 2.0), seed=11, n_lesions=0)
    job = finetune_segmenter(phantom.volume, tiny, CARD, phantom.labels, [2, 5], steps=1,
                             holdout=False, threads=1)
    messages, inference_mode_at_reports = [], set()
    try:
        while True:
            messages.append(next(job).message)
            # the caller's code between reports keeps its own grad mode
            inference_mode_at_reports.add(torch.is_inference_mode_enabled())
    except StopIteration:
        pass
    assert inference_mode_at_reports == {False}
    passes = [m for m in messages if m == "the model's prediction on the annotated slices"]
    # chunks of 8: the backward pass takes all 5, the forward one stops after the first
    assert len(passes) == 5 + 1, messages


def test_given_model_labels_replace_the_first_pass_and_give_the_same_round(tiny):
    """A widget knows what the version it starts from predicted (it wrote it): the round
    starts from that instead of a second pass over the whole volume, with the same
    corrections and held-out Dice as when it finds them itself."""
    phantom = generate_phantom((20, 48, 48), (2.5, 2.0, 2.0), seed=11, n_lesions=0)
    shown = run_to_completion(segment_volume(phantom.volume, tiny, CARD, threads=1)).labels
    painted = shown.copy()
    painted[[3, 9, 15]] = phantom.labels[[3, 9, 15]]

    def run(**kwargs):
        job = finetune_segmenter(phantom.volume, tiny, CARD, painted, [3, 9, 15], steps=2,
                                 threads=1, **kwargs)
        messages = []
        try:
            while True:
                messages.append(next(job).message)
        except StopIteration as stop:
            return stop.value, messages

    found, found_messages = run()
    given, given_messages = run(model_labels=shown)
    first_pass = "the model's prediction on the annotated slices"
    assert first_pass in found_messages and first_pass not in given_messages
    assert found.report.corrections > 0
    assert given.report.corrections == found.report.corrections
    assert given.report.holdout_dice_before == found.report.holdout_dice_before
    # and they are what it measures: labels said to be the model's count as its output
    other, _ = run(model_labels=painted)
    assert other.report.corrections == 0 and other.report.holdout_dice_before == 1.0
    with pytest.raises(MedsegInputError, match="model_labels have shape"):
        run(model_labels=shown[:-1])


def test_a_value_painted_only_on_unmeasured_voxels_is_no_new_structure(tiny, phantom):
    """A stroke on a slice's NaN voxels (a gap plane) is ignored by the loss, yet its new
    value grew the head and was reported as a structure learnt, with no voxel to learn
    from; painted alone, it passed the "only background" check."""
    from napari_medseg.core.volume import Volume

    array = phantom.volume.array.copy()
    array[5, 30:32, :] = np.nan
    volume = Volume(array, phantom.volume.spacing)
    labels = phantom.labels.copy()
    labels[5, 30:32, 10:40] = 11  # a value the model does not know, only on the gap
    res = run_to_completion(finetune_segmenter(volume, tiny, CARD, labels, [5], steps=1,
                                               holdout=False, threads=1))
    assert res.report.new_classes == () and res.model.n_classes == tiny.n_classes
    alone = np.zeros_like(labels)
    alone[5, 30:32, 10:40] = 11
    with pytest.raises(MedsegInputError, match="only background .* where the image has values"):
        run_to_completion(finetune_segmenter(volume, tiny, CARD, alone, [5], steps=1,
                                             holdout=False, threads=1))


def test_a_version_s_card_is_its_own_not_shared_with_callers(tiny):
    """The versions kept shallow copies of cards: a caller appending to the card's class
    list (given, or returned by model()) changed the version kept."""
    card = {**CARD, "classes": [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)]}
    history = VersionHistory.start(tiny, card)
    card["classes"].append("given")
    _, returned = history.model(0)
    returned["classes"].append("returned")
    assert history.model(0)[1]["classes"] == [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)]


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint16])
def test_a_label_volume_saved_as_its_slices_loads_as_the_volume(tmp_path, dtype):
    from napari_medseg.core.session import (AnnotationSession, SliceStack, load_session,
                                            save_session)

    labels = np.random.default_rng(3).integers(0, 9, (5, 17, 11)).astype(dtype)
    before = SliceStack.updated(labels, None)
    labels[3, 4, 5] += 1
    stack = SliceStack.updated(labels, before)
    assert [a is b for a, b in zip(before.slices, stack.slices)] == [True] * 3 + [False, True]
    save_session(tmp_path / "s", AnnotationSession("ct", labels.shape, labels=stack, edited=[3]))
    restored = load_session(tmp_path / "s").labels
    assert restored.dtype == dtype
    np.testing.assert_array_equal(restored, labels)
    # another shape (the layer's data replaced): copied whole, nothing shared
    assert SliceStack.updated(labels[:4], stack).slices[0] is not stack.slices[0]


def test_a_new_structure_named_like_another_class_gets_a_name_of_its_own():
    """A painted value named "liver" (the layer's table) made a second "liver" class: the
    volume summary, keyed by name, then left the real liver out."""
    from napari_medseg.core.finetune import _class_names

    old = ["background", "liver", "unused_2"]
    names = {2: "liver", 3: " ", 4: "new\nline", 5: "spleen"}
    assert _class_names(old, 6, {2, 3, 4, 5}, names) == [
        "background", "liver", "structure_2", "structure_3", "new line", "spleen"]



def test_slices_kept_by_an_autosave_do_not_keep_the_whole_first_copy_alive():
    """The first autosave copied the layer as one block and shared its slices: after a
    re-predict rewrote every slice but the annotated one, that one slice kept the whole
    block alive, and the widget held two volumes instead of one."""
    import gc
    import tracemalloc

    from napari_medseg.core.session import SliceStack

    labels = np.zeros((40, 64, 64), np.int32)
    tracemalloc.start()
    try:
        stack = SliceStack.updated(labels, None)
        labels[1:] = 1  # a re-predict: every slice but the annotated slice 0
        stack = SliceStack.updated(labels, stack)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1.2 * labels.nbytes, held / labels.nbytes
    np.testing.assert_array_equal(np.asarray(stack), labels)


def test_a_damaged_autosave_record_is_an_input_error_not_a_crash(tmp_path):
    """An epoch too large for a float and a record nested past Python's recursion limit
    raised OverflowError and RecursionError from the image picker."""
    from napari_medseg.core.errors import MedsegInputError
    from napari_medseg.core.session import read_meta, saved_epoch

    folder = tmp_path / "s"
    folder.mkdir()
    record = folder / "session.json"
    record.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MedsegInputError, match="unreadable"):
        read_meta(folder)
    assert saved_epoch(folder, {"saved_epoch": 10 ** 400}) == record.stat().st_mtime


def test_an_empty_slice_predicted_empty_scores_full_agreement():
    """Outside the body, annotation and prediction both empty gave NaN ("Dice nan → nan"),
    and a round that painted false positives there (nan → 0) passed the held-out check."""
    empty = np.zeros((100, 100), np.uint8)
    stray, blob = empty.copy(), empty.copy()
    stray[2, 2] = 3
    blob[:20] = 3  # a fifth of the slice painted as a structure
    assert slice_dice(empty, empty) == 1.0
    assert slice_dice(stray, empty) == pytest.approx(0.9999)  # a stray voxel: no rejection
    assert 1.0 - slice_dice(blob, empty) > 0.05  # a drop the Retrain widget rejects
    assert slice_dice(stray, stray) == 1.0 and slice_dice(empty, stray) == 0.0


def test_the_held_out_dice_leaves_never_measured_voxels_out(tiny, phantom):
    """The annotation was copied into the prediction on NaN voxels, so strokes over a gap
    scored as agreement: a model predicting nothing had 'Dice 0.44' before the round."""
    from napari_medseg.core.volume import Volume

    array = phantom.volume.array.copy()
    zs = [3, 6, 8]
    for z in zs:
        array[z, :, :32] = np.nan  # the left half of each annotated slice never measured
    volume = Volume(array, phantom.volume.spacing, (0.0, 0.0, 0.0), "CT")
    r = run_to_completion(finetune_segmenter(
        volume, tiny, CARD, phantom.labels, zs, steps=2, holdout=True, threads=1,
        model_labels=np.zeros(phantom.labels.shape, np.uint8))).report
    truth = phantom.labels[r.holdout_slice]
    assert (truth[:, :32] > 0).any() and (truth[:, 32:] > 0).any()
    assert r.holdout_dice_before == 0.0  # nothing predicted on what was measured


@pytest.mark.parametrize("contiguous", [True, False])
def test_unannotated_updates_are_the_changed_voxels_off_the_protected_slices(contiguous):
    """Flat indices over runs of unprotected slices (the 3-D np.nonzero held napari's
    thread 0.2 s after every round on a real scan): the same voxels and values."""
    from napari_medseg.core.finetune import unannotated_updates

    rng = np.random.default_rng(3)
    current = rng.integers(0, 4, (9, 6, 7)).astype(np.uint8)
    predicted = rng.integers(0, 4, (9, 7, 6)).astype(np.uint8).transpose(0, 2, 1)
    if contiguous:
        predicted = np.ascontiguousarray(predicted)
    protected = np.zeros(9, bool)
    protected[[0, 3, 4, 8]] = True
    idx, values = unannotated_updates(current, predicted, protected)
    expected = (predicted != current) & ~protected[:, None, None]
    assert all((a == b).all() for a, b in zip(idx, np.nonzero(expected)))
    np.testing.assert_array_equal(values, predicted[expected])
    none = unannotated_updates(current, predicted, np.ones(9, bool))
    assert all(len(a) == 0 for a in none[0]) and len(none[1]) == 0

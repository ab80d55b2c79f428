"""Retrain-on-annotations widget in a real viewer: paint, retrain, undo, versions, autosave."""

import numpy as np
import pytest
import torch
from napari.layers import Labels
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt

from napari_medseg._sample_data import phantom_layer_data
from napari_medseg._widgets.retrain import RetrainWidget, painted_slices
from napari_medseg.core.models import load_model, user_models_dir
from tests.gui.conftest import plugin_view, run_widget

# a short budget, below the widget's own minimum: these tests check plumbing, the
# benchmark checks learning
SECONDS = 0.5


def _open(viewer, phantom):
    for data, kwargs, layer_type in phantom_layer_data(phantom):
        if layer_type != "points":
            getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    return viewer.layers[0]


def _prediction_layer(viewer, image, seed_labels):
    """A 'model output' Labels layer to correct (the phantom's truth, degraded)."""
    data = np.array(seed_labels, copy=True)
    data[data == 2] = 1  # the "model" missed the liver everywhere
    return viewer.add_labels(data, name="prediction", scale=image.scale, translate=image.translate)


def _paint_slice(layer, z, truth):
    """Paint the truth of slice z with napari's own brush, one stroke per structure."""
    for value in np.unique(truth[z]):
        ys, xs = np.nonzero(truth[z] == value)
        layer.selected_label = int(value)
        # data_setitem is how napari records edits; it emits the same paint event
        layer.data_setitem((np.full(len(ys), z), ys, xs), int(value))


def _widget(viewer, image, labels, card_path):
    widget = RetrainWidget(plugin_view(viewer))
    widget._image.value = image
    widget._labels_pick.value = labels
    widget._model.value = card_path
    widget._seconds.min = SECONDS
    widget._seconds.value = SECONDS
    return widget


def _wait(widget, qtbot, timeout=120_000):
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


def _errors_since(start):
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == "error"]


@pytest.fixture
def scene(make_napari_viewer, random_models, small_phantom):
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    return viewer, image, labels, widget, small_phantom


def test_painted_slices_reads_both_history_atom_kinds():
    from napari.layers.labels import labels as napari_labels

    _MaskedPaintAtom = getattr(napari_labels, "_MaskedPaintAtom", None)
    if _MaskedPaintAtom is None:
        pytest.skip("this napari (< 0.6) keeps (indices, old, new) tuples only")

    mask = np.zeros((3, 4, 4), bool)
    mask[2, 1, 1] = True
    atom = _MaskedPaintAtom((slice(5, 8), slice(0, 4), slice(0, 4)), mask, np.zeros(1), 3)
    fancy = ((np.array([1, 1, 9]), np.array([0, 1, 2]), np.array([0, 0, 0])), None, 2)
    assert painted_slices([atom, fancy]) == {7, 1, 9}


def test_paint_retrain_repredict_undo_versions(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    truth = phantom.labels
    _paint_slice(labels, 2, truth)
    _paint_slice(labels, 5, truth)
    assert widget.annotated_slices() == [2, 5]
    before = np.array(labels.data, copy=True)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    after = np.array(labels.data, copy=True)
    # annotated voxels untouched, other slices re-predicted
    np.testing.assert_array_equal(after[[2, 5]], before[[2, 5]])
    assert not np.array_equal(np.delete(after, [2, 5], 0), np.delete(before, [2, 5], 0))
    assert len(widget._history.versions) == 2 and widget._history.current == 1
    assert len(widget._curve.losses) > 0
    # one undo step restores every re-predicted voxel
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    assert "undone with Ctrl+Z" in widget._status.value  # it kept saying "re-predicted"
    labels.redo()
    np.testing.assert_array_equal(labels.data, after)
    assert "undone" not in widget._status.value
    # redoing the model's write does not make its output the user's annotation (it did:
    # every re-predicted slice was listed, so the re-predict below changed nothing)
    assert widget.annotated_slices() == [2, 5]
    # pick v0 and re-predict (without "Use this version" first: it predicted with the
    # version in use, v1, whatever the list showed): the starting model's output, still
    # sparing slices 2 and 5
    widget._versions.value = 0
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert widget._history.current == 0  # in use once it predicted
    from napari_medseg._layers import volume_from_layer
    from napari_medseg.core.inference import segment_volume
    from napari_medseg.core.progress import run_to_completion

    model0, card0 = widget._history.model(0)
    expected = run_to_completion(segment_volume(volume_from_layer(image), model0, card0)).labels
    others = np.setdiff1d(np.arange(truth.shape[0]), [2, 5])
    assert f"re-predicted {truth.shape[0] - 2} slices" in widget._status.value
    np.testing.assert_array_equal(labels.data[others], expected[others])
    np.testing.assert_array_equal(labels.data[[2, 5]], before[[2, 5]])


def test_a_write_worked_out_in_the_job_takes_in_an_undo_made_before_it_lands(
        scene, qtbot, monkeypatch):
    """The job works out which voxels its prediction changes, off napari's thread (on a
    200 × 512² scan the comparison held napari 50-90 ms at each write); the slices an
    undo changed after that are compared again when the write lands."""
    import threading

    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 3, phantom.labels)
    widget._predict.clicked.emit()  # v0's output written around slice 3: one undo step
    _wait(widget, qtbot)
    written = np.array(labels.data, copy=True)
    planned, go = threading.Event(), threading.Event()
    plan_of = RetrainWidget._write_plan

    def plan_then_wait(prediction, volume, target):
        plan = plan_of(prediction, volume, target)
        planned.set()
        go.wait(60)
        return plan

    monkeypatch.setattr(RetrainWidget, "_write_plan", staticmethod(plan_then_wait))
    widget._predict.clicked.emit()
    qtbot.waitUntil(planned.is_set, timeout=60_000)
    labels.undo()  # the first write undone after the job planned (nothing to change)
    undone = np.array(labels.data, copy=True)
    go.set()
    _wait(widget, qtbot)
    others = np.setdiff1d(np.arange(labels.data.shape[0]), [3])
    assert not np.array_equal(undone[others], written[others])
    np.testing.assert_array_equal(labels.data[others], written[others])
    np.testing.assert_array_equal(labels.data[3], written[3])  # the stroke stays


@pytest.fixture
def whole_compare(monkeypatch):
    """What each write would be with the whole layer compared when it lands (as before
    the write was planned in the job): the layer after it, and whether it was planned."""
    from napari_medseg.core.finetune import unannotated_updates

    expected = []
    apply = RetrainWidget._apply

    def checked(self, seg, image, layer, volume, number, card, prefix="", plan=None, mark=None):
        data = np.array(layer.data, copy=True)
        protected = self._protected(image, layer, volume.shape[0]) | volume.missing
        idx, values = unannotated_updates(data, seg.labels, protected)
        data[idx] = values
        expected.append((data, plan is not None and mark is not None))
        return apply(self, seg, image, layer, volume, number, card, prefix, plan, mark)

    monkeypatch.setattr(RetrainWidget, "_apply", checked)
    return expected


def _paused_plan(monkeypatch):
    """Events: the job is about to plan (it waits for ``plan``), has planned (it waits
    for ``write``)."""
    import threading

    planning, plan, planned, write = (threading.Event() for _ in range(4))
    plan_of = RetrainWidget._write_plan

    def paused(prediction, volume, target):
        planning.set()
        plan.wait(60)
        out = plan_of(prediction, volume, target)
        planned.set()
        write.wait(60)
        return out

    monkeypatch.setattr(RetrainWidget, "_write_plan", staticmethod(paused))
    return planning, plan, planned, write


@pytest.mark.parametrize("then", ["stroke", "mark correct", "undo before, redo after"])
def test_a_planned_write_follows_every_undo_and_redo_of_the_round(
        scene, qtbot, monkeypatch, whole_compare, then):
    """Compared only at the click and at the write, the histories missed an undone
    re-prediction that then left the redo history (a new stroke, or Mark correct,
    clears it) and an undo before the job read the layer redone after it: those slices
    kept a mix of the old labels and the new prediction, said to be re-predicted."""
    import dataclasses

    viewer, image, labels, widget, phantom = scene
    first = np.array(labels.data, copy=True)
    _paint_slice(labels, 3, phantom.labels)
    widget._predict.clicked.emit()  # v0's output written: one undo step
    _wait(widget, qtbot)
    if then == "undo before, redo after":  # a later version: unlike what is written now
        predict = RetrainWidget._predict_volume

        def other(volume, model, card):
            out = yield from predict(volume, model, card)
            mine = first.astype(out.labels.dtype)
            mine[:, :48] = 0
            return dataclasses.replace(out, labels=mine)

        monkeypatch.setattr(RetrainWidget, "_predict_volume", staticmethod(other))
    planning, plan, planned, write = _paused_plan(monkeypatch)
    widget._predict.clicked.emit()
    if then == "undo before, redo after":
        qtbot.waitUntil(planning.is_set, timeout=60_000)
        labels.undo()
        plan.set()
        qtbot.waitUntil(planned.is_set, timeout=60_000)
        labels.redo()
    else:
        plan.set()
        qtbot.waitUntil(planned.is_set, timeout=60_000)
        labels.undo()  # the first write undone after the job planned …
        if then == "stroke":  # … and dropped from the redo history by a new stroke
            value = 1 if labels.data[6, 40, 40] != 1 else 2
            labels.data_setitem((np.array([6]), np.array([40]), np.array([40])), value)
        else:  # … by marking a slice correct
            viewer.dims.set_point(0, image.data_to_world((5, 0, 0))[0])
            widget._mark_current()
        assert not labels._redo_history
    write.set()
    _wait(widget, qtbot)
    want, was_planned = whole_compare[-1]
    assert was_planned
    wrong = np.argwhere(labels.data != want)
    assert not len(wrong), f"{len(wrong)} voxels differ on slices {sorted(set(wrong[:, 0]))}"


def test_a_refused_repredict_leaves_the_version_in_use(scene, qtbot):
    """'Re-predict with it' made the picked version the one in use before it checked
    its input: a refused click (no image) still switched versions, so the next round
    trained from a version the user never predicted with."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 3, phantom.labels)
    widget._run.clicked.emit()  # v1, in use
    _wait(widget, qtbot)
    assert widget._history.current == 1
    widget._versions.value = 0
    widget._image.value = None
    widget._predict.clicked.emit()
    assert widget._worker is None
    assert widget._history.current == 1
    # refused in the worker (its checks read every voxel there): the same
    empty = viewer.add_image(np.full(image.data.shape, np.nan, np.float32), scale=image.scale,
                             name="empty")
    widget._image.value = empty
    widget._versions.value = 0
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert widget._history.current == 1 and "no finite values" in widget._status.value
    widget._image.value = image  # accepted: v0 predicted, and in use from then on
    widget._versions.value = 0
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert widget._history.current == 0


def test_cancel_leaves_versions_and_layer_unchanged(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 3, phantom.labels)
    widget._run.clicked.emit()  # v1
    _wait(widget, qtbot)
    v1 = {k: v.clone() for k, v in widget._history.versions[1].state.items()}
    widget._seconds.value = 60.0
    before = np.array(labels.data, copy=True)
    widget._run.clicked.emit()  # a long v2 round, cancelled
    qtbot.waitUntil(lambda: len(widget._curve.losses) >= 2, timeout=60_000)
    widget._cancel.clicked.emit()
    _wait(widget, qtbot)
    np.testing.assert_array_equal(labels.data, before)
    assert len(widget._history.versions) == 2 and widget._history.current == 1
    model, _ = widget._history.model()
    for k, v in v1.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("predicted_first", [False, True])
def test_a_round_finishing_after_a_model_switch_keeps_its_version(scene, qtbot,
                                                                  predicted_first):
    """predicted_first: after a re-predict the history held v0 alone, which the switch
    dropped, and the round's result was discarded."""
    viewer, image, labels, widget, phantom = scene
    if predicted_first:
        widget._predict.clicked.emit()
        _wait(widget, qtbot)
        assert len(widget._history.versions) == 1
        assert widget._versions.choices == (0,)  # v0 listed at once
    _paint_slice(labels, 3, phantom.labels)
    first = widget._model.value
    widget._seconds.value = 3.0
    before = np.array(labels.data, copy=True)
    widget._run.clicked.emit()  # the first round
    qtbot.waitUntil(lambda: len(widget._curve.losses) >= 1, timeout=60_000)
    widget._model.value = next(c for c in widget._model.choices if c != first)
    _wait(widget, qtbot)
    np.testing.assert_array_equal(labels.data, before)  # not written into the layer
    assert widget._history is None
    widget._model.value = first  # the round's version is there
    assert len(widget._history.versions) == 2 and widget._versions.choices


def test_save_version_then_load_it_anywhere(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    from napari_medseg._widgets.segment import SegmentWidget

    segment = SegmentWidget(plugin_view(viewer))  # open before the save
    _paint_slice(labels, 4, phantom.labels)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    start = len(notification_manager.records)
    widget._save_name.value = "segmenter"  # a bundled model's name: found first by name,
    widget._save.clicked.emit()  # it would have stood in for the bundled default
    assert not (user_models_dir() / "segmenter.json").exists()
    assert "exists" in " ".join(_errors_since(start))
    widget._save_name.value = "my-liver-fix"
    widget._save.clicked.emit()
    path = user_models_dir() / "my-liver-fix.json"
    model, card = load_model(path)
    v1_model, _ = widget._history.model(1)
    for k, v in v1_model.state_dict().items():
        assert np.array_equal(model.state_dict()[k].numpy(), v.numpy()), k
    assert card["finetune_history"][-1]["slices"] == [4]
    assert str(path) in SegmentWidget(plugin_view(viewer))._model.choices
    # listed at once in the pickers already open, this widget's own included (napari
    # re-reads them only when a layer is added or removed)
    assert str(path) in segment._model.choices and str(path) in widget._model.choices
    # another model picked, then this one again: its versions were kept, not dropped
    first = widget._model.value
    widget._model.value = str(path)
    assert widget._history is None and widget._versions.choices == ()
    widget._model.value = first
    assert len(widget._history.versions) == 2 and widget._versions.value == 1


def test_new_structure_grows_the_model(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    truth = phantom.labels
    n_old = len(load_model(widget._model.value)[1]["classes"])
    for z in (2, 4):
        _paint_slice(labels, z, truth)
        ys, xs = np.nonzero(truth[z] == 6)  # the spine, painted as a new value
        labels.data_setitem((np.full(len(ys), z), ys, xs), n_old)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    model, card = widget._history.model()
    assert model.n_classes == n_old + 1 and card["classes"][-1] == f"structure_{n_old}"
    np.testing.assert_array_equal(labels.data[2][truth[2] == 6], n_old)
    # a short round says that a new structure wants a longer one
    assert f"learned new: structure_{n_old}" in widget._status.value
    report = widget._history.versions[-1].report  # the advice scales this round's pace
    need = 5 * int(np.ceil(report.seconds * 300 / report.steps / 5))
    assert f"round made {report.steps}: " in widget._status.value
    assert f"Seconds ≥ {need}" in widget._status.value
    # the layer names the new structure (it showed unnamed on hover, in the autosave and
    # the saved file), and a name the user gives it reaches the next version's card
    table = labels.features
    assert list(table.loc[table["index"] == n_old, "name"]) == [f"structure_{n_old}"]
    table.loc[table["index"] == n_old, "name"] = "gallbladder"
    labels.features = table
    _paint_slice(labels, 6, truth)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    assert widget._history.model()[1]["classes"][n_old] == "gallbladder"


@pytest.mark.parametrize("problem", ["no annotations", "shape mismatch", "only background",
                                     "all unticked"])
def test_bad_input_message_and_nothing_changes(make_napari_viewer, qtbot, random_models,
                                               small_phantom, problem):
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    if problem == "shape mismatch":
        labels = viewer.add_labels(np.zeros((4, 30, 30), np.uint8), name="other grid")
    else:
        labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    if problem == "only background":
        labels.data_setitem(tuple(a.ravel() for a in np.indices((1, 96, 96))), 0)
    elif problem == "shape mismatch":
        widget._checked.add(1)
    elif problem == "all unticked":  # it said "no annotated slices" beside a full list
        for z in (2, 5):
            _paint_slice(labels, z, small_phantom.labels)
        widget._excluded |= {2, 5}
    before = [np.array(layer.data, copy=True) for layer in viewer.layers]
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    assert widget._worker is None
    errors = _errors_since(start)
    assert len(errors) == 1
    expected = {"no annotations": "no annotated slices", "shape mismatch": "has shape",
                "only background": "only background",
                "all unticked": "every listed slice is unticked"}[problem]
    assert expected in errors[0]
    for layer, data in zip(viewer.layers, before):
        np.testing.assert_array_equal(layer.data, data)
    assert widget._history is None or len(widget._history.versions) == 1


def test_autosave_restores_after_a_restart(make_napari_viewer, qtbot, random_models, small_phantom):
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    _paint_slice(labels, 2, small_phantom.labels)
    _paint_slice(labels, 5, small_phantom.labels)
    widget._mark_current()  # slice 0 or wherever the viewer is: checked as correct
    checked = set(widget._checked)
    widget.autosave_now(wait=True)
    painted = np.array(labels.data, copy=True)
    _process_ended(widget)

    # "crash": a new viewer and widget; the same image is opened again
    viewer2 = make_napari_viewer()
    image2 = _open(viewer2, small_phantom)
    start = len(notification_manager.records)
    widget2 = RetrainWidget(plugin_view(viewer2))
    widget2._image.value = image2
    assert widget2._pending_restore is not None and not widget2._restore_box.native.isHidden()
    # said in a toast too: in a short dock the box was scrolled out of sight
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert sum("can be restored: Restore in the Retrain dock" in m for m in said) == 1, said
    assert "3 slices" in widget2._restore_label.value or "2 slices" in widget2._restore_label.value
    widget2._restore.clicked.emit()
    restored = widget2._labels_pick.value
    assert isinstance(restored, Labels) and restored.name.startswith(f"annotations · {image2.name} (restored ")
    np.testing.assert_array_equal(restored.data, painted)
    np.testing.assert_allclose(restored.scale, image2.scale)
    assert set(widget2._edited) == {2, 5} and set(widget2._checked) == checked
    assert widget2._pending_restore is None and widget2._restore_box.native.isHidden()


def test_a_restored_autosave_is_moved_into_the_new_session_not_kept_twice(
        make_napari_viewer, random_models, small_phantom):
    """Each restore left its source behind beside the new session's copy: the sessions
    folder only grew, and every later start counted the copies as other autosaves."""
    from napari_medseg.core.session import load_session

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    painted = np.array(labels.data, copy=True)
    (source,) = widget._folder_locks
    _process_ended(widget)
    widget2, _ = _restarted(make_napari_viewer, small_phantom)
    assert widget2._pending_restore == source
    widget2._restore.clicked.emit()
    widget2._save_thread.join()
    assert not source.exists()
    (target,) = widget2._folder_locks
    np.testing.assert_array_equal(load_session(target).labels, painted)
    _process_ended(widget2)
    widget3, _ = _restarted(make_napari_viewer, small_phantom)
    assert widget3._pending_restore == target and widget3._older_autosaves == []


def test_unticked_slice_is_not_trained_on_but_still_protected(scene, qtbot):
    from qtpy.QtCore import Qt

    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    _paint_slice(labels, 5, phantom.labels)
    item = widget._slice_list.item(1)  # slice 5
    item.setCheckState(Qt.CheckState.Unchecked)
    assert widget.training_slices() == [2] and widget.annotated_slices() == [2, 5]
    before = np.array(labels.data, copy=True)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    assert widget._history.versions[1].report.slices == (2,)
    np.testing.assert_array_equal(labels.data[[2, 5]], before[[2, 5]])
    widget._slice_list.item(1).setSelected(True)
    widget._remove.clicked.emit()
    assert widget.annotated_slices() == [2]


def test_suggests_the_most_uncertain_unannotated_slices(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    widget._suggest.clicked.emit()
    _wait(widget, qtbot)
    suggested = list(widget._suggestions.choices)
    assert suggested and 2 not in suggested and len(suggested) <= 8
    assert widget._history is not None and len(widget._history.versions) == 1
    np.testing.assert_array_equal(labels.data[2], phantom.labels[2])
    # another scan picked: its slices were never scored, the list must not lead there
    other = viewer.add_image(image.data[:4], name="another scan", scale=image.scale)
    widget._image.value = other
    assert not widget._suggestions.enabled and not list(widget._suggestions.choices)
    widget._image.value = image
    widget._suggest.clicked.emit()
    widget._image.value = other  # while it runs (set by a script: the picker is locked)
    _wait(widget, qtbot)
    assert not list(widget._suggestions.choices) and "discarded" in widget._status.value
    # another scan loaded into the same layer while it runs: the same layer objects, and
    # the ranking of the scan before was offered for it
    widget._image.value = image
    widget._suggest.clicked.emit()
    image.data = np.array(image.data[::-1])
    _wait(widget, qtbot)
    assert not list(widget._suggestions.choices) and "changed meanwhile" in widget._status.value


def test_the_uncertainty_widget_leaves_out_slices_already_in_a_retrain_list(scene, qtbot):
    """Uncertainty's *Correct first* offered slices the user had corrected in Retrain
    already (Retrain's own Suggest left them out), sending them back to work done."""
    from napari_medseg._widgets.explain import UncertaintyWidget

    viewer, image, labels, widget, phantom = scene
    uncertainty = UncertaintyWidget(plugin_view(viewer))
    run_widget(qtbot, uncertainty, image, widget._model.value)
    first, second, *_ = list(uncertainty._goto.choices)
    labels.brush_size = 3
    labels.paint((first, 30, 30), int(labels.data[first, 30, 30]) % 7 + 1)  # a correction
    assert first in widget.annotated_slices()
    run_widget(qtbot, uncertainty)
    offered = list(uncertainty._goto.choices)
    assert first not in offered and second in offered
    assert f"1 slice already in a Retrain list left out ({first})" in uncertainty._status.value
    # another scan's lists do not count
    # the least uncertain slice listed too, with room in the list (fewer than 10
    # ranked): it was left out without being counted
    last = list(uncertainty._goto.choices)[-1]
    labels.paint((last, 30, 30), int(labels.data[last, 30, 30]) % 7 + 1)
    run_widget(qtbot, uncertainty)
    if len(list(uncertainty._goto.choices)) < 10:
        assert "2 slices already in a Retrain list left out" in uncertainty._status.value
    other = viewer.add_image(image.data.copy()[::-1], name="another scan", scale=image.scale)
    run_widget(qtbot, uncertainty, other)
    assert "Retrain list" not in uncertainty._status.value


def test_a_suggested_slice_leaves_the_list_once_annotated_and_the_shown_one_is_reachable(
        scene, qtbot):
    """The top suggestion stayed first after the user corrected it (sending them back to
    a slice already done), and picking the entry already shown did not go there."""
    viewer, image, labels, widget, phantom = scene
    widget._suggest.clicked.emit()
    _wait(widget, qtbot)
    first, *rest = list(widget._suggestions.choices)
    viewer.dims.set_point(0, image.data_to_world([0, 0, 0])[0])
    widget._suggestions.native.activated.emit(0)  # Qt's signal when the shown entry is picked
    assert viewer.dims.point[0] == pytest.approx(image.data_to_world([first, 0, 0])[0])
    labels.brush_size = 3
    labels.paint((first, 30, 30), int(labels.data[first, 30, 30]) % 7 + 1)  # a correction
    assert first in widget.annotated_slices()
    assert list(widget._suggestions.choices)[: len(rest)] == rest
    assert first not in widget._suggestions.choices
    assert widget._status.value == ("Most uncertain unannotated slices: "
                                    + ", ".join(map(str, widget._suggestions.choices)))


def test_a_dock_closed_and_opened_again_keeps_the_painted_slices_protected(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """napari opens a NEW widget when the dock is opened again: it started with empty
    lists on the same layer, and its first round re-predicted over the slices painted
    before the close (9000 painted voxels changed); its restore offer made a copy layer."""
    from napari_medseg.core.session import sessions_dir

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg",
                                                        "Retrain on my annotations")
    widget._image.value, widget._labels_pick.value = image, labels
    for z in (2, 5):
        _paint_slice(labels, z, small_phantom.labels)
    viewer.dims.set_point(0, image.data_to_world([7, 0, 0])[0])
    widget._mark_current()  # slice 7: checked, correct as is
    painted = {z: np.array(labels.data[z]) for z in (2, 5, 7)}
    viewer.window.remove_dock_widget(dock)
    dock2, again = viewer.window.add_plugin_dock_widget("napari-medseg",
                                                        "Retrain on my annotations")
    assert again is not widget
    again._image.value, again._labels_pick.value = image, labels
    assert again.annotated_slices() == [2, 5, 7]
    assert again._pending_restore is None  # the lists are live here: nothing to restore
    again._model.value = random_models["RecurrentSegmenter"]
    again._seconds.value = 2
    again._run.clicked.emit()
    _wait(again, qtbot)
    assert again._history is not None and len(again._history.versions) == 2
    for z, before in painted.items():
        np.testing.assert_array_equal(labels.data[z], before)
    # the closed widget's autosave is superseded by the new one's (not left to offer)
    again.autosave_now(wait=True)
    qtbot.waitUntil(lambda: len([p for p in sessions_dir().rglob("session.json")]) == 1,
                    timeout=10_000)


def test_a_reopened_dock_takes_over_every_layer_the_closed_one_listed(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """Only the pair in use at the close was taken over: another layer's lists came back
    but its autosave was still offered, and Restore made a copy layer."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    first = _prediction_layer(viewer, image, small_phantom.labels)
    second = viewer.add_labels(np.zeros_like(first.data), name="second", scale=image.scale,
                               translate=image.translate)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg",
                                                        "Retrain on my annotations")
    widget._image.value, widget._labels_pick.value = image, first
    _paint_slice(first, 2, small_phantom.labels)
    widget._labels_pick.value = second  # the first pair's autosave is written as it is left
    _paint_slice(second, 5, small_phantom.labels)
    viewer.window.remove_dock_widget(dock)
    dock2, again = viewer.window.add_plugin_dock_widget("napari-medseg",
                                                        "Retrain on my annotations")
    n_layers = len(viewer.layers)
    for layer, listed in ((second, [5]), (first, [2])):
        again._image.value, again._labels_pick.value = image, layer
        assert again.annotated_slices() == listed
        assert again._pending_restore is None, again._restore_label.value
    again._on_restore()  # nothing offered: nothing restored
    assert len(viewer.layers) == n_layers


def test_undo_and_redo_are_autosaved_and_keep_the_list_true(scene, qtbot):
    """napari's undo / redo emit no paint event: the widget must still save and relist."""
    from napari_medseg.core.session import load_session

    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)  # one step: the liver (the rest is unchanged)
    widget._edited.add(7)  # listed before any stroke here (as after a restore)
    labels.brush_size = 3
    labels.paint((2, 30, 30), 4)  # a second step on slice 2
    labels.paint((7, 10, 10), 3)  # napari's brush: one mask-based step
    labels.paint((5, 10, 10), 3)
    assert widget.annotated_slices() == [2, 5, 7]
    widget._autosave_timer.stop()

    labels.undo()  # the stroke on slice 5: nothing else touched it
    assert widget.annotated_slices() == [2, 7]
    assert widget._autosave_timer.isActive()
    widget.autosave_now(wait=True)
    saved = load_session(widget._key_folder() / widget._session_id)
    np.testing.assert_array_equal(saved.labels, labels.data)
    assert saved.edited == [2, 7]

    labels.undo()  # the stroke on 7: slice 7 was listed before it, so it stays
    labels.undo()  # the second step on slice 2: the first still touches it
    assert widget.annotated_slices() == [2, 7]
    labels.undo()  # slice 2's first step: no step touches it any more
    assert widget.annotated_slices() == [7]
    for _ in range(4):
        labels.redo()  # … up to the stroke on 5
    assert widget.annotated_slices() == [2, 5, 7]

    widget._autosave_timer.stop()
    viewer.dims.set_current_step(0, 3)  # scrolling also emits set_data: no save, no change
    assert not widget._autosave_timer.isActive() and widget.annotated_slices() == [2, 5, 7]


class _Prediction:  # what segment_volume returns, as far as _apply reads it
    def __init__(self, labels):
        self.labels = labels


def test_the_pickers_are_locked_during_a_round_and_its_write_protects_its_own_pair(scene, qtbot):
    from napari_medseg._layers import volume_from_layer

    viewer, image, labels, widget, phantom = scene
    truth = phantom.labels
    _paint_slice(labels, 2, truth)
    widget._seconds.value = 30.0
    widget._run.clicked.emit()
    assert not widget._image.enabled and not widget._labels_pick.enabled
    widget._cancel.clicked.emit()
    _wait(widget, qtbot)
    assert widget._image.enabled and widget._labels_pick.enabled
    # a script may still switch: a late write keeps the slices of the pair it ran on
    other = viewer.add_labels(np.zeros_like(labels.data), name="other", scale=image.scale)
    widget._labels_pick.value = other
    before = np.array(labels.data[2], copy=True)
    widget._apply(_Prediction(np.full(labels.data.shape, 3, np.uint8)), image, labels,
                  volume_from_layer(image), 1, {})
    np.testing.assert_array_equal(labels.data[2], before)
    assert (labels.data[6] == 3).all()


def test_a_round_ending_mid_stroke_writes_after_the_stroke(scene, qtbot):
    from napari_medseg._layers import volume_from_layer

    viewer, image, labels, widget, phantom = scene
    truth = phantom.labels
    _paint_slice(labels, 2, truth)
    labels.brush_size = 5
    with labels.block_history():  # napari's drag: one undo step from press to release
        labels.paint((3, 30, 30), 7)
        widget._apply_checked(_Prediction(np.full(labels.data.shape, 3, np.uint8)), image,
                              labels, volume_from_layer(image), 1, {})
        qtbot.wait(100)
        assert not (labels.data[6] == 3).all(), "no write inside the user's stroke"
        labels.paint((3, 30, 40), 7)
    qtbot.waitUntil(lambda: bool((labels.data[6] == 3).all()), timeout=5000)
    assert widget.annotated_slices() == [2, 3] and labels.data[3, 30, 30] == 7


def test_a_write_waiting_for_a_stroke_is_dropped_when_the_widget_is_closed(scene, qtbot):
    """Closing said the unsaved version was let go; 50 ms after the user let go of the
    stroke, the closed widget wrote that version's prediction into the layer anyway."""
    from napari_medseg._layers import volume_from_layer

    viewer, image, labels, widget, phantom = scene
    dock = viewer.window.add_dock_widget(widget, name="Retrain (test)")
    with labels.block_history():
        labels.paint((3, 30, 30), 7)
        widget._apply_checked(_Prediction(np.full(labels.data.shape, 3, np.uint8)), image,
                              labels, volume_from_layer(image), 1, {})
        viewer.window.remove_dock_widget(dock)
    before = np.array(labels.data, copy=True)
    start = len(notification_manager.records)
    qtbot.wait(300)
    np.testing.assert_array_equal(labels.data, before)
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("was closed" in m and "not written" in m for m in said), said


def test_undo_and_redo_after_switching_layers_keep_the_list_true(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    truth = phantom.labels
    _paint_slice(labels, 2, truth)
    widget._predict.clicked.emit()  # the widget's own write: one undo step
    _wait(widget, qtbot)
    labels.selected_label = 5
    labels.data_setitem((np.array([4]), np.array([10]), np.array([10])), 5)  # a stroke on 4
    assert widget.annotated_slices() == [2, 4]
    labels.undo()  # the only stroke on 4 (the re-prediction before it does not count)
    assert widget.annotated_slices() == [2]
    labels.undo()  # the re-prediction
    other = viewer.add_labels(np.zeros_like(labels.data), name="other", scale=image.scale)
    widget._labels_pick.value = other
    widget._labels_pick.value = labels
    labels.redo()  # still known as the widget's write, not a stroke on every slice
    assert widget.annotated_slices() == [2]


def test_a_labels_layer_off_the_image_grid_is_refused(scene):
    viewer, image, labels, widget, phantom = scene
    truth = phantom.labels
    shifted = viewer.add_labels(np.array(labels.data), name="shifted", scale=image.scale,
                                translate=(image.translate[0] + image.scale[0], 0, 0))
    rotated = viewer.add_labels(np.array(labels.data), name="rotated", scale=image.scale,
                                translate=image.translate, rotate=45)
    for layer in (shifted, rotated):  # rotate is apart from affine in napari: checked too
        widget._labels_pick.value = layer
        _paint_slice(layer, 3, truth)
        start = len(notification_manager.records)
        widget._run.clicked.emit()
        assert widget._worker is None
        assert any("does not lie on" in m for m in _errors_since(start))


def test_labels_replaced_during_a_prediction_are_not_written_into(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    start = len(notification_manager.records)
    widget._predict.clicked.emit()
    labels.data = np.zeros((8, 48, 48), np.uint8)  # the user swaps the layer's array meanwhile
    _wait(widget, qtbot)
    assert not labels.data.any()
    assert not _errors_since(start)
    assert any("changed meanwhile" in str(n.message) for n in notification_manager.records[start:])


def test_a_new_empty_layer_on_an_rgb_image_is_refused_with_a_message(scene):
    viewer, image, labels, widget, phantom = scene
    photo = viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="photo", rgb=True)
    widget._image.value = photo
    n_layers = len(viewer.layers)
    start = len(notification_manager.records)
    widget._new_layer.clicked.emit()
    assert len(viewer.layers) == n_layers
    assert any("RGB" in m for m in _errors_since(start))


def test_a_new_empty_layer_opens_when_the_picked_models_card_is_gone(scene):
    """It read the card for the structure names and raised a traceback instead."""
    viewer, image, labels, widget, phantom = scene
    from pathlib import Path

    Path(widget._model.value).unlink()
    n_layers = len(viewer.layers)
    start = len(notification_manager.records)
    widget._new_layer.clicked.emit()
    assert len(viewer.layers) == n_layers + 1 and not viewer.layers[-1].data.any()
    assert viewer.layers[-1].name == f"annotations · {image.name}"
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("model card not found" in m and "unnamed" in m for m in said), said


def test_saving_under_a_name_too_long_for_the_file_system_says_so(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    widget._predict.clicked.emit()  # v0 listed
    _wait(widget, qtbot)
    start = len(notification_manager.records)
    widget._save_name.value = "a" * 300
    widget._save.clicked.emit()  # Path.exists raised ENAMETOOLONG out of the slot
    assert any("saving failed" in m for m in _errors_since(start))
    assert list(user_models_dir().glob("a*")) == []


def test_two_labels_layers_autosave_to_two_folders(scene):
    from napari_medseg.core.session import load_session

    viewer, image, labels, widget, phantom = scene
    truth = phantom.labels
    _paint_slice(labels, 2, truth)
    widget.autosave_now(wait=True)
    other = viewer.add_labels(np.zeros_like(labels.data), name="other", scale=image.scale)
    widget._labels_pick.value = other
    _paint_slice(other, 5, truth)
    widget.autosave_now(wait=True)
    folders = sorted(p for p in widget._key_folder().iterdir())
    assert len(folders) == 2
    edited = sorted(tuple(load_session(p).edited) for p in folders)
    assert edited == [(2,), (5,)]


def _process_ended(widget):
    """What the system does for a widget when napari's process ends (quit or crash): its
    autosave folders' locks go, and the next run may offer them."""
    widget._release_folders()


def _restarted(make_napari_viewer, phantom):
    """A new viewer and Retrain widget with ``phantom`` picked, as after a restart, and
    the notifications said meanwhile."""
    start = len(notification_manager.records)
    viewer = make_napari_viewer()
    widget = RetrainWidget(plugin_view(viewer))
    widget._image.value = _open(viewer, phantom)
    return widget, [str(n.message) for n in notification_manager.records[start:]]


def _autosaved_slice_2(make_napari_viewer, random_models, small_phantom):
    """A Retrain widget on the phantom with slice 2 painted and autosaved."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    _paint_slice(labels, 2, small_phantom.labels)
    widget.autosave_now(wait=True)
    return viewer, image, labels, widget


def test_restore_is_not_offered_for_another_image_of_the_same_name_and_shape(
        make_napari_viewer, random_models, small_phantom):
    """Two patients' files are both named "ct" and have the same shape: one's autosave
    must not be offered (and put) onto the other."""
    from napari_medseg.core.phantom import generate_phantom

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    _process_ended(widget)

    other = generate_phantom(small_phantom.volume.shape, small_phantom.volume.spacing, seed=6,
                             n_lesions=1)
    viewer2 = make_napari_viewer()
    image2 = _open(viewer2, other)
    image2.name = image.name  # two files both called "ct"
    assert image2.name == image.name and image2.data.shape == image.data.shape
    widget2 = RetrainWidget(plugin_view(viewer2))
    widget2._image.value = image2
    assert widget2._pending_restore is None and widget2._restore_box.native.isHidden()
    # the same scan opened again is still offered its autosave
    viewer3 = make_napari_viewer()
    widget3 = RetrainWidget(plugin_view(viewer3))
    widget3._image.value = _open(viewer3, small_phantom)
    assert widget3._pending_restore is not None


def test_restore_offers_the_newest_autosave_made_after_a_rename(
        make_napari_viewer, random_models, small_phantom):
    """Autosaves follow the layer name: after a rename they went to another folder, and a
    restart under the old name offered the older autosave as the newest."""
    import time

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    time.sleep(1.1)  # saved_at has one-second resolution
    image.name = "ct liver phase"
    _paint_slice(labels, 5, small_phantom.labels)
    widget.autosave_now(wait=True)
    _process_ended(widget)

    viewer2 = make_napari_viewer()
    widget2 = RetrainWidget(plugin_view(viewer2))
    widget2._image.value = _open(viewer2, small_phantom)  # opened under its first name
    assert "(2 slices)" in widget2._restore_label.value, widget2._restore_label.value


def test_a_failing_autosave_is_said_until_one_succeeds(scene, qtbot, monkeypatch, tmp_path):
    viewer, image, labels, widget, phantom = scene
    start = len(notification_manager.records)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(blocker))  # sessions cannot be created there
    _paint_slice(labels, 2, phantom.labels)
    widget.autosave_now(wait=True)
    qtbot.waitUntil(lambda: widget._autosave_error is not None, timeout=5000)
    warnings = [str(n.message) for n in notification_manager.records[start:]
                if "autosave FAILED" in str(n.message)]
    alert = widget._autosave_alert
    assert len(warnings) == 1 and "Autosave failed (Not a directory)" in alert.value
    assert not alert.native.isHidden()
    widget.autosave_now(wait=True)  # the same failure again: said once
    qtbot.wait(50)
    assert len([n for n in notification_manager.records[start:]
                if "autosave FAILED" in str(n.message)]) == 1
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home-ok"))
    widget.autosave_now(wait=True)
    qtbot.waitUntil(lambda: widget._autosave_error is None, timeout=5000)
    assert alert.native.isHidden()
    assert any("autosave works again" in str(n.message)
               for n in notification_manager.records[start:])


def test_a_failing_autosave_neither_hides_nor_is_hidden_by_a_rounds_result(
        scene, qtbot, monkeypatch, tmp_path):
    """Both used the status line: the round's progress hid the failure, and the next
    failed autosave, 1.5 s after the round, replaced its result (steps, held-out Dice)."""
    viewer, image, labels, widget, phantom = scene
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(blocker))
    _paint_slice(labels, 2, phantom.labels)
    _paint_slice(labels, 5, phantom.labels)
    widget.autosave_now(wait=True)
    qtbot.waitUntil(lambda: widget._autosave_error is not None, timeout=5000)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    result = widget._status.value
    assert result.startswith("v1:"), result
    widget.autosave_now(wait=True)  # fails again after the round
    qtbot.wait(50)
    assert widget._status.value == result
    assert "Autosave failed" in widget._autosave_alert.value
    assert not widget._autosave_alert.native.isHidden()


def test_closing_the_viewer_during_a_round_raises_nothing(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    _paint_slice(labels, 5, phantom.labels)
    viewer.window.add_dock_widget(widget)  # docked: closing the viewer deletes its Qt objects
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    qtbot.wait(300)  # progress reports are flowing
    viewer.close()  # the loss curve and status line are deleted while the round runs
    _wait(widget, qtbot)
    qtbot.wait(50)
    assert not _errors_since(start)


def test_a_multiscale_labels_layer_is_refused_as_such(scene):
    viewer, image, labels, widget, phantom = scene
    pyramid = viewer.add_labels([np.array(labels.data), np.array(labels.data[:, ::2, ::2])],
                                name="pyramid", scale=image.scale, translate=image.translate)
    widget._labels_pick.value = pyramid
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    assert widget._worker is None
    errors = _errors_since(start)
    assert any("'pyramid' is multiscale" in m for m in errors), errors


def test_a_lazy_image_is_read_in_the_worker_and_checked_before_it(
        make_napari_viewer, qtbot, random_models, small_phantom, lazy_image):
    viewer = make_napari_viewer()
    image, readers = lazy_image(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    widget._fingerprint(image)  # the autosave's sample of the image, read once per array
    # checked before any read: a slice painted with background only is refused at once
    readers.clear()
    start = len(notification_manager.records)
    labels.data[0] = 0
    widget._edited = {0}
    widget._run.clicked.emit()
    assert widget._worker is None and not readers
    assert any("only background" in m for m in _errors_since(start)), _errors_since(start)
    _paint_slice(labels, 2, small_phantom.labels)
    _paint_slice(labels, 5, small_phantom.labels)
    before = np.array(labels.data, copy=True)
    readers.clear()
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    assert readers and not any(readers)  # every chunk was read by the worker
    assert len(widget._history.versions) == 2
    np.testing.assert_array_equal(labels.data[[2, 5]], before[[2, 5]])
    assert not np.array_equal(np.delete(labels.data, [2, 5], 0), np.delete(before, [2, 5], 0))


def test_a_stroke_pushed_out_of_the_undo_history_stays_listed_whatever_is_undone(scene, qtbot):
    """napari keeps 100 undo steps. An undo unlisted a slice whose first stroke had been
    pushed out of them though its paint stayed, and a re-predict then overwrote it."""
    viewer, image, labels, widget, phantom = scene
    labels.brush_size = 3
    labels.paint((3, 40, 40), 7)  # the user's correction on slice 3
    kept = labels.data[3] == 7
    for i in range(110):  # more strokes elsewhere than napari keeps undo steps for
        labels.paint((5 + i % 2, 10 + i % 50, 10 + 30 * (i // 50)), 4 + i % 2)
    assert len(labels._undo_history) == labels._undo_history.maxlen
    labels.paint((3, 70, 70), 6)
    labels.undo()  # only the second stroke on slice 3
    assert 3 in widget.annotated_slices()
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert (labels.data[3][kept] == 7).all()


def test_strokes_made_while_another_layer_is_picked_are_listed_when_it_is_picked_back(
        scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    other = viewer.add_labels(np.zeros_like(labels.data), name="other", scale=image.scale,
                              translate=image.translate)
    widget._labels_pick.value = other
    labels.brush_size = 4
    labels.paint((5, 40, 40), 7)  # napari's selected layer is not the widget's pick
    widget._labels_pick.value = labels
    assert widget.annotated_slices() == [2, 5]
    painted = labels.data[5] == 7
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert (labels.data[5][painted] == 7).all()
    # the widget's own write, undone and redone, is still not the user's
    labels.undo()
    labels.redo()
    assert widget.annotated_slices() == [2, 5]


def test_a_round_whose_layer_was_removed_still_says_what_it_made(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    widget._run.clicked.emit()
    qtbot.wait(300)
    viewer.layers.remove(labels)
    _wait(widget, qtbot)
    assert widget._status.value.startswith("v1: ")
    assert "prediction not written" in widget._status.value


def test_a_stroke_pushed_out_while_another_layer_was_picked_stays_listed(scene, qtbot):
    viewer, image, labels, widget, phantom = scene
    labels.brush_size = 3
    labels.paint((3, 40, 40), 7)
    kept = labels.data[3] == 7
    other = viewer.add_labels(np.zeros_like(labels.data), name="other", scale=image.scale,
                              translate=image.translate)
    widget._labels_pick.value = other
    for i in range(110):  # while away: the first stroke falls out of napari's history
        labels.paint((5 + i % 2, 10 + i % 50, 10 + 30 * (i // 50)), 4 + i % 2)
    widget._labels_pick.value = labels
    labels.paint((3, 70, 70), 6)
    labels.undo()
    assert 3 in widget.annotated_slices()
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert (labels.data[3][kept] == 7).all()


def test_steady_painting_is_autosaved_while_it_goes_on(scene, qtbot, monkeypatch):
    """Each change restarted the autosave timer: a stroke every second under a 1.5 s
    delay saved nothing until the user paused (a crash meanwhile lost every stroke)."""
    import time

    import napari_medseg._widgets._retrain_base as retrain_module

    monkeypatch.setattr(retrain_module, "AUTOSAVE_DELAY_MS", 300)
    viewer, image, labels, widget, phantom = scene
    saves = []
    widget._autosave_timer.timeout.connect(lambda: saves.append(time.monotonic()))
    start = time.monotonic()
    for z in range(8):  # a stroke every 0.2 s, for 1.6 s: never a 0.3 s pause
        _paint_slice(labels, z, phantom.labels)
        qtbot.wait(200)
    assert saves and saves[0] - start < 0.9, "saved while the painting went on"


def test_a_restored_layer_keeps_the_name_of_a_new_structure(make_napari_viewer, random_models,
                                                            small_phantom):
    """The user named value 9 "stomach" in the layer's features; the restored layer took
    its names from the model card only, so the next round called it structure_9."""
    import pandas as pd

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    labels.features = pd.concat([labels.features, pd.DataFrame({"index": [9], "name": ["stomach"]})],
                                ignore_index=True)
    labels.data_setitem((np.array([3, 3]), np.array([5, 6]), np.array([5, 5])), 9)
    widget.autosave_now(wait=True)
    _process_ended(widget)

    viewer2 = make_napari_viewer()
    image2 = _open(viewer2, small_phantom)
    widget2 = RetrainWidget(plugin_view(viewer2))
    widget2._image.value = image2
    widget2._model.value = random_models["RecurrentSegmenter"]
    widget2._restore.clicked.emit()
    restored = widget2._labels_pick.value
    assert widget2._layer_class_names(restored)[9] == "stomach"


def test_an_image_removed_and_opened_again_keeps_its_slices_protected(scene, qtbot):
    """The lists were kept under the removed image layer: opened again (a new layer
    object) it had none, so a re-prediction overwrote the painted slices."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    _paint_slice(labels, 5, phantom.labels)
    data, kwargs = image.data, dict(name=image.name, scale=image.scale, translate=image.translate)
    viewer.layers.remove(image)
    again = viewer.add_image(data, **kwargs)
    widget._image.value = again
    assert widget.annotated_slices() == [2, 5]
    painted = np.array(labels.data[[2, 5]])
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    np.testing.assert_array_equal(labels.data[[2, 5]], painted)
    other = viewer.add_image(data + 1.0, name="another scan", scale=image.scale)
    widget._image.value = other  # other voxels: not the lists of that image
    assert widget.annotated_slices() == []


def test_replacing_the_layers_data_is_autosaved(scene):
    """napari's ``layer.data = new`` adds no undo step and emits what scrolling emits:
    it was saved only with the next stroke (a crash before it lost the new data)."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    widget.autosave_now(wait=True)
    widget._autosave_timer.stop()
    viewer.dims.set_current_step(0, 3)  # scrolling alone schedules nothing
    assert not widget._autosave_timer.isActive()
    new = np.array(labels.data)
    new[4] = 7
    labels.data = new
    assert widget._autosave_timer.isActive()
    widget.autosave_now(wait=True)
    widget._autosave_timer.stop()
    # the console idiom: the same array edited in place, then given back to the layer
    same = labels.data
    same[5] = 7
    labels.data = same
    assert widget._autosave_timer.isActive()


def test_a_newer_autosave_without_annotations_does_not_hide_older_work(
        make_napari_viewer, random_models, small_phantom):
    """A session that only ran Predict then quit autosaved "(0 slices)", and the restore
    offer showed that one; the 5 slices of the session before were reachable by Discard."""
    import time

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    _process_ended(widget)
    time.sleep(1.1)  # saved_at has one-second resolution
    viewer_b = make_napari_viewer()
    image_b = _open(viewer_b, small_phantom)
    labels_b = _prediction_layer(viewer_b, image_b, small_phantom.labels)
    widget_b = _widget(viewer_b, image_b, labels_b, random_models["RecurrentSegmenter"])
    widget_b.autosave_now(wait=True)  # nothing annotated in this session
    _process_ended(widget_b)

    viewer3 = make_napari_viewer()
    widget3 = RetrainWidget(plugin_view(viewer3))
    widget3._image.value = _open(viewer3, small_phantom)
    assert "(1 slice)" in widget3._restore_label.value, widget3._restore_label.value
    assert "1 other autosave of this image" in widget3._restore_label.value
    widget3._restore.clicked.emit()
    assert widget3.annotated_slices() == [2]


def test_a_second_viewer_neither_offers_nor_discards_an_open_widgets_autosave(
        make_napari_viewer, random_models, small_phantom):
    """Discard in a second viewer deleted the first viewer's live autosave: a crash
    there then lost its slices."""
    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    live = widget._key_folder() / widget._session_id
    viewer2 = make_napari_viewer()
    widget2 = RetrainWidget(plugin_view(viewer2))
    widget2._image.value = _open(viewer2, small_phantom)
    assert widget2._pending_restore is None and widget2._restore_box.native.isHidden()
    widget2._pending_restore = live  # as if offered the moment before the first one wrote
    widget2._discard.clicked.emit()
    assert (live / "session.json").is_file()
    _process_ended(widget)  # the first window's process ends: its autosave is offered
    widget3 = RetrainWidget(plugin_view(viewer2))
    widget3._image.value = widget2._image.value
    assert widget3._pending_restore == live


def test_discard_that_cannot_delete_the_autosave_is_said_and_stops_offering_it(
        make_napari_viewer, random_models, small_phantom, monkeypatch):
    """A sessions folder the user cannot write to (left by a run as another user, a
    read-only mount) raised OSError through the button's callback and kept the offer."""
    import napari_medseg._widgets._retrain_base as base

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    _process_ended(widget)
    viewer2 = make_napari_viewer()
    widget2 = RetrainWidget(plugin_view(viewer2))
    widget2._image.value = _open(viewer2, small_phantom)
    offered = widget2._pending_restore
    assert offered is not None

    def refused(folder):
        raise PermissionError(13, "Permission denied", str(folder / "session.json"))

    monkeypatch.setattr(base, "discard_session", refused)
    start = len(notification_manager.records)
    widget2._discard.clicked.emit()
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("could not be deleted (Permission denied)" in m for m in said), said
    assert (offered / "session.json").is_file()  # nothing lost
    assert widget2._pending_restore is None and widget2._restore_box.native.isHidden()


def test_an_unreadable_sessions_folder_is_said_when_looking_for_autosaves(
        make_napari_viewer, random_models, small_phantom, monkeypatch):
    """Listing the sessions folder raised through the image picker's callback."""
    from pathlib import Path

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    _process_ended(widget)

    real_iterdir = Path.iterdir

    def refused(self):
        if "sessions" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    widget2, said = _restarted(make_napari_viewer, small_phantom)
    assert widget2._pending_restore is None
    assert any("cannot look for autosaves" in m and "Permission denied" in m for m in said)


def test_snapshots_taken_while_a_write_runs_are_written_once_newest_first(
        scene, monkeypatch):
    """Each autosave was a thread waiting on one lock, served in no set order: an older
    snapshot written last replaced the newer autosave, and behind slow writes of a large
    layer the threads (each holding a copy of the layer) piled up without bound."""
    from napari_medseg._widgets import _retrain_base
    from napari_medseg.core.session import load_session

    viewer, image, labels, widget, phantom = scene
    started, written = [], []

    class Held:  # a thread that runs only when the test says
        def __init__(self, target, name):
            self.run = target
            started.append(self)

        def start(self):
            pass

        def join(self):
            pass

    real_save = _retrain_base.save_session
    monkeypatch.setattr(_retrain_base, "save_session",
                        lambda target, session: (written.append(list(session.edited)),
                                                 real_save(target, session)))
    monkeypatch.setattr(_retrain_base.threading, "Thread", Held)
    for z in (2, 3, 5):  # three snapshots while the writer has not run
        _paint_slice(labels, z, phantom.labels)
        widget.autosave_now()
    assert len(started) == 1  # one writer, holding one pending snapshot
    started[0].run()
    assert written == [[2, 3, 5]]
    (folder,) = widget._key_folder().iterdir()
    assert load_session(folder).edited == [2, 3, 5]
    _paint_slice(labels, 4, phantom.labels)
    widget.autosave_now()  # the writer finished: the next snapshot starts another
    assert len(started) == 2


def test_an_autosave_failing_in_any_way_is_said(scene, monkeypatch, qtbot):
    """A MemoryError in the writer thread went to stderr only: the user kept painting
    believing the work was saved."""
    from napari_medseg._widgets import _retrain_base

    viewer, image, labels, widget, phantom = scene

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(_retrain_base, "save_session", no_memory)
    _paint_slice(labels, 2, phantom.labels)
    widget.autosave_now(wait=True)
    qtbot.waitUntil(lambda: widget._autosave_error == "MemoryError", timeout=5_000)


def test_strokes_on_a_labels_layer_off_the_image_grid_are_said_not_autosaved(
        make_napari_viewer, random_models, small_phantom, qtbot):
    """The slice was listed and the timer ran, but nothing was written and nothing said."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    other = viewer.add_labels(np.zeros((4, 96, 96), np.uint8), name="small", scale=image.scale)
    widget = _widget(viewer, image, other, random_models["RecurrentSegmenter"])
    start = len(notification_manager.records)
    other.data_setitem((np.array([1, 1]), np.array([5, 6]), np.array([5, 5])), 2)
    assert widget.annotated_slices() == [1]
    widget.autosave_now(wait=True)
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("autosave FAILED" in m and "(4, 96, 96)" in m for m in said), said
    assert widget._autosave_alert.value.startswith("⚠ Autosave failed")


def test_a_damaged_autosave_is_said_and_the_next_older_one_is_offered(
        make_napari_viewer, random_models, small_phantom):
    """A damaged record was skipped in silence, and a damaged newest autosave left
    "cannot restore" with the older intact one unreachable."""
    viewer, image, labels, old_widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                           small_phantom)
    older = old_widget._key_folder() / old_widget._session_id
    _process_ended(old_widget)
    viewer_b, image_b, labels_b, widget_b = _autosaved_slice_2(make_napari_viewer, random_models,
                                                               small_phantom)
    _paint_slice(labels_b, 5, small_phantom.labels)
    widget_b.autosave_now(wait=True)
    _process_ended(widget_b)
    newer = widget_b._key_folder() / widget_b._session_id
    data = next(newer.glob("annotations*.npz"))
    data.write_bytes(data.read_bytes()[:-100])  # the newest one's data damaged

    viewer2 = make_napari_viewer()
    widget2 = RetrainWidget(plugin_view(viewer2))
    widget2._image.value = _open(viewer2, small_phantom)
    assert widget2._pending_restore == newer
    start = len(notification_manager.records)
    widget2._restore.clicked.emit()
    assert any("next older autosave is offered" in m for m in _errors_since(start))
    assert widget2._pending_restore == older and "(1 slice)" in widget2._restore_label.value
    widget2._restore.clicked.emit()
    assert widget2.annotated_slices() == [2]
    widget2._save_thread.join()  # the restored autosave now lies in widget2's folder
    (kept,) = widget2._folder_locks
    _process_ended(widget2)

    record = kept / "session.json"  # now its record is damaged: said, not skipped silently
    record.write_text(record.read_text()[:-40])
    viewer3 = make_napari_viewer()
    start = len(notification_manager.records)
    widget3 = RetrainWidget(plugin_view(viewer3))
    widget3._image.value = _open(viewer3, small_phantom)
    warned = [str(n.message) for n in notification_manager.records[start:]
              if "cannot be read" in str(n.message)]
    assert len(warned) == 1 and str(kept) in warned[0]


def test_a_round_shows_its_progress_in_the_widget_not_in_naparis_activity_dock(scene, qtbot,
                                                                            monkeypatch):
    """While a napari progress bar exists napari animates an "in progress" image; under
    software OpenGL it cost a time-budgeted round half its steps."""
    from napari_medseg import _jobs

    made = []
    real = _jobs.progress
    monkeypatch.setattr(_jobs, "progress", lambda *a, **k: made.append(k) or real(*a, **k))
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    bar = widget._round_progress
    seen = []
    bar.changed.connect(seen.append)
    widget._run.clicked.emit()
    assert not bar.native.isHidden()
    qtbot.waitUntil(lambda: bar.value > 0 or widget._worker is None, timeout=60_000)
    _wait(widget, qtbot)
    assert bar.native.isHidden() and len(widget._history.versions) == 2
    # one bar over the round (it followed each phase's own steps: 0–100, then again)
    assert seen[1:] == sorted(seen[1:]) and max(seen) > 0
    assert made == []  # no napari progress bar for the round
    widget._predict.clicked.emit()  # a prediction (fixed work) keeps napari's bar
    _wait(widget, qtbot)
    assert len(made) == 1


def test_a_round_starts_from_what_its_version_last_predicted(scene, qtbot, monkeypatch):
    """A round passed over the whole volume to find what its model predicts, which the
    widget had just computed when it re-predicted with that version: on a long series,
    seconds of each round. The next round now gets it, and only while it is still true
    of the voxels the round reads."""
    from napari_medseg._layers import volume_from_layer
    from napari_medseg.core.inference import segment_volume
    from napari_medseg.core.progress import run_to_completion

    from napari_medseg.core.finetune import finetune_segmenter

    viewer, image, labels, widget, phantom = scene
    given = []

    def recording(volume, model, card, labels, slices, seconds, version, names,
                  model_output=None):
        given.append(model_output)
        # two steps, not a time budget: the rounds' training is not what is tested here
        return finetune_segmenter(volume, model, card, labels, slices, steps=2,
                                  version=version, class_names=names,
                                  model_labels=model_output)

    monkeypatch.setattr(RetrainWidget, "_finetune", staticmethod(recording))

    def round_given():
        widget._run.clicked.emit()
        _wait(widget, qtbot)
        return given[-1]

    _paint_slice(labels, 2, phantom.labels)
    _paint_slice(labels, 5, phantom.labels)
    assert round_given() is None  # v1: nothing known yet
    kept = round_given()  # v2 starts from v1's re-prediction
    model1, card1 = widget._history.model(1)
    v1_output = run_to_completion(segment_volume(volume_from_layer(image), model1, card1)).labels
    np.testing.assert_array_equal(kept, v1_output)
    image.data = np.array(image.data, copy=True)  # the same voxels in a new array: still true
    assert round_given() is not None
    # the voxels edited in place (as when a prediction finished on data replaced
    # meanwhile): the kept output belongs to other voxels and is not used
    image.data[:] = image.data[:, ::-1, ::-1].copy()
    image.refresh()
    assert round_given() is None
    widget._versions.value = 1
    widget._revert.clicked.emit()  # another version than the one last predicted with
    assert round_given() is None
    image.scale = (image.scale[0] * 2, *image.scale[1:])  # another spacing
    assert round_given() is None
    viewer.layers.remove(image)  # its image gone: its prediction is not kept alive
    assert widget._model_output is None


def test_another_scan_loaded_into_the_image_layer_gets_its_own_lists_and_autosave(
        make_napari_viewer, random_models, small_phantom, qtbot):
    """Replacing the image layer's data (another scan of the same name and shape) kept
    the first scan's slice list, and its autosave went into the same folder under the
    second scan's fingerprint: the first scan's restore offer was lost and the second
    was offered the first's slices."""
    from napari_medseg.core.phantom import generate_phantom

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    scan_a = image.data
    scan_b = generate_phantom(small_phantom.volume.shape, small_phantom.volume.spacing,
                              seed=6, n_lesions=1).volume.array
    _paint_slice(labels, 4, small_phantom.labels)  # pending autosave: scan A's
    assert widget.annotated_slices() == [2, 4]
    image.data = scan_b
    assert widget.annotated_slices() == []
    _paint_slice(labels, 5, small_phantom.labels)
    assert widget.annotated_slices() == [5]
    widget.autosave_now(wait=True)
    _process_ended(widget)
    # a restart: scan A is offered its own slices 2 and 4, scan B its slice 5
    for data, expected in ((scan_a, "(2 slices)"), (scan_b, "(1 slice)")):
        fresh = make_napari_viewer()
        opened = _open(fresh, small_phantom)
        opened.data = data
        restarted = RetrainWidget(plugin_view(fresh))
        restarted._image.value = opened
        assert restarted._pending_restore is not None, expected
        assert expected in restarted._restore_label.value
    # switching the data back brings scan A's list back
    image.data = scan_a
    assert widget.annotated_slices() == [2, 4]
    image.data = scan_b
    assert widget.annotated_slices() == [5]


@pytest.mark.parametrize("damage", [5, [[1]], "2", [True]])
def test_an_autosave_whose_slice_lists_are_not_lists_of_slices_is_said_not_offered(
        make_napari_viewer, random_models, small_phantom, damage):
    """Picking the image raised (EmitLoopError: 'int' object is not iterable) when an
    autosave record's slice list had another type; nothing was offered or said."""
    import json

    viewer, image, labels, widget = _autosaved_slice_2(make_napari_viewer, random_models,
                                                       small_phantom)
    _process_ended(widget)
    record = next(widget._key_folder(image).glob("*/session.json"))
    meta = json.loads(record.read_text())
    meta["edited"] = damage
    record.write_text(json.dumps(meta))
    restarted, said = _restarted(make_napari_viewer, small_phantom)
    assert restarted._pending_restore is None
    assert any("cannot be read" in m and "damaged" in m for m in said), said


def test_a_closed_widget_autosaves_its_last_strokes_and_follows_the_layer_no_more(scene, qtbot):
    """napari's close button takes a dock widget out of its dock and opens a new instance
    next time: the old one kept tracking and autosaving, and its last strokes (autosave
    pending) were missing from the new widget's restore offer. The new one now takes its
    lists over (and that autosave with them)."""
    from napari_medseg.core.session import read_meta

    viewer, image, labels, widget, ph = scene
    dock = viewer.window.add_dock_widget(widget, name="Retrain (test)")
    _paint_slice(labels, 2, ph.labels)
    assert widget._autosave_timer.isActive()  # the stroke's autosave is still pending
    viewer.window.remove_dock_widget(dock)
    assert not widget._autosave_timer.isActive() and widget._shut
    saved = [p for p in widget._key_folder().iterdir() if (p / "session.json").exists()]
    assert [read_meta(p)["edited"] for p in saved] == [[2]], "the last strokes were not saved"
    again = _widget(viewer, image, labels, widget._model.value)
    assert again._pending_restore is None and again._edited == {2}
    _paint_slice(labels, 5, ph.labels)
    assert widget._edited == {2} and again._edited == {2, 5}
    again.autosave_now(wait=True)
    saved = [p for p in again._key_folder().iterdir() if (p / "session.json").exists()]
    assert [read_meta(p)["edited"] for p in saved] == [[2, 5]]  # one autosave, both slices


def test_closing_the_window_writes_a_pending_autosave(make_napari_viewer, random_models,
                                                      small_phantom):
    """The viewer removes its layers as it closes, which ends the pair and saves."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    viewer.window.add_dock_widget(widget, name="Retrain (test)")
    _paint_slice(labels, 2, small_phantom.labels)
    folder = widget._key_folder()
    viewer.close()  # within the autosave delay of the stroke
    sessions = [p for p in folder.iterdir() if (p / "session.json").exists()]
    from napari_medseg.core.session import read_meta

    assert len(sessions) == 1 and read_meta(sessions[0])["edited"] == [2]


def test_closing_the_window_by_its_button_writes_a_pending_autosave(scene):
    """The close button (or Ctrl+W, Ctrl+Q) closes the main window without removing the
    layers, and deletes the widget's timer before the application quits: the strokes of
    the last 1.5 s were in no autosave."""
    from napari_medseg.core.session import read_meta

    viewer, image, labels, widget, ph = scene
    viewer.window.add_dock_widget(widget, name="Retrain (test)")
    _paint_slice(labels, 2, ph.labels)
    assert widget._autosave_timer.isActive()  # the stroke's autosave is still pending
    folder = widget._key_folder()
    window = widget.native.window()
    assert window is not widget.native and window.parent() is None  # the main window
    window.close()  # what the close button does; the layers stay
    assert labels in viewer.layers
    sessions = [p for p in folder.iterdir() if (p / "session.json").exists()]
    assert len(sessions) == 1 and read_meta(sessions[0])["edited"] == [2]


def test_an_autosave_is_written_by_a_thread_the_interpreter_waits_for(scene):
    """A daemon thread was stopped halfway when the interpreter exited right after the
    window closed (napari's own exit): nothing was written for a large scan."""
    viewer, image, labels, widget, ph = scene
    _paint_slice(labels, 2, ph.labels)
    widget.autosave_now()
    assert widget._save_thread is not None and not widget._save_thread.daemon
    widget._save_thread.join()


def test_a_re_predict_that_changes_nothing_leaves_the_last_stroke_the_users(scene, qtbot):
    """With no voxel changed napari adds no undo step, and the widget took the user's
    last stroke for its own write: an undo of a later stroke unlisted the slice, and the
    next re-predict overwrote the painting."""
    viewer, image, labels, widget, ph = scene
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    ys, xs = np.nonzero(ph.labels[2] == 2)
    labels.data_setitem((np.full(len(ys), 2), ys, xs), 2)  # the user's stroke on slice 2
    mine = np.array(labels.data[2], copy=True)
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert "(0 voxels changed)" in widget._status.value  # and no Ctrl+Z to offer
    labels.data_setitem((np.array([2]), np.array([0]), np.array([0])), 5)  # another stroke
    labels.undo()  # … undone: the first stays
    assert widget.annotated_slices() == [2]
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    np.testing.assert_array_equal(labels.data[2], mine)


def test_painting_while_the_image_is_away_is_listed_when_it_is_back(scene, qtbot):
    """The image layer removed (to be opened again), a stroke on the labels went into the
    lists of (no image, layer), which were dropped when the image came back: the slice
    was unprotected and the next round overwrote it."""
    viewer, image, labels, widget, ph = scene
    _paint_slice(labels, 2, ph.labels)
    viewer.layers.remove(image)
    labels.data_setitem((np.full(10, 4), np.arange(10), np.arange(10)), 3)
    viewer.layers.insert(0, image)
    assert widget._image.value is image and widget.annotated_slices() == [2, 4]
    before = np.array(labels.data[4], copy=True)
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    np.testing.assert_array_equal(labels.data[4], before)


def test_a_closed_widget_docked_again_follows_its_layer_again(scene):
    viewer, image, labels, widget, ph = scene
    dock = viewer.window.add_dock_widget(widget, name="Retrain (test)")
    viewer.window.remove_dock_widget(dock)
    _paint_slice(labels, 2, ph.labels)
    assert widget._edited == set()
    viewer.window.add_dock_widget(widget, name="Retrain (test)")
    _paint_slice(labels, 5, ph.labels)
    assert not widget._shut and 5 in widget._edited


@pytest.mark.parametrize("seed", [0, 4])
def test_a_slice_holding_a_live_stroke_stays_listed_through_undo_redo_and_repredictions(
        scene, seed):
    """The cache of a history step's slices was keyed by the id() of a list napari frees
    on every undo and redo: a new stroke's list took over a re-prediction's cached slices,
    and an undo unlisted a slice that still held the user's paint (the next re-predict
    overwrote it), or left undone slices listed. A seeded walk of strokes, undos, redos
    and re-predictions against a mirror of napari's history."""
    import random

    from napari_medseg._layers import volume_from_layer

    viewer, image, labels, widget, phantom = scene
    rng, volume = random.Random(seed), volume_from_layer(image)
    undo, redo = [], []  # z of each user stroke in napari's history; None: a re-prediction
    for step in range(60):
        op = rng.choice(["stroke", "stroke", "undo", "undo", "redo", "predict"])
        depth = len(labels._undo_history)
        if op == "stroke":
            z, y, x, v = (rng.randrange(labels.data.shape[0]), rng.randrange(40),
                          rng.randrange(40), rng.randrange(1, 7))
            labels.data_setitem((np.array([z] * 3), np.array([y, y + 1, y + 2]),
                                 np.array([x] * 3)), v)
            if len(labels._undo_history) != depth:
                undo.append(z)
                redo.clear()
        elif op == "undo" and undo:
            labels.undo()
            redo.append(undo.pop())
        elif op == "redo" and redo:
            labels.redo()
            undo.append(redo.pop())
        elif op == "predict":
            made = np.random.default_rng(step).integers(0, 7, labels.data.shape).astype(np.uint8)
            widget._apply(_Prediction(made), image, labels, volume, 1, {})
            if len(labels._undo_history) != depth:
                undo.append(None)
                redo.clear()
        assert set(widget.annotated_slices()) == {z for z in undo if z is not None}, (step, op)


def test_mark_current_is_refused_while_the_slices_run_across_the_view(scene):
    """With the axes reordered (a coronal plane shown, y on the slider) it marked the
    last axial slice looked at as checked: training truth nobody had reviewed."""
    viewer, image, labels, widget, phantom = scene
    viewer.dims.set_current_step(0, 3)
    viewer.dims.order = (1, 0, 2)
    start = len(notification_manager.records)
    widget._mark_current()
    assert widget.annotated_slices() == []
    assert any("axes reordered" in m for m in _errors_since(start))
    viewer.dims.order = (0, 1, 2)
    viewer.dims.ndisplay = 3  # no slider shows the slice then: it marked one never seen
    widget._mark_current()
    assert widget.annotated_slices() == []
    assert any("3D view" in m for m in _errors_since(start))
    viewer.dims.ndisplay = 2
    widget._mark_current()
    assert widget.annotated_slices() == [3]


def test_an_autosave_copies_only_the_slices_changed_since_the_last(scene):
    """Each autosave copied the whole layer on napari's thread (0.1-1.3 s of a 300 x
    512 x 512 int32 layer, every 1.5 s while the user painted); it now shares the slices
    that did not change with the autosave before and still saves every voxel."""
    from napari_medseg.core.session import SliceStack, load_session

    viewer, image, labels, widget, phantom = scene
    labels.data_setitem((np.array([2, 2]), np.array([10, 11]), np.array([10, 10])), 7)
    first = widget._session(labels, image).labels
    labels.data_setitem((np.array([5]), np.array([20]), np.array([30])), 7)
    second = widget._session(labels, image).labels
    assert isinstance(second, SliceStack)
    assert [z for z in range(labels.data.shape[0])
            if second.slices[z] is not first.slices[z]] == [5]
    assert np.asarray(first)[5, 20, 30] != 7 and np.asarray(second)[5, 20, 30] == 7
    labels.data_setitem((np.array([5]), np.array([21]), np.array([30])), 7)
    widget.autosave_now(wait=True)
    saved = load_session(widget._key_folder() / widget._session_id)
    np.testing.assert_array_equal(saved.labels, labels.data)


def test_two_layers_autosaved_on_one_image_are_both_offered_after_a_crash(
        make_napari_viewer, random_models, small_phantom):
    """Each Labels layer has its own autosave, but only the newest was offered: once it
    was restored (and saved again, newer), the other layer's work was never offered."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    first = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, first, random_models["RecurrentSegmenter"])
    _paint_slice(first, 2, np.full_like(small_phantom.labels, 3))
    widget.autosave_now(wait=True)
    second = viewer.add_labels(np.zeros_like(first.data), name="second", scale=image.scale)
    widget._labels_pick.value = second
    _paint_slice(second, 5, np.full_like(small_phantom.labels, 4))
    widget.autosave_now(wait=True)
    first_data, second_data = np.array(first.data), np.array(second.data)
    _process_ended(widget)

    restarted, _ = _restarted(make_napari_viewer, small_phantom)
    restored = []
    for _ in range(2):
        assert not restarted._restore_box.native.isHidden()
        restarted._restore.clicked.emit()
        restarted._save_thread.join()
        restored.append(np.array(restarted._labels_pick.value.data))
    # both restored: nothing left to offer
    assert restarted._pending_restore is None and restarted._restore_box.native.isHidden()
    assert np.array_equal(restored[0], second_data)  # the newest first
    assert np.array_equal(restored[1], first_data)


def _repredict(widget, image, labels, value):
    """The widget's own re-predict write (every unlisted slice set to ``value``)."""
    from napari_medseg._layers import volume_from_layer

    widget._apply(_Prediction(np.full(labels.data.shape, value, np.uint8)), image, labels,
                  volume_from_layer(image), 1, {})


def _another_labels_layer(viewer, image, labels):
    return viewer.add_labels(np.zeros_like(labels.data), name="other", scale=image.scale,
                             translate=image.translate)


def test_a_repredict_redone_while_another_layer_is_picked_lists_no_slice(scene):
    """Taken for a user's stroke made while away, it listed every slice it wrote: the next
    round trained on the model's own output everywhere."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    _repredict(widget, image, labels, 3)
    labels.undo()
    widget._labels_pick.value = _another_labels_layer(viewer, image, labels)
    labels.redo()  # redone while away
    widget._labels_pick.value = labels
    assert widget.annotated_slices() == [2]


def test_a_repredict_redone_after_a_slice_was_marked_correct_leaves_that_slice(scene):
    """Marking a slice correct changes no data, so napari kept the undone re-predict in its
    redo history: redone, it wrote the model's output over the slice marked correct."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    _repredict(widget, image, labels, 3)
    labels.undo()
    viewer.dims.set_current_step(0, 6)
    widget._mark_current()
    assert widget.annotated_slices() == [2, 6]
    kept = labels.data[6].copy()
    labels.redo()
    np.testing.assert_array_equal(labels.data[6], kept)


def test_a_stroke_undone_while_another_layer_is_picked_is_unlisted(scene):
    """Its slice stayed listed: the round trained on the uncorrected labels as if they
    were a correction, and re-predicts never updated that slice again."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    labels.brush_size = 4
    labels.paint((5, 40, 40), 7)
    assert widget.annotated_slices() == [2, 5]
    widget._labels_pick.value = _another_labels_layer(viewer, image, labels)
    labels.undo()  # undone while away
    widget._labels_pick.value = labels
    assert widget.annotated_slices() == [2]


def test_a_closed_retrain_widget_is_let_go_with_its_versions(make_napari_viewer, qtbot,
                                                            random_models, small_phantom):
    """Its job (napari keeps every worker, and superqt the function each ran) and a
    closure on the layer list kept a closed widget for the viewer's life, with its model
    versions and a whole volume's prediction (80 MB on a 300 × 512² CT)."""
    import gc
    import weakref

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    dock = viewer.window.add_dock_widget(widget)
    _paint_slice(labels, 2, small_phantom.labels)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    kept, history = weakref.ref(widget._model_output[4]), weakref.ref(widget._history)
    gone = weakref.ref(widget)
    start = len(notification_manager.records)
    viewer.window.remove_dock_widget(dock)
    assert kept() is None  # let go of at the close
    # the unsaved version goes with it: said (the annotations are autosaved, not it)
    said = [str(n.message) for n in notification_manager.records[start:]]
    # named with its model: "v1" read wrong beside another model's v1 just saved
    assert any("model version test-segmenter Retrain v1 was never saved" in m for m in said), said
    del widget, dock
    for _ in range(3):
        qtbot.wait(10)
        gc.collect()
    assert gone() is None and history() is None


def test_a_round_that_does_worse_on_its_held_out_slice_is_listed_not_applied(scene, qtbot,
                                                                             monkeypatch):
    """A 2-3 s round could leave the segmenter far worse (held-out Dice 0.94 → 0.70, the
    liver nearly gone), and the widget wrote its prediction into the layer all the same."""
    import dataclasses

    from napari_medseg._widgets import retrain as retrain_module

    viewer, image, labels, widget, phantom = scene
    real = retrain_module.finetune_segmenter

    def worse(*args, **kwargs):
        result = yield from real(*args, **kwargs)
        report = dataclasses.replace(result.report, holdout_slice=2, holdout_dice_before=0.94,
                                     holdout_dice_after=0.70, new_classes=("structure_9",))
        return dataclasses.replace(result, report=report)

    _paint_slice(labels, 2, phantom.labels)
    _paint_slice(labels, 5, phantom.labels)
    widget._run.clicked.emit()  # v1, applied
    _wait(widget, qtbot)
    history = widget._history
    assert widget._output_for(image, (history, 1)) is not None
    monkeypatch.setattr(retrain_module, "finetune_segmenter", worse)
    before = np.array(labels.data, copy=True)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    np.testing.assert_array_equal(labels.data, before)  # nothing written
    assert len(history.versions) == 3 and history.current == 1
    assert "did worse on the held-out slice" in widget._status.value
    assert "learned new: structure_9" in widget._status.value
    # the list says so first (it cut the Dice off), and Save takes it with a word
    labels_of = [widget._versions.native.itemText(i) for i in range(widget._versions.native.count())]
    assert labels_of[2].startswith("v2 (worse) · ") and "(worse)" not in labels_of[1]
    widget._versions.value = 2
    widget._save_name.value = "worse-one"
    start = len(notification_manager.records)
    widget._save.clicked.emit()
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("saved v2 as 'worse-one'; it did worse on its held-out slice 2" in m for m in said), said
    widget._versions.value = 1
    # v1's kept prediction stays for its next round (one whole-volume pass fewer)
    assert widget._output_for(image, (history, 1)) is not None
    # a worse round that finished after another model was picked is not put in use either
    first = widget._model.value
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: len(widget._curve.losses) >= 1, timeout=60_000)
    widget._model.value = next(c for c in widget._model.choices if c != first)
    _wait(widget, qtbot)
    widget._model.value = first
    assert len(history.versions) == 4 and history.current == 1
    widget._versions.value = 2  # applied when asked for
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert history.current == 2 and "re-predicted" in widget._status.value


def test_use_and_save_are_off_until_a_version_is_listed(scene, qtbot):
    """Before any round the list was empty and both buttons were live, only to say
    "no versions yet"."""
    viewer, image, labels, widget, phantom = scene
    assert not widget._revert.enabled and not widget._save.enabled
    assert widget._predict.enabled and "v0" in widget._predict.tooltip
    _paint_slice(labels, 2, phantom.labels)
    widget._run.clicked.emit()
    assert not widget._revert.enabled  # running
    _wait(widget, qtbot)
    assert widget._revert.enabled and widget._save.enabled and widget._save_name.enabled
    # the whole entry, which a narrow dock cuts short, as the picker's tooltip
    assert widget._versions.tooltip == widget._versions.native.currentText()
    assert widget._versions.tooltip.startswith("v1 · ")


def test_the_loss_caption_compares_the_first_and_last_fifth_not_two_steps(qtbot):
    """'loss 0.281 → 0.432' compared one noisy step at each end of a falling curve."""
    from napari_medseg._widgets._loss_curve import LossCurve

    curve = LossCurve()
    qtbot.addWidget(curve)
    assert curve.caption() == "loss: no retrain yet"
    for loss in [0.281, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2, 0.25, 0.432]:
        curve.add(loss)
    assert curve.caption().startswith("loss 0.591 → 0.341 (first / last fifth) · 10 steps")


def test_a_new_result_on_the_image_is_picked_while_nothing_is_listed(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """Docked before Segment ran, the picker stayed on the sample's ground truth: the
    user corrected the new segmentation and nothing was listed."""
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)  # image and ground truth
    truth = viewer.layers[1]
    widget = _widget(viewer, image, truth, random_models["RecurrentSegmenter"])
    # a layer of the image's shape that no model made on it (another scan's labels of
    # the same size, a script's): not picked
    other = _prediction_layer(viewer, image, small_phantom.labels)
    assert widget._labels_pick.value is truth
    segment = SegmentWidget(plugin_view(viewer))
    run_widget(qtbot, segment, image, random_models["RecurrentSegmenter"])
    result = viewer.layers[-1]
    assert result is not other and widget._labels_pick.value is result
    assert f"now '{result.name}'" in widget._status.value
    viewer.add_labels(np.zeros((2, 8, 8), np.uint8), name="elsewhere")  # not on the image
    assert widget._labels_pick.value is result
    _paint_slice(result, 2, small_phantom.labels)
    run_widget(qtbot, segment)  # something is listed: the pick stays
    assert widget._labels_pick.value is result and viewer.layers[-1] is not result


def test_strokes_made_before_a_layer_was_first_picked_are_listed(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """Only strokes on a layer picked before were caught up: corrections painted before
    picking it stayed unlisted, and the next round's re-prediction wrote over them."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    truth = viewer.layers[1]
    widget = _widget(viewer, image, truth, random_models["RecurrentSegmenter"])
    _paint_slice(truth, 1, small_phantom.labels)  # listed on the truth layer: it stays
    labels = viewer.add_labels(np.zeros(small_phantom.labels.shape, np.uint8), name="mine",
                               scale=image.scale, translate=image.translate)
    _paint_slice(labels, 4, small_phantom.labels)  # painted while the truth was picked
    widget._labels_pick.value = labels
    assert widget.annotated_slices() == [4]
    steps = len(labels._undo_history)
    widget._on_predict()  # the widget's own write: not listed by a widget picking it later
    _wait(widget, qtbot)
    assert len(labels._undo_history) == steps + 1  # it wrote
    written = {int(z) for z in range(labels.data.shape[0])} - {4}
    other = RetrainWidget(plugin_view(viewer))
    other._image.value = image
    other._labels_pick.value = truth
    other._labels_pick.value = labels
    assert not set(other.annotated_slices()) & written
    assert 4 in other.annotated_slices()


def test_an_undo_after_a_write_that_changed_nothing_says_it_undid_an_earlier_one(
        scene, qtbot):
    """Re-predicting with the version in use changed 0 voxels (no undo step); Ctrl+Z then
    undid the round's earlier write while the status said 'this write' was undone."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    widget._on_predict()  # the same version again: nothing changes
    _wait(widget, qtbot)
    assert "(0 voxels changed)" in widget._status.value
    labels.undo()
    assert "Ctrl+Z undid an earlier re-prediction" in widget._status.value
    assert "undone with Ctrl+Z: the layer shows" not in widget._status.value
    labels.redo()
    assert "earlier re-prediction" not in widget._status.value


def _two_scans(viewer, phantom):
    """Two scans of one shape and grid, other content: "patient A" and "patient B"."""
    spacing = phantom.volume.spacing
    mine = viewer.add_image(phantom.volume.array, scale=spacing, name="patient A")
    other = viewer.add_image(phantom.volume.array[::-1].copy(), scale=spacing,
                             name="patient B")
    return mine, other


def test_an_empty_labels_picker_is_not_filled_with_another_scans_result(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """With nothing in the Labels picker, any new Labels layer filled it: Segment run on
    another scan of the same shape, and a stroke there trained this image on its labels."""
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    mine, other = _two_scans(viewer, small_phantom)
    widget = RetrainWidget(plugin_view(viewer))
    widget._image.value = mine
    assert widget._labels_pick.value is None
    segment = SegmentWidget(plugin_view(viewer))
    segment._model.value = random_models["RecurrentSegmenter"]
    for source, taken in ((other, False), (mine, True)):
        segment._image.value = source
        run_widget(qtbot, segment)
        assert (widget._labels_pick.value is viewer.layers[-1]) is taken
    flat = viewer.add_labels(np.zeros((8, 8), np.uint8), name="2D")  # not on the image's grid
    widget._labels_pick.value = None
    viewer.layers.remove(flat)
    assert widget._labels_pick.value is viewer.layers[-1]  # A's result, not B's


@pytest.mark.parametrize("action", ["_duplicate_layer", "_convert_to_image"])
def test_napari_s_copy_of_another_scan_s_result_is_refused_like_the_result(
        make_napari_viewer, qtbot, random_models, small_phantom, action):
    """napari's Duplicate Layer (and Convert to …) make a new layer object keeping the
    metadata: a copy of scan B's segmentation was taken as made on nothing known, filled
    the picker of scan A, and a round trained A on B's labels and wrote into the copy."""
    from napari.layers import _layer_actions

    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    mine, other = _two_scans(viewer, small_phantom)
    segment = SegmentWidget(plugin_view(viewer))
    run_widget(qtbot, segment, other, random_models["RecurrentSegmenter"])
    viewer.layers.selection = {viewer.layers[-1]}
    getattr(_layer_actions, action)(viewer.layers)
    if action == "_convert_to_image":  # and back: a Labels layer again
        _layer_actions._convert(viewer.layers, "labels")
    copy = viewer.layers[-1]
    assert type(copy).__name__ == "Labels" and copy.metadata["medseg"]["input_layer"] == "patient B"
    widget = RetrainWidget(plugin_view(viewer))
    widget._model.value = random_models["RecurrentSegmenter"]
    widget._image.value = mine
    assert not widget._may_fill_with(copy)  # an empty picker does not take it by itself
    widget._labels_pick.value = copy
    copy.data_setitem((np.full(10, 3), np.arange(10), np.arange(10)), 2)
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    assert widget._worker is None
    assert any("was made on 'patient B'" in m for m in _errors_since(start))


def test_switching_the_image_never_writes_another_scans_prediction_over_corrections(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """Image picker moved to another scan of the same shape, Labels picker left on the
    first one's layer: 'Re-predict' wrote the second scan's prediction over the first
    one's painted slices (its list, kept with the first pair, protected nothing)."""
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    spacing = small_phantom.volume.spacing
    scan_a = viewer.add_image(small_phantom.volume.array, scale=spacing, name="A")
    scan_b = viewer.add_image(small_phantom.volume.array[::-1].copy(), scale=spacing, name="B")
    mine = viewer.add_labels(np.zeros(small_phantom.labels.shape, np.uint8), scale=spacing,
                             name="drawn on A")
    widget = _widget(viewer, scan_a, mine, random_models["RecurrentSegmenter"])
    _paint_slice(mine, 2, small_phantom.labels)
    _paint_slice(mine, 5, small_phantom.labels)
    assert widget.annotated_slices() == [2, 5]
    painted = np.array(mine.data[[2, 5]], copy=True)
    widget._image.value = scan_b
    assert widget.annotated_slices() == []
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    np.testing.assert_array_equal(mine.data[[2, 5]], painted)  # A's corrections kept
    # a layer a model made on A is refused for B, with a word
    segment = SegmentWidget(plugin_view(viewer))
    run_widget(qtbot, segment, scan_a, random_models["RecurrentSegmenter"])
    result = viewer.layers[-1]
    widget._image.value, widget._labels_pick.value = scan_b, result
    before = np.array(result.data, copy=True)
    start = len(notification_manager.records)
    widget._predict.clicked.emit()
    assert widget._worker is None
    assert any("was made on 'A', not on 'B'" in m for m in _errors_since(start))
    # said on the status line too: the toast was cut off and went
    assert widget._status.value.startswith("Retrain refused: '"), widget._status.value
    np.testing.assert_array_equal(result.data, before)


def test_a_scan_opened_again_keeps_its_segmentation_usable(make_napari_viewer, qtbot,
                                                            random_models, small_phantom):
    """Segment on A, A closed and opened again: the layer was refused as "made on 'A',
    not on 'A'" while the closed layer object lived on (until a full collection)."""
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    spacing = small_phantom.volume.spacing
    scan = viewer.add_image(small_phantom.volume.array.copy(), scale=spacing, name="A")
    segment = SegmentWidget(plugin_view(viewer))
    run_widget(qtbot, segment, scan, random_models["RecurrentSegmenter"])
    result = viewer.layers[-1]
    keep_alive = scan  # as napari's reference cycles keep a removed layer for a while
    viewer.layers.remove(scan)
    again = viewer.add_image(small_phantom.volume.array.copy(), scale=spacing, name="A")
    widget = _widget(viewer, again, result, random_models["RecurrentSegmenter"])
    start = len(notification_manager.records)
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert not _errors_since(start) and widget._history is not None
    assert keep_alive is not again


@pytest.mark.parametrize("view", ["sagittal", "3d brush"])
def test_a_stroke_across_slices_lists_them_unticked_until_reviewed(scene, view):
    """A ticked slice trains as correct in every voxel: one stroke in a sagittal view
    touched a few voxels of each of 8 axial slices (hundreds wrong on each, never looked
    at) and listed them all ticked, silently."""
    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 1, phantom.labels)  # an axial correction: ticked as ever
    if view == "sagittal":
        viewer.dims.order = (2, 0, 1)
    else:
        labels.n_edit_dimensions = 3
    labels.brush_size = 10
    start = len(notification_manager.records)
    labels.paint((4, 48, 48), 2)
    touched = set(widget.annotated_slices()) - {1}
    assert len(touched) > 1
    assert widget.training_slices() == [1]
    z = min(touched)  # the list says why (the warning goes)
    items = [widget._slice_list.item(i) for i in range(widget._slice_list.count())]
    item = next(i for i in items if i.text().startswith(f"slice {z} "))
    assert item.text().endswith("across slices: review, tick")
    item.setCheckState(Qt.CheckState.Checked)
    assert z in widget.training_slices() and "review" not in item.text()
    item.setCheckState(Qt.CheckState.Unchecked)
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("stroke across slices" in m and "unticked" in m for m in said), said
    labels.undo()  # its slices leave the list, the axial one stays
    assert widget.annotated_slices() == [1]
    labels.redo()  # and come back unticked
    assert set(widget.annotated_slices()) == touched | {1} and widget.training_slices() == [1]


@pytest.mark.parametrize("view", ["sagittal", "3d view"])
def test_a_one_slice_stroke_off_the_axial_view_is_unticked_also_after_redo(scene, view):
    """A dab in the 3D view (no single slice on screen) or a 1-voxel stroke in a sagittal
    view touches one axial slice, never looked at: it was listed ticked (and a sagittal
    stroke's redo came back ticked)."""
    viewer, image, labels, widget, phantom = scene
    if view == "sagittal":
        viewer.dims.order = (2, 0, 1)
    else:
        viewer.dims.ndisplay = 3
    labels.brush_size = 1
    with labels.block_history():  # a drag: one step of several atoms, which napari keeps
        for y in range(40, 52, 2):  # in reverse order over an undo and redo
            labels.paint((4, y, 48), 2)
    assert widget.annotated_slices() == [4] and widget.training_slices() == []
    labels.undo()
    assert widget.annotated_slices() == []
    labels.redo()
    assert widget.annotated_slices() == [4] and widget.training_slices() == []


def test_a_3d_stroke_painted_before_the_layer_was_picked_is_listed_unticked(
        make_napari_viewer, random_models, small_phantom):
    """Corrected first (a 3D brush), Retrain opened next: its slices were listed ticked."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    _paint_slice(labels, 1, small_phantom.labels)  # one slice: ticked as ever
    labels.n_edit_dimensions = 3
    labels.brush_size = 10
    labels.paint((4, 48, 48), 2)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    assert len(widget.annotated_slices()) > 2
    assert widget.training_slices() == [1]


def test_a_stroke_across_a_gap_says_the_slices_were_not_acquired(make_napari_viewer,
                                                                 random_models, small_phantom):
    viewer = make_napari_viewer()
    data = np.array(small_phantom.volume.array, copy=True)
    data[4] = np.nan  # a gap the reader recorded
    image = viewer.add_image(data, scale=small_phantom.volume.spacing, name="ct",
                             metadata={"medseg": {"missing_slices": [4]}})
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    labels.n_edit_dimensions = 3
    labels.brush_size = 10
    start = len(notification_manager.records)
    labels.paint((4, 48, 48), 2)
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("stroke across slices" in m and "(slice 4 was not acquired: a round leaves it out)"
               in m for m in said), said
    assert 4 in widget.annotated_slices() and 4 not in widget.training_slices()


@pytest.mark.parametrize("kind", ["read-only", "dask"])
def test_a_labels_layer_that_cannot_be_written_is_refused_before_the_round(
        make_napari_viewer, random_models, small_phantom, kind):
    """Marked slices on a read-only (or lazy, e.g. OME-Zarr) Labels layer: the round
    trained to its end, then writing its prediction raised a traceback in napari."""
    import dask.array as da

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    data = small_phantom.labels.astype(np.uint8)
    if kind == "read-only":
        data.flags.writeable = False
    else:
        data = da.from_array(data, chunks=(2, -1, -1))
    labels = viewer.add_labels(data, scale=image.scale, translate=image.translate)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    widget._checked |= {2, 5}
    start = len(notification_manager.records)
    for button in (widget._run, widget._predict):
        button.clicked.emit()
        assert widget._worker is None
    errors = _errors_since(start)
    assert len(errors) == 2 and all("cannot be written into" in m for m in errors), errors
    np.testing.assert_array_equal(np.asarray(labels.data), small_phantom.labels)
    widget._suggest.clicked.emit()  # writes no layer: not refused
    assert len(_errors_since(start)) == 2 and widget._worker is not None
    widget._on_cancel()


def test_napari_s_copies_of_an_annotated_layer_keep_its_listed_slices(scene, qtbot):
    """Convert to Image and back (or Duplicate Layer) made a new layer object, and the
    lists, kept by layer object, stayed behind: Predict then overwrote the painted slice
    (9216 voxels). The layer's metadata carries them; the picker follows a converted
    layer back."""
    from napari.layers import _layer_actions

    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 3, phantom.labels)
    widget._mark_current()  # slice 0, checked
    listed = widget.annotated_slices()
    viewer.layers.selection = {labels}
    _layer_actions._duplicate_layer(viewer.layers)
    copy = viewer.layers[-1]
    assert copy is not labels
    viewer.layers.selection = {copy}
    _layer_actions._convert_to_image(viewer.layers)
    _layer_actions._convert(viewer.layers, "labels")
    converted = viewer.layers[-1]
    assert type(converted).__name__ == "Labels" and converted is not copy
    _paint_slice(labels, 5, phantom.labels)  # the original's list grows, not the copies'
    widget._labels_pick.value = converted
    assert widget.annotated_slices() == listed
    painted = np.array(converted.data, copy=True)
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    np.testing.assert_array_equal(converted.data[listed], painted[listed])
    assert not np.array_equal(converted.data, painted)  # the other slices were predicted
    widget._labels_pick.value = labels
    assert widget.annotated_slices() == sorted([*listed, 5])
    # the picked layer converted (removed, a new one put in its place): followed back
    viewer.layers.selection = {labels}
    index = viewer.layers.index(labels)
    widget.autosave_now(wait=True)
    _layer_actions._convert_to_image(viewer.layers)
    _layer_actions._convert(viewer.layers, "labels")
    assert widget._labels_pick.value is viewer.layers[index]
    assert widget.annotated_slices() == sorted([*listed, 5])
    # its autosave is the live layer's, not one to restore (a duplicate, and the picker
    # moved onto it)
    widget._save_thread.join()
    assert widget._pending_restore is None, widget._restore_label.value
    assert "back on" in widget._status.value


def test_a_deleted_annotation_layer_s_autosave_is_let_go_and_offered_again(scene):
    """The widget kept a lock and an open file on the autosave of every layer it ever
    saved, removed or not (one per scan all day long); and a deleted annotation layer's
    autosave was offered by no window until this one was closed."""
    from napari_medseg.core.session import session_in_use

    viewer, image, labels, widget, phantom = scene
    _paint_slice(labels, 2, phantom.labels)
    widget.autosave_now(wait=True)
    painted = np.array(labels.data, copy=True)
    (folder,) = widget._autosave_targets[labels].values()
    assert session_in_use(folder)
    viewer.layers.remove(labels)  # by mistake: napari has no undo for it
    widget._save_thread.join()
    assert not session_in_use(folder) and folder not in widget._folder_locks
    assert widget._pending_restore == folder  # offered at once
    widget._restore.clicked.emit()
    restored = widget._labels_pick.value
    np.testing.assert_array_equal(restored.data, painted)
    assert widget.annotated_slices() == [2]


def test_new_data_put_into_the_layer_unticks_the_listed_slices_it_changed(scene, qtbot):
    """``labels.data = other array`` (a script, another plugin) kept the listed slices
    ticked: the next round trained on the new array's voxels there as the user's
    corrections. Those it changed are unticked, with a note; the others stay ticked."""
    viewer, image, labels, widget, phantom = scene
    for z in (1, 4):
        labels.brush_size = 3
        labels.paint((z, 30, 30), int(labels.data[z, 30, 30]) % 7 + 1)
    widget.autosave_now(wait=True)
    assert widget.training_slices() == [1, 4]
    start = len(notification_manager.records)
    new = np.array(labels.data, copy=True)
    new[4] = 0
    new[6] = 3  # a slice no list holds: nothing to review
    labels.data = new
    assert widget.training_slices() == [1] and widget.annotated_slices() == [1, 4]
    items = [widget._slice_list.item(i) for i in range(widget._slice_list.count())]
    item = next(i for i in items if i.text().startswith("slice 4 "))
    assert item.text().endswith("new data: review, tick")
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("got new data" in m and "(4)" in m for m in said), said
    item.setCheckState(Qt.CheckState.Checked)  # reviewed: trains again
    assert widget.training_slices() == [1, 4] and "review" not in item.text()
    # the same array again (the refresh idiom after an edit in place): nothing changed,
    # also for a stroke not yet autosaved (it was unticked)
    labels.paint((6, 30, 30), int(labels.data[6, 30, 30]) % 7 + 1)
    labels.data = labels.data
    assert widget.training_slices() == [1, 4, 6]
    # a script's edit in place, then the refresh idiom: the slice it wiped is unticked
    widget.autosave_now(wait=True)
    labels.data[1] = 0
    labels.data = labels.data
    assert 1 not in widget.training_slices() and 6 in widget.training_slices()
    # unticked by hand later: the old note does not come back
    item = next(widget._slice_list.item(i) for i in range(widget._slice_list.count())
                if widget._slice_list.item(i).text().startswith("slice 4 "))
    item.setCheckState(Qt.CheckState.Unchecked)
    assert "review" not in item.text()


def test_a_layer_numbering_its_structures_otherwise_than_the_model_is_refused(scene, qtbot):
    """A layer whose names say 2 is spleen and 3 liver (another tool's or model's
    numbering) was trained in silently, the model's liver learning the spleen; the
    CLI refused the same labels."""
    import pandas as pd

    from napari_medseg.core.models.registry import read_card

    viewer, image, labels, widget, phantom = scene
    classes = read_card(widget._model.value)["classes"]
    names = list(classes)
    names[2], names[3] = names[3], names[2]
    labels.features = pd.DataFrame({"index": range(len(names)), "name": names})
    z = next(z for z in range(len(phantom.labels))  # both painted on the ticked slice
             if {2, 3} <= set(np.unique(phantom.labels[z])))
    _paint_slice(labels, z, phantom.labels)
    before = np.array(labels.data, copy=True)
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    assert widget._worker is None
    assert widget._history is None or len(widget._history.versions) == 1
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("numbers its structures otherwise than the model" in m
               and f"'{classes[3]}' in the layer, '{classes[2]}' in the model" in m
               for m in said), said
    assert "Retrain refused" in widget._status.value
    np.testing.assert_array_equal(labels.data, before)
    # the model's own names (any case or spacing): trained as ever
    labels.features = pd.DataFrame({"index": range(len(classes)),
                                    "name": [c.replace("_", " ").title() for c in classes]})
    widget._run.clicked.emit()
    assert widget._worker is not None
    _wait(widget, qtbot)


def test_a_layer_records_each_version_that_wrote_into_it_and_its_file_too(scene, qtbot,
                                                                        tmp_path):
    """A Segment result re-predicted by Retrain still named only the model that made it,
    in its metadata and in the file saved from it (which named no model at all)."""
    import json

    import napari
    import nibabel as nib

    viewer, image, labels, widget, phantom = scene
    labels.metadata["medseg"] = {**labels.metadata.get("medseg", {}), "model": "segmenter",
                                 "model_version": "1.0", "model_sha256": "abc"}
    _paint_slice(labels, 2, phantom.labels)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    (entry,) = labels.metadata["medseg"]["repredicted_with"]
    assert entry["retrain_version"] == 1 and entry["model"] == widget._history.model()[1]["name"]
    assert entry["slices"] > 0
    napari.save_layers(str(tmp_path / "seg.nii.gz"), [labels], plugin="napari-medseg")
    (extension,) = nib.load(tmp_path / "seg.nii.gz").header.extensions
    ours = json.loads(extension.get_content())["napari-medseg"]
    assert ours["model"] == "segmenter" and ours["model_sha256"] == "abc"
    assert ours["repredicted_with"][0]["retrain_version"] == 1


def test_keyboard_shortcuts_mark_step_through_the_list_and_retrain(scene, qtbot):
    """No key marked a slice reviewed, went to the next listed slice or retrained: the
    annotating hand left the keyboard for every slice."""
    from napari_medseg._widgets import _keys

    viewer, image, labels, widget, phantom = scene
    viewer.layers.selection.active = labels
    def press(key):
        from napari.utils.key_bindings import coerce_keybinding

        viewer.keymap[coerce_keybinding(key)](viewer)

    viewer.dims.set_point(0, image.data_to_world([3, 0, 0])[0])
    press("K")
    assert 3 in widget.annotated_slices() and 3 in widget._checked
    labels.brush_size = 3
    for z in (6, 1):
        labels.paint((z, 30, 30), int(labels.data[z, 30, 30]) % 7 + 1)
    assert widget.annotated_slices() == [1, 3, 6]
    press("Shift-Right")
    assert widget._current_image_slice() == 6
    press("Shift-Left")
    press("Shift-Left")
    assert widget._current_image_slice() == 1
    press("Control-Shift-R")
    assert widget._worker is not None
    _wait(widget, qtbot)
    assert widget._history is not None and len(widget._history.versions) == 2
    # with the annotation layer not active and two Retrain widgets open: none is guessed
    other = RetrainWidget(plugin_view(viewer))
    viewer.layers.selection.active = image
    assert _keys._widget_for(viewer) is None
    other.close()


def test_the_autosave_alert_is_readable_in_the_light_theme(scene):
    """One red (#ff6b6b) for both themes read 2.26:1 on the light background, on the one
    message about losing work."""
    viewer, image, labels, widget, phantom = scene
    assert "#ff6b6b" in widget._autosave_alert.native.styleSheet()
    viewer.theme = "light"
    assert "#b00020" in widget._autosave_alert.native.styleSheet()
    viewer.theme = "dark"
    assert "#ff6b6b" in widget._autosave_alert.native.styleSheet()


def test_a_key_the_user_bound_on_the_viewer_class_is_left_to_them(make_napari_viewer,
                                                                   random_models, small_phantom):
    """K bound the usual way (napari.Viewer.bind_key) was shadowed by Retrain's."""
    import napari
    from napari.utils.key_bindings import coerce_keybinding

    called = []
    napari.Viewer.bind_key("K", lambda v: called.append(v), overwrite=True)
    try:
        viewer = make_napari_viewer()
        image = _open(viewer, small_phantom)
        labels = _prediction_layer(viewer, image, small_phantom.labels)
        _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
        assert coerce_keybinding("K") not in viewer.keymap
        assert coerce_keybinding("Shift-Right") in viewer.keymap  # the others are bound
    finally:
        napari.Viewer.class_keymap.pop(coerce_keybinding("K"), None)


def test_listed_slices_name_their_image_numbers(make_napari_viewer, random_models,
                                                small_phantom):
    """As Detect's, Classify's and Uncertainty's lists: on a DICOM series each listed
    slice is also named by the image number a PACS shows it as."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    numbers = list(range(8, 0, -1))  # numbered from the head
    image.metadata = {**image.metadata, "medseg": {
        **image.metadata.get("medseg", {}),
        "source": {**image.metadata.get("medseg", {}).get("source", {}),
                   "instance_numbers": numbers}}}
    labels = _prediction_layer(viewer, image, small_phantom.labels)
    widget = _widget(viewer, image, labels, random_models["RecurrentSegmenter"])
    _paint_slice(labels, 2, small_phantom.labels)
    _paint_slice(labels, 5, small_phantom.labels)
    texts = [widget._slice_list.item(i).text() for i in range(widget._slice_list.count())]
    assert [t.split(" · ")[0] for t in texts] == ["slice 2", "slice 5"]
    assert texts[0].endswith("· image 6") and texts[1].endswith("· image 3"), texts

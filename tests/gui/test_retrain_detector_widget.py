"""Retrain-detector widget: edited points list their slices, retrain adds a new layer."""

import numpy as np
import pytest
import torch
from napari.layers import Points
from napari.utils.notifications import notification_manager

from napari_medseg._widgets.retrain_detector import RetrainDetectorWidget
from tests.gui.conftest import plugin_view, run_widget


def _open(viewer, phantom):
    vol = phantom.volume
    return viewer.add_image(vol.array, scale=vol.spacing, name="ct")


@pytest.fixture
def scene(make_napari_viewer, random_models, small_phantom):
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    points = viewer.add_points(np.array([[2.0, 40.0, 40.0], [6.0, 20.0, 60.0]]), scale=image.scale,
                               name="detections", features={"diameter_mm": [12.0, 8.0]})
    widget = RetrainDetectorWidget(plugin_view(viewer))
    # docked, as napari does it: adding a layer then re-evaluates every picker
    viewer.window.add_dock_widget(widget)
    widget._image.value = image
    widget._layer_pick.value = points
    widget._model.value = random_models["LesionDetector"]
    widget._seconds.value = 2.0
    return viewer, image, points, widget


def _restored_elsewhere(make_napari_viewer, image, widget):
    """Autosave ``widget`` now, end its process (the system drops its folder locks), open
    the same image in a new viewer and restore there."""
    widget.autosave_now(wait=True)
    widget._release_folders()
    viewer = make_napari_viewer()
    other = RetrainDetectorWidget(plugin_view(viewer))
    other._image.value = viewer.add_image(image.data, scale=image.scale, name="ct")
    assert other._pending_restore is not None
    other._restore.clicked.emit()
    return other


def _wait(widget, qtbot):
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)


def test_add_move_delete_points_list_their_slices(scene):
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    assert widget.annotated_slices() == [4]
    points.selected_data = {0}
    points.remove_selected()  # the point on slice 2 was a false positive
    assert widget.annotated_slices() == [2, 4]
    points.selected_data = {0}  # now the point on slice 6, dragged in-plane as the mouse does
    points._move(points.selected_data, [6.0, 25.0, 55.0])
    assert widget.annotated_slices() == [2, 4, 6]
    moved = np.array(points.data, copy=True)
    moved[0, 0] = 7.0  # a script moving it to another slice lists both slices
    points.data = moved
    assert widget.annotated_slices() == [2, 4, 6, 7]


def test_a_script_setting_the_whole_data_lists_only_the_moved_points_slices(scene):
    """napari reports every row when the whole data is set: the untouched point's slice
    was listed too, and its slice then taken as fully reviewed."""
    viewer, image, points, widget = scene
    nudged = np.array(points.data, copy=True)
    nudged[1, 1] += 3.0  # the point on slice 6 moved in-plane; slice 2's point untouched
    points.data = nudged
    assert widget.annotated_slices() == [6]
    # rows deleted or added by a script: the slices of the points that went or came
    points.data = np.array(points.data)[1:]  # the point on slice 2 deleted
    assert widget.annotated_slices() == [2, 6]
    points.data = np.vstack([points.data, [[5.0, 30.0, 30.0]]])
    assert widget.annotated_slices() == [2, 5, 6]


def test_retrain_adds_a_new_points_layer_and_keeps_the_users(scene, qtbot):
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    widget._mark_current()
    user = np.array(points.data, copy=True)
    n_layers = len(viewer.layers)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    assert len(viewer.layers) == n_layers + 1 and isinstance(viewer.layers[-1], Points)
    new = viewer.layers[-1]
    np.testing.assert_allclose(new.scale, image.scale)
    # "detector v1" read as the bundled detector v1.0
    assert new.metadata["medseg"]["model"].endswith(", Retrain v1")
    assert new.name.startswith("lesions · ") and new.name.endswith(", Retrain v1)")
    # orange, apart from the lime detections it is drawn over (hidden rows transparent)
    from napari.utils.colormaps.standardize_color import transform_color

    assert len(new.data)
    np.testing.assert_allclose(new.border_color[:, :3],
                               np.broadcast_to(transform_color("orange")[0][:3], (len(new.data), 3)))
    np.testing.assert_array_equal(points.data, user)
    assert len(widget._history.versions) == 2 and len(widget._curve.losses) > 0
    assert widget._versions.choices == (0, 1) and widget._versions.value == 1
    # cancel a long second round: versions and layers unchanged
    v1 = {k: v.clone() for k, v in widget._history.versions[1].state.items()}
    widget._seconds.value = 60.0
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: len(widget._curve.losses) >= 2, timeout=60_000)
    widget._cancel.clicked.emit()
    _wait(widget, qtbot)
    assert len(viewer.layers) == n_layers + 1 and len(widget._history.versions) == 2
    model, _ = widget._history.model()
    for k, v in v1.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_no_reviewed_slice_is_refused(scene):
    viewer, image, points, widget = scene
    start = len(notification_manager.records)
    n_layers = len(viewer.layers)
    widget._run.clicked.emit()
    errors = [str(n.message) for n in notification_manager.records[start:] if n.severity == "error"]
    assert widget._worker is None and len(errors) == 1 and "no reviewed slices" in errors[0]
    assert len(viewer.layers) == n_layers


def test_points_autosave_restores(make_napari_viewer, scene, qtbot):
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    widget2 = _restored_elsewhere(make_napari_viewer, image, widget)
    restored = widget2._layer_pick.value
    np.testing.assert_allclose(restored.data, points.data)
    np.testing.assert_allclose(restored.features["diameter_mm"][:2], [12.0, 8.0])
    assert widget2.annotated_slices() == [4]


def test_hidden_points_are_not_lesions(scene):
    viewer, image, points, widget = scene
    points.shown = np.array([True, False])
    pts, diam = widget._points_on_image(points, image)
    np.testing.assert_allclose(pts, [[2.0, 40.0, 40.0]])
    np.testing.assert_allclose(diam, [12.0])


def test_slice_lists_stay_with_their_image_and_points_layer(scene):
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    widget._mark_current()
    listed = widget.annotated_slices()
    assert 4 in listed
    # another points layer: its own (empty) lists; back: the first layer's lists again
    other = viewer.add_points(np.zeros((0, 3)), scale=image.scale, name="other")
    widget._layer_pick.value = other
    assert widget.annotated_slices() == []
    widget._layer_pick.value = points
    assert widget.annotated_slices() == listed
    # another image (twice the slices, half the spacing): slice numbers would mean other
    # slices there, so its list starts empty; back on the first image the list returns
    fine = viewer.add_image(np.repeat(np.asarray(image.data), 2, axis=0),
                            scale=(image.scale[0] / 2, *image.scale[1:]), name="ct fine")
    widget._image.value = fine
    assert widget.annotated_slices() == []
    points.add([5.0, 30.0, 30.0])  # world z 5 · 2.5 mm: slice 10 of the fine image
    assert widget.annotated_slices() == [10]
    widget._image.value = image
    assert widget.annotated_slices() == listed


def test_a_round_still_shows_its_detections_when_the_users_points_layer_is_deleted(scene, qtbot):
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    widget._mark_current()
    widget._seconds.value = 3.0
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: len(widget._curve.losses) >= 1, timeout=60_000)
    viewer.layers.remove(points)  # the round trained on a copy; its output is a new layer
    _wait(widget, qtbot)
    assert len(widget._history.versions) == 2
    assert isinstance(viewer.layers[-1], Points) and "v1" in viewer.layers[-1].metadata["medseg"]["model"]


def test_autosave_keeps_hidden_points_and_a_restored_layer_adds_unknown_sizes(
        make_napari_viewer, scene, qtbot):
    """Hidden (weak) detections were dropped from the autosave, so a restore lost them;
    a point added to the restored layer took the selected lesion's diameter."""
    viewer, image, points, widget = scene
    points.shown = np.array([True, False])
    points.add([4.0, 30.0, 30.0])
    widget2 = _restored_elsewhere(make_napari_viewer, image, widget)
    restored = widget2._layer_pick.value
    np.testing.assert_allclose(restored.data, points.data)
    assert list(restored.shown) == list(points.shown)
    # the added point (no diameter) comes back at the size retraining gives it, not at
    # the 3-pixel minimum
    from napari_medseg._layers import marker_sizes
    from napari_medseg.core.finetune import DEFAULT_DIAMETER_MM

    assert np.isnan(points.features["diameter_mm"].iloc[-1])
    assert restored.size[-1] == pytest.approx(
        marker_sizes([DEFAULT_DIAMETER_MM], restored.scale)[0])
    assert restored.size[-1] > 3
    restored.selected_data = {0}  # the 12 mm lesion
    restored.add([5.0, 50.0, 50.0])
    assert np.isnan(restored.features["diameter_mm"].iloc[-1])
    assert widget2.annotated_slices() == [4, 5]


def test_edits_made_while_another_points_layer_is_picked_are_listed_when_picked_back(scene):
    viewer, image, points, widget = scene
    other = viewer.add_points(np.zeros((0, 3)), scale=image.scale, name="other")
    widget._layer_pick.value = other
    points.add([5.0, 30.0, 30.0])
    points.selected_data = {0}
    points.remove_selected()  # the false positive on slice 2
    widget._layer_pick.value = points
    assert widget.annotated_slices() == [2, 5]


def test_a_points_layer_of_another_ndim_is_said_when_picked(scene):
    viewer, image, points, widget = scene
    start = len(notification_manager.records)
    four = viewer.add_points(np.zeros((0, 4)), scale=(1, *image.scale), name="p4")
    widget._layer_pick.value = four
    assert any("'p4' is 4D" in str(n.message) for n in notification_manager.records[start:])
    four.add([0.0, 5.0, 30.0, 30.0])
    assert widget.annotated_slices() == [5]  # its slice, not slice 0


def _weak_detections_layer(viewer, image):
    """A Detect-widget-style layer: one detection shown, three weak ones hidden."""
    from napari_medseg._layers import watch_detection_edits

    data = np.array([[2.0, 40.0, 40.0], [2.0, 60.0, 60.0], [5.0, 30.0, 30.0], [6.0, 20.0, 20.0]])
    layer = viewer.add_points(data, scale=image.scale, name="detections",
                              shown=np.array([True, False, False, False]),
                              features={"score": [0.9, 0.2, 0.1, 0.3],
                                        "diameter_mm": [10.0, 6.0, 6.0, 6.0],
                                        "label": ["0.90", "0.20", "0.10", "0.30"]})
    watch_detection_edits(layer)  # as the Detect widget does
    return layer


def test_a_restored_detection_layer_keeps_scores_and_labels(make_napari_viewer, scene):
    """A restored detection layer kept only the diameters: every point lost its score
    and its text, and the weak (hidden) detections could no longer be told apart."""
    viewer, image, _, widget = scene
    layer = _weak_detections_layer(viewer, image)
    widget._layer_pick.value = layer
    layer.selected_data = {0}
    layer._move(layer.selected_data, [2.0, 42.0, 40.0])  # the user's now: no score
    layer.add([4.0, 30.0, 30.0])
    widget2 = _restored_elsewhere(make_napari_viewer, image, widget)
    restored = widget2._layer_pick.value
    np.testing.assert_allclose(restored.data, layer.data)
    np.testing.assert_array_equal(restored.features["score"].to_numpy(),
                                  [np.nan, 0.2, 0.1, 0.3, np.nan])
    # hidden rows restored hidden in every view: no ring, no text (hide_unshown)
    hidden = ~np.asarray(restored.shown)
    assert [t for t, h in zip(restored.features["label"], hidden) if not h] == [
        t for t, h in zip(["moved", "0.20 · 6 mm", "0.10 · 6 mm", "0.30 · 6 mm", "added"],
                          hidden) if not h]
    assert all(t == "" for t, h in zip(restored.features["label"], hidden) if h)
    assert (np.asarray(restored.border_color)[hidden, 3] == 0).all()
    assert list(restored.shown) == list(layer.shown)
    restored.selected_data = {1}
    restored.add([5.0, 50.0, 50.0])  # not the selected weak detection's score
    assert np.isnan(restored.features["score"].iloc[-1])
    assert restored.features["label"].iloc[-1] == "added"


def test_setting_a_detection_layers_data_marks_only_the_moved_point(scene):
    """napari names every row when a script sets the whole data: every weak detection was
    marked "moved" and shown, then trained on as a lesion of the reviewed slice."""
    viewer, image, _, widget = scene
    layer = _weak_detections_layer(viewer, image)
    widget._layer_pick.value = layer
    moved = np.array(layer.data, copy=True)
    moved[0, 2] += 2.0
    layer.data = moved
    assert list(layer.shown) == [True, False, False, False]
    scores = layer.features["score"].to_numpy()
    assert np.isnan(scores[0]) and list(scores[1:]) == [0.2, 0.1, 0.3]
    assert widget.annotated_slices() == [2]
    voxels, _ = widget._points_on_image(layer, image)
    assert len(voxels) == 1  # the weak detection on slice 2 is no lesion
    layer.selected_data = {1}  # napari fills a new row from the point selected last
    layer.data = np.vstack([layer.data, [[4.0, 30.0, 30.0]]])  # a point appended by a script
    assert list(layer.shown) == [True, False, False, False, True]
    # hidden rows have no text (napari draws them in the 3D view: see hide_unshown)
    assert list(layer.features["label"])[1:] == ["", "", "", "added"]
    assert list(layer.features["score"])[1:4] == [0.2, 0.1, 0.3]
    assert np.isnan(layer.features["diameter_mm"].iloc[4])  # not the selected one's 6 mm
    layer.data = np.array(layer.data[:4])  # and deleted again: no row marked
    assert list(layer.shown) == [True, False, False, False]


# napari's own slicing casts a NaN coordinate to int (a RuntimeWarning from napari)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_only_real_edits_made_away_are_listed(scene):
    """Showing weak detections (the Detect threshold) while another layer was picked
    listed their slices; a deleted twin of an identical point went unseen; a point with a
    NaN coordinate raised in the event handler."""
    viewer, image, points, widget = scene
    layer = _weak_detections_layer(viewer, image)
    widget._layer_pick.value = layer
    widget._layer_pick.value = points
    layer.shown = np.ones(4, bool)
    widget._layer_pick.value = layer
    assert widget.annotated_slices() == []
    twins = viewer.add_points(np.array([[3.0, 10.0, 10.0], [3.0, 10.0, 10.0], [4.0, 11.0, 11.0],
                                        [5.0, 12.0, np.nan]]), scale=image.scale, name="twins")
    widget._layer_pick.value = twins
    twins.data = np.array(twins.data[1:])  # one of two identical points deleted
    assert widget.annotated_slices() == [3]  # (a NaN x is no change of slice 5's point)
    twins.add([np.nan, 30.0, 30.0])
    assert widget.annotated_slices() == [3]
    widget._layer_pick.value = points  # away and back with nothing edited: nothing new
    widget._layer_pick.value = twins
    assert widget.annotated_slices() == [3]


def test_edits_made_while_the_image_is_removed_are_listed_when_it_is_back(scene):
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    assert widget.annotated_slices() == [4]
    data, kwargs = image.data, dict(name=image.name, scale=image.scale)
    viewer.layers.remove(image)
    points.selected_data = {0}
    points.remove_selected()  # the false positive on slice 2, deleted meanwhile
    again = viewer.add_image(data, **kwargs)
    widget._image.value = again
    assert widget.annotated_slices() == [2, 4]


def test_a_point_off_the_image_is_left_out_with_a_warning_not_a_refusal(scene):
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    points.add([20.0, 30.0, 30.0])  # beyond the last slice
    start = len(notification_manager.records)
    annotation = widget._snapshot(points, image, _volume_of(image), need_annotations=True)
    assert len(annotation[0]) == 3
    warned = [str(n.message) for n in notification_manager.records[start:]]
    assert any("outside the image and were left out" in m and "z, y, x = 20" in m for m in warned)


def test_a_point_with_a_coordinate_that_is_no_number_is_said_where_it_is(scene):
    """It was "outside the image (the first at z, y, x = nan, nan, nan)": no slice to find."""
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    data = np.array(points.data, copy=True)
    data[-1, 1] = np.nan
    points.data = data
    start = len(notification_manager.records)
    annotation = widget._snapshot(points, image, _volume_of(image), need_annotations=False)
    assert not np.isnan(annotation[0]).any()
    warned = [str(n.message) for n in notification_manager.records[start:]]
    assert any("1 point(s)" in m and "not a number" in m and "the first at 4, nan, 30" in m
               for m in warned), warned


def _volume_of(image):
    from napari_medseg._layers import volume_from_layer

    return volume_from_layer(image)


def test_changed_rows_counts_points_as_a_multiset_nan_included():
    from napari_medseg._widgets.retrain_detector import _changed_rows

    a = np.array([[2.0, 10.0, np.nan], [3.0, 5.0, 5.0], [3.0, 5.0, 5.0]])
    assert len(_changed_rows(a, a.copy())) == 0  # NaN rows compared equal to themselves
    gone = _changed_rows(a, a[:2])
    np.testing.assert_array_equal(gone, [[3.0, 5.0, 5.0]])


def test_a_point_added_to_a_detection_layer_opened_from_a_file_has_no_size_of_its_own(
        make_napari_viewer, random_models, small_phantom, tmp_path):
    """A detection layer saved and opened again has no Detect widget marking its added
    points: napari filled the new row from the point selected last, and the point
    trained as a 30 mm lesion."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    found = viewer.add_points(np.array([[3.0, 40.0, 40.0], [5.0, 20.0, 20.0]]), name="det",
                              scale=image.scale, features={
                                  "score": [0.9, 0.3], "label": ["a", "b"],
                                  "diameter_mm": [30.0, 8.0]})
    path = str(tmp_path / "det.csv")
    found.save(path)
    viewer.layers.remove(found)
    (points,) = viewer.open(path, layer_type="points")
    points.scale = image.scale
    widget = RetrainDetectorWidget(plugin_view(viewer))
    viewer.window.add_dock_widget(widget)
    widget._image.value, widget._layer_pick.value = image, points
    points.selected_data = {0}
    points.add([6.0, 70.0, 70.0])
    added = points.features.iloc[-1]
    assert np.isnan(added["diameter_mm"]) and np.isnan(added["score"]), added.to_dict()
    assert widget.annotated_slices() == [6]


def test_edits_made_while_the_image_is_removed_go_to_that_scan_not_the_next_one(scene):
    """They were given to whichever image was picked next: another patient's slice 5 was
    listed (its points there read as reviewed), and the scan opened again listed none."""
    viewer, image, points, widget = scene
    data, kwargs = image.data, dict(name=image.name, scale=image.scale)
    viewer.layers.remove(image)
    points.add([5.0, 30.0, 30.0])
    other = viewer.add_image(np.random.default_rng(1).random(data.shape).astype(np.float32),
                             name="other patient", scale=image.scale)
    widget._image.value = other
    assert widget.annotated_slices() == []
    widget._image.value = viewer.add_image(data, **kwargs)
    assert widget.annotated_slices() == [5]


def test_re_detect_needs_only_the_image(scene, qtbot):
    """Re-detect writes a new layer from the image alone; with no Points layer picked it
    was refused ("no Points layer picked")."""
    viewer, image, points, widget = scene
    viewer.layers.remove(points)
    start = len(notification_manager.records)
    widget._predict.clicked.emit()
    _wait(widget, qtbot)
    assert not [n for n in notification_manager.records[start:] if n.severity == "error"]
    assert viewer.layers[-1].name.endswith(")") and len(viewer.layers) == 2


def test_a_script_setting_the_data_keeps_each_point_s_features(scene):
    """napari keeps features and shown flags by row position: a script deleting the
    first row gave a hidden weak detection the deleted one's score and flag; one deleting
    a row and appending one marked every shifted row "moved", shown and trained on."""
    viewer, image, _, widget = scene
    layer = _weak_detections_layer(viewer, image)
    widget._layer_pick.value = layer
    layer.data = np.vstack([layer.data[1:], [[4.0, 30.0, 30.0]]])  # one out, one in
    assert list(layer.shown) == [False, False, False, True]
    assert layer.features["score"].tolist()[:3] == [0.2, 0.1, 0.3]
    assert layer.features["label"].tolist()[3] == "added"
    assert np.isnan(layer.features["diameter_mm"].tolist()[3])
    assert widget._points_on_image(layer, image)[0].tolist() == [[4.0, 30.0, 30.0]]
    layer.data = np.array(layer.data[:3])  # the added one deleted again
    assert list(layer.shown) == [False, False, False]
    assert layer.features["score"].tolist() == [0.2, 0.1, 0.3]


@pytest.mark.parametrize("transform", ["plain", "shear", "rotate"])
def test_a_point_on_a_sheared_or_rotated_image_lists_the_slice_it_is_trained_on(
        make_napari_viewer, random_models, small_phantom, transform):
    """The slice was taken from the point's world z alone: on a sheared image a lesion
    put on slice 4 listed slice 10 as reviewed (trained as "no lesion here"), and on a
    rotated one no slice at all, while training placed the lesion on slice 4."""
    viewer = make_napari_viewer()
    vol = small_phantom.volume
    extra = {"plain": {}, "shear": {"shear": (0.1, 0.0, 0.0)},
             "rotate": {"rotate": [[np.cos(0.26), -np.sin(0.26), 0],
                                   [np.sin(0.26), np.cos(0.26), 0], [0, 0, 1]]}}[transform]
    image = viewer.add_image(vol.array, name="ct", scale=vol.spacing, **extra)
    widget = RetrainDetectorWidget(plugin_view(viewer))
    viewer.window.add_dock_widget(widget)
    widget._image.value = image
    widget._model.value = random_models["LesionDetector"]
    widget._add_empty_layer()
    points = widget._layer_pick.value
    points.add([4.0, 80.0, 80.0])  # a lesion on slice 4 (the layer lies as the image does)
    voxels, _ = widget._points_on_image(points, image)
    assert int(round(voxels[0, 0])) == 4 and widget.annotated_slices() == [4]
    points.data = np.array([[6.0, 70.0, 20.0]])  # moved to slice 6: both slices edited
    assert widget.annotated_slices() == [4, 6]


def test_a_script_editing_a_lesion_layer_keeps_each_points_diameter(
        make_napari_viewer, random_models, small_phantom):
    """On Retrain's own points layer (diameters, no scores) a row appended by a script took
    the selected point's diameter, and a row deleted by one shifted the others'."""
    from napari_medseg._widgets.retrain_detector import RetrainDetectorWidget

    viewer = make_napari_viewer()
    vol = small_phantom.volume
    image = viewer.add_image(vol.array, scale=vol.spacing, name="ct")
    widget = RetrainDetectorWidget(plugin_view(viewer))
    widget._image.value = image
    widget._model.value = random_models["LesionDetector"]
    widget._add_empty_layer()
    points = widget._layer_pick.value
    points.add([[2.0, 40.0, 40.0], [3.0, 20.0, 30.0]])
    features = points.features
    features["diameter_mm"] = [30.0, 12.0]
    points.features = features
    points.selected_data = {0}
    points.data = np.vstack([points.data, [[4.0, 20.0, 20.0]]])  # a script appends a lesion
    assert widget.annotated_slices() == [2, 3, 4]
    diameters = points.features["diameter_mm"].to_numpy()
    assert diameters[:2].tolist() == [30.0, 12.0] and np.isnan(diameters[2])
    points.data = points.data[1:]  # … and deletes the first
    diameters = points.features["diameter_mm"].to_numpy()
    assert diameters[0] == 12.0 and np.isnan(diameters[1])


def test_a_new_detection_layer_on_the_image_is_picked_while_nothing_is_listed(
        scene, qtbot, random_models):
    from napari_medseg._widgets.detect import DetectWidget

    viewer, image, points, widget = scene
    assert widget.annotated_slices() == []
    # a points layer no model widget made on this image (another patient's lesions
    # opened from a file, a script's): not picked, its points would train this image
    viewer.add_points(np.array([[3.0, 30.0, 30.0]]), scale=image.scale, name="from a file",
                      features={"diameter_mm": [9.0]})
    assert widget._layer_pick.value is points
    detect = DetectWidget(plugin_view(viewer))
    run_widget(qtbot, detect, image, random_models["LesionDetector"])
    detected = viewer.layers[-1]
    assert widget._layer_pick.value is detected
    points.add([4.0, 50.0, 50.0])  # not picked now: listed only when picked again
    widget._layer_pick.value = points
    assert widget.annotated_slices() == [4]
    run_widget(qtbot, detect)
    assert widget._layer_pick.value is points  # a slice is listed: the pick stays


def test_a_round_says_how_it_agrees_with_the_points_it_trained_on(scene):
    """A round brought back a false positive the user deleted and missed the lesion they
    added, and its status gave only a count of detections."""
    from types import SimpleNamespace

    from napari_medseg._layers import volume_from_layer

    viewer, image, points, widget = scene
    widget._add_edited({2, 6})  # both points' slices reviewed
    det = [SimpleNamespace(z=2.0, y=41.0, x=41.0, score=0.9),  # on the point at slice 2
           SimpleNamespace(z=6.0, y=80.0, x=80.0, score=0.8),  # not one of the user's
           SimpleNamespace(z=6.0, y=20.0, x=60.0, score=0.1),  # on a point, below threshold
           SimpleNamespace(z=4.0, y=10.0, x=10.0, score=0.9)]  # a slice not reviewed
    note = widget._agreement(SimpleNamespace(detections=det), image, points,
                             volume_from_layer(image), threshold=0.5)
    assert "On the 2 slices it trained on: it finds 1 of your 2 points" in note
    assert "1 detection you did not keep" in note and "not a held-out score" in note


def test_detect_run_on_another_image_is_not_picked(scene, qtbot, random_models):
    """Detect on another open scan switched the points picker to that scan's detections
    ('made on this image', it said), and the round trained on this image's voxels with
    the other scan's points."""
    from napari_medseg._widgets.detect import DetectWidget

    viewer, image, points, widget = scene
    other = viewer.add_image(image.data[::-1].copy(), scale=image.scale, name="prior scan")
    assert widget._image.value is image and widget.annotated_slices() == []
    for source, picked in ((other, False), (image, True)):
        detect = DetectWidget(plugin_view(viewer))
        run_widget(qtbot, detect, source, random_models["LesionDetector"])
        result = viewer.layers[-1]
        assert isinstance(result, Points) and result.metadata["medseg"]["input_layer"] == source.name
        assert (widget._layer_pick.value is result) is picked
    assert "made on this image" in widget._status.value


def test_corrections_made_before_the_widget_was_opened_are_listed(make_napari_viewer, qtbot,
                                                                  random_models, small_phantom):
    """Detect, correct the points, then open Retrain (the natural order): nothing was
    listed, and Retrain asked for the edits the user had already made; a deleted false
    positive was lost as a negative."""
    from napari_medseg._widgets.detect import DetectWidget

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    detect = DetectWidget(plugin_view(viewer))
    run_widget(qtbot, detect, image, random_models["LesionDetector"])
    detections = viewer.layers[-1]
    detect._threshold.value = detect._threshold.min  # a random model's weak detections shown
    shown = np.flatnonzero(detections.shown)
    assert len(shown) >= 1
    first_z = int(round(detections.data[shown[0]][0]))
    n = len(detections.data)
    detections.selected_data = {int(shown[0])}
    detections.remove_selected()  # a false positive deleted
    assert len(detections.data) == n - 1
    detections.add([5.0, 30.0, 30.0])  # a lesion it missed
    widget = RetrainDetectorWidget(plugin_view(viewer))
    widget._image.value = image
    widget._layer_pick.value = detections
    assert widget.annotated_slices() == sorted({first_z, 5})


def test_a_resized_ring_is_the_diameter_trained_on_and_lists_its_slice(scene):
    """Setting a point's size (napari's point size slider) listed no slice, and the round
    trained on the old diameter; the detection's text kept the old size."""
    viewer, image, points, widget = scene
    assert widget.annotated_slices() == []
    points.selected_data = {0}  # the 12 mm lesion on slice 2
    points.current_size = 20.0  # what the layer controls' slider does
    step = abs(float(image.scale[-1]))
    assert points.features["diameter_mm"].iloc[0] == pytest.approx(20.0 * step)
    assert points.features["diameter_mm"].iloc[1] == pytest.approx(8.0)  # not selected
    assert widget.annotated_slices() == [2]
    _, diameters = widget._points_on_image(points, image)
    assert diameters[0] == pytest.approx(20.0 * step)


def test_a_resized_detection_is_the_users_with_its_new_size_shown(make_napari_viewer):
    from napari_medseg._layers import watch_detection_edits

    viewer = make_napari_viewer()
    layer = viewer.add_points(np.array([[1.0, 5.0, 5.0], [2.0, 9.0, 9.0]]), scale=(2.0, 0.5, 0.5),
                              features={"diameter_mm": [6.0, 7.0], "score": [0.4, 0.9],
                                        "label": ["0.40 · 6 mm", "0.90 · 7 mm"]},
                              text="{label}")
    watch_detection_edits(layer)
    layer.selected_data = {0}
    layer.current_size = 30.0
    row = layer.features.iloc[0]
    assert row["diameter_mm"] == pytest.approx(15.0) and np.isnan(row["score"])
    assert row["label"] == "15 mm" and layer.features.iloc[1]["label"] == "0.90 · 7 mm"
    layer.selected_data = set()
    layer.current_size = 4.0  # nothing selected: no point changes
    assert layer.features["diameter_mm"].tolist() == pytest.approx([15.0, 7.0])


@pytest.mark.parametrize("recorded", [False, True])
def test_a_listed_missing_slice_is_left_out_of_the_round_not_blocking_it(
        make_napari_viewer, qtbot, random_models, small_phantom, recorded):
    """A point added on a missing (all-NaN) slice listed it, and every round was refused
    ('slices 4 were not acquired') until the user found and unticked it."""
    viewer = make_napari_viewer()
    data = small_phantom.volume.array.copy()
    data[4] = np.nan
    image = viewer.add_image(data, scale=small_phantom.volume.spacing, name="ct",
                             metadata={"medseg": {"missing_slices": [4]}} if recorded else {})
    points = viewer.add_points(np.zeros((0, 3)), scale=image.scale, name="mine",
                               features={"diameter_mm": np.zeros(0)})
    widget = RetrainDetectorWidget(plugin_view(viewer))
    widget._image.value, widget._layer_pick.value = image, points
    widget._model.value = random_models["LesionDetector"]
    widget._seconds.value = 2.0
    points.add([4.0, 30.0, 30.0])
    points.add([2.0, 40.0, 40.0])
    assert widget.annotated_slices() == [2, 4]
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    _wait(widget, qtbot)
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("slice 4 is missing from the image" in m for m in said), said
    assert widget._history is not None and widget._history.current == 1, widget._status.value
    assert list(widget._history.versions[-1].report.slices) == [2]
    # the point on the missing slice is no lesion the version failed to find
    assert "On the 1 slice it trained on" in widget._status.value, widget._status.value
    assert "of your 1 point," in widget._status.value


def test_a_resize_made_away_is_listed_and_a_removed_slice_stays_removed(
        make_napari_viewer, scene):
    """A ring resized while another layer was picked (or before the widget opened) was
    not listed, so its new diameter was not trained on; a slice removed from the list
    came back in the next widget (it compared with the points as first seen)."""
    from napari_medseg._layers import watch_detection_edits

    viewer, image, points, widget = scene
    watch_detection_edits(points)  # as Detect's layers are
    other = viewer.add_points(np.zeros((0, 3)), scale=image.scale, name="other")
    widget._layer_pick.value = other
    points.selected_data = {1}  # the 8 mm lesion on slice 6
    points.current_size = 25.0
    widget._layer_pick.value = points
    assert widget.annotated_slices() == [6]
    # removed from the list by the user, then the widget closed: the next one does not
    # list it again
    widget._edited.discard(6)
    widget._rebuild_list()
    assert widget.annotated_slices() == []
    widget._layer_pick.value = other  # let go, as closing does
    fresh = RetrainDetectorWidget(plugin_view(viewer))
    fresh._image.value, fresh._layer_pick.value = image, points
    assert fresh.annotated_slices() == []
    points.add([3.0, 20.0, 20.0])
    assert fresh.annotated_slices() == [3]


def test_the_pickers_start_on_the_shown_scan_and_its_newest_result(make_napari_viewer, qtbot,
                                                                    random_models,
                                                                    small_phantom):
    """Docked after Detect, Retrain took the newest image (a hidden one) and, as Detect's
    result was made on another, the sample's ground-truth lesions; picking the scan in
    view left the points picker on the ground truth."""
    from napari_medseg._sample_data import phantom_layer_data
    from napari_medseg._widgets.detect import DetectWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in phantom_layer_data(small_phantom):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    scan = viewer.layers[0]
    detect = DetectWidget(plugin_view(viewer))
    run_widget(qtbot, detect, scan, random_models["LesionDetector"])
    detected = viewer.layers[-1]
    viewer.add_image(np.zeros(scan.data.shape, np.float32), scale=scan.scale,
                     name="hidden scratch", visible=False)
    widget = RetrainDetectorWidget(plugin_view(viewer))
    assert widget._image.value is scan  # the newest shown, not the hidden one
    assert widget._layer_pick.value is detected  # its result, not the ground truth
    # on another scan picked and back, the result made on the scan is picked again
    other = viewer.add_image(scan.data[::-1].copy(), scale=scan.scale, name="B")
    run_widget(qtbot, detect, other, random_models["LesionDetector"])
    other_result = viewer.layers[-1]
    widget._image.value = other
    assert widget._layer_pick.value is other_result
    widget._image.value = scan
    assert widget._layer_pick.value is detected


def test_an_added_event_naming_only_the_last_row_counts_every_appended_row():
    """napari < 0.6 sends data_indices=(-1,) for Points.add of several points: only the
    last was marked added and listed (its slice trained on, the others' not)."""
    from types import SimpleNamespace

    from napari_medseg._layers import _ROWS_BEFORE_ADD, _added_rows

    layer = Points(np.zeros((5, 3)))
    _ROWS_BEFORE_ADD[layer] = 3  # at its "adding" event
    assert _added_rows(layer, SimpleNamespace(data_indices=(-1,)), 5) == [3, 4]
    assert _added_rows(layer, SimpleNamespace(data_indices=(-2, -1)), 5) == [3, 4]



def test_moving_detects_threshold_unticks_the_reviewed_slices_it_changes(scene):
    """Moving Detect's score threshold after a slice was reviewed changed what a round
    trained on there, silently: a kept detection hidden was taught as no lesion, a weak
    one never seen, shown, as a lesion."""
    from qtpy.QtCore import Qt

    from napari_medseg._widgets.detect import DetectWidget

    viewer, image, _points, widget = scene
    found = viewer.add_points([[2.0, 40.0, 40.0], [6.0, 20.0, 60.0], [6.0, 50.0, 50.0]],
                              scale=image.scale, name="lesions",
                              features={"score": [0.9, 0.3, 0.7], "diameter_mm": [12.0, 8, 8]})
    widget._layer_pick.value = found
    detect = DetectWidget(plugin_view(viewer))
    detect._points = found
    detect._threshold.value = 0.5
    detect._apply_threshold()
    assert list(found.shown) == [True, False, True]
    widget._add_edited({2, 6})  # both reviewed as shown at 0.5
    assert widget.training_slices() == [2, 6]
    start = len(notification_manager.records)
    detect._threshold.value = 0.2  # the 0.3 detection on slice 6, never seen, now shown
    detect._apply_threshold()
    assert widget.training_slices() == [2] and widget.annotated_slices() == [2, 6]
    items = [widget._slice_list.item(i) for i in range(widget._slice_list.count())]
    item = next(i for i in items if i.text().startswith("slice 6 "))
    assert item.text().endswith("threshold changed: review, tick")
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("score threshold" in m and "(6)" in m for m in said), said
    item.setCheckState(Qt.CheckState.Checked)  # reviewed again: trains
    assert widget.training_slices() == [2, 6] and "review" not in item.text()
    detect._threshold.value = 0.25  # nothing shown or hidden: nothing unticked
    detect._apply_threshold()
    assert widget.training_slices() == [2, 6]


def test_a_rounds_report_describes_the_round_not_points_added_during_it(scene, qtbot):
    """Points added during a round were counted in its report ("on the 2 slices it
    trained on: it finds 0 of your 3 points" of a round on 1 slice and 1 point)."""
    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    widget._run.clicked.emit()
    assert widget._worker is not None
    points.add([[7.0, 30.0, 30.0], [7.0, 60.0, 60.0]])
    _wait(widget, qtbot)
    assert "On the 1 slice it trained on" in widget._status.value, widget._status.value
    assert "of your 1 point" in widget._status.value


def test_resizing_rings_on_a_layer_without_sizes_says_they_are_not_trained_on(scene):
    """On napari's own New points layer a ring drawn 30 mm wide trained as a 10 mm
    lesion, silently."""
    viewer, image, _points, widget = scene
    plain = viewer.add_points(np.array([[4.0, 30.0, 30.0]]), scale=image.scale, name="mine")
    widget._layer_pick.value = plain
    start = len(notification_manager.records)
    plain.selected_data = {0}
    plain.current_size = 15  # the layer controls' point size slider
    plain.current_size = 20  # said once
    said = [str(n.message) for n in notification_manager.records[start:]
            if "holds no lesion sizes" in str(n.message)]
    assert len(said) == 1 and "10 mm lesions whatever their rings" in said[0]


def test_moving_the_points_layer_unticks_its_listed_slices(scene):
    """Translated by one slice, the layer's points trained on the next slice and the
    listed one was taught as "no lesion here", silently (the image moved: the same)."""
    from qtpy.QtCore import Qt

    viewer, image, points, widget = scene
    points.add([4.0, 30.0, 30.0])
    assert widget.training_slices() == [4]
    start = len(notification_manager.records)
    points.translate = (image.scale[0], 0.0, 0.0)
    assert widget.training_slices() == [] and widget.annotated_slices() == [4]
    item = widget._slice_list.item(0)
    assert item.text().endswith("layer moved: review, tick")
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("was moved or rescaled" in m and "(4)" in m for m in said), said
    points.translate = points.translate  # the same place: nothing said again
    assert len([m for m in (str(n.message) for n in notification_manager.records[start:])
                if "was moved" in m]) == 1
    item.setCheckState(Qt.CheckState.Checked)
    points.translate = (image.scale[0], 5.0, 5.0)  # in-plane: the same slices
    assert widget.training_slices() == [4]
    image.translate = (image.scale[0], 0.0, 0.0)  # the image moved instead
    assert widget.training_slices() == []


def test_a_diameter_typed_into_the_features_table_lists_its_slice_and_redraws_its_ring(scene,
                                                                                      qtbot):
    """napari's features table writes in place and emits no event: the point's slice
    was not listed (the round ignored the edit) and its ring kept the old size."""
    from napari_medseg._layers import marker_sizes, scale_mm

    viewer, image, points, widget = scene
    assert widget.annotated_slices() == []
    points.features.loc[1, "diameter_mm"] = 25.0  # as the table's cell edit does
    widget.autosave_now(wait=True)
    assert widget.annotated_slices() == [6]
    assert points.size[1] == pytest.approx(marker_sizes([25.0], scale_mm(points))[0])
    points.features.loc[0, "diameter_mm"] = 15.0
    widget._run.clicked.emit()  # a round notices it too, before it reads the points
    _wait(widget, qtbot)
    assert 2 in widget.annotated_slices()

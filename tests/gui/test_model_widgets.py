"""Segment / Detect / Classify dock widgets in a real viewer, with small random models."""

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from napari.layers import Labels, Points
from napari.utils.notifications import notification_manager
from pydicom.data import get_testdata_file

from napari_medseg._sample_data import phantom_layer_data
from napari_medseg._widgets.classify import ClassifyWidget
from napari_medseg._widgets.detect import DetectWidget, _camera
from napari_medseg._widgets.segment import SegmentWidget
from napari_medseg.core.models.registry import BUNDLED_DIR
from tests.gui.conftest import plugin_view


WIDGETS = [SegmentWidget, DetectWidget, ClassifyWidget]


def layer_snapshot(viewer):
    return [(l.name, type(l).__name__, np.array(l.data, copy=True)) for l in viewer.layers]


def _open_phantom(viewer, phantom):
    for data, kwargs, layer_type in phantom_layer_data(phantom):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    return viewer.layers[0]


def _select(widget, layer, card_path):
    widget._image.value = layer
    widget._model.value = card_path


def _ready(make_napari_viewer, phantom, widget_cls, card_path):
    """(viewer, image, widget): a phantom opened and a widget with image and model picked."""
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, phantom)
    widget = widget_cls(plugin_view(viewer))
    _select(widget, image, card_path)
    return viewer, image, widget


def _picker_names(combo):
    return [combo.native.itemText(i) for i in range(combo.native.count())]


def _run_and_wait(widget, qtbot, timeout=120_000):
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


def _messages_since(start, severity):
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == severity]


def _assert_on_image(result_layer, image):
    from napari_medseg._layers import world_matrix

    np.testing.assert_allclose(result_layer.scale, image.scale)
    np.testing.assert_allclose(result_layer.translate, image.translate)
    np.testing.assert_allclose(world_matrix(result_layer), world_matrix(image))


def test_segment_adds_aligned_labels_and_leaves_layers_alone(
    make_napari_viewer, qtbot, random_models, small_phantom
):
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    before = layer_snapshot(viewer)
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    _run_and_wait(widget, qtbot)
    _run_and_wait(widget, qtbot)  # running again adds a second layer, never overwrites
    new = viewer.layers[len(before):]
    assert len(new) == 2 and all(isinstance(layer, Labels) for layer in new)
    assert new[0].data.shape == image.data.shape and new[0].data.dtype == np.uint8
    _assert_on_image(new[0], image)
    meta = new[0].metadata["medseg"]
    assert meta["model"] == "test-segmenter" and meta["input_layer"] == image.name
    assert len(meta["model_sha256"]) == 64 and "not for diagnostic use" in meta["disclaimer"]
    assert "liver" in list(new[0].features["name"])
    # kind first: napari's layer list cuts a long name at its end, where the kind was
    assert new[0].name.startswith(f"segmentation · {image.name} (test-segmenter)")
    for (name, kind, data), layer in zip(before, viewer.layers):
        assert layer.name == name and type(layer).__name__ == kind
        np.testing.assert_array_equal(layer.data, data)


def test_a_run_shows_its_progress_in_the_widget_not_in_naparis_activity_dock(
    make_napari_viewer, qtbot, random_models, small_phantom
):
    """While any napari progress bar exists, napari animates an "in progress" image, which
    slowed a Segment run ~1.6x under software OpenGL: the widget shows a bar of its own."""
    from napari.utils import progress

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    seen = []  # (widget bar shown, napari progress bars) at each report
    shown = widget._on_progress
    statuses = []

    def watch(report):
        seen.append((not widget._progress.native.isHidden(), len(progress._all_instances)))
        shown(report)
        statuses.append(widget._status.value)

    widget._on_progress = watch
    _run_and_wait(widget, qtbot)
    assert seen and all(visible and bars == 0 for visible, bars in seen), seen
    assert widget._progress.native.isHidden() and isinstance(viewer.layers[-1], Labels)
    # the progress message goes on the bar, not the status line, which holds what the
    # user reads meanwhile (Detect's threshold count was replaced by "Detect: step 20")
    assert set(statuses) == {f"Segment: running on '{image.name}'…"}, statuses
    assert widget._progress.native.format().endswith("%p%")
    # Qt's format has no escape for a message's own %: "50%% of slices" was shown
    from napari_medseg.core.progress import Progress

    widget._worker, widget._drawn_at = object(), 0.0  # as while a job runs
    shown(Progress(1, 4, "50% of slices"))
    assert widget._progress.native.text() == "50\uff05 of slices  25%"
    widget._worker = None


@pytest.mark.parametrize("widget_cls", WIDGETS)
def test_widgets_run_on_real_ct_opened_by_reader(make_napari_viewer, qtbot, random_models, widget_cls):
    """pydicom's CT_small.dcm: one 128×128 slice, opened as a (1, y, x) volume in HU."""
    viewer = make_napari_viewer()
    viewer.open(get_testdata_file("CT_small.dcm"), plugin="napari-medseg")
    image = viewer.layers[0]
    widget = widget_cls(plugin_view(viewer))
    _select(widget, image, random_models[widget_cls.architecture])
    start = len(notification_manager.records)
    _run_and_wait(widget, qtbot)
    assert not _messages_since(start, "error")
    if widget_cls is ClassifyWidget:
        assert widget._result.probabilities.shape == (1, 3)
        assert widget._current.value.startswith("Slice 0:")
        return
    result = viewer.layers[-1]
    assert result is not image and len(viewer.layers) == 2
    assert isinstance(result, Labels if widget_cls is SegmentWidget else Points)
    _assert_on_image(result, image)
    if isinstance(result, Labels):
        assert result.data.shape == image.data.shape


def _detect(make_napari_viewer, qtbot, random_models, phantom):
    """The Detect widget run on a phantom: (viewer, image, widget, its Points layer)."""
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, phantom)
    widget = DetectWidget(plugin_view(viewer))
    _select(widget, image, random_models["LesionDetector"])
    _run_and_wait(widget, qtbot)
    return viewer, image, widget, viewer.layers[-1]


def test_a_detector_card_with_a_threshold_below_the_sliders_minimum_runs(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """peak_threshold 0.02 (the registry accepts 0–1): setting the slider below its
    minimum raised in show_result, leaving a stuck status and an empty go-to list."""
    import json
    from pathlib import Path

    from napari_medseg.core.models import load_model, save_model

    model, card = load_model(random_models["LesionDetector"])
    keep = {k: card[k] for k in ("input_spacing_mm", "resample_axes", "normalisation",
                                 "classes", "min_distance_mm", "context_slices")}
    low = save_model(model, Path(random_models["LesionDetector"]).parent, "low-threshold",
                     {**keep, "peak_threshold": 0.02})
    assert json.loads(Path(low).read_text())["peak_threshold"] == 0.02
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = DetectWidget(plugin_view(viewer))
    _select(widget, image, str(low))
    _run_and_wait(widget, qtbot)
    assert isinstance(viewer.layers[-1], Points)
    assert widget._threshold.value == pytest.approx(0.02) and widget._threshold.enabled
    assert "detections at score ≥ 0.02" in widget._status.value, widget._status.value


def test_the_threshold_box_is_off_with_its_slider_before_a_run(make_napari_viewer):
    """The slider looked disabled while its number box took a typed threshold."""
    from qtpy.QtWidgets import QAbstractSpinBox

    viewer = make_napari_viewer()
    widget = DetectWidget(plugin_view(viewer))
    box = widget._threshold.native.findChild(QAbstractSpinBox)
    assert not widget._threshold.enabled and not box.isEnabled()


def test_detect_points_threshold_and_jump(make_napari_viewer, qtbot, random_models, small_phantom):
    viewer, image, widget, points = _detect(make_napari_viewer, qtbot, random_models, small_phantom)
    assert isinstance(points, Points) and points is not viewer.layers[2]
    _assert_on_image(points, image)
    assert {"score", "diameter_mm"} <= set(points.features.columns)
    assert points.name.startswith(f"lesions · {image.name} (")
    scores = points.features["score"].to_numpy()
    n_layers = len(viewer.layers)
    widget._threshold.value = widget._threshold.min
    assert points.shown.sum() == (scores >= widget._threshold.min).sum()
    widget._threshold.value = 1.0
    assert points.shown.sum() == (scores >= 1.0).sum()
    assert len(viewer.layers) == n_layers, "filtering must not re-run or add layers"
    if len(scores):
        widget._threshold.value = widget._threshold.min
        index = int(np.argmax(scores))
        widget._goto.value = index
        expected = points.data_to_world(points.data[index])[0]
        assert viewer.dims.point[0] == pytest.approx(expected, abs=image.scale[0])
    # a lesion the user adds is theirs: no detection's score, no diameter, never filtered out
    points.add([2.0, 10.0, 10.0])
    added = points.features.iloc[-1]
    assert np.isnan(added["score"]) and np.isnan(added["diameter_mm"]) and added["label"] == "added"
    assert points.text.values[-1] == "added"
    widget._threshold.value = 1.0
    assert points.shown[-1] and points.shown.sum() == (scores >= 1.0).sum() + 1
    assert "1 added or moved by you" in widget._status.value
    assert all(i != len(scores) for _, i in widget._goto_items)


@pytest.mark.parametrize("widget_cls, arch", [(SegmentWidget, "RecurrentSegmenter"),
                                               (DetectWidget, "LesionDetector")])
def test_a_turned_series_missing_planes_are_named(make_napari_viewer, qtbot, random_models,
                                                 small_phantom, widget_cls, arch):
    """A coronal series' lost planes (the reader records them along y) were left empty
    without a word, where an axial series' gaps are named."""
    viewer = make_napari_viewer()
    data = np.array(small_phantom.volume.array, copy=True)
    data[:, 3:5] = np.nan  # the planes the series lacks, as the reader leaves them
    image = viewer.add_image(data, scale=small_phantom.volume.spacing, metadata={"medseg": {
        "source": {"missing_planes": {"axis": "y", "indices": [3, 4]}}}})
    widget = widget_cls(plugin_view(viewer))
    _select(widget, image, random_models[arch])
    _run_and_wait(widget, qtbot)
    assert ("Missing planes along y (coronal): 3–4 (not acquired): left without a result"
            in widget._status.value), widget._status.value


def test_a_damaged_user_card_is_listed_as_unreadable_and_run_says_why(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """A card cut short, or hand-edited with a bad value, vanished from every Model picker
    with only a log line: the user never learnt why their model was not offered."""
    import json
    from pathlib import Path

    from napari.utils.notifications import notification_manager

    from napari_medseg.core.models import user_models_dir

    folder = user_models_dir()
    (folder / "cut.json").write_text('{"name": "cut", "architecture": "LesionDetector",')
    card = json.loads(Path(random_models["LesionDetector"]).read_text())
    (folder / "tuned.json").write_text(json.dumps({**card, "name": "tuned",
                                                   "peak_threshold": "0.4"}))
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    detect, segment = DetectWidget(plugin_view(viewer)), SegmentWidget(plugin_view(viewer))
    labels = lambda w: [w._model.native.itemText(i) for i in range(w._model.native.count())]  # noqa: E731
    assert {"cut.json (unreadable)", "tuned.json (unreadable)"} <= set(labels(detect))
    assert labels(detect)[0].endswith("(bundled)")  # still starts on the bundled model
    # one that names another architecture is not offered to a segmenter's picker
    assert "cut.json (unreadable)" in labels(segment)
    assert "tuned.json (unreadable)" not in labels(segment)
    n_layers, start = len(viewer.layers), len(notification_manager.records)
    _select(detect, image, str(folder / "tuned.json"))
    _run_and_wait(detect, qtbot)
    errors = [str(n.message) for n in notification_manager.records[start:]
              if n.severity == "error"]
    assert len(errors) == 1 and "tuned.json" in errors[0] and "peak_threshold" in errors[0]
    assert len(viewer.layers) == n_layers


def _drawn_as_hidden(points) -> np.ndarray:
    """Rows napari draws (in view) that look like nothing: no ring, no text."""
    ring = np.asarray(points.border_color)[:, 3]
    text = np.asarray(points.text.values, dtype=object)
    return (ring == 0) & (text == "")


@pytest.mark.parametrize("view", ["3D view", "2D image"])
def test_the_threshold_hides_weak_detections_in_the_3d_view_and_on_a_2d_image(
        make_napari_viewer, qtbot, random_models, small_phantom, view):
    """napari honours `shown` only while an axis is off screen: in the 3D view, and on a
    2D layer, every detection down to 0.05 was drawn with its text, while the widget said
    "0 of 65 detections" and the CSV held none of them."""
    viewer = make_napari_viewer()
    if view == "2D image":
        image = viewer.add_image(small_phantom.volume.array[4], scale=small_phantom.volume.spacing[1:])
    else:
        image = _open_phantom(viewer, small_phantom)
    widget = DetectWidget(plugin_view(viewer))
    _select(widget, image, random_models["LesionDetector"])
    _run_and_wait(widget, qtbot)
    points = viewer.layers[-1]
    if view == "3D view":
        viewer.dims.ndisplay = 3
    # napari 0.9 draws every row here (hidden ones too: the plugin's hide_unshown then
    # makes them transparent); napari 0.5 leaves the hidden ones out itself
    scores = points.features["score"].to_numpy()
    assert len(scores) >= 2, "the random detector found too little to test"
    widget._threshold.value = float(np.median(scores))
    hidden = ~points.shown
    assert hidden.any() and points.shown.any()
    # a 2D image has no slices to name ("z=0" on every entry)
    entries = [text for text, _ in widget._goto_items]
    assert entries and all((" z=" in t) == (view != "2D image") for t in entries), entries
    np.testing.assert_array_equal(_drawn_as_hidden(points), hidden)
    assert all(t for t in np.asarray(points.text.values)[points.shown])
    # napari selects what it draws, invisible rows included: Delete removed weak
    # detections the user never saw
    points.selected_data = set(range(len(points.data)))
    assert set(points.selected_data) == set(np.flatnonzero(points.shown))
    points.selected_data = set()
    # what the user set on a shown row (ring colour, label) survives the slider
    keep = int(np.flatnonzero(points.shown)[0])
    colors = np.array(points.border_color)
    colors[keep] = (1.0, 0.0, 0.0, 0.4)
    points.border_color = colors
    features = points.features.copy()
    features.loc[keep, "label"] = "nodule A"
    points.features = features
    widget._threshold.value = widget._threshold.min  # back: every ring and text again
    assert points.shown.all() and not _drawn_as_hidden(points).any()
    np.testing.assert_allclose(points.border_color[keep], (1.0, 0.0, 0.0, 0.4))
    assert points.features["label"][keep] == "nodule A"
    widget._threshold.value = 1.0
    # a hidden detection the user moves is theirs: drawn and labelled "moved"
    data = np.array(points.data, copy=True)
    data[0] = data[0] + 1.0
    points.data = data
    assert points.shown[0] and not _drawn_as_hidden(points)[0]
    assert points.features["label"][0] == "moved" and points.text.values[0] == "moved"
    np.testing.assert_array_equal(_drawn_as_hidden(points), ~points.shown)


def test_go_to_lesion_follows_the_axes_the_user_shows(make_napari_viewer, qtbot, random_models,
                                                     small_phantom):
    """With the axes reordered (a sagittal-type view showing z and y), the jump moved the
    z slider and centred the camera on (y, x): the lesion was not brought into view."""
    viewer, image, widget, points = _detect(make_napari_viewer, qtbot, random_models, small_phantom)
    points.add([3.0, 20.0, 30.0])  # a point of the user's: the jump works on any row
    index = len(points.data) - 1
    world = points.data_to_world(points.data[index])
    for order, ndisplay in (((2, 0, 1), 2), ((0, 1, 2), 2), ((1, 2, 0), 3)):
        viewer.dims.order = order
        viewer.dims.ndisplay = ndisplay
        viewer.dims.set_point(range(3), [0.0, 0.0, 0.0])
        widget._go_to_lesion(index)
        for axis in viewer.dims.not_displayed:
            assert viewer.dims.point[axis] == pytest.approx(world[axis], abs=image.scale[axis])
        center = np.asarray(_camera(viewer).center)[-ndisplay:]
        np.testing.assert_allclose(center, [world[a] for a in viewer.dims.displayed], atol=1e-6)


def test_detect_keeps_the_missing_slices_said_and_lets_go_of_a_deleted_layer(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """The missing-slices line vanished when the threshold moved; a deleted detections
    layer left its slider and lesion list looking live."""
    viewer = make_napari_viewer()
    data = small_phantom.volume.array.copy()
    data[2] = np.nan
    image = viewer.add_image(data, scale=small_phantom.volume.spacing, name="gapped")
    widget = DetectWidget(plugin_view(viewer))
    _select(widget, image, random_models["LesionDetector"])
    _run_and_wait(widget, qtbot)
    points = viewer.layers[-1]
    assert widget._status.value.count("Missing slices 2") == 1
    widget._threshold.value = 0.3
    assert "detections at score ≥ 0.30" in widget._status.value
    assert widget._status.value.count("Missing slices 2") == 1
    viewer.layers.remove(points)
    assert not widget._threshold.enabled and not widget._goto.enabled
    assert widget._goto_items == [] and "removed" in widget._status.value


@pytest.mark.parametrize("one_slice_volume", [False, True])
def test_segment_on_a_2d_image_reports_areas_not_volumes(make_napari_viewer, qtbot, small_phantom,
                                                         one_slice_volume):
    """A 2D slice has no thickness: its structures were given in ml (× a made-up 1 mm).
    napari-medseg's reader opens a 2D file as a one-slice volume: the widget still said
    ml there, while the CLI gave cm² for the same file."""
    viewer = make_napari_viewer()
    z = small_phantom.volume.shape[0] // 2
    data = small_phantom.volume.array[z]
    scale = small_phantom.volume.spacing[1:]
    if one_slice_volume:  # 5 mm thick: the area is not the voxel volume (× 5) in disguise
        data, scale = data[None], (5.0, *scale)
    image = viewer.add_image(data, scale=scale, name="one slice")
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, str(BUNDLED_DIR / "segmenter.json"))
    _run_and_wait(widget, qtbot)
    assert "cm²" in widget._status.value and " ml" not in widget._status.value
    labels = viewer.layers[-1].data
    sy, sx = small_phantom.volume.spacing[1:]
    body = float((labels == 1).sum()) * sy * sx / 100.0
    assert f"body {body:.0f} cm²" in widget._status.value


def test_classify_follows_slice_and_jumps(make_napari_viewer, qtbot, random_models, small_phantom):
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    n_layers = len(viewer.layers)
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, image, random_models["SliceClassifier"])
    _run_and_wait(widget, qtbot)
    assert len(viewer.layers) == n_layers  # classification adds no layer
    probs = widget._result.probabilities
    assert probs.shape == (image.data.shape[0], 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for z in (0, 5):
        widget._go_to_slice(z)
        assert widget._current.value.startswith(f"Slice {z}:")
        assert widget._strip._current == z
    # z put on screen (a coronal-type view): the label named the slider's leftover slice,
    # and a jump only moved a point on a displayed axis (nothing visible happened)
    viewer.dims.order = (1, 0, 2)
    assert "no current slice" in widget._current.value and widget._strip._current == -1
    widget._go_to_slice(5)
    z_on_screen = list(viewer.dims.displayed).index(0)
    world_z = image.data_to_world([5, 0, 0])[0]
    assert np.asarray(_camera(viewer).center)[-2:][z_on_screen] == pytest.approx(world_z)
    viewer.dims.order = (0, 1, 2)
    assert widget._current.value.startswith("Slice ")
    viewer.dims.ndisplay = 3  # every axis shown, none reordered: the slider's slice stays named
    widget._follow_slice()
    assert widget._current.value.startswith("Slice ")
    # a jump there moved only the camera: the widget kept naming the slice before it
    widget._go_to_slice(6)
    assert widget._current.value.startswith("Slice 6:") and widget._strip._current == 6
    viewer.dims.ndisplay = 2
    # the classified layer removed: its strip and lesion list no longer look live
    viewer.layers.remove(image)
    widget._follow_slice()
    assert len(widget._strip._values) == 0 and not widget._goto.enabled


def test_classify_marks_generated_slices_and_preselects_none(make_napari_viewer, qtbot,
                                                             random_models, small_phantom):
    """On a Generate result the lesion list and the slice line gave an interpolated
    slice's class as any other's; and the list showed its first slice as if picked."""
    from napari_medseg.core.models import load_model, save_model

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    image.metadata["medseg"] = {**image.metadata.get("medseg", {}), "synthetic": True,
                                "slice_axis": "z", "generated_slices": [1, 3, 5]}
    # a classifier that calls every slice lesion: each slice is listed
    model, card = load_model(random_models["SliceClassifier"])
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias[:] = torch.tensor([-50.0, -50.0, 50.0])
    path = save_model(model, Path(random_models["SliceClassifier"]).parent, "all-lesion",
                      {k: card[k] for k in card if k not in ("name", "sha256", "weights_file",
                                                              "version", "format")})
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, image, str(path))
    _run_and_wait(widget, qtbot)
    items = widget._goto_items
    assert items[0][1] is None and "pick one to go there" in items[0][0]
    assert widget._goto.value is None  # nothing looks picked
    marked = {z for text, z in items[1:] if text.endswith(" · generated")}
    assert marked == {1, 3, 5}
    widget._go_to_slice(3)
    assert widget._current.value.startswith("Slice 3 (generated, not acquired): lesion")
    widget._go_to_slice(2)
    assert widget._current.value.startswith("Slice 2: lesion")


def _strip_image(qtbot, values):
    from napari_medseg._widgets._strip import ProbabilityStrip

    strip = ProbabilityStrip()
    qtbot.addWidget(strip)
    strip.resize(100, 70)
    strip.set_values(values)
    return strip.grab().toImage()


def _rgb(image, x, y):
    color = image.pixelColor(x, y)
    return color.red(), color.green(), color.blue()


@pytest.mark.parametrize("change", ["data", "scale"])
def test_classify_drops_its_result_when_the_image_changes_after_the_run(
        make_napari_viewer, qtbot, random_models, small_phantom, change):
    """The classes, the strip and the lesion list stayed those of the image as it was:
    after its data was replaced by 3 slices of air, slice 1 still showed the old slice 1."""
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array.copy(), scale=small_phantom.volume.spacing)
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, image, random_models["SliceClassifier"])
    _run_and_wait(widget, qtbot)
    assert widget._current.value.startswith("Slice ")
    if change == "data":
        image.data = np.full((3, *image.data.shape[1:]), -1000, np.float32)
    else:
        image.scale = (1.0, 1.0, 1.0)
    assert widget._current.value == "The classified image changed since; run Classify again"
    assert widget._status.value.startswith("Result out of date")
    assert not widget._goto.enabled and widget._strip._values.size == 0
    assert not widget._goto.choices  # no entries naming the old image's slices
    viewer.dims.set_point(0, 0.0)  # moving on shows no stale slice either
    assert widget._current.value == "The classified image changed since; run Classify again"
    _run_and_wait(widget, qtbot)  # a new run on the image as it is
    assert widget._current.value.startswith("Slice ")


def test_the_strip_shows_missing_slices_and_a_single_slice(qtbot):
    """NaN became probability 0 (a confident "no lesion"); one slice drew no curve."""
    background = (38, 41, 48)
    gapped = _strip_image(qtbot, [0.9, np.nan, np.nan, 0.9])
    grey = _rgb(gapped, 37, 5)  # top of slice 1's column: a grey band, not background
    assert grey != background and abs(grey[0] - grey[2]) < 12
    single = _strip_image(qtbot, [0.6])
    red, green, blue = _rgb(single, 50, 60)  # inside the bar, near its foot
    assert green > red + 20 and green > blue + 10


@pytest.mark.parametrize("widget_cls", WIDGETS)
@pytest.mark.parametrize(
    "make_layer, reason",
    [
        (lambda v: v.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="photo"), "RGB"),
        (lambda v: v.add_image(np.zeros((2, 3, 16, 16)), name="4d"), "dimensions"),
        (lambda v: v.add_image(np.full((3, 16, 16), np.nan), name="nan"), "NaN"),
        (lambda v: None, "no image layer"),
    ],
)
def test_bad_input_notifies_and_changes_nothing(
    make_napari_viewer, qtbot, random_models, widget_cls, make_layer, reason
):
    viewer = make_napari_viewer()
    layer = make_layer(viewer)
    widget = widget_cls(plugin_view(viewer))
    if layer is not None:
        widget._image.value = layer
    before = layer_snapshot(viewer)
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    # what needs a pass over every voxel (NaN) is found in the worker, off napari's thread
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    errors = _messages_since(start, "error")
    assert len(errors) == 1 and reason in errors[0] and "\n" not in errors[0]
    assert [(n, k) for n, k, _ in layer_snapshot(viewer)] == [(n, k) for n, k, _ in before]
    assert widget._worker is None and widget._run.enabled


def test_a_picked_model_that_goes_away_stays_picked_and_a_run_says_why(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """The picker moved on its own to the bundled model when the picked card was deleted
    or damaged, and the next run used it unannounced."""
    viewer, image, widget = _ready(make_napari_viewer, small_phantom, SegmentWidget,
                                   random_models["RecurrentSegmenter"])
    card = Path(random_models["RecurrentSegmenter"])
    card.write_text(card.read_text()[:-20])  # damaged
    widget._model.reset_choices()  # what a layer added or a model saved elsewhere does
    assert widget._model.value == str(card)
    assert "test-segmenter.json (unavailable)" in _picker_names(widget._model)
    before = layer_snapshot(viewer)
    start = len(notification_manager.records)
    _run_and_wait(widget, qtbot)
    errors = _messages_since(start, "error")
    assert len(errors) == 1 and "not a readable model card" in errors[0], errors
    assert [(n, k) for n, k, _ in layer_snapshot(viewer)] == [(n, k) for n, k, _ in before]


def test_two_user_models_of_one_name_can_both_be_picked(make_napari_viewer, random_models):
    card = Path(random_models["RecurrentSegmenter"])
    copy = card.with_name("zz-copy.json")
    copy.write_text(card.read_text())  # same name and version: magicgui listed one of them
    widget = SegmentWidget(make_napari_viewer())
    values = [widget._model.native.itemData(i) for i in range(widget._model.native.count())]
    assert str(card) in values and str(copy) in values
    names = _picker_names(widget._model)
    assert len(set(names)) == len(names) and any("zz-copy.json" in n for n in names)


def test_labels_layer_is_refused_as_image(make_napari_viewer):
    from napari_medseg._layers import volume_from_layer
    from napari_medseg.core.errors import MedsegInputError

    viewer = make_napari_viewer()
    labels = viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="seg")
    with pytest.raises(MedsegInputError, match="Labels layer"):
        volume_from_layer(labels)


def test_cancel_and_removed_layer_leave_no_result(
    make_napari_viewer, qtbot, random_models, small_phantom
):
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    n_layers = len(viewer.layers)
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    widget._run.clicked.emit()
    widget._cancel.clicked.emit()
    # until the job has stopped the widget says it is cancelling (it said "Cancelled"
    # while the model was still loading, Run still off)
    assert widget._status.value == "Cancelling…" and not widget._cancel.enabled
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == n_layers and widget._run.enabled
    assert widget._status.value == "Cancelled"

    start = len(notification_manager.records)
    widget._run.clicked.emit()
    viewer.layers.remove(image)  # the user deletes the input while the model runs
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == n_layers - 1
    # cancelled at once and said (see test_removing_the_image_during_a_run_cancels_it)
    assert "was removed" in widget._status.value
    assert not _messages_since(start, "error")


@pytest.mark.parametrize("transform", [
    {"affine": [[5, 0.5, 0, 10], [0, 1.5, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 1]]},
    {"scale": (5, 1.5, 1.5), "shear": (0.3, 0.2, 0.1)},
    {"scale": (5, 1.5, 1.5), "rotate": [[1, 0, 0], [0, 0.866025, -0.5], [0, 0.5, 0.866025]]},
])
def test_go_to_lesion_shows_its_slice_and_centres_it_on_a_sheared_image(make_napari_viewer,
                                                                        transform):
    """napari slices by the world z alone; a sheared layer's lesion has a world z that
    depends on its y and x, and the jump drew slice 10 for a lesion on slice 6."""
    from napari_medseg._layers import _like_layer

    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.rand(10, 64, 64).astype(np.float32), **transform)
    points = viewer.add_points(np.array([[6.0, 40.0, 20.0], [2.0, 5.0, 50.0]]),
                               **_like_layer(image))
    widget = DetectWidget(plugin_view(viewer))
    widget._points = points
    widget._go_to_lesion(0)
    image.refresh()
    points.refresh()
    assert float(image._data_slice.point[0]) == 6.0  # what napari draws
    (drawn,) = points._view_data  # the lesion is on the slice shown …
    at = points._data_to_world.set_slice([1, 2])(drawn)  # … at the centre of the view
    np.testing.assert_allclose(_camera(viewer).center[-2:], at, atol=1e-6)


@pytest.mark.parametrize("transform", [
    # an oblique scan: its z mixes in y (30° about x), placed off the origin
    {"scale": (2.5, 2, 2), "rotate": (30, 0, 0), "translate": (-40, 12, 7)},
    {"scale": (2.5, 2, 2), "rotate": (0, 20, 0), "translate": (5, -30, 60)},
    {"scale": (5, 1.5, 1.5), "shear": (0.3, 0.2, 0.1), "translate": (10, 20, -30)},
    {"affine": [[4, 0.6, -0.4, 10], [0.3, 1.5, 0, 20], [0, 0, 1.5, -3], [0, 0, 0, 1]]},
    {"scale": (-2.5, 2, 2), "translate": (40, 0, 0)},  # z flipped
])
def test_go_to_slice_shows_that_slice_on_a_rotated_or_sheared_image(make_napari_viewer,
                                                                     transform):
    """napari slices a layer by the hidden axes' rows of its world-to-data transform: on
    a rotated layer the slider at the slice's world z drew another slice (7 drew 5). Some
    slices of a rotated layer no slider position reaches (napari's own limit): said."""
    from napari_medseg._widgets._navigate import go_to_slice, slice_at

    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.rand(12, 32, 32).astype(np.float32), **transform)
    rotated, reached = "rotate" in transform, []
    for z in (0, 4, 7, 11):
        start = len(notification_manager.records)
        go_to_slice(viewer, image, z)
        image.refresh()
        # the slider snaps to its steps: napari draws the nearest slice to where it lands
        drawn = round(float(image._data_slice.point[0]))
        assert round(slice_at(viewer, image)) == drawn
        said = _messages_since(start, "warning")
        if drawn != z:
            assert rotated and len(said) == 1 and f"slice {z} " in said[0], (z, drawn, said)
        else:
            assert not said
            reached.append(z)
    assert reached  # before the fix, any slice it drew off its place went unsaid (7 drew 5)


def test_closing_the_widget_stops_its_job(make_napari_viewer, qtbot, random_models,
                                          small_phantom):
    """napari's close button takes the widget out of its dock: its job ran on and added
    its layers to a viewer with no widget left to cancel it."""
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    n_layers = len(viewer.layers)
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    dock = viewer.window.add_dock_widget(widget, name="Segment (test)")
    widget._run.clicked.emit()
    viewer.window.remove_dock_widget(dock)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    qtbot.wait(50)
    assert len(viewer.layers) == n_layers


def test_gui_stays_responsive_while_segmenting(make_napari_viewer, qtbot, random_models):
    """Longest gap between event-loop ticks while a 64×256×256 segmentation runs.

    The bound is generous (shared 2-core machine, software rendering); the benchmark
    reports the real figure.
    """
    from qtpy.QtCore import QTimer

    from napari_medseg.core.phantom import generate_phantom

    viewer = make_napari_viewer()
    phantom = generate_phantom((64, 256, 256), (2.5, 0.8, 0.8), seed=11, n_lesions=0)
    image = viewer.add_image(phantom.volume.array, scale=phantom.volume.spacing)
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=300_000)
    timer.stop()
    gaps = np.diff(ticks)
    assert len(ticks) > 10 and isinstance(viewer.layers[-1], Labels)
    assert gaps.max() < 1.0, f"event loop stalled for {gaps.max() * 1000:.0f} ms"


def test_go_to_lists_survive_a_new_layer_when_docked(make_napari_viewer, qtbot, random_models,
                                                    small_phantom):
    """napari calls reset_choices on docked widgets whenever a layer is added; lists
    filled after a run must come back from it unchanged."""
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = DetectWidget(plugin_view(viewer))
    viewer.window.add_dock_widget(widget)
    _select(widget, image, random_models["LesionDetector"])
    _run_and_wait(widget, qtbot)
    widget._threshold.value = 0.05
    before = widget._goto.choices
    viewer.add_image(np.zeros((4, 4)), name="another layer")
    assert widget._goto.choices == before


def test_detect_with_no_detection_adds_an_empty_points_layer(make_napari_viewer, qtbot, random_models,
                                                           small_phantom, monkeypatch):
    from napari_medseg._widgets import detect as detect_module

    real = detect_module.detect_lesions
    # a detector that finds nothing at all: every peak below any threshold
    monkeypatch.setattr(detect_module, "detect_lesions",
                        lambda volume, model, card, threshold: real(volume, model, card, threshold=1.0))
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = DetectWidget(plugin_view(viewer))
    _select(widget, image, random_models["LesionDetector"])
    n_layers = len(viewer.layers)
    _run_and_wait(widget, qtbot)
    points = viewer.layers[-1]
    assert len(viewer.layers) == n_layers + 1 and isinstance(points, Points) and len(points.data) == 0
    assert widget._status.value.startswith("'phantom CT (seed 5)' (test-detector): 0 of 0 detections")
    points.add([2.0, 10.0, 10.0])  # the user's own lesion on an empty result
    assert points.features["label"].iloc[-1] == "added" and points.shown[-1]
    # and it says so on screen (an empty layer was made without its text labels)
    assert np.atleast_1d(points.text.values).tolist() == ["added"]


def test_detect_list_follows_deletions_and_added_points_are_never_a_detection(
        make_napari_viewer, qtbot, random_models, small_phantom):
    viewer, image, widget, points = _detect(make_napari_viewer, qtbot, random_models, small_phantom)
    widget._threshold.value = widget._threshold.min
    n = len(points.data)
    assert n >= 3, "the random detector keeps weak peaks"
    # delete all but two: the go-to list and the count follow (they hold row numbers)
    points.selected_data = set(range(2, n))
    points.remove_selected()
    assert len(widget._goto_items) == 2 and all(i < 2 for _, i in widget._goto_items)
    assert widget._status.value.startswith("'phantom CT (seed 5)' (test-detector): 2 of 2 detections")
    # selecting a detection makes napari copy its features into the defaults for new points
    points.selected_data = {0}
    points.mode = "add"
    points.add([2.0, 10.0, 10.0])
    added = points.features.iloc[-1]
    assert np.isnan(added["score"]) and np.isnan(added["diameter_mm"]) and added["label"] == "added"
    widget._threshold.value = 1.0
    assert points.shown[-1] and "1 added or moved by you" in widget._status.value


def test_a_failed_job_says_so_in_the_status_line(make_napari_viewer, qtbot, random_models,
                                                 small_phantom, monkeypatch):
    from napari_medseg.core.errors import MedsegInputError

    def failing_job(self, volume, model, card, options):
        raise MedsegInputError("the model refused this volume")
        yield  # a generator job, as every core job is

    monkeypatch.setattr(SegmentWidget, "core_job", failing_job)
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    _run_and_wait(widget, qtbot)
    assert widget._status.value == "Segment: the model refused this volume"  # refused, not failed
    assert widget._run.enabled


def test_a_flipped_layer_s_recorded_missing_slices_are_not_trusted(make_napari_viewer):
    """The reader's missing_slices were applied to the layer's data as it is now: after a
    flip in z, a measured slice was left unlabelled and said "not acquired"."""
    from napari_medseg._layers import volume_from_layer, volume_layer_data
    from napari_medseg.core.volume import Volume

    viewer = make_napari_viewer()
    array = np.arange(10 * 8 * 8, dtype=np.float32).reshape(10, 8, 8)
    array[3] = np.nan
    data, kwargs, _ = volume_layer_data(Volume(array, (2.0, 1.0, 1.0), modality="CT"), "ct")
    image = viewer.add_image(data, **kwargs)
    assert image.metadata["medseg"]["missing_slices"] == [3]
    image.data = np.ascontiguousarray(image.data[::-1])  # the gap is slice 6 now
    assert volume_from_layer(image).missing_slices() == [6]


def test_a_sheared_layer_s_volumes_are_its_true_voxel_volume(make_napari_viewer, qtbot,
                                                             small_phantom):
    """The ml figure multiplied each axis's step length; a shear makes a voxel smaller
    than that product (+7 % on a phantom): |det| of the transform is its volume."""
    from napari_medseg.core.inference import format_measure

    viewer = make_napari_viewer()
    spacing = small_phantom.volume.spacing
    image = viewer.add_image(small_phantom.volume.array, scale=spacing, shear=(0.3, 0.2, 0.1))
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, str(BUNDLED_DIR / "segmenter.json"))
    _run_and_wait(widget, qtbot)
    matrix = image._data_to_world.linear_matrix  # napari's scale · shear, as it draws
    voxel = abs(np.linalg.det(matrix))
    assert voxel < 0.97 * np.prod(np.linalg.norm(matrix, axis=0))
    body = float((viewer.layers[-1].data == 1).sum()) * voxel / 1000.0
    assert f"body {format_measure(body)} ml" in widget._status.value, widget._status.value


def test_slices_without_a_finite_voxel_are_missing_slices(make_napari_viewer):
    from napari_medseg._layers import volume_from_layer

    viewer = make_napari_viewer()
    data = np.zeros((5, 8, 8), np.float32)
    data[3] = np.nan  # a NaN block the metadata does not mark as missing
    data[1, 2:4, 2:4] = np.nan  # NaN voxels in an acquired slice: still acquired
    volume = volume_from_layer(viewer.add_image(data, name="ct"))
    assert volume.missing_slices() == [3]
    assert volume.unmeasured_voxels().tolist() == [0, 4, 0, 0, 0]  # slice 3 said as a whole


@pytest.mark.parametrize("widget_cls, arch, effect", [
    (ClassifyWidget, "SliceClassifier", "each slice's class is read from its measured voxels only"),
    (DetectWidget, "LesionDetector", "left without a result"),
])
def test_a_masked_patch_is_said_under_the_result(make_napari_viewer, qtbot, random_models,
                                                 small_phantom, widget_cls, arch, effect):
    """Classify gave a confident class for a slice one voxel of which was measured, and
    neither it nor Detect said that part of the scan had no value (Segment did)."""
    viewer = make_napari_viewer()
    data = np.array(small_phantom.volume.array, copy=True)
    data[2:4, 10:60, 10:60] = np.nan
    image = viewer.add_image(data, scale=small_phantom.volume.spacing, name="ct")
    widget = widget_cls(plugin_view(viewer))
    _select(widget, image, random_models[arch])
    _run_and_wait(widget, qtbot)
    assert f"5000 voxels without a value (NaN) on slices 2–3: {effect}" in widget._status.value



@pytest.mark.parametrize("change", ["crop", "units"])
def test_an_image_changed_while_the_model_ran_gets_no_stale_result(
        make_napari_viewer, qtbot, random_models, small_phantom, change):
    viewer, image, widget = _ready(make_napari_viewer, small_phantom, SegmentWidget,
                                   random_models["RecurrentSegmenter"])
    n_layers = len(viewer.layers)
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    widget._run.clicked.emit()  # a second (scripted) click while it runs starts nothing
    if change == "crop":  # the user crops the image meanwhile
        image.data = np.array(image.data[:, ::2, ::2])
    else:  # mm → µm: the same numbers, a thousandth of the size (the result was kept)
        image.units = ("µm",) * 3
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == n_layers
    assert any("changed while the model ran" in m for m in _messages_since(start, "warning"))
    assert not _messages_since(start, "error")
    _run_and_wait(widget, qtbot)  # run again on what it is now: a result, on the new grid
    assert len(viewer.layers) == n_layers + 1 and viewer.layers[-1].data.shape == image.data.shape


def test_go_to_moves_z_with_a_4d_layer_open_and_a_deleted_layer_raises_nothing(
        make_napari_viewer, qtbot, random_models, small_phantom):
    viewer, image, widget = _ready(make_napari_viewer, small_phantom, ClassifyWidget,
                                   random_models["SliceClassifier"])
    _run_and_wait(widget, qtbot)
    viewer.add_image(np.zeros((3,) + image.data.shape, np.float32), name="time series")
    widget._go_to_slice(5)
    assert viewer.dims.current_step[0] == 0  # t left alone
    assert round(image.world_to_data(viewer.dims.point[-3:])[0]) == 5
    assert widget._current.value.startswith("Slice 5:")
    for layer in list(viewer.layers):  # the user deletes everything: no IndexError
        viewer.layers.remove(layer)
    viewer.add_image(np.zeros((16, 16)), name="a photo")
    assert "removed" in widget._current.value


def test_the_image_picker_follows_a_rename(make_napari_viewer, small_phantom):
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = SegmentWidget(plugin_view(viewer))
    image.name = "patient A"
    assert "patient A" in _picker_names(widget._image)


def test_detect_adds_the_heatmap_only_if_asked_when_run_was_clicked(
        make_napari_viewer, qtbot, random_models, small_phantom):
    viewer, image, widget = _ready(make_napari_viewer, small_phantom, DetectWidget,
                                   random_models["LesionDetector"])
    n_layers = len(viewer.layers)
    widget._run.clicked.emit()
    widget._with_heatmap.value = True  # ticked while it runs: for the next run
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == n_layers + 1 and not any("heatmap" in l.name for l in viewer.layers)


def test_info_and_retrain_pickers_follow_a_rename(make_napari_viewer, small_phantom):
    from napari_medseg._widgets.info import VolumeInfoWidget
    from napari_medseg._widgets.retrain import RetrainWidget

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widgets = [VolumeInfoWidget(plugin_view(viewer)), RetrainWidget(plugin_view(viewer))]
    image.name = "patient B"
    for combo in (widgets[0]._layer, widgets[1]._image):
        assert "patient B" in _picker_names(combo)


def test_results_keep_a_rotated_and_sheared_image_s_place_in_the_world(
        make_napari_viewer, qtbot, random_models, small_phantom):
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array, name="ct", scale=(2.5, 2.0, 2.0),
                             translate=(5.0, -3.0, 7.0), rotate=30, shear=[0.2, 0.0, 0.0])
    for widget_cls, arch in ((SegmentWidget, "RecurrentSegmenter"), (DetectWidget, "LesionDetector")):
        widget = widget_cls(plugin_view(viewer))
        _select(widget, image, random_models[arch])
        _run_and_wait(widget, qtbot)
        result = viewer.layers[-1]
        assert " · ct (" in result.name
        # napari keeps rotate and shear apart from affine: both must come along
        _assert_on_image(result, image)
        np.testing.assert_allclose(result.data_to_world((4, 50, 50)), image.data_to_world((4, 50, 50)))


def test_the_voxel_spacing_comes_from_the_whole_layer_transform(make_napari_viewer):
    from napari_medseg._layers import volume_from_layer

    viewer = make_napari_viewer()
    data = np.zeros((4, 8, 8), np.float32)
    by_scale = volume_from_layer(viewer.add_image(data, scale=(2.5, 2.0, 2.0)))
    by_affine = volume_from_layer(viewer.add_image(data, affine=np.diag([2.5, 2.0, 2.0, 1.0])))
    rotated = volume_from_layer(viewer.add_image(data, scale=(2.5, 2.0, 2.0), rotate=45))
    flipped = volume_from_layer(viewer.add_image(data, scale=(2.5, -2.0, 2.0)))
    for volume in (by_scale, by_affine, rotated, flipped):
        np.testing.assert_allclose(volume.spacing, (2.5, 2.0, 2.0))


def test_a_lazy_image_is_read_in_the_worker_not_the_gui_thread(
        make_napari_viewer, qtbot, random_models, small_phantom, lazy_image):
    viewer = make_napari_viewer()
    image, readers = lazy_image(viewer, small_phantom)
    readers.clear()  # napari may read a slice to draw it
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    _run_and_wait(widget, qtbot)
    assert readers and not any(readers)  # every chunk was read by the worker
    assert isinstance(viewer.layers[-1], Labels) and viewer.layers[-1].data.shape == image.data.shape


def test_closing_the_viewer_mid_run_raises_nothing(make_napari_viewer, qtbot, random_models,
                                                   small_phantom):
    viewer, image, widget = _ready(make_napari_viewer, small_phantom, SegmentWidget,
                                   random_models["RecurrentSegmenter"])
    viewer.window.add_dock_widget(widget)
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    viewer.close()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    qtbot.wait(50)
    assert not _messages_since(start, "error")


def test_moved_detections_and_points_on_an_earlier_layer_are_the_users(
        make_napari_viewer, qtbot, random_models, small_phantom):
    viewer, image, widget, first = _detect(make_napari_viewer, qtbot, random_models, small_phantom)
    _run_and_wait(widget, qtbot)  # a second run: the first layer is no longer the widget's
    second = viewer.layers[-1]
    assert second is not first and len(first.data) >= 1
    first.selected_data = {0}
    first.mode = "add"
    first.add([2.0, 10.0, 10.0])  # it copied detection 0's score and size
    assert np.isnan(first.features["score"].iloc[-1]) and first.features["label"].iloc[-1] == "added"
    size = float(second.features["diameter_mm"].iloc[0])
    second.selected_data = {0}
    second._move([0], np.asarray(second.data[0]) + [0.0, 3.0, 3.0])  # the user drags it
    moved = second.features.iloc[0]
    assert np.isnan(moved["score"]) and moved["label"] == "moved"
    assert moved["diameter_mm"] == size  # its size still fits
    widget._threshold.value = 1.0
    assert second.shown[0]  # no threshold hides what the user placed


def test_go_to_lesion_centres_a_3d_view_on_it(make_napari_viewer, qtbot, random_models,
                                              small_phantom):
    viewer, image, widget, points = _detect(make_napari_viewer, qtbot, random_models, small_phantom)
    widget._threshold.value = widget._threshold.min
    viewer.dims.ndisplay = 3
    index = widget._goto_items[0][1]
    widget._go_to_lesion(index)
    from napari_medseg._widgets.detect import _camera

    np.testing.assert_allclose(_camera(viewer).center, points.data_to_world(points.data[index]))


@pytest.mark.parametrize("placement", [
    {"scale": (2.5, 0.5, 0.5)},
    {"affine": np.diag([2.5, 0.5, 0.5, 1.0])},  # a reader that keeps spacing in the affine
    {"scale": (2.5, 0.5, 1.0)},  # non-square pixels
])
def test_lesion_markers_are_drawn_at_their_diameter(placement):
    """napari draws a point size × |scale[-1]| wide: a 20 mm lesion must come out 20 mm
    (it was 40 mm with the spacing in an affine, 26.7 mm on 0.5 × 1.0 mm pixels)."""
    from types import SimpleNamespace

    from napari.layers import Image, Points

    from napari_medseg._layers import detection_layer_data, points_layer_data
    from napari_medseg.core.volume import Volume

    image = Image(np.zeros((4, 40, 40), np.float32), name="scan", **placement)
    result = SimpleNamespace(as_rows=lambda: [(1.0, 20.0, 20.0, 0.9, 20.0)])
    data, kwargs, _ = detection_layer_data(result, image, {"model": "m"}, threshold=0.5)
    points = Points(data, **kwargs)
    # napari/_vispy/layers/points.py: the drawn width is size × |scale[-1]| world units
    # (the affine moves the centres, not the marker size)
    assert float(points.size[0]) * abs(float(points.scale[-1])) == pytest.approx(20.0)
    data, kwargs, _ = points_layer_data(np.array([[1.0, 2.0, 3.0]]), np.array([20.0]),
                                        Volume(np.zeros((4, 5, 6)), (2.5, 0.5, 1.0)), "p")
    points = Points(data, **kwargs)
    assert float(points.size[0]) * abs(float(points.scale[-1])) == pytest.approx(20.0)


def test_one_coronal_dicom_image_is_refused_with_a_message(make_napari_viewer, qtbot,
                                                            random_models, tmp_path):
    """The layer did not carry the scan's axes to the models: a coronal image was
    classified as an axial slice ("lesion 0.54") with no warning."""
    import pydicom

    from napari_medseg._reader import read_layers

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # a coronal plane
    ds.save_as(tmp_path / "coronal.dcm")
    (data, kwargs, _), = read_layers(str(tmp_path / "coronal.dcm"))
    viewer = make_napari_viewer()
    image = viewer.add_image(data, **kwargs)
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, image, random_models["SliceClassifier"])
    start = len(notification_manager.records)
    _run_and_wait(widget, qtbot)
    errors = [str(n.message) for n in notification_manager.records[start:] if n.severity == "error"]
    assert any("coronal planes" in m for m in errors), errors
    assert widget._result is None


def test_the_input_checks_after_a_run_are_worked_out_off_napari_thread(
        make_napari_viewer, qtbot, monkeypatch, small_phantom):
    """The HU plausibility check takes percentiles over the whole scan: run in the result
    callback, it held napari's thread about 0.1 s after each Detect on a 200 × 512² CT."""
    import threading

    import napari_medseg._widgets._model_widget as model_widget

    threads = []
    checks = model_widget.input_warnings

    def recorded(volume, card):
        threads.append(threading.current_thread() is threading.main_thread())
        return checks(volume, card)

    monkeypatch.setattr(model_widget, "input_warnings", recorded)
    viewer = make_napari_viewer()
    raw = np.clip(small_phantom.volume.array + 1024, 0, None).astype(np.uint16)
    layer = viewer.add_image(raw, scale=small_phantom.volume.spacing, name="raw")
    widget = DetectWidget(plugin_view(viewer))
    _select(widget, layer, str(BUNDLED_DIR / "detector.json"))
    _run_and_wait(widget, qtbot)
    assert threads == [False]
    assert "Hounsfield" in widget._status.value  # still said


def test_closing_another_viewer_leaves_a_job_of_this_one_running(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """napari's create_worker listed each job among the tasks of whichever viewer was
    current: closing a second viewer cancelled a Segment running in the first (no
    result, "cancelled"), and the first viewer's close did not ask about it."""
    import threading

    first = make_napari_viewer()
    image = _open_phantom(first, small_phantom)
    widget = SegmentWidget(plugin_view(first))
    _select(widget, image, random_models["RecurrentSegmenter"])
    second = make_napari_viewer()  # napari's current viewer now
    go, entered = threading.Event(), threading.Event()
    real = SegmentWidget.core_job

    def held(volume, model, card, options):
        entered.set()
        go.wait(60)
        return (yield from real(widget, volume, model, card, options))

    widget.core_job = held
    layers = len(first.layers)
    widget._run.clicked.emit()
    qtbot.waitUntil(entered.is_set, timeout=20_000)
    if hasattr(first.window, "_task_status_manager"):  # napari >= 0.6 lists tasks
        assert first.window._task_status_manager.is_busy()
        assert not second.window._task_status_manager.is_busy()
    second.close()
    go.set()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(first.layers) == layers + 1 and isinstance(first.layers[-1], Labels)


def test_raw_stored_values_and_a_scale_in_cm_are_said(make_napari_viewer, qtbot, small_phantom):
    """Raw uint16 CT gave organ volumes, a scale in cm "body 1 ml", both in silence."""
    viewer = make_napari_viewer()
    raw = np.clip(small_phantom.volume.array + 1024, 0, None).astype(np.uint16)
    layers = [viewer.add_image(raw, scale=small_phantom.volume.spacing, name="raw"),
              viewer.add_image(small_phantom.volume.array,
                               scale=np.asarray(small_phantom.volume.spacing) / 10, name="cm")]
    widget = SegmentWidget(plugin_view(viewer))
    for layer, said in zip(layers, ("Hounsfield", "in cm")):
        _select(widget, layer, str(BUNDLED_DIR / "segmenter.json"))
        start = len(notification_manager.records)
        _run_and_wait(widget, qtbot)
        assert any(said in str(n.message) for n in notification_manager.records[start:])
        assert "Warning:" in widget._status.value and said in widget._status.value


@pytest.mark.parametrize("transform", [
    {"affine": [[5, 0.5, 0, 10], [0, 1.5, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 1]]},
    {"scale": (5, 1.5, 1.5), "shear": (0.3, 0, 0)},
])
def test_on_a_sheared_layer_the_widget_names_the_slice_napari_draws(
        make_napari_viewer, qtbot, random_models, small_phantom, transform):
    """napari 0.9 slices a sheared layer by the world z alone (y and x do not move it): a
    "fix" that read z at the whole point named slice 2 where napari drew slice 5, and its
    jump to slice 7 drew slice 10 (nothing). This pins the widgets to what is drawn."""
    viewer = make_napari_viewer()
    array = np.concatenate([small_phantom.volume.array] * 2)[:10, :64, :64]
    image = viewer.add_image(array, name="sheared", **transform)
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, image, random_models["SliceClassifier"])
    _run_and_wait(widget, qtbot)

    def drawn():  # the data slice napari draws now
        image.refresh()
        return int(round(float(image._data_slice.point[0])))

    viewer.dims.set_point(range(3), image.data_to_world([2, 32, 32]))
    assert widget._current.value.startswith(f"Slice {drawn()}:"), widget._current.value
    for z in (7, 1):
        widget._go_to_slice(z)
        assert drawn() == z and widget._current.value.startswith(f"Slice {z}:")


def test_a_layer_in_cm_beside_one_in_mm_is_navigated_and_retrained_where_napari_draws_it(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """napari converts a layer in cm beside one in mm (its numbers × 10 on screen): a jump
    to slice 4 (2.0 cm) went to 2 mm, a points layer in mm over the cm image was read 19
    slices away, and labels saved in mm from it were refused as "not on the image"."""
    from napari_medseg._widgets.retrain import RetrainWidget
    from napari_medseg._widgets.retrain_detector import RetrainDetectorWidget

    viewer = make_napari_viewer()
    if not hasattr(viewer.dims, "units"):
        pytest.skip("this napari (< 0.6) draws cm beside mm unconverted: nothing to follow")
    array = np.concatenate([small_phantom.volume.array] * 2)[:10, :64, :64]
    viewer.add_image(array, scale=(2.5, 1.0, 1.0), units="mm", name="ct mm")
    ct_cm = viewer.add_image(array, scale=(0.25, 0.1, 0.1), translate=(1.0, 0.0, 0.0),
                             units="cm", name="ct cm")
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, ct_cm, random_models["SliceClassifier"])
    _run_and_wait(widget, qtbot)
    for z in (4, 7):
        widget._go_to_slice(z)
        ct_cm.refresh()
        assert int(round(float(ct_cm._data_slice.point[0]))) == z
        assert widget._current.value.startswith(f"Slice {z}:"), widget._current.value
    # a points layer in mm, drawn at voxel (4, 8, 8) of the cm image
    points = viewer.add_points([[20.0, 8.0, 8.0]], units="mm", name="marks")
    detector = RetrainDetectorWidget(plugin_view(viewer))
    detector._image.value = ct_cm
    voxels, _ = detector._points_on_image(points, ct_cm)
    np.testing.assert_allclose(voxels, [[4.0, 8.0, 8.0]], atol=1e-6)
    # labels in mm lying exactly on the cm image are taken; a layer 10x off is refused
    on_it = viewer.add_labels(np.zeros(array.shape, np.uint8), scale=(2.5, 1.0, 1.0),
                              translate=(10.0, 0.0, 0.0), units="mm", name="on it")
    retrain = RetrainWidget(plugin_view(viewer))
    retrain._image.value = ct_cm
    # taken (no error; a re-prediction copies no label)
    assert retrain._snapshot(on_it, ct_cm, None, False) is None
    off = viewer.add_labels(np.zeros(array.shape, np.uint8), scale=(0.25, 0.1, 0.1),
                            translate=(1.0, 0.0, 0.0), units="mm", name="off")
    with pytest.raises(Exception, match="does not lie on"):
        retrain._snapshot(off, ct_cm, None, False)
    # a pixel-unit layer open: napari converts nothing (dims.units None) and draws every
    # layer at its raw numbers; the checks follow it (the mm reading refused a labels
    # layer with the image's numbers, and put its points 7 slices off)
    viewer.layers.remove(on_it)
    viewer.layers.remove(off)
    viewer.layers.remove(points)
    raw = viewer.add_labels(np.zeros(array.shape, np.uint8), scale=ct_cm.scale,
                            translate=ct_cm.translate, name="raw")
    assert viewer.dims.units is None
    retrain._snapshot(raw, ct_cm, None, False)
    pixel_points = viewer.add_points([[2.0, 0.8, 0.8]], name="pixel marks")
    voxels, _ = detector._points_on_image(pixel_points, ct_cm)
    np.testing.assert_allclose(voxels, [[4.0, 8.0, 8.0]], atol=1e-6)
    widget._go_to_slice(6)
    ct_cm.refresh()
    assert int(round(float(ct_cm._data_slice.point[0]))) == 6


def test_a_score_at_the_threshold_is_shown_as_the_core_keeps_it(make_napari_viewer):
    """The core compares the float32 heatmap (0.7 is 0.69999999 there) and kept a peak of
    exactly that score, which the CLI listed; the layer, comparing in float64, hid it."""
    from types import SimpleNamespace

    from napari_medseg._layers import detection_layer_data
    from napari_medseg.core.models.detector import extract_peaks

    heat = np.zeros((3, 9, 9), np.float32)
    heat[1, 4, 4] = 0.7
    peaks = extract_peaks(heat, None, (1.0, 1.0, 1.0), threshold=0.7)
    assert len(peaks) == 1
    viewer = make_napari_viewer()
    image = viewer.add_image(heat)
    result = SimpleNamespace(as_rows=lambda: [(p.z, p.y, p.x, p.score, 10.0) for p in peaks])
    _, kwargs, _ = detection_layer_data(result, image, {"model": "m"}, threshold=0.7)
    assert kwargs["shown"].tolist() == [True]


@pytest.mark.parametrize("widget_cls", [SegmentWidget, ClassifyWidget, "uncertainty"])
def test_a_deleted_image_is_not_kept_in_memory_by_a_widget_that_ran_on_it(
        make_napari_viewer, qtbot, random_models, small_phantom, widget_cls):
    """napari keeps every worker for the session (its task-status list), the worker kept
    the job's callbacks, and the callbacks and widgets kept the input layer's volume: a
    radiologist going through series held each one in memory until napari closed."""
    import gc
    import weakref

    from napari_medseg._widgets.explain import UncertaintyWidget

    widget_cls = UncertaintyWidget if widget_cls == "uncertainty" else widget_cls
    arch = "SliceClassifier" if widget_cls is ClassifyWidget else "RecurrentSegmenter"
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array.copy(), scale=small_phantom.volume.spacing,
                             name="ct")
    data = weakref.ref(image.data)
    widget = widget_cls(plugin_view(viewer))
    viewer.window.add_dock_widget(widget)
    _select(widget, image, random_models[arch])
    _run_and_wait(widget, qtbot)
    assert "running" not in widget._status.value
    viewer.layers.clear()  # the series is closed
    del image
    for _ in range(3):
        qtbot.wait(20)
        gc.collect()
    assert data() is None


def test_classify_lets_go_of_a_removed_layer_at_once(make_napari_viewer, qtbot, random_models,
                                                     small_phantom):
    """Removing the classified image beside another of the same extent moves no slider:
    the widget showed the removed image's classes as live until the slider moved."""
    viewer = make_napari_viewer()
    for name in ("other", "ct"):
        image = viewer.add_image(small_phantom.volume.array.copy(),
                                 scale=small_phantom.volume.spacing, name=name)
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, image, random_models["SliceClassifier"])
    _run_and_wait(widget, qtbot)
    assert widget._current.value.startswith("Slice")
    step = viewer.dims.current_step
    viewer.layers.remove(image)
    assert viewer.dims.current_step == step
    assert widget._current.value == "The classified layer was removed"
    assert widget._status.value == "Result dropped: the classified layer was removed"
    assert widget._layer is None and not widget._goto.enabled and widget._goto_items == []
    widget._go_to_slice(3)  # a click on the emptied strip: nothing, no traceback
    assert viewer.dims.current_step == step


def test_detect_resamples_its_heatmap_in_the_worker_not_on_naparis_thread(
        make_napari_viewer, qtbot, random_models, small_phantom, monkeypatch):
    """Resampled on napari's thread, a long series' heatmap froze the viewer."""
    import threading

    from napari_medseg.core.inference import DetectionResult

    viewer, image, widget = _ready(make_napari_viewer, small_phantom, DetectWidget,
                                   random_models["LesionDetector"])
    threads = []
    original = DetectionResult.heatmap_on_input_grid

    def recording(self):
        threads.append(threading.current_thread())
        return original(self)

    monkeypatch.setattr(DetectionResult, "heatmap_on_input_grid", recording)
    widget._with_heatmap.value = True
    _run_and_wait(widget, qtbot)
    heat = [layer for layer in viewer.layers if "heatmap" in layer.name]
    assert len(heat) == 1 and heat[0].data.shape == image.data.shape
    assert threads and threading.main_thread() not in threads


def test_a_slice_the_slider_grid_cannot_reach_is_said_for_what_it_is(make_napari_viewer):
    """Beside a series of finer slices the slider's grid missed the last slice of the CT:
    the warning blamed a rotation the layer does not have."""
    from napari_medseg._widgets._navigate import go_to_slice

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    ct = viewer.add_image(rng.random((12, 8, 8), dtype=np.float32), name="CT", scale=(2.5, 1, 1))
    viewer.add_image(rng.random((7, 8, 8), dtype=np.float32), name="other", scale=(2.0, 1, 1))
    start = len(notification_manager.records)
    go_to_slice(viewer, ct, 11)
    said = _messages_since(start, "warning")
    assert len(said) == 1 and "slice 11 of 'CT' cannot be shown" in said[0]
    assert "rotated" not in said[0] and "steps by 2 from 0" in said[0]
    assert "(showing slice 10)" in said[0]


def test_a_layer_the_slider_does_not_reach_is_not_said_to_show_slice_minus_one(
        make_napari_viewer, monkeypatch):
    """Where the slider lands beside a layer (an MR slice off the CT's slider grid), the
    warning said "(showing slice -1)", a slice that does not exist."""
    from napari_medseg._widgets import _navigate

    viewer = make_napari_viewer()
    mr = viewer.add_image(np.zeros((2, 8, 8), np.float32), name="MR")
    monkeypatch.setattr(_navigate, "slice_at", lambda _viewer, _layer: -1.2)
    start = len(notification_manager.records)
    _navigate.go_to_slice(viewer, mr, 1)
    (said,) = _messages_since(start, "warning")
    assert "slice 1 of 'MR' cannot be shown" in said and "slice -1" not in said
    assert "no slice of it is shown there" in said
    assert "from 0 (z, set by" in said  # napari's default axis label ("-3" or "0") is no name


def test_classify_result_says_which_image_it_belongs_to(make_napari_viewer, qtbot, random_models,
                                                         small_phantom):
    """Classify adds no layer: after another image was picked (and its run cancelled),
    the widget went on showing the first image's classes with nothing naming it."""
    viewer = make_napari_viewer()
    spacing = small_phantom.volume.spacing
    first = viewer.add_image(small_phantom.volume.array.copy(), scale=spacing, name="patient A")
    second = viewer.add_image(small_phantom.volume.array[::-1].copy(), scale=spacing,
                              name="patient B")
    widget = ClassifyWidget(plugin_view(viewer))
    _select(widget, first, random_models["SliceClassifier"])
    _run_and_wait(widget, qtbot)
    model = random_models["SliceClassifier"]
    import json
    name = json.loads(open(model).read())["name"]
    assert widget._current.value.endswith(f"(of 'patient A' by {name})")
    assert "'patient A'" in widget._strip.toolTip()
    widget._image.value = second
    widget._run.clicked.emit()
    widget._cancel.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    viewer.dims.set_point(0, second.data_to_world([2, 0, 0])[0])
    assert widget._current.value.startswith("Slice 2:")
    assert widget._current.value.endswith("(of 'patient A' by " + name + ")")
    first.name = "patient A (arterial)"  # renamed: the line and tooltip name it as it is now
    assert widget._current.value.endswith("(of 'patient A (arterial)' by " + name + ")")
    assert "'patient A (arterial)'" in widget._strip.toolTip()


def test_a_closed_widget_follows_the_viewer_no_more(make_napari_viewer, qtbot,
                                                                  random_models, small_phantom):
    """Closed with its dock's ×, a widget lived on for the viewer's life (a closure on the
    layer list): Detect went on hiding the points the user had shown, Classify on
    following the slider; docked again, it follows again."""
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array.copy(), scale=small_phantom.volume.spacing,
                             name="ct")
    classify, detect = ClassifyWidget(plugin_view(viewer)), DetectWidget(plugin_view(viewer))
    docks = []
    for widget, kind in ((classify, "SliceClassifier"), (detect, "LesionDetector")):
        docks.append(viewer.window.add_dock_widget(widget))
        _select(widget, image, random_models[kind])
        _run_and_wait(widget, qtbot)
    points = detect._points
    for dock in docks:
        viewer.window.remove_dock_widget(dock)
    shown = classify._current.value
    viewer.dims.set_current_step(0, 5)
    assert classify._current.value == shown
    points.shown = np.ones(len(points.data), bool)  # the user shows every detection
    points.add([3.0, 40.0, 40.0])
    assert points.shown.all()
    viewer.window.add_dock_widget(classify)  # docked again: it follows the viewer again
    assert classify._current.value == ""  # not slice 3's classes under the slider at 5
    _run_and_wait(classify, qtbot)
    viewer.dims.set_current_step(0, 2)
    assert classify._current.value.startswith("Slice 2:")


def test_a_new_picker_starts_on_the_bundled_model(make_napari_viewer, random_models):
    """User models were listed first: a model saved from a round (maybe a poor one)
    became the default of every later session, where the CLI without --model takes the
    bundled one."""
    from napari_medseg.core.models.registry import BUNDLED_DIR

    widget = SegmentWidget(make_napari_viewer())
    assert str(random_models["RecurrentSegmenter"]) in [p for _, p in _picker_choices(widget)]
    assert widget._model.value == str(BUNDLED_DIR / "segmenter.json")


def _picker_choices(widget):
    from napari_medseg._widgets._model_widget import model_choices

    return model_choices(widget.architecture)


def test_a_point_added_after_selecting_a_detection_is_drawn_at_its_training_size(
        make_napari_viewer):
    """napari drew it at the size of the point selected last (a 21.5 mm ring), while
    retraining takes a point without a diameter as 10 mm."""
    from napari_medseg._layers import marker_sizes, points_layer_data, watch_detection_edits
    from napari_medseg.core.finetune import DEFAULT_DIAMETER_MM
    from napari_medseg.core.volume import Volume

    viewer = make_napari_viewer()
    volume = Volume(np.zeros((6, 40, 40), np.float32), (2.5, 0.8, 0.8))
    data, kwargs, _ = points_layer_data([[2.0, 20.0, 20.0]], [21.5], volume, "det",
                                        features={"score": [0.9]})
    points = viewer.add_points(data, **kwargs)
    watch_detection_edits(points)
    points.selected_data = {0}  # napari takes the selected point's size for the next one
    points.add([4.0, 10.0, 10.0])
    assert points.size[0] == pytest.approx(marker_sizes([21.5], volume.spacing)[0])
    assert points.size[1] == pytest.approx(marker_sizes([DEFAULT_DIAMETER_MM], volume.spacing)[0])


def test_segment_volumes_name_their_image_and_a_refusal_replaces_them(make_napari_viewer, qtbot,
                                                                      small_phantom):
    """The ml line stayed word for word after another image was picked and refused before
    the run: one scan's liver volume was shown under the next scan's name."""
    viewer = make_napari_viewer()
    first = viewer.add_image(small_phantom.volume.array.copy(), scale=small_phantom.volume.spacing,
                             name="patient A")
    second = viewer.add_image(np.zeros((2, 4, 32, 32), np.float32), name="patient B")
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, first, str(BUNDLED_DIR / "segmenter.json"))
    _run_and_wait(widget, qtbot)
    assert widget._status.value.startswith("'patient A' (segmenter): body "), widget._status.value
    widget._image.value = second
    start = len(notification_manager.records)
    widget._run.clicked.emit()  # refused before any job starts (4 dimensions)
    assert widget._worker is None
    refusal = _messages_since(start, "error")
    assert refusal and "4 dimensions" in refusal[-1]
    assert widget._status.value == refusal[-1], widget._status.value
    assert " ml" not in widget._status.value


@pytest.mark.parametrize("shape, hint", [((1, 4, 32, 32), "its first axis has length 1"),
                                         ((1, 1, 4, 32, 32), "its first 2 axes have length 1"),
                                         ((2, 4, 32, 32), None)])
def test_a_volume_with_extra_axes_of_length_one_is_refused_with_the_way_on(
        make_napari_viewer, shape, hint):
    """A 4D NIfTI of one time point was refused with no way forward."""
    from napari_medseg._layers import check_image_layer
    from napari_medseg.core.errors import MedsegInputError

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros(shape, np.float32), scale=(2.0,) * len(shape), name="t1")
    with pytest.raises(MedsegInputError) as refused:
        check_image_layer(layer)
    message = str(refused.value)
    assert f"has {len(shape)} dimensions" in message
    if hint is None:
        assert "length 1" not in message
        return
    assert hint in message
    # the console line given works: it adds a volume the check accepts
    extra = len(shape) - 3
    command = message[message.index("viewer.add_image("):message.index(") adds it") + 1]
    volume = eval(command, {"viewer": viewer, "layer": layer})
    check_image_layer(volume)
    assert volume.data.shape == shape[extra:] and tuple(volume.scale) == (2.0,) * 3


def test_segment_says_that_nan_voxels_on_acquired_slices_were_left_out(make_napari_viewer,
                                                                         qtbot, small_phantom):
    """A masked region (NaN on slices that were acquired) was left at label 0 and the
    volumes covered only the rest, without a word (whole NaN slices were named)."""
    viewer = make_napari_viewer()
    data = small_phantom.volume.array.copy()
    data[2:4, :, : data.shape[2] // 2] = np.nan
    image = viewer.add_image(data, scale=small_phantom.volume.spacing, name="masked")
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, str(BUNDLED_DIR / "segmenter.json"))
    _run_and_wait(widget, qtbot)
    n = int(np.isnan(data).sum())
    assert f"{n} voxels without a value (NaN) on slices 2–3: left unlabelled" in \
        widget._status.value, widget._status.value
    assert "Missing slices" not in widget._status.value
    assert not viewer.layers[-1].data[np.isnan(data)].any()


def test_a_resized_detection_leaves_detects_list_and_count(make_napari_viewer, qtbot,
                                                            random_models, small_phantom):
    """After a ring was resized (the detection is the user's now), Detect's go-to list and
    count still showed it as a scored detection until the slider moved."""
    viewer, image, widget = _ready(make_napari_viewer, small_phantom, DetectWidget,
                                   random_models["LesionDetector"])
    _run_and_wait(widget, qtbot)
    widget._threshold.value = widget._threshold.min
    points = widget._points
    listed = [index for _, index in widget._goto_items]
    assert listed
    points.selected_data = {listed[0]}
    points.current_size = 30.0
    assert listed[0] not in [index for _, index in widget._goto_items]
    assert "1 added or moved by you" in widget._status.value


def test_a_point_added_on_a_layer_in_cm_is_drawn_10_mm_wide(make_napari_viewer):
    from napari_medseg._layers import watch_added_lesions

    viewer = make_napari_viewer()
    layer = viewer.add_points(np.array([[1.0, 5.0, 5.0]]), scale=(0.25, 0.05, 0.05),
                              units=("cm", "cm", "cm"), size=[20.0],
                              features={"diameter_mm": [10.0], "label": ["l1"]})
    watch_added_lesions(layer)
    layer.add([2.0, 6.0, 6.0])
    assert layer.size[-1] * 0.05 * 10 == pytest.approx(10.0)  # 10 mm, not 100


def test_removing_the_image_during_a_run_cancels_it(make_napari_viewer, qtbot, random_models,
                                                    small_phantom):
    """The job ran to its end with "running on 'CT'" over an empty picker, and only then
    said the result was discarded."""
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = SegmentWidget(plugin_view(viewer))
    _select(widget, image, random_models["RecurrentSegmenter"])
    n_layers = len(viewer.layers)
    widget._run.clicked.emit()
    assert widget._worker is not None
    viewer.layers.remove(image)
    assert widget._status.value == f"'{image.name}' was removed: Segment cancelled"
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == n_layers - 1 and widget._run.enabled
    assert "cancelled" in widget._status.value


@pytest.mark.parametrize("widget_cls, arch", [("segment", "RecurrentSegmenter"),
                                               ("detect", "LesionDetector")])
def test_a_rerun_hides_the_earlier_result_and_a_moved_image_is_said(
        make_napari_viewer, qtbot, random_models, small_phantom, widget_cls, arch):
    """A re-run left the first result on screen (a ring drawn at a threshold said to hide
    every detection; two label layers' colours stacked); a spacing corrected after the run
    kept the volumes and the go-to list of the image before, silently."""
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    widget = (SegmentWidget if widget_cls == "segment" else DetectWidget)(plugin_view(viewer))
    _select(widget, image, random_models[arch])
    _run_and_wait(widget, qtbot)
    first = viewer.layers[-1]
    _run_and_wait(widget, qtbot)
    second = viewer.layers[-1]
    assert second is not first and second.visible and not first.visible
    assert "1 earlier result of this image hidden" in widget._status.value
    # a result the user edited stays shown: painted by hand, a false positive deleted
    first.visible = True
    if widget_cls == "segment":
        first.brush_size = 3
        first.paint((3, 20, 20), 2)
    else:
        shown = np.flatnonzero(first.shown)
        if len(shown):
            first.selected_data = {int(shown[0])}
            first.remove_selected()
        else:
            first.add([3.0, 20.0, 20.0])
    _run_and_wait(widget, qtbot)
    assert first.visible and not second.visible
    image.scale = (5.0, *image.scale[1:])
    assert "changed (new data, scale or position) after" in widget._status.value
    if widget_cls == "detect":
        assert not widget._goto.enabled and not widget._goto_items


def test_the_lesion_list_names_each_slices_image_number(make_napari_viewer, qtbot, random_models,
                                                        small_phantom):
    """A PACS shows a slice by its InstanceNumber: a lesion listed at "z=5" of a series
    numbered from the head is image 3 of 8 there. The list says both, while the layer
    still has one slice per number."""
    viewer = make_napari_viewer()
    image = _open_phantom(viewer, small_phantom)
    numbers = [8, 7, 6, None, 4, 3, 2, 1]  # from the head; slice 3 a gap
    image.metadata = {**image.metadata, "medseg": {
        **image.metadata.get("medseg", {}),
        "source": {**image.metadata.get("medseg", {}).get("source", {}),
                   "instance_numbers": numbers}}}
    widget = DetectWidget(plugin_view(viewer))
    _select(widget, image, random_models["LesionDetector"])
    _run_and_wait(widget, qtbot)
    widget._threshold.value = widget._threshold.min
    assert widget._goto_items, "the random detector's peaks above the lowest threshold"
    for text, _ in widget._goto_items:
        z = int(re.search(r" z=(\d+)", text).group(1))
        assert text.endswith(f" mm · image {numbers[z]}") == (numbers[z] is not None), text
    assert widget._image_number(3) == "" and widget._image_number(0) == " · image 8"
    # a crop: the numbers no longer fit, none said
    image.data = image.data[:5].copy()
    _run_and_wait(widget, qtbot)
    assert widget._numbers is None
    assert not any("image" in text for text, _ in widget._goto_items)

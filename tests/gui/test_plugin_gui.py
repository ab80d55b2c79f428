"""The plugin inside a real napari viewer (pytest-qt + make_napari_viewer, under Xvfb)."""

import re

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from napari.layers import Image, Labels, Points
from napari.utils.notifications import notification_manager

from napari_medseg.core.io import read_nifti, write_nifti
from napari_medseg.core.volume import CT_WINDOW
from tests.gui.conftest import plugin_view


def _errors_since(start: int) -> list[str]:
    return [
        str(n.message)
        for n in notification_manager.records[start:]
        if getattr(n.severity, "value", str(n.severity)) == "error"
    ]


def _assert_aligned(*layers):
    first = layers[0]
    for layer in layers[1:]:
        np.testing.assert_allclose(layer.scale, first.scale)
        np.testing.assert_allclose(layer.translate, first.translate)


def test_sample_data_opens_aligned_image_labels_points(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "synthetic_ct")
    image, labels, points = viewer.layers
    assert isinstance(image, Image) and isinstance(labels, Labels) and isinstance(points, Points)
    assert labels.data.shape == image.data.shape
    _assert_aligned(image, labels, points)
    np.testing.assert_allclose(image.scale, (2.5, 1.0, 1.0))
    assert tuple(image.contrast_limits) == CT_WINDOW
    assert len(points.data) > 0
    z, y, x = np.round(points.data).astype(int).T
    assert (labels.data[z, y, x] == 8).all(), "every lesion point sits on a lesion voxel"
    assert "liver" in list(labels.features["name"])
    assert "not for diagnostic use" in image.metadata["medseg"]["disclaimer"]


def test_reader_opens_real_ct_in_hu_with_spacing(make_napari_viewer):
    import pydicom

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    viewer = make_napari_viewer()
    viewer.open(path, plugin="napari-medseg")
    (layer,) = viewer.layers
    expected_hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(layer.data[0], expected_hu)
    np.testing.assert_allclose(layer.scale[1:], [float(v) for v in ds.PixelSpacing])
    assert layer.metadata["medseg"]["modality"] == "CT"
    assert tuple(layer.contrast_limits) == CT_WINDOW


def test_reader_nifti_keeps_spacing(make_napari_viewer, tmp_path):
    path = write_nifti(tmp_path / "vol.nii.gz", np.random.default_rng(0).normal(size=(5, 20, 30)).astype(np.float32), (3.0, 0.7, 0.8))
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-medseg")
    np.testing.assert_allclose(viewer.layers[0].scale, (3.0, 0.7, 0.8), rtol=1e-5)
    assert viewer.layers[0].name == "vol"


@pytest.mark.parametrize("name, content", [("broken.dcm", b"DICM" * 40), ("empty.dcm", b"")])
def test_reader_bad_file_notifies_and_opens_nothing(make_napari_viewer, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 4)), name="user layer")
    start = len(notification_manager.records)
    viewer.open(str(path), plugin="napari-medseg")
    assert [layer.name for layer in viewer.layers] == ["user layer"]
    errors = _errors_since(start)
    assert len(errors) == 1 and name in errors[0] and "\n" not in errors[0]


def test_writer_saves_labels_with_image_spacing(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((4, 16, 12), dtype=np.int32)
    labels[1:3, 4:8, 2:6] = 3
    layer = viewer.add_labels(labels, scale=(2.0, 0.6, 0.6), translate=(10.0, -5.0, 4.0))
    out = tmp_path / "seg.nii.gz"
    written = viewer.layers.save(str(out), selected=False, plugin="napari-medseg")
    assert written == [str(out)]
    back = read_nifti(out)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.spacing, layer.scale, rtol=1e-5)
    np.testing.assert_allclose(back.origin, layer.translate, atol=1e-4)


def test_labels_in_cm_are_saved_in_mm_and_multiscale_at_full_resolution(make_napari_viewer,
                                                                          tmp_path):
    """A layer whose units were cm was saved with its numbers as mm (a tenth of its
    size); a multiscale one at its coarsest level with the full-resolution voxel size."""
    viewer = make_napari_viewer()
    labels = np.zeros((4, 16, 12), dtype=np.uint8)
    labels[1:3, 4:8, 2:6] = 2
    viewer.add_labels(labels, scale=(0.25, 0.06, 0.06), translate=(1.0, -0.5, 0.4),
                      units="cm", name="cm")
    assert viewer.layers.save(str(tmp_path / "cm.nii.gz"), selected=False,
                              plugin="napari-medseg") == [str(tmp_path / "cm.nii.gz")]
    back = read_nifti(tmp_path / "cm.nii.gz")
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.spacing, (2.5, 0.6, 0.6), rtol=1e-5)
    np.testing.assert_allclose(back.origin, (10.0, -5.0, 4.0), atol=1e-4)
    viewer.layers.clear()
    viewer.add_labels([labels, labels[:, ::2, ::2]], multiscale=True, scale=(2.0, 0.6, 0.6))
    viewer.layers.save(str(tmp_path / "ms.nii.gz"), selected=False, plugin="napari-medseg")
    back = read_nifti(tmp_path / "ms.nii.gz")
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.spacing, (2.0, 0.6, 0.6), rtol=1e-5)


def test_saved_labels_open_again_as_the_same_labels_layer(make_napari_viewer, tmp_path):
    """Save a segmentation, open the file: a Labels layer with the same values (above
    float32's 2**24 too), placement and structure names, usable as an annotation layer."""
    viewer = make_napari_viewer()
    labels = np.zeros((4, 16, 12), dtype=np.int32)
    labels[1:3, 4:8, 2:6] = 2
    labels[0, 0, 0] = 2**24 + 1
    viewer.add_labels(labels, scale=(2.0, 0.6, 0.6), translate=(10.0, -5.0, 4.0), name="seg",
                      features={"index": [0, 2], "name": ["background", "liver"]})
    out = tmp_path / "seg.nii.gz"
    viewer.layers.save(str(out), selected=False, plugin="napari-medseg")
    viewer.layers.clear()
    viewer.open(str(out), plugin="napari-medseg")
    (layer,) = viewer.layers
    assert isinstance(layer, Labels) and layer.name == "seg"
    np.testing.assert_array_equal(layer.data, labels)
    np.testing.assert_allclose(layer.scale, (2.0, 0.6, 0.6), rtol=1e-5)
    np.testing.assert_allclose(layer.translate, (10.0, -5.0, 4.0), atol=1e-4)
    assert dict(zip(layer.features["index"], layer.features["name"])) == {0: "background",
                                                                          2: "liver"}
    layer.data[3, 1, 1] = 2  # corrected, saved back onto its own file (the scan's is refused)
    assert viewer.layers.save(str(out), selected=False, plugin="napari-medseg") == [str(out)]
    from napari_medseg.core.io import read_label_map

    assert read_label_map(out).labels[3, 1, 1] == 2


def test_phantom_widget_says_min_above_max_in_its_own_words(make_napari_viewer):
    from napari_medseg._widgets.phantom import PhantomWidget

    viewer = make_napari_viewer()
    widget = PhantomWidget(plugin_view(viewer))
    widget._rmin.value, widget._rmax.value = 20.0, 3.0
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    assert widget._worker is None and len(viewer.layers) == 0
    (error,) = _errors_since(start)
    assert "Lesion radius min" in error and "lesion_radius_mm" not in error
    assert widget._status.native.wordWrap()  # a long message wraps, it does not widen the dock


def _phantom_widget(make_napari_viewer, shape, lesions):
    """A viewer with the Synthetic phantom widget set to ``shape`` (z, y, x) and ``lesions``."""
    from napari_medseg._widgets.phantom import PhantomWidget

    viewer = make_napari_viewer()
    widget = PhantomWidget(plugin_view(viewer))
    widget._z.value, widget._y.value, widget._x.value = shape
    widget._n_lesions.value = lesions
    return viewer, widget


def test_phantom_widget_errors_name_its_own_controls(make_napari_viewer, qtbot):
    """The core's "smaller lesion_radius_mm" reached the user, whose control says
    "Lesion radius min (mm)"; and it is the minimum that decides (a lesion is shrunk to
    fit down to it), so the advice named the maximum, which never helps."""
    viewer, widget = _phantom_widget(make_napari_viewer, (8, 64, 64), lesions=30)
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    (error,) = _errors_since(start)
    assert "could not fit 30 lesions" in error and "smaller Lesion radius min" in error
    assert "Lesion radius max" not in error
    assert "lesion_radius_mm" not in error and "lesion_radius_mm" not in widget._status.value
    assert len(viewer.layers) == 0


def test_a_point_added_after_a_lesion_was_selected_is_no_lesion(make_napari_viewer, qtbot):
    """napari sets a layer's feature defaults to the last selected point's: the next
    point added took that lesion's diameter, organ and contrast (and was saved so)."""
    viewer, widget = _phantom_widget(make_napari_viewer, (16, 96, 96), lesions=2)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    points = viewer.layers[-1]
    points.selected_data = {0}
    points.add([[8, 40, 40]])
    added = points.features.iloc[-1]
    assert added["label"] == "added" and added["organ"] == ""
    assert np.isnan(added["diameter_mm"]) and np.isnan(added["contrast_hu"])
    assert points.features.iloc[0]["label"] != "added"  # the lesion keeps its own
    # drawn at the 10 mm retraining gives it, not as the ring of the lesion selected
    from napari_medseg._layers import marker_sizes
    from napari_medseg.core.finetune import DEFAULT_DIAMETER_MM

    assert points.size[-1] == pytest.approx(marker_sizes([DEFAULT_DIAMETER_MM], points.scale)[0])


def test_phantom_widget_says_when_random_lesions_did_not_fit(make_napari_viewer, qtbot):
    """A random number of lesions too large for the organs gave 0 lesions and no word."""
    viewer, widget = _phantom_widget(make_napari_viewer, (16, 96, 96), lesions=0)
    widget._random_lesions.value = True
    widget._rmin.value, widget._rmax.value = 30.0, 50.0
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    settings = viewer.layers[0].metadata["medseg"]["source"]["phantom_settings"]
    assert settings["n_lesions"] == "random" and settings["lesions_drawn"] >= 1
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any(f"0 of the {settings['lesions_drawn']} lesions drawn fit" in m for m in said), said
    assert "Lesion radius min" in widget._status.value


def test_the_phantoms_layers_say_what_they_are(make_napari_viewer):
    """A point the user adds to the lesions took the last lesion's diameter, organ and
    contrast (and was saved so); Info called the ground truth a CT in HU; the layers
    did not record the settings beyond the seed (the widget's seed 0 differs from the
    sample's in noise)."""
    from napari_medseg._widgets.info import describe_layer

    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "synthetic_ct")
    image, truth, points = viewer.layers
    points.add([[10, 100, 100]])
    added = points.features.iloc[-1]
    assert np.isnan(added["diameter_mm"]) and np.isnan(added["contrast_hu"])
    assert added["organ"] == "" and added["label"] == "added"
    assert list(points.text.values)[-1] == "added"
    text = describe_layer(truth)
    assert "Modality" not in text and "HU" not in text and "phantom_seed: 0" in text
    assert "Modality: CT" in describe_layer(image)
    settings = image.metadata["medseg"]["source"]["phantom_settings"]
    from napari_medseg._sample_data import SAMPLE_SHAPE, SAMPLE_SPACING
    from napari_medseg.core.phantom import generate_phantom

    again = generate_phantom(SAMPLE_SHAPE, SAMPLE_SPACING, seed=0,
                             noise_hu=settings["noise_hu"],
                             lesion_radius_mm=settings["lesion_radius_mm"])
    np.testing.assert_allclose(again.volume.array, image.data, atol=1e-3)


def test_phantom_widget_thin_slab_advice_names_the_minimum_radius(make_napari_viewer, qtbot):
    """A slab too thin for the smallest lesion advised "a smaller Lesion radius max",
    which never helps there (the minimum decides)."""
    viewer, widget = _phantom_widget(make_napari_viewer, (1, 64, 64), lesions=2)
    widget._rmin.value, widget._rmax.value = 3.0, 3.0
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    (error,) = _errors_since(start)
    assert "more or thicker slices, a smaller Lesion radius min, or no lesions" in error
    assert "Lesion radius max" not in error and len(viewer.layers) == 0


def test_phantom_widget_generates_layers(make_napari_viewer, qtbot):
    viewer, widget = _phantom_widget(make_napari_viewer, (6, 64, 64), lesions=2)
    widget._run.clicked.emit()
    assert not widget._run.enabled and widget._cancel.enabled
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert [type(layer) for layer in viewer.layers] == [Image, Labels, Points]
    assert viewer.layers[0].data.shape == (6, 64, 64)
    assert len(viewer.layers[2].data) == 2
    assert widget._run.enabled and not widget._cancel.enabled


def test_phantom_widget_cancel_adds_nothing(make_napari_viewer, qtbot):
    viewer, widget = _phantom_widget(make_napari_viewer, (4, 96, 96), lesions=0)
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    widget._cancel.clicked.emit()
    # until the job stops the widget says it is cancelling (it said "Cancelled" while
    # Run stayed disabled for seconds)
    assert widget._status.value.startswith("Cancelling") and not widget._cancel.enabled
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == 0
    assert widget._status.value == "Cancelled" and widget._run.enabled
    assert not _errors_since(start)


def test_cancel_stops_a_large_phantom_between_slabs(make_napari_viewer, qtbot, monkeypatch):
    """Drawing was one call: Cancel left a 1024-slice phantom running for minutes."""
    from napari_medseg._widgets import phantom as phantom_widget

    reports = []

    def recorded(*args, **kwargs):
        for report in phantom_widget_job(*args, **kwargs):
            reports.append(report)
            yield report

    phantom_widget_job = phantom_widget.phantom_job
    monkeypatch.setattr(phantom_widget, "phantom_job", recorded)
    viewer, widget = _phantom_widget(make_napari_viewer, (60, 512, 512), lesions=0)
    widget._run.clicked.emit()
    # (the report reaches the status line through the event loop, after the worker yields)
    qtbot.waitUntil(lambda: widget._status.value.startswith("Generating: drawing slices"),
                    timeout=60_000)
    assert reports
    widget._cancel.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert reports[-1].step < 60 and len(viewer.layers) == 0  # slabs of 7 slices: 9 of them
    assert widget._status.value == "Cancelled" and widget._run.enabled


def test_closing_the_viewer_while_a_phantom_is_drawn_raises_nothing(make_napari_viewer, qtbot):
    """The finished handler read the deleted status label: RuntimeError through Qt."""
    viewer, widget = _phantom_widget(make_napari_viewer, (40, 256, 256), lesions=2)
    viewer.window.add_dock_widget(widget)  # docked: closing the window deletes its labels
    widget._run.clicked.emit()
    worker = widget._worker
    qtbot.wait(200)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=60_000)
    qtbot.wait(200)  # the finished signal is delivered (pytest-qt fails on its exceptions)


def test_phantom_widget_bad_request_notifies(make_napari_viewer, qtbot):
    from napari_medseg._widgets.phantom import PhantomWidget

    viewer = make_napari_viewer()
    widget = PhantomWidget(plugin_view(viewer))
    widget._z.value, widget._y.value, widget._x.value = 4, 48, 48
    widget._rmin.value, widget._rmax.value = 20.0, 5.0  # min above max
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == 0
    errors = _errors_since(start)
    assert len(errors) == 1 and "radius" in errors[0]


def test_phantom_widget_takes_ct_spacings_as_typed(make_napari_viewer):
    """Qt's 2 decimals made 0.625 mm slices 0.63 and radii of 8.125 mm 8.13."""
    from napari_medseg._widgets.phantom import PhantomWidget

    widget = PhantomWidget(make_napari_viewer())
    widget._dz.value, widget._dxy.value = 0.625, 0.875
    widget._rmin.value, widget._rmax.value = 3.333, 8.125
    request = widget.request()
    assert request.spacing == (0.625, 0.875, 0.875), request
    assert request.lesion_radius_mm == (3.333, 8.125)


def test_info_widget_and_dock(make_napari_viewer):
    from napari_medseg._widgets.info import VolumeInfoWidget

    viewer = make_napari_viewer()
    info = VolumeInfoWidget(plugin_view(viewer))
    assert "No image or labels layer" in info._text.value
    viewer.open_sample("napari-medseg", "synthetic_ct")
    assert "Spacing (mm): (2.5, 1.0, 1.0)" in info._text.value
    assert "Missing slices: none" in info._text.value
    for name in ("Synthetic phantom", "Volume info"):
        dock, _ = viewer.window.add_plugin_dock_widget("napari-medseg", name)
        assert dock is not None


def test_info_says_the_spacing_the_models_use_and_names_other_axes(make_napari_viewer):
    from napari_medseg._widgets.info import describe_layer

    viewer = make_napari_viewer()
    in_affine = viewer.add_image(np.zeros((4, 8, 8)), affine=np.diag([2.5, 0.7, 0.7, 1.0]))
    assert "Spacing (mm): (2.5, 0.7, 0.7)" in describe_layer(in_affine)  # it said (1, 1, 1)
    series = viewer.add_image(np.zeros((3, 4, 8, 8)), name="time series")
    assert "Shape (4 axes; the models take 2D or 3D): (3, 4, 8, 8)" in describe_layer(series)
    photo = viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True)
    assert "Shape (y, x, colour): (8, 8, 3)" in describe_layer(photo)


def test_info_lists_the_slices_the_models_call_missing_and_follows_the_layer(make_napari_viewer):
    from napari_medseg._layers import volume_from_layer
    from napari_medseg._widgets.info import VolumeInfoWidget

    viewer = make_napari_viewer()
    data = np.zeros((6, 16, 16), np.float32)
    data[2] = np.nan  # the models treat it as missing; the widget said "none"
    # a reader's record of slices 2 and 4 as missing (4 zero-filled): the models agree
    image = viewer.add_image(data, name="ct", metadata={"medseg": {"missing_slices": [2, 4]}})
    info = VolumeInfoWidget(plugin_view(viewer))
    assert volume_from_layer(image).missing_slices() == [2, 4]
    assert "Missing slices: 2, 4" in info._text.value
    # flipped: the record no longer fits the data (the models ignore it; Info named the
    # measured slices 2 and 4 "missing")
    image.data = np.ascontiguousarray(data[::-1])
    assert volume_from_layer(image).missing_slices() == [3]
    assert "Missing slices: 3" in info._text.value.splitlines()
    image.scale = (5.0, 0.7, 0.7)  # it kept saying (1.0, 1.0, 1.0)
    assert "Spacing (mm): (5.0, 0.7, 0.7)" in info._text.value
    other = viewer.add_image(np.zeros((3, 8, 8), np.int16), name="other")
    info._layer.value = other
    image.scale = (2.0, 1.0, 1.0)  # no longer followed
    other.translate = (0.0, 10.0, 0.0)
    assert "Origin (mm): (0.0, 10.0, 0.0)" in info._text.value and "'ct'" not in info._text.value
    other.metadata = {"medseg": {"modality": "MR"}}  # it kept saying "unknown"
    assert "Modality: MR" in info._text.value


def test_info_finds_empty_slices_without_reading_a_memmap_on_napari_s_thread(tmp_path):
    """A memmap is an ndarray: Info read its whole file on napari's thread (0.23 s of a
    300 × 512² one at every edit); an empty slice is still found where the coarse sample
    of a slice is empty but the slice is not."""
    from types import SimpleNamespace

    from napari_medseg._widgets.info import _empty_slices

    data = np.zeros((6, 32, 32), np.float32)
    data[2] = np.nan
    data[4, ::8, ::8] = np.nan  # its coarse sample: every voxel of it is NaN
    assert _empty_slices(SimpleNamespace(data=data, rgb=False)) == {2}
    np.save(tmp_path / "ct.npy", data)
    mapped = np.load(tmp_path / "ct.npy", mmap_mode="r")
    assert _empty_slices(SimpleNamespace(data=mapped, rgb=False)) == set()


def test_info_reads_the_volume_again_only_when_its_data_change(make_napari_viewer, monkeypatch):
    """Every contrast step of a slider drag re-read the whole volume for empty slices
    (24 ms a step on a 512² × 200 CT)."""
    from napari_medseg._widgets import info as info_module

    viewer = make_napari_viewer()
    data = np.zeros((4, 8, 8), np.float32)
    image = viewer.add_image(data, name="ct")
    widget = info_module.VolumeInfoWidget(plugin_view(viewer))
    reads = []
    real = info_module._empty_slices
    monkeypatch.setattr(info_module, "_empty_slices", lambda layer: reads.append(1) or real(layer))
    for high in (0.5, 0.6, 0.7):
        image.contrast_limits = (0.0, high)
    assert "Contrast window: W 0.7 / L 0.35 (0.0, 0.7)" in widget._text.value and reads == []
    emptied = data.copy()
    emptied[1] = np.nan
    image.data = emptied
    assert reads and "Missing slices: 1" in widget._text.value.splitlines()
    # other layers added, renamed, removed: nothing of the picked one changed (each
    # rescanned it, inside every Segment and Detect result added)
    reads.clear()
    points = viewer.add_points(np.zeros((1, 3)), name="marks")
    image.name = "ct renamed"
    viewer.layers.remove(points)
    assert reads == [] and "Layer: ct renamed" in widget._text.value
    assert "Missing slices: 1" in widget._text.value.splitlines()
    viewer.add_image(np.zeros((2, 4, 4), np.float32), name="other")
    widget._layer.value = viewer.layers["other"]  # another layer picked: read
    assert reads


def test_a_refused_input_is_a_notification_not_a_logged_traceback(make_napari_viewer, qtbot, caplog):
    import logging

    from napari_medseg import _jobs
    from napari_medseg.core.errors import MedsegInputError

    def refuse():
        raise MedsegInputError("needs at least two acquired slices")

    start = len(notification_manager.records)
    with caplog.at_level(logging.INFO, logger=_jobs.log.name):
        worker = _jobs.start_job(refuse, description="Generate", on_result=lambda _: None)
        qtbot.waitUntil(lambda: any("needs at least two" in str(n.message)
                                    for n in notification_manager.records[start:]), timeout=10_000)
        qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_reader_warnings_reach_the_user(make_napari_viewer, tmp_path):
    """A reader warning (here: .npy has no geometry) becomes a notification, and the layer opens."""
    path = tmp_path / "scan.npy"
    np.save(path, np.zeros((3, 8, 8), dtype=np.int16))
    viewer = make_napari_viewer()
    start = len(notification_manager.records)
    viewer.open(str(path), plugin="napari-medseg")
    assert [layer.name for layer in viewer.layers] == ["scan"]
    warnings = [
        str(n.message) for n in notification_manager.records[start:] if n.severity == "warning"
    ]
    assert warnings and all(w.startswith("scan.npy: ") for w in warnings)


def test_labels_saved_from_an_oblique_scan_lie_on_it_and_never_replace_it(make_napari_viewer,
                                                                          tmp_path):
    """napari's own new labels layer on an oblique scan was saved as axial (16 mm off);
    a rotated layer was saved unrotated; saving onto the scan's file replaced the scan."""
    import nibabel as nib

    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-20.0, 15.0, 30.0)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(5 * 7 * 6, dtype=np.int16).reshape(5, 7, 6), affine), scan)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(scan), plugin="napari-medseg")
    drawn = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale,
                              translate=image.translate)  # as napari's New Labels makes it
    drawn.data[2, 3, 4] = 1
    viewer.layers.selection = {drawn}
    out = tmp_path / "drawn.nii.gz"
    assert viewer.layers.save(str(out), selected=True, plugin="napari-medseg") == [str(out)]
    saved = nib.load(out)
    (ijk,) = np.argwhere(np.asarray(saved.dataobj) == 1)
    value = image.data[2, 3, 4]  # the scan voxel the user painted on
    (src,) = np.argwhere(np.asarray(nib.load(scan).dataobj) == value)
    np.testing.assert_allclose(saved.affine @ [*ijk, 1], affine @ [*src, 1], atol=1e-3)

    turned = viewer.add_labels(np.zeros((2, 4, 4), np.uint8), scale=(2.0, 1.0, 1.0), rotate=30)
    turned.data[1, 2, 3] = 1
    viewer.layers.selection = {turned}
    out = tmp_path / "turned.nii.gz"
    viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    saved = nib.load(out)
    (ijk,) = np.argwhere(np.asarray(saved.dataobj) == 1)
    ras = saved.affine @ [*ijk, 1]
    world_zyx = np.array([ras[2], -ras[1], -ras[0]])  # axial: z = S, y = P, x = L
    np.testing.assert_allclose(world_zyx, turned.data_to_world((1, 2, 3)), atol=1e-4)

    before = scan.read_bytes()
    viewer.layers.selection = {drawn}
    start = len(notification_manager.records)
    try:
        written = viewer.layers.save(str(scan), selected=True, plugin="napari-medseg")
    except Exception as exc:  # napari may pass the writer's refusal on
        written, message = [], str(exc)
    else:
        message = " ".join(str(n.message) for n in notification_manager.records[start:])
    assert written == [] and scan.read_bytes() == before
    assert "opened from this file" in message, message


def test_info_says_how_a_result_was_made_and_lists_labels_layers(make_napari_viewer):
    """A synthetic layer looked like an acquired scan (its provenance was not shown),
    Labels layers could not be picked, and a micrometre layer was said to be in mm."""
    from napari_medseg._layers import _result_metadata
    from napari_medseg._widgets.info import VolumeInfoWidget, describe_layer

    viewer = make_napari_viewer()
    prov = {"model": None, "input_layer": "ct", "created": "2026-12-03T15:00:00+0000"}
    synthetic = viewer.add_image(np.zeros((5, 8, 8)), name="ct ×2 synthetic", metadata=(
        _result_metadata(prov, synthetic=True, method="linear", slice_axis="z",
                         generated_slices=[1, 3], note="generated slices are synthetic")))
    text = describe_layer(synthetic)
    assert "SYNTHETIC: 2 generated slices (not acquired) along z: 1, 3" in text
    assert "Made by: linear interpolation from layer 'ct' at 2026-12-03T15:00:00+0000" in text
    assert "Note: generated slices are synthetic" in text
    seg = viewer.add_labels(np.zeros((5, 8, 8), np.uint8), name="seg", metadata=_result_metadata(
        {"model": "segmenter", "model_version": 3, "input_layer": "ct"}))
    info = VolumeInfoWidget(plugin_view(viewer))
    info._layer.value = seg
    assert "Made by: model segmenter v3 from layer 'ct'" in info._text.value
    assert "Unlabelled slices" not in info._text.value
    gap = viewer.add_labels(np.zeros((5, 8, 8), np.uint8), name="seg with gap", metadata=(
        _result_metadata({"model": "segmenter", "input_layer": "ct"},
                         unlabelled_slices=[1, 2, 4])))
    # it said "Missing slices: none": the gap read as segmented, with nothing found
    assert "Unlabelled slices (no input there, not segmented): 1–2, 4" in describe_layer(gap)
    assert "Contrast window" not in info._text.value
    coronal = viewer.add_image(np.zeros((3, 8, 8)), metadata={"medseg": {"source": {
        "missing_planes": {"axis": "y", "indices": [3, 4]}}}})
    assert "Missing planes along y: 3–4" in describe_layer(coronal)  # it said none
    assert "missing_planes:" not in describe_layer(coronal)  # once, not again as raw metadata
    cells = viewer.add_image(np.zeros((3, 8, 8)), scale=(0.5, 0.2, 0.2), units="um")
    # the numbers were read as mm, 1000 times too large
    assert "Spacing (mm, converted from micrometer): (0.0005, 0.0002, 0.0002)" in \
        describe_layer(cells)
    assert "Spacing (mm)" in describe_layer(viewer.add_image(np.zeros((3, 8, 8))))


def test_a_layer_in_cm_is_read_by_the_models_in_mm():
    """The models read a layer's numbers as mm whatever its units: a CT whose scale was
    given in cm (0.25 × 0.1 × 0.1) went to them as 0.25 mm slices of 0.1 mm pixels."""
    from napari.layers import Image

    from napari_medseg._layers import marker_sizes, scale_mm, volume_from_layer

    data = np.zeros((4, 16, 16), np.float32)
    in_cm = Image(data, scale=(0.25, 0.1, 0.1), translate=(1.0, 2.0, 3.0), units="cm")
    in_mm = Image(data, scale=(2.5, 1.0, 1.0), translate=(10.0, 20.0, 30.0))
    for layer in (in_cm, in_mm):
        volume = volume_from_layer(layer)
        np.testing.assert_allclose(volume.spacing, (2.5, 1.0, 1.0))
        np.testing.assert_allclose(volume.origin, (10.0, 20.0, 30.0))
    # a 10 mm lesion is drawn 10 mm wide on both: 1 cm on the first, 10 mm on the other
    for layer in (in_cm, in_mm):
        assert marker_sizes([10.0], scale_mm(layer))[0] * abs(layer.scale[-1]) == \
            pytest.approx(10.0 / (10.0 if layer is in_cm else 1.0))


def test_another_tools_label_map_opens_with_a_colour_per_structure(tmp_path):
    """Every value without a known structure name was drawn in the same magenta: a
    nnU-Net or TotalSegmentator map opened as one colour, as did a structure the user
    added by painting a new value."""
    import nibabel as nib
    from napari.layers import Labels

    from napari_medseg._reader import read_layers

    data = np.zeros((4, 10, 10), np.uint8)
    for value in range(1, 6):
        data[:, 2 * (value - 1):2 * value, :5] = value
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "other_tool.nii.gz")
    ((array, kwargs, kind),) = read_layers(str(tmp_path / "other_tool.nii.gz"))
    assert kind == "labels"
    layer = Labels(array, **kwargs)
    colours = layer.colormap.map(np.arange(1, 7))  # 6: a value painted later
    assert len({tuple(np.round(c, 3)) for c in colours}) == 6
    assert layer.colormap.map(np.array([0]))[0][3] == 0  # background stays transparent


def test_a_new_structure_is_not_drawn_in_an_organ_s_colour():
    """napari's colour for 9 (its "new label" value after the 8 structures) was the left
    kidney's yellow, 0.16 away; 10 the liver's red: a new structure read as those."""
    from napari.layers import Labels

    from napari_medseg._layers import STRUCTURE_COLORS, _labels_kwargs
    from napari_medseg.core.phantom import LABEL_NAMES

    layer = Labels(np.zeros((2, 4, 4), np.uint8), **_labels_kwargs("seg", dict(LABEL_NAMES)))
    organs = np.array([c[:3] for n, c in STRUCTURE_COLORS.items() if n != "body"])
    new = layer.colormap.map(np.arange(len(LABEL_NAMES), 40))[:, :3]
    nearest = np.linalg.norm(new[:, None] - organs[None], axis=2).min(axis=1)
    assert nearest.min() >= 0.3, nearest.round(2)
    assert len({tuple(np.round(c, 3)) for c in new[:8]}) == 8  # and still apart


def test_saved_detections_reopen_where_they_were_drawn_without_the_hidden_ones(
        make_napari_viewer, tmp_path):
    """napari's fallback CSV writer stored a detection layer's data coordinates without
    its scale (reopened, voxel indices read as mm: off the scan) and its hidden weak
    detections, which came back shown and were retrained on as lesions."""
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((10, 40, 40), np.float32), scale=(2.5, 0.8, 0.8),
                             translate=(-40.0, 5.0, -7.0), units="mm", name="ct")
    points = viewer.add_points(np.array([[3.0, 10.0, 12.0], [6.0, 30.0, 20.0], [8.0, 5.0, 5.0]]),
                               scale=image.scale, translate=image.translate, units="mm",
                               features={"score": [0.9, 0.2, 0.7], "diameter_mm": [12.0, 6.0, 9.0]},
                               name="ct lesions")
    points.shown = [True, False, True]  # the second: below Detect's threshold
    world = np.array([points.data_to_world(p) for p in points.data[[0, 2]]])
    path = tmp_path / "lesions.csv"
    viewer.layers.selection = {points}
    # as File › Save Selected Layers with the file type "CSV points (world mm)"
    viewer.layers.save(str(path), selected=True, plugin="napari-medseg")
    reopened = viewer.open(str(path), plugin="napari")[0]
    assert isinstance(reopened, Points) and len(reopened.data) == 2
    np.testing.assert_allclose([reopened.data_to_world(p) for p in reopened.data], world,
                               atol=1e-4)
    np.testing.assert_allclose(reopened.features["score"], [0.9, 0.7])
    np.testing.assert_allclose(reopened.features["diameter_mm"], [12.0, 9.0])
    # and `napari-medseg finetune detector --points` reads it on the image's voxels
    from napari_medseg.cli_finetune import read_points_csv
    from napari_medseg.core.volume import Volume

    volume = Volume(np.zeros((10, 40, 40), np.float32), spacing=(2.5, 0.8, 0.8),
                    origin=(-40.0, 5.0, -7.0))
    voxels, diameters = read_points_csv(str(path), volume)
    np.testing.assert_allclose(voxels, points.data[[0, 2]], atol=1e-4)
    assert diameters.tolist() == [12.0, 9.0]


def test_points_saved_from_a_layer_in_cm_say_the_file_is_in_mm(make_napari_viewer, tmp_path):
    """A CSV carries no units: saved in mm from a layer in cm, napari reopened the points
    at ten times their place, in silence."""
    viewer = make_napari_viewer()
    points = viewer.add_points(np.array([[2.0, 40.0, 40.0]]), scale=(0.25, 0.1, 0.1),
                               units=("cm",) * 3, name="ct lesions")
    viewer.layers.selection = {points}
    start = len(notification_manager.records)
    viewer.layers.save(str(tmp_path / "p.csv"), selected=True, plugin="napari-medseg")
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("positions written in mm" in m and "centimeter" in m for m in said), said
    points.units = ("mm",) * 3
    start = len(notification_manager.records)
    viewer.layers.save(str(tmp_path / "q.csv"), selected=True, plugin="napari-medseg")
    assert not any("positions written in mm" in str(n.message)
                   for n in notification_manager.records[start:])


def test_a_volume_three_voxels_wide_opens_as_a_volume_not_a_colour_picture(
        make_napari_viewer, tmp_path):
    """napari takes a last axis of 3 or 4 for RGB(A): a 3-slice sagittal series (its
    slices along x) failed to open with a broadcasting traceback."""
    import nibabel as nib

    path = tmp_path / "sag3.nii.gz"
    array = np.random.default_rng(0).random((3, 64, 48)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.diag([4.0, 1.0, 1.0, 1.0])), str(path))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-medseg")
    assert not layer.rgb and layer.ndim == 3 and layer.data.shape[-1] == 3


@pytest.mark.parametrize("address", ["https://example.org/a.nii.gz", "s3://bucket/a.npy"])
def test_web_and_cloud_addresses_are_left_to_other_readers(address):
    """Claimed, they were reported as missing files and napari tried no other reader."""
    from napari_medseg._reader import get_reader

    assert get_reader(address) is None
    assert get_reader([address]) is None


def _oblique_scan(tmp_path):
    import nibabel as nib

    angle = np.radians(20)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-20.0, 15.0, 30.0)
    scan = tmp_path / "scan.nii.gz"
    data = (np.arange(5 * 7 * 6, dtype=np.int16).reshape(5, 7, 6) * 7 + 1000)
    nib.save(nib.Nifti1Image(data, affine), str(scan))
    return scan, affine


def test_labels_saved_from_one_window_see_the_scan_open_in_another(make_napari_viewer,
                                                                    tmp_path):
    """The writer looked only at the current viewer: with a second window current, a
    Labels layer was written over the scan open in the first, and labels drawn on an
    oblique scan were saved axial."""
    import nibabel as nib

    scan, affine = _oblique_scan(tmp_path)
    first = make_napari_viewer()
    (image,) = first.open(str(scan), plugin="napari-medseg")
    labels = first.add_labels(np.zeros(image.data.shape, np.uint8), name="drawn",
                              scale=image.scale, translate=image.translate,
                              metadata={})
    labels.data[2, 3, 4] = 1
    make_napari_viewer()  # napari.current_viewer() is this one now
    first.layers.selection = {labels}
    before = scan.read_bytes()
    with pytest.raises(Exception, match="was opened from this file"):
        first.layers.save(str(scan), selected=True, plugin="napari-medseg")
    assert scan.read_bytes() == before
    out = tmp_path / "drawn.nii.gz"
    first.layers.save(str(out), selected=True, plugin="napari-medseg")
    saved = nib.load(str(out))
    (ijk,) = np.argwhere(np.asarray(saved.dataobj) == 1)
    (expected,) = np.argwhere(np.asarray(nib.load(str(scan)).dataobj) == image.data[2, 3, 4])
    np.testing.assert_allclose((np.linalg.inv(affine) @ saved.affine @ [*ijk, 1])[:3], expected,
                               atol=1e-3)


def test_structure_names_by_row_and_long_names_survive_a_save(make_napari_viewer, tmp_path):
    """A features table without an index column names labels by row (napari reads it so):
    the names were dropped; a name over 64 characters came back cut."""
    viewer = make_napari_viewer()
    data = np.zeros((3, 4, 5), np.uint8)
    data[1, 1, 1] = 2
    long_name = "x" * 100
    layer = viewer.add_labels(data, name="L", features={"name": ["background", "liver", long_name]})
    viewer.layers.selection = {layer}
    viewer.layers.save(str(tmp_path / "n.nii.gz"), selected=True, plugin="napari-medseg")
    viewer.layers.clear()
    (back,) = viewer.open(str(tmp_path / "n.nii.gz"), plugin="napari-medseg")
    names = dict(zip(back.features["index"], back.features["name"]))
    assert names[2] == long_name and names[1] == "liver"


def test_label_values_above_255_reopen_in_colours_of_their_own(make_napari_viewer, tmp_path):
    """The colour table covered 1–255: labels 300 and 301 reopened in one magenta."""
    viewer = make_napari_viewer()
    data = np.zeros((2, 3, 4), np.uint16)
    data[0, 0, :3] = [300, 301, 5]
    layer = viewer.add_labels(data, name="L")
    viewer.layers.selection = {layer}
    viewer.layers.save(str(tmp_path / "c.nii.gz"), selected=True, plugin="napari-medseg")
    viewer.layers.clear()
    (back,) = viewer.open(str(tmp_path / "c.nii.gz"), plugin="napari-medseg")
    colours = back.colormap.map(np.array([300, 301]))
    assert not np.allclose(colours[0], colours[1])


def test_closed_info_widgets_read_no_volume(make_napari_viewer, qtbot, monkeypatch):
    """Each Volume info widget closed with its dock's × went on re-reading the picked
    volume at every layer added or renamed (napari opens a new one each time)."""
    from napari_medseg._widgets import info as info_module

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 16, 16), np.float32), name="ct")
    for _ in range(3):
        dock, _widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Volume info")
        viewer.window.remove_dock_widget(dock)
    viewer.window.add_plugin_dock_widget("napari-medseg", "Volume info")
    reads = []
    real = info_module._empty_slices
    monkeypatch.setattr(info_module, "_empty_slices", lambda layer: reads.append(1) or real(layer))
    viewer.add_labels(np.zeros((4, 16, 16), np.uint8), name="labels")
    assert reads == []  # the picked layer is unchanged: its missing slices are known
    viewer.layers["ct"].data = np.ones((4, 16, 16), np.float32)  # read by the open one only
    assert len(reads) == 1


def test_info_calls_no_multiscale_image_lazy(make_napari_viewer):
    from napari_medseg._widgets.info import describe_layer

    viewer = make_napari_viewer()
    base = np.zeros((8, 32, 32), np.float32)
    layer = viewer.add_image([base, base[:, ::2, ::2]], multiscale=True, name="ms")
    assert "lazy" not in describe_layer(layer)


def test_info_leaves_out_fields_the_file_leaves_empty(make_napari_viewer):
    """"body_part: None" and "series_description: None" were listed for a series that
    gives neither (the CLI left them out)."""
    from napari_medseg._widgets.info import describe_layer

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((2, 8, 8), np.float32), metadata={"medseg": {"source": {
        "body_part": None, "series_description": "", "kvp": 120.0, "manufacturer": (),
        "slice_spacings_mm": np.array([2.5, 2.5])}}})  # a script's array: no ValueError
    text = describe_layer(layer)
    assert "kvp: 120.0" in text and "None" not in text and "series_description" not in text
    assert "manufacturer" not in text and "slice_spacings_mm: [2.5 2.5]" in text
    # one value per slice of a 200-slice series: summed up, not 200 numbers in the box
    layer.metadata = {"medseg": {"source": {"slice_spacings_mm": [2.5] * 199,
                                            "instance_numbers": [*range(200, 100, -1), None]}}}
    text = describe_layer(layer)
    assert "slice_spacings_mm: 2.5 (× 199)" in text
    assert "instance_numbers: 200 → 101 (101 values, 1 none)" in text  # numbered from the head


def test_info_names_the_synthetic_slices_of_a_generated_file(make_napari_viewer, tmp_path):
    """A generated file opened again said "synthetic_slices: 4", not which slices."""
    from napari_medseg.cli import main
    from napari_medseg.core.io import write_nifti
    from napari_medseg._widgets.info import describe_layer

    write_nifti(tmp_path / "scan.nii.gz",
                np.random.default_rng(0).normal(size=(5, 8, 8)).astype(np.float32), (3.0, 1.0, 1.0))
    assert main(["generate", str(tmp_path / "scan.nii.gz"), str(tmp_path / "up.nii.gz"),
                 "--factor", "2", "-q"]) == 0
    viewer = make_napari_viewer()
    layer = viewer.open(tmp_path / "up.nii.gz", plugin="napari-medseg")[0]
    text = describe_layer(layer)
    assert "SYNTHETIC: 4 generated slices (not acquired) along z: 1, 3, 5, 7" in text
    assert "synthetic_planes" not in text
    layer.data = np.ascontiguousarray(layer.data[::2])  # the acquired slices kept: none said
    assert "SYNTHETIC" not in describe_layer(layer)


def test_slices_of_a_series_picked_together_say_once_to_open_their_folder(
        make_napari_viewer, tmp_path):
    """File › Open File(s) with every slice selected gave one 2D layer per file, silently."""
    from napari.utils.notifications import notification_manager

    import napari_medseg._reader as reader
    from tests.core.test_io_dicom import write_series

    write_series(tmp_path, [0.0, 2.5, 5.0], shuffle=False)
    viewer = make_napari_viewer()
    reader._SAID_SERIES.pop(str(tmp_path.resolve()), None)
    files = sorted(str(p) for p in tmp_path.glob("*.dcm"))

    def said_since(start):
        return [str(n.message) for n in notification_manager.records[start:]
                if "one slice of a series of 3 files" in str(n.message)]

    start = len(notification_manager.records)
    # as napari's Open File(s) dialog opens a selection: one reader call per file
    viewer.open(files, stack=False, plugin="napari-medseg")
    said = said_since(start)
    assert len(viewer.layers) == 3 and len(said) == 1, said
    assert "open the folder" in said[0] and "as Stack" in said[0]
    # one file of it opened later, on its own: said again (it was said once per folder
    # for the whole session)
    reader._SAID_SERIES[str(tmp_path.resolve())] -= reader.SAME_PICK_S
    start = len(notification_manager.records)
    viewer.open(files[1], plugin="napari-medseg")
    assert len(said_since(start)) == 1
    # Open Files as Stack: one volume, as the folder gives (napari refused the stack)
    viewer.layers.clear()
    (layer,) = viewer.open(files, stack=True, plugin="napari-medseg")
    assert layer.data.shape == (3, *viewer.open(files[0], plugin="napari-medseg")[0].data.shape[1:])
    assert layer.scale[0] == pytest.approx(2.5)
    assert layer.name == tmp_path.name


def test_dicom_files_named_by_number_or_uid_open_in_napari(make_napari_viewer, tmp_path):
    """A PACS or CD export names its files IM000001 or by UID, without a suffix: napari
    offered no reader for them, even with the plugin chosen (the CLI read them)."""
    import shutil

    import pydicom.data

    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    viewer = make_napari_viewer()
    for name in ("IM000001", "1.2.840.113619.2.1.1"):
        shutil.copy(ct, tmp_path / name)
        (layer,) = viewer.open(str(tmp_path / name), plugin=None)  # as File › Open does
        assert layer.data.shape == (1, 128, 128), name
    # a file of that name that is not DICOM: declined, for another reader to take
    (tmp_path / "00000002").write_text("not an image")
    from napari_medseg._reader import get_reader

    assert get_reader(str(tmp_path / "00000002")) is None


def test_run_leaves_the_copy_of_the_image_to_the_worker(make_napari_viewer):
    """Run copied the whole image on napari's thread: 0.12-1.1 s on a 400 x 512² float32
    CT, on every click. The worker's copy is of the array the layer had at the click."""
    import tracemalloc

    from napari_medseg._layers import volume_from_layer

    viewer = make_napari_viewer()
    array = np.random.default_rng(0).normal(40, 100, (20, 128, 128)).astype(np.float32)
    layer = viewer.add_image(array, scale=(2.5, 1.0, 1.0))
    tracemalloc.start()
    try:
        deferred = volume_from_layer(layer, defer=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < array.nbytes / 10, peak
    layer.data = np.zeros_like(array)  # replaced after the click: the model keeps the first
    volume = deferred()
    np.testing.assert_array_equal(volume.array, array)
    assert not np.shares_memory(volume.array, array)


@pytest.mark.parametrize("dtype", ["float32", "int16", "float64", ">f4"])
def test_the_worker_s_copy_of_an_image_is_made_once(dtype):
    """A layer of another dtype was copied as it was, then again into float32: a float64
    CT took 3 times the float32 volume's memory on top of the layer. The Volume is still
    the model's own copy, whatever the layer's dtype."""
    import tracemalloc

    from napari.layers import Image

    from napari_medseg._layers import volume_from_layer

    array = np.random.default_rng(0).normal(40, 100, (48, 384, 384)).astype(dtype)
    layer = Image(array, scale=(2.5, 1.0, 1.0))
    tracemalloc.start()
    try:
        volume = volume_from_layer(layer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the copy, and the modality guess's sample (at most a million voxels: about 9 MB)
    assert peak < volume.array.nbytes + 10e6, peak / volume.array.nbytes  # was 1.75-3.25
    np.testing.assert_array_equal(volume.array, array.astype(np.float32))
    assert not np.shares_memory(volume.array, array)


@pytest.mark.parametrize("name", ["Retrain on my annotations", "Retrain detector on my points"])
def test_the_retrain_docks_scroll_instead_of_growing_the_window(make_napari_viewer, name):
    """napari docks a magicgui widget's .native: the controls' 920 px were the dock's
    minimum, and the window grew past a laptop's screen to hold them."""
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name)
    assert dock.minimumSizeHint().height() < 300
    assert widget._run.native.isVisibleTo(dock.widget())  # the controls are inside it
    # opened again from the menu: napari hands back the docked widget, not its scroll area
    assert viewer.window.add_plugin_dock_widget("napari-medseg", name)[1] is widget


def test_every_dock_can_shrink_so_five_fit_a_window_without_growing_it(make_napari_viewer,
                                                                       qtbot):
    """Only Retrain scrolled: docked with Segment, Uncertainty, Detect and Retrain
    detector it was squeezed to 94 px (its pickers alone); all ten widgets grew the window
    to 2445 px, past the screen and napari's own status bar."""
    from napari_medseg._widgets._model_widget import ScrollableDock

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    names = ["Segment organs", "Retrain on my annotations", "Segmentation uncertainty",
             "Detect lesions", "Retrain detector on my points", "Synthetic phantom",
             "Classify slices", "Generate slices (upsample, fill gaps)",
             "Explain slice classes (Grad-CAM)"]
    for name in names:
        dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name)
        assert type(widget).native is ScrollableDock.native, name
        assert dock.minimumSizeHint().height() < 100, name
    qtbot.wait(50)
    assert window.height() <= 1000


def test_ground_truth_lesions_are_drawn_apart_from_detections():
    """The sample's lesions were lime rings with yellow text, as detections are: on the
    same lesion the rings and texts could not be told apart."""
    from napari.layers import Points

    from napari_medseg._sample_data import phantom_layer_data
    from napari_medseg.core.phantom import generate_phantom

    (_, _, (centres, kwargs, kind)) = phantom_layer_data(
        generate_phantom((8, 48, 48), (4.0, 2.0, 2.0), seed=2, n_lesions=1))
    layer = Points(centres, **kwargs)
    assert kind == "points" and kwargs["name"].startswith("lesions, ground truth · ")
    cyan = np.array([0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(layer.border_color[0], cyan)
    np.testing.assert_allclose(layer.text.color.constant, cyan)


def test_info_gives_the_window_as_width_and_level_and_settings_in_short(make_napari_viewer):
    """The window read '(-160.0, 240.0)', not W 400 / L 40; a phantom's settings printed
    15-digit noise levels; the text box stayed 330 px tall under an empty half dock."""
    from napari_medseg._sample_data import phantom_layer_data
    from napari_medseg._widgets.info import VolumeInfoWidget
    from napari_medseg.core.phantom import generate_phantom

    viewer = make_napari_viewer()
    data, kwargs, _ = phantom_layer_data(generate_phantom((4, 32, 32), (2.5, 4.0, 4.0), seed=1))[0]
    image = viewer.add_image(data, **kwargs)
    image.contrast_limits = (-160.0, 240.0)
    info = VolumeInfoWidget(plugin_view(viewer))
    text = info._text.value
    assert "Contrast window: W 400 / L 40 (-160.0, 240.0)" in text
    settings = next(line for line in text.splitlines() if line.startswith("phantom_settings"))
    assert not re.search(r"\d\.\d{5}", settings), settings
    # read as text, not a Python dict's braces and quotes
    assert "{" not in settings and "'" not in settings and "noise_hu " in settings, settings
    from qtpy.QtWidgets import QSizePolicy

    assert info.native.sizePolicy().verticalPolicy() == QSizePolicy.Policy.Expanding


def test_retrain_docked_under_segment_takes_the_height_its_controls_want(
        make_napari_viewer, qtbot):
    """Qt gives a dock added below another its minimum: three rows of the Retrain form
    showed in 90 px while Segment's dock above stood mostly empty."""
    viewer = make_napari_viewer(show=True)
    segment_dock, _ = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment organs")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg",
                                                        "Retrain on my annotations")
    viewer.window.resize(1280, 800)
    qtbot.wait(200)
    assert dock.height() > 300, (dock.height(), segment_dock.height())
    assert segment_dock.height() >= segment_dock.minimumSizeHint().height()


@pytest.mark.parametrize("first, second", [("Classify slices", "Generate slices (upsample, fill gaps)"),
                                           ("Synthetic phantom", "Classify slices")])
def test_every_dock_docked_under_another_shows_its_run_button(make_napari_viewer, qtbot,
                                                              first, second):
    """Docked under Classify, Generate showed its two pickers in 69 px with its Run
    button out of sight, beside Classify's empty space (only Retrain took its height)."""
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    upper, _ = viewer.window.add_plugin_dock_widget("napari-medseg", first)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", second)
    qtbot.wait(200)
    inner = widget.native.widget()
    assert dock.height() >= inner.sizeHint().height(), (dock.height(), upper.height())
    run = widget._run.native
    assert run.isVisible() and not widget.native.visibleRegion().isEmpty()
    assert widget.native.verticalScrollBar().maximum() == 0  # nothing hidden below


def test_a_point_added_to_the_sample_s_lesions_is_no_lesion(make_napari_viewer):
    """Open Sample gave the lesion layer none of the Phantom widget's handling: a point
    added after selecting a lesion took its diameter, organ and '13 mm' label."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "synthetic_ct")
    points = next(layer for layer in viewer.layers if isinstance(layer, Points))
    points.selected_data = {0}
    points.add([[8, 40, 40]])
    added = points.features.iloc[-1]
    assert added["label"] == "added" and added["organ"] == "" and np.isnan(added["diameter_mm"])
    assert points.features.iloc[0]["label"] != "added"


def test_labels_of_another_extent_on_an_oblique_scan_are_saved_on_it(make_napari_viewer,
                                                                       tmp_path):
    """napari's New Labels sized to other layers (or a cropped layer) on the scan's grid
    was saved axial: 70 mm off an oblique scan in other viewers; two open scans with other
    axes are said, not guessed; a 2D slice layer is said to lose its place."""
    import nibabel as nib

    scan, affine = _oblique_scan(tmp_path)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(scan), plugin="napari-medseg")
    scale = np.asarray(image.scale)
    crop = viewer.add_labels(np.zeros((3, 4, 4), np.uint8), scale=scale,
                             translate=np.asarray(image.translate) + scale * (1, 2, 1), name="crop")
    crop.data[1, 1, 2] = 1  # the scan's voxel (2, 3, 3)
    viewer.layers.selection = {crop}
    out = tmp_path / "crop.nii.gz"
    assert viewer.layers.save(str(out), selected=True, plugin="napari-medseg") == [str(out)]
    saved = nib.load(str(out))
    (ijk,) = np.argwhere(np.asarray(saved.dataobj) == 1)
    (expected,) = np.argwhere(np.asarray(nib.load(str(scan)).dataobj) == image.data[2, 3, 3])
    np.testing.assert_allclose((np.linalg.inv(affine) @ saved.affine @ [*ijk, 1])[:3], expected,
                               atol=1e-3)

    # a .npy image (no axes) and labels on it: not on the oblique scan's grid, so axial
    np.save(tmp_path / "plain.npy", np.zeros((3, 5, 5), np.float32))
    (plain,) = viewer.open(str(tmp_path / "plain.npy"), plugin="napari-medseg")
    on_plain = viewer.add_labels(np.zeros((3, 5, 5), np.uint8), scale=plain.scale,
                                 translate=plain.translate)
    viewer.layers.selection = {on_plain}
    out = tmp_path / "plain_labels.nii.gz"
    viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    ras = nib.load(str(out)).affine[:3, :3]
    np.testing.assert_allclose(ras - np.diag(np.diag(ras)), 0.0, atol=1e-6)  # axial

    # two open scans along different axes on whose grids the layer lies: said, not guessed
    viewer.layers.clear()
    for angle in (20, 35):
        a = np.radians(angle)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        turned = np.eye(4)
        turned[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
        nib.save(nib.Nifti1Image(np.ones((5, 7, 6), np.int16), turned), str(tmp_path / f"t{angle}.nii"))
        (scan_layer,) = viewer.open(str(tmp_path / f"t{angle}.nii"), plugin="napari-medseg")
    crop = viewer.add_labels(np.zeros((2, 2, 2), np.uint8), scale=scan_layer.scale,
                             translate=scan_layer.translate)
    assert np.allclose(viewer.layers[0].scale, scan_layer.scale)
    assert np.allclose(viewer.layers[0].translate, scan_layer.translate)
    start = len(notification_manager.records)
    viewer.layers.selection = {crop}
    viewer.layers.save(str(tmp_path / "crop2.nii.gz"), selected=True, plugin="napari-medseg")
    said = " ".join(str(n.message) for n in notification_manager.records[start:])
    assert "grids of open scans along different axes" in said, said

    flat = viewer.add_labels(np.zeros((7, 6), np.uint8), scale=scale[1:], name="slice")
    start = len(notification_manager.records)
    viewer.layers.selection = {flat}
    viewer.layers.save(str(tmp_path / "slice.nii.gz"), selected=True, plugin="napari-medseg")
    said = " ".join(str(n.message) for n in notification_manager.records[start:])
    assert "holds no slice position" in said, said


def test_renaming_a_picked_layer_that_is_not_the_first_keeps_it_picked(make_napari_viewer,
                                                                          random_models):
    """magicgui keeps an entry by its label: a picked layer renamed made every picker jump
    to the first layer, and Uncertainty (Segment …) ran on another scan."""
    from napari_medseg._widgets.detect import DetectWidget
    from napari_medseg._widgets.explain import UncertaintyWidget
    from napari_medseg._widgets.info import VolumeInfoWidget
    from napari_medseg._widgets.retrain import RetrainWidget
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 8, 8), np.float32), name="first scan")
    chosen = viewer.add_image(np.ones((3, 8, 8), np.float32), name="test")
    labels = viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="mine")
    viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="other labels")
    widgets = [cls(plugin_view(viewer)) for cls in (SegmentWidget, DetectWidget,
                                                     UncertaintyWidget, RetrainWidget)]
    info = VolumeInfoWidget(plugin_view(viewer))
    for widget in (*widgets, info):  # docked: napari re-lists their pickers too
        viewer.window.add_dock_widget(widget)
    later = viewer.add_image(np.ones((3, 8, 8), np.float32), name="later scan")
    pickers = [w._image for w in widgets] + [info._layer]
    for picker in pickers:
        picker.value = chosen
    retrain = widgets[-1]
    retrain._layer_pick.value = labels
    changes = []
    for picker in pickers:
        picker.changed.connect(changes.append)
    chosen.name = "patient A"
    labels.name = "my corrections"
    assert all(picker.value is chosen for picker in pickers)
    assert retrain._layer_pick.value is labels
    assert changes == []  # nothing re-picked, nothing said to have changed
    assert "patient A" in info._text.value
    # another layer renamed to the picked one's name: napari tells the pickers "patient A"
    # before it makes it "patient A [1]", and magicgui merged the two entries by label
    later.name = "patient A"  # after the picked layer in the list
    viewer.layers["other labels"].name = "my corrections"
    assert all(picker.value is chosen for picker in pickers)
    assert retrain._layer_pick.value is labels
    assert changes == []
    viewer.layers.remove(chosen)  # gone: the pickers move on, and say so
    assert all(picker.value is not chosen for picker in pickers)
    assert changes


def test_picker_labels_stay_unique_when_a_layer_is_named_like_a_suffix():
    from types import SimpleNamespace

    from napari_medseg._widgets._model_widget import layer_choices

    layers = [SimpleNamespace(name=n) for n in ("CT", "CT (2)", "CT", "CT")]
    labels = [label for label, _ in layer_choices(layers)]
    assert len(set(labels)) == 4 and labels[:2] == ["CT", "CT (2)"], labels


def test_a_coronal_series_gaps_survive_a_save_and_reopen(make_napari_viewer, tmp_path):
    """A coronal series' lost planes (NaN planes along y) were forgotten once saved to
    NIfTI and opened again: no warning, 'gaps: none', its slice axis taken as z."""
    import napari
    from napari.utils.notifications import notification_manager
    from pydicom.uid import generate_uid

    from tests.core.test_io_dicom import write_ct_slice

    iop = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    normal = np.cross(iop[:3], iop[3:])
    uid, series = generate_uid(), tmp_path / "series"
    series.mkdir()
    for k, step in enumerate([0, 1, 2, 5]):  # planes 3 and 4 lost
        write_ct_slice(series / f"{k}.dcm", 100 * step, series_uid=uid, instance=k + 1,
                       iop=iop, ipp=np.array([-100.0, -120.0, 40.0]) + 3.0 * step * normal)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(series), plugin="napari-medseg")
    napari.save_layers(str(tmp_path / "c.nii.gz"), [layer], plugin="napari-medseg")
    start = len(notification_manager.records)
    (again,) = viewer.open(str(tmp_path / "c.nii.gz"), plugin="napari-medseg")
    source = again.metadata["medseg"]["source"]
    assert source["missing_planes"] == {"axis": "y", "indices": [3, 4]}
    assert source["slice_axis"] == "y"
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("2 missing slices of the series (NaN planes at y=3–4" in m for m in said), said
    # filled by another tool (the record kept): no longer missing, not said
    import nibabel as nib

    from napari_medseg.core.io import read_nifti

    img = nib.load(tmp_path / "c.nii.gz")
    filled = nib.Nifti1Image(np.nan_to_num(img.get_fdata(), nan=5.0).astype("f4"),
                             img.affine, img.header)
    assert len(filled.header.extensions) == 1
    filled.to_filename(tmp_path / "filled.nii.gz")
    volume = read_nifti(tmp_path / "filled.nii.gz")
    assert "missing_planes" not in volume.metadata and volume.metadata["slice_axis"] == "y"
    assert not any("missing slice" in w for w in volume.metadata["warnings"])


def test_a_generated_file_saved_again_keeps_its_method(make_napari_viewer, tmp_path):
    """Saved a second time, a generated file's header said 'SYNTHETIC slices (?)'."""
    import napari
    import nibabel as nib

    from napari_medseg.cli import main

    np.save(tmp_path / "ct.npy", np.random.default_rng(0).normal(40, 5, (4, 16, 16)).astype("f4"))
    assert main(["generate", str(tmp_path / "ct.npy"), str(tmp_path / "up.nii.gz"),
                 "--factor", "2", "-q"]) == 0
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "up.nii.gz"), plugin="napari-medseg")
    napari.save_layers(str(tmp_path / "again.nii.gz"), [layer], plugin="napari-medseg")
    first = nib.load(tmp_path / "up.nii.gz").header["descrip"].tobytes().rstrip(b"\0")
    second = nib.load(tmp_path / "again.nii.gz").header["descrip"].tobytes().rstrip(b"\0")
    assert b"(linear" in first and second == first


def test_a_long_layer_name_does_not_widen_the_docks(make_napari_viewer):
    """A Generate result's name widened the Image picker to its length: the Classify
    dock grew to 468 px and the canvas lost a third of its width."""
    from napari_medseg._widgets.classify import ClassifyWidget

    viewer = make_napari_viewer(show=True)
    long = "synthetic ×2 · " + "a long series description " * 4 + "(linear) [1]"
    viewer.add_image(np.zeros((4, 8, 8), np.float32), name=long)
    widget = ClassifyWidget(plugin_view(viewer))
    viewer.window.add_dock_widget(widget)
    box = widget._image.native
    assert box.currentText() == long
    assert box.sizeHint().width() < box.fontMetrics().horizontalAdvance(long) / 2
    # the list that drops down still shows the whole name
    view = widget._image.native.view()
    assert view.minimumWidth() >= view.sizeHintForColumn(0)


def test_the_sample_says_why_it_cannot_be_made(make_napari_viewer, monkeypatch):
    """The phantom's memory check raised through napari's sample menu as a traceback."""
    from napari.utils.notifications import notification_manager

    from napari_medseg import _sample_data
    from napari_medseg.core import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1000)
    make_napari_viewer()
    start = len(notification_manager.records)
    assert _sample_data.synthetic_ct() == []
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("napari-medseg sample:" in m and "GB of memory" in m for m in said), said


def test_the_structure_colours_stand_apart_from_each_other_and_from_grey():
    """The spine was near-white over bone white in the CT window (labels on or off
    differed by 7 RGB levels); the two kidneys were 0.17 apart, both yellow."""
    import itertools

    from napari_medseg._layers import _MIN_COLOUR_DISTANCE, STRUCTURE_COLORS

    organs = {n: np.array(c[:3]) for n, c in STRUCTURE_COLORS.items() if n != "body"}
    for (a, ca), (b, cb) in itertools.combinations(organs.items(), 2):
        assert np.linalg.norm(ca - cb) >= _MIN_COLOUR_DISTANCE, (a, b)
    for name, colour in organs.items():
        assert colour.max() - colour.min() >= 0.3, name  # a colour, not a grey


def test_a_click_in_a_dock_leaves_napari_its_keys(make_napari_viewer, qtbot):
    """A click left keyboard focus on the control: L then switched Retrain's Labels
    picker by type-ahead, Ctrl+Z and P did nothing, and after Mark current slice the Right
    arrow walked the buttons instead of stepping slices."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QAbstractSpinBox, QApplication, QComboBox

    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((6, 16, 16), np.float32), name="ct")
    labels = viewer.add_labels(np.zeros((6, 16, 16), np.uint8), name="prediction")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg",
                                                         "Retrain on my annotations")
    viewer.window._qt_window.activateWindow()
    qtbot.wait(50)
    for control in (widget._mark, widget._run, widget._layer_pick, widget._image):
        assert control.native.focusPolicy() == Qt.FocusPolicy.TabFocus, control
        qtbot.mouseClick(control.native, Qt.MouseButton.LeftButton) if not isinstance(
            control.native, QComboBox) else None
        assert QApplication.focusWidget() is not control.native
    # a number typed into a box: focus goes back to the viewer once it is entered
    box = widget._seconds.native
    spin = box if isinstance(box, QAbstractSpinBox) else box.findChild(QAbstractSpinBox)
    spin.setFocus()
    qtbot.keyClicks(spin, "9")
    qtbot.keyClick(spin, Qt.Key.Key_Return)
    qtbot.wait(20)
    assert not spin.hasFocus()
    labels.mode = "pan_zoom"
    qtbot.keyClick(QApplication.focusWidget(), Qt.Key.Key_P)  # napari's paint key
    assert labels.mode == "paint"
    # a click on a button or the slice list, then the arrow that steps slices (the dock's
    # scroll area took the focus and ate the arrows)
    for control in (widget._mark.native, widget._slice_list):
        viewer.dims.set_current_step(0, 2)
        qtbot.mouseClick(control, Qt.MouseButton.LeftButton)
        qtbot.wait(20)
        target = QApplication.focusWidget() or viewer.window._qt_window
        qtbot.keyClick(target, Qt.Key.Key_Right)
        qtbot.wait(20)
        assert viewer.dims.current_step[0] == 3, (control, type(target).__name__)


def test_the_loss_curve_caption_follows_the_font_size(qtbot):
    """At a fixed 60 px with the caption drawn at y 11, a 14 pt caption was cut off."""
    from qtpy.QtGui import QFont

    from napari_medseg._widgets._loss_curve import LossCurve

    curve = LossCurve()
    qtbot.addWidget(curve)
    assert curve.minimumHeight() >= 60
    font = QFont(curve.font())
    font.setPointSize(24)
    curve.setFont(font)
    assert curve.minimumHeight() >= 3 * curve.fontMetrics().height()
    curve.resize(300, curve.minimumHeight())
    for loss in (1.0, 0.5, 0.25):
        curve.add(loss)
    curve.grab()  # paints without error at that size


@pytest.mark.parametrize("title", ["Segment organs", "Detect lesions", "Classify slices",
                                   "Generate slices (upsample, fill gaps)", "Synthetic phantom",
                                   "Retrain on my annotations"])
def test_every_control_says_what_it_does_and_has_a_name(make_napari_viewer, title):
    """About 7 of 80 controls had a tooltip (none in Segment, Detect, Classify, Generate
    or Phantom), and none an accessible name: a screen reader read "combo box"."""
    from magicgui.widgets import ComboBox, PushButton

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 16, 16), np.float32))
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", title)
    controls = []

    def walk(container):
        for child in container:
            if hasattr(child, "_list"):
                walk(child)
            elif isinstance(child, (ComboBox, PushButton)) or (
                    hasattr(child, "step") and type(child).__name__ != "ProgressBar"):
                controls.append(child)

    walk(widget)
    assert controls
    for control in controls:
        name = str(getattr(control, "label", "") or getattr(control, "text", ""))
        if title != "Retrain on my annotations" or control in (widget._run, widget._mark,
                                                              widget._image):
            assert control.tooltip, name
        assert control.native.accessibleName(), name


def test_labels_saved_on_a_nifti_scan_are_stored_in_its_voxel_order(make_napari_viewer,
                                                                     tmp_path):
    """Labels drawn on a RAS-stored NIfTI scan (napari's New Labels, or a layer made with
    the scan's record) were saved in the plugin's own (L, P, S) order: in place in the
    patient, but their raw array had i and j reversed against the scan's, so scripts
    indexing one with the other read other voxels. Now they have the scan's shape and
    affine; a crop on its grid keeps its order."""
    import nibabel as nib

    from napari_medseg._layers import scan_axes

    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-20.0, 15.0, 30.0)
    raw = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)  # (i, j, k): R, A, S
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(raw, affine), scan)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(scan), plugin="napari-medseg")
    drawn = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale,
                              translate=image.translate, name="drawn")
    recorded = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale,
                                 translate=image.translate, name="recorded",
                                 metadata={"medseg": {"source": scan_axes(image)}})
    for layer in (drawn, recorded):
        layer.data[2, 3, 4] = 1
        viewer.layers.selection = {layer}
        out = tmp_path / f"{layer.name}.nii.gz"
        assert viewer.layers.save(str(out), selected=True, plugin="napari-medseg") == [str(out)]
        saved = nib.load(out)
        assert saved.shape == raw.shape
        np.testing.assert_allclose(saved.affine, affine, atol=1e-4)
        (ijk,) = np.argwhere(np.asarray(saved.dataobj) == 1)
        assert raw[tuple(ijk)] == image.data[2, 3, 4]  # the voxel painted, raw on raw

    scale = np.asarray(image.scale)
    crop = viewer.add_labels(np.zeros((2, 3, 4), np.uint8), scale=scale,
                             translate=np.asarray(image.translate) + scale * (1, 2, 1))
    crop.data[1, 1, 2] = 1  # the scan's voxel (2, 3, 3)
    viewer.layers.selection = {crop}
    out = tmp_path / "crop.nii.gz"
    viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    saved = nib.load(out)
    assert nib.aff2axcodes(saved.affine) == ("R", "A", "S") and saved.shape == (4, 3, 2)
    (ijk,) = np.argwhere(np.asarray(saved.dataobj) == 1)
    (expected,) = np.argwhere(raw == image.data[2, 3, 3])
    np.testing.assert_allclose((np.linalg.inv(affine) @ saved.affine @ [*ijk, 1])[:3],
                               expected, atol=1e-3)
    # the same grid opened twice, stored in two orders: which to follow is not known, so
    # the plugin's own (L, P, S), whichever was opened first
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    turn = ornt_transform(axcodes2ornt(tuple("RAS")), axcodes2ornt(tuple("LPS")))
    nib.save(nib.Nifti1Image(np.asarray(nib.load(scan).dataobj)[::-1, ::-1],
                             affine @ inv_ornt_aff(turn, raw.shape)), tmp_path / "lps.nii.gz")
    viewer.open(str(tmp_path / "lps.nii.gz"), plugin="napari-medseg")
    viewer.layers.selection = {drawn}
    out = tmp_path / "two.nii.gz"
    viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    assert nib.aff2axcodes(nib.load(out).affine) == ("L", "P", "S")

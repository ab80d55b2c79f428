"""Generate widget: a new synthetic Image layer on the same world grid; nothing else changes."""

import numpy as np
import pytest
from napari.layers import Image, Points

from napari_medseg._sample_data import phantom_layer_data
from napari_medseg._widgets.generate import GenerateWidget
from napari_medseg.core.generation import linear_fill
from tests.gui.conftest import plugin_view


def _open(viewer, phantom):
    for data, kwargs, layer_type in phantom_layer_data(phantom):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    return viewer.layers[0]


def _snapshot(viewer):
    return [(layer.name, np.array(layer.data, copy=True)) for layer in viewer.layers]


def _unchanged(viewer, before):
    assert len(viewer.layers) >= len(before)
    for name, data in before:  # by name: a generated layer sits among them
        np.testing.assert_array_equal(viewer.layers[name].data, data)


@pytest.mark.parametrize("method", ["model", "cubic"])
def test_upsampled_layer_is_new_aligned_and_marked_synthetic(make_napari_viewer, qtbot,
                                                             random_models, small_phantom,
                                                             method, monkeypatch):
    if method != "model":  # interpolation needs no model: loading one would be a bug
        import napari_medseg._widgets._model_widget as mw

        monkeypatch.setattr(mw, "load_model", lambda *_: (_ for _ in ()).throw(
            AssertionError("interpolation loaded a model")))
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    before = _snapshot(viewer)
    widget = GenerateWidget(plugin_view(viewer))
    viewer.window.add_dock_widget(widget)
    widget._image.value = image
    widget._model.value = random_models["SliceGenerator"]
    widget._factor.value = 2
    widget._method.value = method
    widget._run.clicked.emit()
    widget._factor.value = 3  # changed while it runs: the run keeps what was clicked
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert len(viewer.layers) == len(before) + 1
    # just above its scan: the labels and points stay drawn over it (it went on top)
    new = viewer.layers[viewer.layers.index(image) + 1]
    assert isinstance(viewer.layers[-1], Points)
    nz = image.data.shape[0]
    assert isinstance(new, Image) and new.data.shape == (2 * nz - 1, *image.data.shape[1:])
    assert new.name.startswith("synthetic ×2 · ")  # seen in the list, which cuts names short
    np.testing.assert_allclose(new.scale, [image.scale[0] / 2, *image.scale[1:]])
    np.testing.assert_allclose(new.translate, image.translate)
    # acquired slices sit at the same world z as in the input, bit-identical
    np.testing.assert_array_equal(new.data[::2], image.data)
    meta = new.metadata["medseg"]
    assert meta["synthetic"] is True and meta["method"] == method
    assert meta["generated_slices"] == list(range(1, 2 * nz - 1, 2))
    assert meta["acquired_slices"] == list(range(0, 2 * nz - 1, 2))
    assert np.isclose(new.data_to_world([2, 0, 0])[0], image.data_to_world([1, 0, 0])[0])
    if method == "model":  # the test model is exactly linear (zero head)
        known = np.zeros(2 * nz - 1, dtype=bool)
        known[::2] = True
        np.testing.assert_allclose(new.data, linear_fill(new.data, known), atol=0.05)
    _unchanged(viewer, before)


def test_bad_input_gets_one_message_and_changes_nothing(make_napari_viewer, qtbot,
                                                        random_models):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32),
                     name="one slice")
    before = _snapshot(viewer)
    widget = GenerateWidget(plugin_view(viewer))
    widget._image.value = viewer.layers[0]
    widget._model.value = random_models["SliceGenerator"]
    widget._factor.value = 2
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    errors = [str(n.message) for n in notification_manager.records[start:]
              if n.severity == "error"]
    assert len(errors) == 1 and "two acquired slices" in errors[0] and "\n" not in errors[0]
    assert len(viewer.layers) == len(before)
    _unchanged(viewer, before)
    assert widget._run.enabled


def _linear_x2_errors(widget, qtbot, layer) -> list[str]:
    """Run ×2 linear on ``layer``; the error notifications it gave."""
    from napari.utils.notifications import notification_manager

    widget._method.value = "linear"
    widget._factor.value = 2
    widget._image.value = layer
    start = len(notification_manager.records)
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    return [str(n.message) for n in notification_manager.records[start:]
            if n.severity == "error"]


def test_a_synthetic_layer_is_not_generated_from_again(make_napari_viewer, qtbot):
    """×2 of a ×2 layer listed the first run's synthetic slices as acquired."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).normal(size=(5, 8, 8)).astype(np.float32),
                     scale=(4, 1, 1), name="ct")
    widget = GenerateWidget(plugin_view(viewer))
    assert _linear_x2_errors(widget, qtbot, viewer.layers["ct"]) == []
    assert len(viewer.layers) == 2
    before = _snapshot(viewer)
    errors = _linear_x2_errors(widget, qtbot, viewer.layers[-1])
    assert len(errors) == 1 and "already holds 4 generated (synthetic) slices" in errors[0]
    assert len(viewer.layers) == 2
    _unchanged(viewer, before)
    # cut back to its acquired slices it is a scan again (a layer of a plain array, no
    # reader's axes: its shape was not recorded and the record held for any data)
    made = viewer.layers[-1]
    made.data, made.scale = np.ascontiguousarray(made.data[::2]), (4, 1, 1)
    assert _linear_x2_errors(widget, qtbot, made) == [] and len(viewer.layers) == 3


def test_a_generated_nifti_opened_in_napari_is_not_generated_from_again(
        make_napari_viewer, qtbot, tmp_path):
    """The reader's record of a generated file reached the layer's source facts only,
    and the widget made a ×2 of it; its acquired slices kept alone are generated from."""
    from napari_medseg.core.io import write_nifti

    path = tmp_path / "x2.nii.gz"
    data = np.random.default_rng(0).normal(size=(9, 8, 8)).astype(np.float32)
    write_nifti(path, data, (2, 1, 1), info={"synthetic": True, "generated_slices": [1, 3, 5, 7]})
    viewer = make_napari_viewer()
    (opened,) = viewer.open(str(path), plugin="napari-medseg")
    widget = GenerateWidget(plugin_view(viewer))
    errors = _linear_x2_errors(widget, qtbot, opened)
    assert len(errors) == 1 and "already holds 4 generated (synthetic) slices" in errors[0]
    assert len(viewer.layers) == 1
    from napari_medseg._layers import generated_planes

    assert generated_planes(opened) == {"axis": "z", "indices": [1, 3, 5, 7]}
    opened.data = opened.data[::2]  # the acquired slices only: nothing synthetic left
    assert _linear_x2_errors(widget, qtbot, opened) == []
    assert len(viewer.layers) == 2


def test_segment_and_retrain_on_a_synthetic_layer_say_which_slices_were_generated(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """Segment ran on a Generate result and Retrain trained on its generated slices with
    no word (the CLI warns of both)."""
    from napari.utils.notifications import notification_manager

    from napari_medseg._layers import generated_planes
    from napari_medseg._widgets.retrain import RetrainWidget
    from napari_medseg._widgets.segment import SegmentWidget
    from tests.gui.conftest import run_widget

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    assert _linear_x2_errors(GenerateWidget(plugin_view(viewer)), qtbot, image) == []
    made = viewer.layers[1]
    generated = made.metadata["medseg"]["generated_slices"]
    assert generated_planes(made) == {"axis": "z", "indices": generated}
    assert generated_planes(image) is None
    start = len(notification_manager.records)
    segment = SegmentWidget(plugin_view(viewer))
    run_widget(qtbot, segment, made, random_models["RecurrentSegmenter"])
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any(f"{len(generated)} slices of the image were generated (synthetic)" in m
               for m in said), said
    assert "generated (synthetic)" in segment._status.value
    retrain = RetrainWidget(plugin_view(viewer))
    # the scan, not the newest image (the synthetic one, put just above it)
    assert retrain._image.value is image
    retrain._model.value = random_models["RecurrentSegmenter"]
    retrain._seconds.min = retrain._seconds.value = 0.5
    retrain._image.value, retrain._labels_pick.value = made, viewer.layers[-1]
    z = generated[1]
    viewer.layers[-1].data_setitem((np.full(5, z), np.arange(5) + 30, np.arange(5) + 30), 2)
    start = len(notification_manager.records)
    retrain._run.clicked.emit()
    qtbot.waitUntil(lambda: retrain._worker is None, timeout=60_000)
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any(f"1 ticked slice ({z}) was generated (synthetic)" in m for m in said), said


def test_a_shown_generated_volume_is_picked_over_a_hidden_scan(make_napari_viewer):
    """Generate results are passed over by an image picker filling itself, but not for a
    hidden scan (maybe another patient's) when the generated volume is the one shown."""
    from napari_medseg._widgets.retrain import RetrainWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((6, 32, 32), np.float32), name="other patient", visible=False)
    made = viewer.add_image(np.zeros((6, 32, 32), np.float32), name="generated",
                            metadata={"medseg": {"synthetic": True, "generated_slices": [1, 3]}})
    assert RetrainWidget(plugin_view(viewer))._image.value is made


def test_gaps_are_filled_and_named(make_napari_viewer, qtbot, random_models, small_phantom):
    from napari_medseg._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    image.data[[2, 3]] = np.nan  # a gap the reader found: NaN slices + metadata
    image.metadata.setdefault("medseg", {})["missing_slices"] = [2, 3]
    before = _snapshot(viewer)
    widget = GenerateWidget(plugin_view(viewer))
    widget._image.value = image
    widget._model.value = random_models["SliceGenerator"]
    widget._factor.value = 1
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    new = viewer.layers[viewer.layers.index(image) + 1]
    assert new.name.startswith("synthetic, gaps filled · ")
    assert new.data.shape == image.data.shape and np.isfinite(new.data).all()
    assert new.metadata["medseg"]["generated_slices"] == [2, 3]
    assert new.metadata["medseg"]["missing_slices"] == []
    assert "Missing input slices 2–3: filled (synthetic)" in widget._status.value
    _unchanged(viewer, before)
    # the other model widgets name the missing slices they leave without a result
    from napari_medseg._widgets.classify import ClassifyWidget
    from napari_medseg._widgets.detect import DetectWidget
    from napari_medseg._widgets.explain import GradCamWidget, UncertaintyWidget

    for kind in (SegmentWidget, ClassifyWidget, DetectWidget, GradCamWidget, UncertaintyWidget):
        other = kind(viewer)
        other._image.value = image
        other._model.value = random_models[other.architecture]
        n_layers = len(viewer.layers)
        other._run.clicked.emit()
        qtbot.waitUntil(lambda: other._worker is None, timeout=120_000)
        assert "Missing slices 2–3 (not acquired): left without a result" in other._status.value, kind
        if kind is not ClassifyWidget:  # classify adds no layer: its strip marks the slices
            assert len(viewer.layers) > n_layers, kind
            result = viewer.layers[-1]
            if kind is not DetectWidget:
                assert not np.asarray(result.data)[[2, 3]].any(), kind
            else:
                assert not any(2 <= z < 4 for z in np.asarray(result.data)[:, 0]), kind


def test_float64_acquired_slices_stay_bit_identical_as_they_were_at_run(
        make_napari_viewer, qtbot, small_phantom, monkeypatch):
    """float32 rounded them; then they were copied from the layer when the result came:
    an edit in place meanwhile (same array, so no "changed" check fires) was mixed into
    slices generated from the old data, and a lazy float64 layer was read whole in the
    GUI thread. Both copies are the worker's, taken before it generates anything."""
    import threading

    import dask.array as da

    from napari_medseg._widgets import generate

    viewer = make_napari_viewer()
    data = small_phantom.volume.array.astype(np.float64) + 1e-4 / 3  # digits float32 drops
    at_run = data.copy()
    image = viewer.add_image(data, name="ct64", scale=small_phantom.volume.spacing)
    widget = GenerateWidget(plugin_view(viewer))
    widget._image.value = image
    widget._factor.value = 3
    widget._method.value = "linear"
    copied, edited = threading.Event(), threading.Event()
    real_job = generate.interpolation_job

    def job(*args, **kwargs):  # the worker, its copies taken: waits for the edit
        copied.set()
        edited.wait(10)
        return (yield from real_job(*args, **kwargs))

    monkeypatch.setattr(generate, "interpolation_job", job)
    widget._run.clicked.emit()
    assert copied.wait(10)
    image.data[0] += 1000.0  # painted in place while it runs
    edited.set()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    made = viewer.layers[viewer.layers.index(image) + 1]
    np.testing.assert_array_equal(made.data[::3], at_run)
    monkeypatch.setattr(generate, "interpolation_job", real_job)

    reads: list[bool] = []

    def read(block):
        reads.append(threading.current_thread() is threading.main_thread())
        return block

    lazy = da.from_array(at_run, chunks=(2, -1, -1)).map_blocks(read)
    widget._image.value = viewer.add_image(lazy, name="lazy64", scale=small_phantom.volume.spacing)
    reads.clear()  # napari's own read of the slice it draws
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    lazy_layer = viewer.layers["lazy64"]
    np.testing.assert_array_equal(viewer.layers[viewer.layers.index(lazy_layer) + 1].data[::3],
                                  at_run)
    assert reads and not any(reads)  # every chunk read in the worker


def _linear_x2_of_file(viewer, qtbot, path):
    """Open ``path`` with the plugin's reader, run ×2 linear on it; (image, widget)."""
    (image,) = viewer.open(str(path), plugin="napari-medseg")
    widget = GenerateWidget(plugin_view(viewer))
    widget._image.value = image
    widget._factor.value = 2
    widget._method.value = "linear"
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    return image, widget


def test_labels_drawn_on_a_synthetic_layer_are_saved_where_the_scan_lies(make_napari_viewer,
                                                                         qtbot, tmp_path,
                                                                         monkeypatch):
    """The synthetic layer of an oblique scan carried no scan axes: labels drawn on it
    were saved as axial, 16 mm from the same voxel's labels drawn on the scan."""
    import nibabel as nib

    from napari_medseg._layers import _like_layer, scan_axes
    from napari_medseg._writer import write_labels_nifti

    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0],
                               [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) @ np.diag([0.8, 0.9, 3.0])
    affine[:3, 3] = (-20.0, 15.0, 30.0)
    scan = tmp_path / "oblique.nii.gz"
    data = np.random.default_rng(0).normal(size=(12, 10, 6)).astype(np.float32)  # (i, j, k)
    nib.save(nib.Nifti1Image(data, affine), scan)
    viewer = make_napari_viewer()
    image, widget = _linear_x2_of_file(viewer, qtbot, scan)
    synthetic = viewer.layers[-1]
    assert scan_axes(synthetic)["axes_lps"] == scan_axes(image)["axes_lps"]
    # recorded for the synthetic layer's own shape (the input's made the writer drop them)
    assert scan_axes(synthetic)["shape_zyx"] == list(synthetic.data.shape)
    import napari_medseg._writer as writer

    monkeypatch.setattr(writer, "_open_layers", lambda: [])  # the layer's own metadata only

    def saved_at(layer, z, name):
        labels = np.zeros(layer.data.shape, np.uint8)
        labels[z, 2, 3] = 1
        drawn = viewer.add_labels(labels, name=name, **_like_layer(layer))
        (path,) = write_labels_nifti(str(tmp_path / f"{name}.nii.gz"), labels, drawn._get_state())
        img = nib.load(path)
        return nib.affines.apply_affine(img.affine, np.argwhere(np.asarray(img.dataobj) == 1)[0])

    # input slice 3 is synthetic slice 6: the same voxel of the patient
    np.testing.assert_allclose(saved_at(synthetic, 6, "on_synthetic"), saved_at(image, 3, "on_scan"),
                               atol=1e-3)


def test_a_sagittal_scan_gets_slices_between_its_own(make_napari_viewer, qtbot, tmp_path):
    """Opened from NIfTI a sagittal scan lies (S, P, L): its 4 mm slices run along x.
    ×2 made the 0.5 mm z finer and left the 4 mm gaps, without a word."""
    import nibabel as nib

    data = np.random.default_rng(2).normal(size=(8, 20, 16)).astype(np.float32)  # (x, y, z)
    path = tmp_path / "sag.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 0.5, 0.5, 1.0])), path)
    viewer = make_napari_viewer()
    image, widget = _linear_x2_of_file(viewer, qtbot, path)
    new = viewer.layers[-1]
    nz, ny, nx = image.data.shape
    assert new.data.shape == (nz, ny, 2 * nx - 1)
    np.testing.assert_allclose(new.scale, [*image.scale[:2], image.scale[2] / 2])
    np.testing.assert_array_equal(new.data[:, :, ::2], image.data)
    assert new.metadata["medseg"]["slice_axis"] == "x" and "along x" in widget._status.value


def test_a_turned_coronal_series_layer_keeps_its_slice_axis(make_napari_viewer):
    """The reader records where a turned series' slices lie; the layer's copy for a job
    dropped it, so the widget generated 1 mm coronal slices of 2 mm pixels along z."""
    from napari_medseg._layers import volume_from_layer
    from napari_medseg.core.generation import slice_axis

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((6, 5, 6), np.float32), scale=(2.0, 1.0, 2.0),
                             metadata={"medseg": {"source": {"slice_axis": "y"}}})
    volume = volume_from_layer(layer)
    assert volume.metadata["slice_axis"] == "y" and slice_axis(volume) == 1
    plain = volume_from_layer(viewer.add_image(np.zeros((6, 5, 6), np.float32),
                                               scale=(2.0, 1.0, 2.0)))
    assert slice_axis(plain) == 0


@pytest.mark.parametrize("fill", [True, False])
def test_a_turned_sagittal_series_gap_is_named_and_recorded_along_its_axis(
        make_napari_viewer, qtbot, fill):
    """A sagittal series' gap plane (x = 3) was never mentioned on the status line, and
    planes left missing were recorded nowhere (``missing_slices`` []: they index z)."""
    from napari_medseg._layers import volume_from_layer

    viewer = make_napari_viewer()
    data = np.random.default_rng(3).normal(size=(6, 5, 7)).astype(np.float32)
    data[:, :, 3] = np.nan  # what the reader leaves in a gap of a series turned to (S, P, L)
    image = viewer.add_image(data, scale=(0.5, 0.5, 4.0), metadata={"medseg": {"source": {
        "slice_axis": "x", "missing_planes": {"axis": "x", "indices": [3]}}}})
    widget = GenerateWidget(plugin_view(viewer))
    widget._image.value = image
    widget._factor.value = 2
    widget._fill.value = fill
    widget._method.value = "linear"
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    new = viewer.layers[-1]
    assert new.data.shape == (6, 5, 13)
    medseg = new.metadata["medseg"]
    if fill:
        assert "Missing input slices (along x) 3: filled (synthetic)" in widget._status.value
        assert np.isfinite(new.data).all() and "missing_planes" not in medseg["source"]
    else:
        assert "Missing input slices (along x) 3: left missing" in widget._status.value
        assert np.isnan(new.data[:, :, 5:8]).all()
        assert medseg["source"]["missing_planes"] == {"axis": "x", "indices": [5, 6, 7]}
    assert medseg["missing_slices"] == [] and medseg["source"]["slice_axis"] == "x"
    # generating again from the new layer still runs along x
    assert volume_from_layer(new).metadata["slice_axis"] == "x"


def test_a_generated_layer_saves_as_a_nifti_scan_still_marked_synthetic(make_napari_viewer,
                                                                       qtbot, tmp_path):
    """napari had no NIfTI writer for images: a generated volume could leave the GUI only
    as pictures or .npy, without its spacing and without the synthetic mark."""
    import nibabel as nib

    from napari_medseg.core.io import read_volume

    scan = tmp_path / "ct.nii.gz"
    data = np.random.default_rng(3).normal(size=(12, 10, 5)).astype(np.float32)  # (x, y, z)
    nib.save(nib.Nifti1Image(data, np.diag([-0.8, -0.9, 3.0, 1.0])), scan)
    viewer = make_napari_viewer()
    image, widget = _linear_x2_of_file(viewer, qtbot, scan)
    synthetic = viewer.layers[-1]
    assert synthetic is not image
    made = synthetic.metadata["medseg"]
    out = tmp_path / "ct_x2.nii.gz"
    viewer.layers.selection = {synthetic}
    viewer.layers.save(str(out), selected=True, plugin="napari-medseg")
    reopened = read_volume(out)
    np.testing.assert_array_equal(reopened.array, synthetic.data)
    np.testing.assert_allclose(reopened.spacing, synthetic.scale)
    np.testing.assert_allclose(reopened.origin, synthetic.translate, atol=1e-5)
    assert reopened.metadata["synthetic_slices"] == len(made["generated_slices"]) > 0
    assert "SYNTHETIC" in str(nib.load(out).header["descrip"])
    # opened again in napari it is still refused as a source of generation
    (opened,) = viewer.open(str(out), plugin="napari-medseg")
    errors = _linear_x2_errors(widget, qtbot, opened)
    assert len(errors) == 1 and "generated (synthetic) slices" in errors[0]
    # the acquired scan saves too, plainly, but never onto the file it was opened from
    viewer.layers.selection = {image}
    viewer.layers.save(str(tmp_path / "copy.nii"), selected=True, plugin="napari-medseg")
    assert "synthetic_slices" not in read_volume(tmp_path / "copy.nii").metadata
    before = scan.read_bytes()
    with pytest.raises(PermissionError, match="was opened from this file"):
        viewer.layers.save(str(scan), selected=True, plugin="napari-medseg")
    assert scan.read_bytes() == before


def test_a_colour_picture_is_not_saved_as_a_scan(make_napari_viewer, tmp_path):
    from napari_medseg._writer import ImageNotSaved, write_image_nifti

    viewer = make_napari_viewer()
    rgb = viewer.add_image(np.zeros((8, 9, 3), np.uint8), rgb=True)
    with pytest.raises(ImageNotSaved, match="RGB"):
        write_image_nifti(str(tmp_path / "rgb.nii.gz"), rgb.data, rgb._get_state())
    with pytest.raises(ImageNotSaved, match="4D"):
        write_image_nifti(str(tmp_path / "t.nii.gz"), np.zeros((2, 3, 4, 5)), {"scale": (1,) * 4})
    assert not list(tmp_path.iterdir())


def test_a_layer_no_longer_holding_its_generated_slices_is_saved_unmarked(
        make_napari_viewer, qtbot, tmp_path):
    """Cut back to its acquired slices, or projected by napari (which copies the
    metadata), a generated layer was saved marked SYNTHETIC with slices it does not hold:
    reopened, it warned "4 slices were generated" on a scan of acquired data only."""
    import nibabel as nib

    from napari_medseg._writer import write_image_nifti
    from napari_medseg.core.io import read_volume

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).normal(size=(5, 8, 8)).astype(np.float32),
                     scale=(4, 1, 1), name="ct")
    widget = GenerateWidget(plugin_view(viewer))
    assert _linear_x2_errors(widget, qtbot, viewer.layers["ct"]) == []
    made = viewer.layers[-1]
    state = made._get_state()
    cut = np.ascontiguousarray(made.data[::2])
    (path,) = write_image_nifti(str(tmp_path / "cut.nii.gz"), cut, {**state, "scale": (4, 1, 1)})
    assert "SYNTHETIC" not in str(nib.load(path).header["descrip"])
    assert "synthetic_slices" not in read_volume(path).metadata
    (path,) = write_image_nifti(str(tmp_path / "mip.nii.gz"), made.data.max(axis=0),
                                {**state, "scale": (1, 1)})
    assert "synthetic_slices" not in read_volume(path).metadata
    # the whole layer keeps its mark; opened again and saved again, still marked
    (path,) = write_image_nifti(str(tmp_path / "x2.nii.gz"), made.data, state)
    assert read_volume(path).metadata["synthetic_slices"] == 4
    (opened,) = viewer.open(path, plugin="napari-medseg")
    (again,) = write_image_nifti(str(tmp_path / "again.nii.gz"), opened.data,
                                 opened._get_state())
    reread = read_volume(again)
    assert reread.metadata["synthetic_slices"] == 4
    assert reread.metadata["synthetic_planes"] == read_volume(path).metadata["synthetic_planes"]


def test_a_float64_layer_is_saved_exact(tmp_path):
    """The Generate widget keeps a float64 or wide-integer scan's acquired slices exact;
    the save made them float32 in silence (2**24 + 1 came back as 2**24)."""
    import nibabel as nib

    from napari_medseg._writer import write_image_nifti

    exact = (np.arange(24) + 2**24 + 1).reshape(2, 3, 4).astype(np.float64)
    (path,) = write_image_nifti(str(tmp_path / "wide.nii.gz"), exact, {"scale": (1, 1, 1)})
    img = nib.load(path)
    assert img.get_data_dtype() == np.float64
    # every value exact (the file's voxel order is its own: compared as sets of values)
    np.testing.assert_array_equal(np.sort(np.asarray(img.dataobj).ravel()),
                                  np.sort(exact.ravel()))
    # values float32 holds exactly stay a float32 file (half the size)
    plain = exact.astype(np.float32).astype(np.float64) - 2**24
    (path,) = write_image_nifti(str(tmp_path / "plain.nii.gz"), plain, {"scale": (1, 1, 1)})
    assert nib.load(path).get_data_dtype() == np.float32


def test_the_model_picker_is_live_only_for_the_model_method(make_napari_viewer):
    """Beside linear or cubic interpolation the generator model looked as if it took part."""
    widget = GenerateWidget(plugin_view(make_napari_viewer()))
    assert widget._method.value == "linear" and not widget._model.enabled
    widget._method.value = "model"
    assert widget._model.enabled
    widget._method.value = "cubic"
    assert not widget._model.enabled


def test_run_on_a_float64_scan_copies_nothing_on_napari_s_thread(make_napari_viewer):
    """The exact acquired slices were copied at the click: 0.55 s and 210 MB of napari's
    thread for a 100 x 512² float64 scan (the worker copies them now)."""
    import tracemalloc

    viewer = make_napari_viewer()
    data = np.zeros((20, 128, 128), np.float64)
    widget = GenerateWidget(plugin_view(viewer))
    widget._image.value = viewer.add_image(data, name="ct64")
    tracemalloc.start()
    try:
        options = widget.options()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < data.nbytes / 10 and options["exact"] is not None

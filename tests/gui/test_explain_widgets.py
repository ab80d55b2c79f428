"""Grad-CAM and uncertainty widgets: a new, aligned, additive Image layer; nothing else changes."""

import numpy as np
import pytest
from napari.layers import Image

from napari_medseg._sample_data import phantom_layer_data
from napari_medseg._widgets.explain import GradCamWidget, UncertaintyWidget
from napari_medseg.core.models.registry import read_card
from tests.gui.conftest import plugin_view, run_widget


def _open(viewer, phantom):
    for data, kwargs, layer_type in phantom_layer_data(phantom):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    return viewer.layers[0]


@pytest.mark.parametrize("change", ["data", "scale", "translate"])
def test_the_uncertainty_list_empties_as_soon_as_the_image_changes(
        make_napari_viewer, qtbot, random_models, small_phantom, change):
    """The docs say the list is emptied when the image gets new data or another placement:
    it stayed live (slices a cut volume no longer had) until an entry was picked."""
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array, scale=small_phantom.volume.spacing)
    widget = UncertaintyWidget(plugin_view(viewer))
    widget._image.value, widget._model.value = image, random_models["RecurrentSegmenter"]
    _run(widget, qtbot)
    assert widget._goto.enabled and widget._goto.choices
    point, first = viewer.dims.point, widget._goto.choices[0]
    if change == "data":
        image.data = small_phantom.volume.array[:3].copy()
    elif change == "scale":
        image.scale = (5.0, *image.scale[1:])
    else:
        image.translate = (100.0, 0.0, 0.0)
    assert not widget._goto.enabled and not widget._goto.choices
    assert "changed since the uncertainty ranking" in widget._status.value
    # an entry picked before (a script, a stale menu) goes nowhere: it went to z 15 mm on
    # a layer 5 mm deep
    widget._go_to(first)
    assert viewer.dims.point == point
    image.translate = (0.0, 5.0, 5.0)  # no longer watched: nothing said again
    widget._status.value = "other"
    assert widget._status.value == "other"


@pytest.mark.parametrize("widget_cls, arch", [(GradCamWidget, "SliceClassifier"),
                                               (UncertaintyWidget, "RecurrentSegmenter")])
def test_explanation_layer_sits_on_the_image(make_napari_viewer, qtbot, random_models,
                                             small_phantom, widget_cls, arch):
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    before = [(layer.name, np.array(layer.data, copy=True)) for layer in viewer.layers]
    widget = widget_cls(plugin_view(viewer))
    viewer.window.add_dock_widget(widget)
    widget._image.value = image
    widget._model.value = random_models[arch]
    if widget_cls is GradCamWidget:
        assert "lesion" in widget._target.choices
        widget._target.value = "lesion"
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    new = viewer.layers[-1]
    assert isinstance(new, Image) and len(viewer.layers) == len(before) + 1
    assert new.blending == "additive" and new.data.shape == image.data.shape
    np.testing.assert_allclose(new.scale, image.scale)
    np.testing.assert_allclose(new.translate, image.translate)
    assert 0.0 <= float(new.data.min()) and float(new.data.max()) <= 1.0
    assert "not for diagnostic use" in new.metadata["medseg"]["disclaimer"]
    for (name, data), layer in zip(before, viewer.layers):
        assert layer.name == name
        np.testing.assert_array_equal(layer.data, data)
    if widget_cls is UncertaintyWidget:
        assert widget._goto.choices  # slices to correct first
        viewer.add_image(np.zeros((4, 4)), name="another")  # napari resets pickers …
        assert widget._goto.choices  # … and the list survives
        # the first-ranked slice is already the shown entry: activating it still goes there
        viewer.dims.set_point(0, image.data_to_world([0, 0, 0])[0])
        first = widget._goto.value
        widget._goto.native.activated.emit(0)
        expected = image.data_to_world([first, 0, 0])[0]
        assert viewer.dims.point[0] == pytest.approx(expected, abs=image.scale[0] / 2)
        # the ranked image deleted: the list went nowhere but still looked live
        viewer.layers.remove(image)
        assert not widget._goto.enabled and not widget._goto.choices
        assert "removed" in widget._status.value


def test_detect_can_add_its_heatmap_under_the_points(make_napari_viewer, qtbot, random_models,
                                                     small_phantom):
    from napari.layers import Points

    from napari_medseg._widgets.detect import DetectWidget

    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    n = len(viewer.layers)
    widget = DetectWidget(plugin_view(viewer))
    widget._image.value = image
    widget._model.value = random_models["LesionDetector"]
    widget._with_heatmap.value = True
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    heat, points = viewer.layers[n], viewer.layers[n + 1]
    assert isinstance(heat, Image) and isinstance(points, Points)
    assert heat.data.shape == image.data.shape and heat.blending == "additive"
    np.testing.assert_allclose(heat.scale, image.scale)


def _run_on_one_slice(make_napari_viewer, qtbot, phantom, widget_cls, model, volume=False):
    """``widget_cls`` run with ``model`` on slice 3 of ``phantom`` as a 2D image (or as a
    one-slice volume, as napari-medseg's reader opens a 2D file)."""
    viewer = make_napari_viewer()
    image = (viewer.add_image(phantom.volume.array[3:4], scale=phantom.volume.spacing)
             if volume else
             viewer.add_image(phantom.volume.array[3], scale=phantom.volume.spacing[1:]))
    widget = widget_cls(plugin_view(viewer))
    widget._image.value, widget._model.value = image, model
    _run(widget, qtbot)
    return widget


def test_gradcam_on_one_slice_says_slice_not_slices(make_napari_viewer, qtbot, random_models,
                                                    small_phantom):
    widget = _run_on_one_slice(make_napari_viewer, qtbot, small_phantom, GradCamWidget,
                               random_models["SliceClassifier"])
    assert widget._status.value.startswith("Explained: ")
    assert widget._status.value.endswith(" on 1 slice"), widget._status.value


@pytest.mark.parametrize("volume", [False, True])
def test_uncertainty_on_one_slice_gives_its_mean_not_a_ranking(make_napari_viewer, qtbot,
                                                                random_models, small_phantom,
                                                                volume):
    """A 2D image said "Most uncertain slices (correct these first): 0"; a one-slice
    volume still did."""
    widget = _run_on_one_slice(make_napari_viewer, qtbot, small_phantom, UncertaintyWidget,
                               random_models["RecurrentSegmenter"], volume=volume)
    assert widget._status.value.startswith(("Mean uncertainty ", "No structure found")), \
        widget._status.value
    assert not widget._goto.enabled and not widget._goto.choices


def test_a_predicted_class_map_says_which_class_each_slice_explains(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """"Predicted class" explains another class on each slice; the layer said none."""
    viewer = make_napari_viewer()
    array = small_phantom.volume.array.copy()
    array[2] = np.nan  # a missing slice: nothing explained there
    image = viewer.add_image(array, scale=small_phantom.volume.spacing)
    widget = GradCamWidget(plugin_view(viewer))
    widget._image.value, widget._model.value = image, random_models["SliceClassifier"]
    _run(widget, qtbot)
    per_slice = viewer.layers[-1].metadata["medseg"]["explained_class_per_slice"]
    classes = read_card(random_models["SliceClassifier"])["classes"]
    assert len(per_slice) == len(array) and per_slice[2] is None
    assert all(c in classes for i, c in enumerate(per_slice) if i != 2)


def _run(widget, qtbot):
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)


@pytest.mark.parametrize("widget_cls, arch", [(GradCamWidget, "SliceClassifier"),
                                               (UncertaintyWidget, "RecurrentSegmenter")])
def test_no_acquired_slice_says_so(make_napari_viewer, qtbot, random_models, small_phantom,
                                   widget_cls, arch):
    """Every slice missing: "Explained: " (nothing after it) and "No structure found"
    (no model ran)."""
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array, metadata={"medseg": {
        "missing_slices": list(range(len(small_phantom.volume.array)))}})
    widget = widget_cls(plugin_view(viewer))
    widget._image.value, widget._model.value = image, random_models[arch]
    _run(widget, qtbot)
    assert widget._status.value.startswith("No acquired slice: nothing to"), widget._status.value


def test_a_new_map_hides_the_earlier_maps_of_its_image(make_napari_viewer, qtbot,
                                                       random_models, small_phantom):
    """Each run added another visible additive map: their colours summed, and no hot
    spot could be told to one map."""
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array.copy(), scale=small_phantom.volume.spacing,
                             name="ct")
    other = viewer.add_image(small_phantom.volume.array.copy(), scale=small_phantom.volume.spacing,
                             name="other ct")
    gradcam = GradCamWidget(plugin_view(viewer))
    gradcam._model.value = random_models["SliceClassifier"]
    gradcam._image.value = other
    _run(gradcam, qtbot)
    on_other = viewer.layers[-1]
    gradcam._image.value = image
    _run(gradcam, qtbot)
    first = viewer.layers[-1]
    uncertainty = UncertaintyWidget(plugin_view(viewer))
    uncertainty._image.value, uncertainty._model.value = image, random_models["RecurrentSegmenter"]
    _run(uncertainty, qtbot)
    assert not first.visible and viewer.layers[-1].visible
    assert on_other.visible  # another image's map: left as it was
    assert image.visible
    assert "1 earlier map of this image hidden" in uncertainty._status.value
    # by the layer, not its name: renamed, its maps are still its maps; a new layer
    # under the old name is not the one they were made over
    latest = viewer.layers[-1]
    image.name = "ct (renamed)"
    viewer.layers.remove(other)
    newcomer = viewer.add_image(small_phantom.volume.array.copy(),
                                scale=small_phantom.volume.spacing, name="other ct")
    on_other.visible = True
    gradcam._image.value = newcomer
    _run(gradcam, qtbot)
    assert on_other.visible and latest.visible
    gradcam._image.value = image
    _run(gradcam, qtbot)
    assert not latest.visible and "1 earlier map" in gradcam._status.value


def test_gradcam_says_which_class_the_current_slice_shows_and_how_likely(
        make_napari_viewer, qtbot, random_models, small_phantom):
    """Every slice's map peaks at 1: a class the model ruled out on a slice glowed as
    brightly as a likely one, and in "predicted class" mode nothing on screen said which
    class a slice's map showed (the whole frame past the body lit up for 'no_body')."""
    viewer = make_napari_viewer()
    image = _open(viewer, small_phantom)
    widget = GradCamWidget(plugin_view(viewer))
    widget._image.value = image
    widget._model.value = random_models["SliceClassifier"]
    widget._target.value = "lesion"
    assert "own peak" in widget._target.tooltip
    _run(widget, qtbot)
    new = viewer.layers[-1]
    assert new.name.startswith("Grad-CAM lesion · ")  # the kind survives a narrow list
    meta = new.metadata["medseg"]
    from napari_medseg.core.explain import gradcam_volume
    from napari_medseg.core.models.registry import load_model
    from napari_medseg.core.progress import run_to_completion
    from napari_medseg._layers import volume_from_layer

    model, card = load_model(random_models["SliceClassifier"])
    result = run_to_completion(gradcam_volume(volume_from_layer(image), model, card, target="lesion"))
    lesion = list(result.class_names).index("lesion")
    for z in (1, 4):
        viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])
        p = float(result.probabilities[z, lesion])
        assert meta["explained_class_probability_per_slice"][z] == pytest.approx(p, abs=1e-4)
        line = widget._current.value
        assert line.startswith(f"Slice {z}: the map shows 'lesion', P {p:.2f}"), line
        top = int(np.argmax(result.probabilities[z]))
        if top != lesion:  # the class the model does give the slice is named beside it
            assert (f"the model's class here: {result.class_names[top]}, "
                    f"P {result.probabilities[z, top]:.2f}") in line
        assert f"(map '{new.name}')" in line
    # a forced class is said as evidence, not as a finding on every slice
    calls = int((np.argmax(result.probabilities, axis=1) == lesion).sum())
    assert widget._status.value.startswith(
        f"Map of the evidence for 'lesion' on {len(result.target)} slices (the model gives "
        f"'lesion' to {calls} slice"), widget._status.value
    viewer.layers.remove(new)
    assert widget._current.value == ""
    assert widget._status.value == "The Grad-CAM map was removed"


def _gradcam_on_ct(make_napari_viewer, qtbot, random_models, small_phantom):
    """(viewer, image "ct", Grad-CAM widget) after a run: its map is the last layer."""
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array, scale=small_phantom.volume.spacing,
                             name="ct")
    widget = GradCamWidget(plugin_view(viewer))
    widget._image.value = image
    widget._model.value = random_models["SliceClassifier"]
    _run(widget, qtbot)
    return viewer, image, widget


def test_no_image_picker_offers_an_explanation_map(make_napari_viewer, qtbot, random_models,
                                                    small_phantom):
    """With the CT deleted, Grad-CAM's picker fell on its own map, and Run explained the
    map (a 0-1 image, warned about only as 'not known to be CT')."""
    from napari_medseg._widgets.detect import DetectWidget
    from napari_medseg._widgets.retrain import RetrainWidget

    viewer, image, widget = _gradcam_on_ct(make_napari_viewer, qtbot, random_models,
                                           small_phantom)
    cam = viewer.layers[-1]
    assert cam.metadata["medseg"]["explanation_map"] is True
    detect = DetectWidget(plugin_view(viewer))
    detect._image.value, detect._model.value = image, random_models["LesionDetector"]
    detect._with_heatmap.value = True
    run_widget(qtbot, detect)
    heat = next(layer for layer in viewer.layers if "heatmap" in layer.name)
    assert heat.metadata["medseg"]["explanation_map"] is True
    retrain = RetrainWidget(plugin_view(viewer))
    for picker in (widget._image, detect._image, retrain._image):
        offered = [value for value in picker.choices if value is not None]
        assert offered == [image], [getattr(v, "name", v) for v in offered]
    viewer.layers.remove(image)
    assert [v for v in widget._image.choices if v is not None] == []
    assert widget._image.value is None


def test_a_map_saved_and_opened_again_is_still_a_map(make_napari_viewer, qtbot, random_models,
                                                     small_phantom, tmp_path):
    """Saved with the plugin's NIfTI writer, a Grad-CAM map came back as a scan: offered
    in every image picker, segmented and explained again as if acquired."""
    from napari.utils.notifications import notification_manager

    from napari_medseg._layers import is_explanation_map
    from napari_medseg.core.io import read_volume

    viewer, image, widget = _gradcam_on_ct(make_napari_viewer, qtbot, random_models,
                                           small_phantom)
    viewer.layers.selection = {viewer.layers[-1]}
    path = str(tmp_path / "cam.nii.gz")
    viewer.layers.save(path, selected=True, plugin="napari-medseg")
    start = len(notification_manager.records)
    (opened,) = viewer.open(path, plugin="napari-medseg")
    assert is_explanation_map(opened)
    said = [str(n.message) for n in notification_manager.records[start:]]
    assert any("explanation map (Grad-CAM" in m and "not a scan" in m for m in said), said
    assert [v for v in widget._image.choices if v is not None] == [image]
    assert read_volume(path).metadata["explanation_map"].startswith("Grad-CAM")


def test_the_uncertainty_map_says_what_its_values_mean(make_napari_viewer, qtbot, random_models,
                                                       small_phantom):
    """Nothing said what 0 and 1 meant, nor how the slices were ranked, and Volume info
    called the map a scan of unknown modality."""
    from napari_medseg._widgets.info import VolumeInfoWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array, scale=small_phantom.volume.spacing)
    widget = UncertaintyWidget(plugin_view(viewer))
    widget._image.value, widget._model.value = image, random_models["RecurrentSegmenter"]
    assert "dropout" in widget._samples.tooltip and "wrong voxels" in widget._goto.tooltip
    _run(widget, qtbot)
    assert widget._goto.choices  # slices ranked: the legend is there
    assert "0 where every sample agrees, 1 where all classes are equally likely" in \
        widget._status.value
    # its colours span what the map holds (its values, mostly hundredths, were near black
    # under a fixed 0-1 window), and the line says so
    new = viewer.layers[-1]
    top = new.contrast_limits[1]
    positive = new.data[new.data > 0]
    assert 0.01 <= top <= 1.0 and top <= float(positive.max()) + 1e-6
    assert np.mean(positive <= top) > 0.98
    assert f"its colours span 0–{top:.2g}" in widget._status.value
    info = VolumeInfoWidget(plugin_view(viewer))
    info._layer.value = viewer.layers[-1]
    assert "Kind: explanation map (0–1), not a scan" in info._text.value
    assert "Modality" not in info._text.value


def test_detects_heatmap_hides_an_earlier_map_of_the_image(make_napari_viewer, qtbot,
                                                          random_models, small_phantom):
    """Detect's heatmap was added over a visible uncertainty map of the same image, in
    additive colours: hot spots of the two summed (Grad-CAM and Uncertainty hide)."""
    from napari_medseg._widgets.detect import DetectWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array, scale=small_phantom.volume.spacing,
                             name="ct")
    run_widget(qtbot, UncertaintyWidget(plugin_view(viewer)), image,
               random_models["RecurrentSegmenter"])
    earlier = viewer.layers[-1]
    detect = DetectWidget(plugin_view(viewer))
    detect._with_heatmap.value = True
    run_widget(qtbot, detect, image, random_models["LesionDetector"])
    assert not earlier.visible
    assert "1 earlier map of this image hidden" in detect._status.value
    assert detect._status.value.startswith("'ct' (test-detector): ")


@pytest.mark.parametrize("change", ["data", "translate"])
def test_the_gradcam_line_goes_when_the_explained_image_changes(
        make_napari_viewer, qtbot, random_models, small_phantom, change):
    """Moved or given new data, the image left the map behind, and the line kept naming
    the class of a slice no longer shown there ("Slice 10: … lesion" over slice 6)."""
    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array, scale=small_phantom.volume.spacing)
    widget = GradCamWidget(plugin_view(viewer))
    widget._image.value, widget._model.value = image, random_models["SliceClassifier"]
    _run(widget, qtbot)
    assert widget._current.value.startswith("Slice ")
    if change == "data":
        image.data = small_phantom.volume.array[::-1].copy()
    else:
        image.translate = (10.0, 30.0, 40.0)
    assert widget._current.value == ""
    assert "changed (new data or placement) since the map was made" in widget._status.value
    viewer.dims.set_current_step(0, 2)  # and it does not come back
    assert widget._current.value == ""
    viewer.layers.remove(image)  # let go
    assert widget._explained_image is None


def test_the_class_to_explain_is_kept_over_a_model_without_it(make_napari_viewer, random_models):
    """Picking a model without the class picked under Explain set it to "predicted
    class" without a word, and it stayed there when the first model was picked again."""
    from pathlib import Path

    from napari_medseg.core.models import load_model, save_model

    model, card = load_model(random_models["SliceClassifier"])
    other = save_model(model, Path(random_models["SliceClassifier"]).parent, "tumour-cls",
                       {**{k: card[k] for k in ("input_spacing_mm", "normalisation")},
                        "classes": ["no_body", "normal", "tumour"]})
    try:
        viewer = make_napari_viewer()
        viewer.add_image(np.zeros((3, 16, 16), np.float32))
        widget = GradCamWidget(plugin_view(viewer))
        first = widget._model.value = random_models["SliceClassifier"]
        widget._target.value = "lesion"
        widget._model.value = str(other)
        assert widget._target.value == "predicted class"
        assert "'lesion' is not a class of this model" in widget._status.value
        widget._model.value = first
        assert widget._target.value == "lesion"
    finally:  # the other tests' pickers list that folder
        for path in Path(other).parent.glob("tumour-cls*"):
            path.unlink()


def test_uncertainty_on_one_listed_slice_still_gives_its_mean(make_napari_viewer, qtbot,
                                                               random_models, small_phantom):
    """A 2D image whose slice was in a Retrain list read "No structure found": the one
    slice there is was left out of a ranking of one."""
    from napari_medseg._widgets._retrain_base import image_list_key, record_lists

    viewer = make_napari_viewer()
    image = viewer.add_image(small_phantom.volume.array[3], scale=small_phantom.volume.spacing[1:])
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8))
    record_lists(labels, image_list_key(image), ({0}, set(), set()))
    widget = UncertaintyWidget(plugin_view(viewer))
    widget._image.value, widget._model.value = image, random_models["RecurrentSegmenter"]
    _run(widget, qtbot)
    assert widget._status.value.startswith("Mean uncertainty"), widget._status.value


def test_the_slices_to_correct_first_name_their_image_numbers(make_napari_viewer, qtbot,
                                                              random_models, small_phantom):
    """As Detect's lesion list: on a DICOM series each slice is also named by the image
    number a PACS shows it as (its InstanceNumber; a series numbered from the head counts
    the other way)."""
    viewer = make_napari_viewer()
    numbers = list(range(18, 10, -1))  # 8 slices, numbered from the head
    image = viewer.add_image(small_phantom.volume.array, scale=small_phantom.volume.spacing,
                             metadata={"medseg": {"source": {"instance_numbers": numbers}}})
    widget = UncertaintyWidget(plugin_view(viewer))
    widget._image.value, widget._model.value = image, random_models["RecurrentSegmenter"]
    _run(widget, qtbot)
    assert widget._goto_items
    for text, z in widget._goto_items:
        assert text.endswith(f" · image {numbers[z]}"), text

"""Regenerate the user guide's widget screenshots (run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/scripts/screenshots.py [NAMES]

Opens the sample CT, docks each model widget, runs it with its bundled model, waits for
the worker, and saves docs/images/<name>.png (the whole window, as a user sees it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

IMAGES = Path(__file__).resolve().parents[1] / "images"
WIDGETS = {"segment": "Segment organs", "detect": "Detect lesions", "classify": "Classify slices"}


def wait_for(widget, timeout=600.0) -> None:
    app = QApplication.instance()
    start = time.perf_counter()
    while widget._worker is not None:
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{widget.task} did not finish in {timeout} s")
    for _ in range(20):  # let the new layers draw
        app.processEvents()
        time.sleep(0.02)


def shoot(name: str) -> Path:
    viewer = napari.Viewer(title="napari-medseg")
    viewer.window.resize(1500, 950)
    viewer.scale_bar.visible = True
    viewer.open_sample("napari-medseg", "synthetic_ct")
    truth = [layer for layer in viewer.layers if layer.name.startswith("labels, ground truth")]
    for layer in truth:
        layer.visible = False  # show the model's output, not the answer
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", WIDGETS[name])
    widget._image.value = viewer.layers[0]
    widget._run.clicked.emit()
    wait_for(widget)
    points = viewer.layers[-2] if name != "detect" else viewer.layers[-1]
    lesions = [layer for layer in viewer.layers if layer.name.startswith("lesions, ground truth")]
    if name == "detect" and widget._goto.choices:
        widget._go_to_lesion(widget._goto.value)  # as if the user picked the first entry
        for layer in lesions:
            layer.visible = False
    elif lesions and len(lesions[0].data):
        largest = int(lesions[0].features["diameter_mm"].argmax())
        viewer.dims.set_point(0, lesions[0].data_to_world(lesions[0].data[largest])[0])
    viewer.layers.selection.active = viewer.layers[-1]
    QApplication.instance().processEvents()
    path = IMAGES / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()
    return path


def _sample_viewer():
    """A viewer with the sample CT open, only the image visible."""
    viewer = napari.Viewer(title="napari-medseg")
    viewer.window.resize(1500, 1000)
    viewer.scale_bar.visible = True
    viewer.open_sample("napari-medseg", "synthetic_ct")
    for layer in viewer.layers[1:]:
        layer.visible = False
    return viewer


def _run_docked(viewer, title: str, image):
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", title)
    widget._image.value = image
    return widget


def _save(viewer, active, name: str) -> Path:
    viewer.layers.selection.active = active
    QApplication.instance().processEvents()
    path = IMAGES / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()
    return path


def shoot_retrain() -> Path:
    """Segment, "correct" three slices from the ground truth, retrain for 10 s."""
    import numpy as np

    viewer = _sample_viewer()
    image = viewer.layers[0]
    truth = next(layer for layer in viewer.layers if layer.name.startswith("labels, ground truth")
                 and type(layer).__name__ == "Labels")
    seg = _run_docked(viewer, WIDGETS["segment"], image)
    seg._run.clicked.emit()
    wait_for(seg)
    labels = viewer.layers[-1]
    widget = _run_docked(viewer, "Retrain on my annotations", image)
    widget._labels_pick.value = labels
    widget._seconds.value = 10.0
    nz = labels.data.shape[0]
    for z in (nz // 4, nz // 2, 3 * nz // 4):  # the "user" fixes three slices
        wrong = np.nonzero(labels.data[z] != truth.data[z])
        labels.data_setitem((np.full(len(wrong[0]), z), *wrong), truth.data[z][wrong])
    widget._mark_current()
    widget._run.clicked.emit()
    wait_for(widget)
    viewer.dims.set_point(0, labels.data_to_world([nz // 2 + 3, 0, 0])[0])
    return _save(viewer, labels, "retrain")


def shoot_retrain_detector() -> Path:
    """Detect, then "review": add the lesions it missed as points, retrain for 30 s."""
    import numpy as np

    viewer = _sample_viewer()
    image = viewer.layers[0]
    truth = next(layer for layer in viewer.layers if type(layer).__name__ == "Points")
    det = _run_docked(viewer, WIDGETS["detect"], image)
    det._run.clicked.emit()
    wait_for(det)
    found = viewer.layers[-1]
    widget = _run_docked(viewer, "Retrain detector on my points", image)
    widget._layer_pick.value = found
    widget._seconds.value = 30.0
    shown = found.data[np.asarray(found.shown, bool)]
    missed = []
    for centre, diam in zip(truth.data, truth.features["diameter_mm"]):
        if not len(shown) or np.min(np.linalg.norm(shown - centre, axis=1)) > 4:
            missed.append((centre, diam))
    for centre, diam in missed:  # the "user" adds the lesions it missed
        found.add(centre)
        found.features.loc[len(found.data) - 1, "diameter_mm"] = diam
    widget._run.clicked.emit()
    wait_for(widget)
    if missed:
        viewer.dims.set_point(0, image.data_to_world(missed[0][0])[0])
    return _save(viewer, viewer.layers[-1], "retrain_detector")


def shoot_gradcam() -> Path:
    """Grad-CAM of the lesion class, shown on the slice through the largest lesion."""
    viewer = _sample_viewer()
    image = viewer.layers[0]
    truth = next(layer for layer in viewer.layers if type(layer).__name__ == "Points")
    widget = _run_docked(viewer, "Explain slice classes (Grad-CAM)", image)
    widget._target.value = "lesion"
    widget._run.clicked.emit()
    wait_for(widget)
    largest = int(truth.features["diameter_mm"].argmax())
    truth.visible = True  # the true lesions, circled, to compare with the map
    viewer.dims.set_point(0, truth.data_to_world(truth.data[largest])[0])
    return _save(viewer, viewer.layers[-1], "gradcam")


def shoot_detect_heatmap() -> Path:
    """Detect with the heatmap under the points, at the strongest detection; the true
    lesions shown too, to compare."""
    viewer = _sample_viewer()
    image = viewer.layers[0]
    truth = next(layer for layer in viewer.layers if type(layer).__name__ == "Points")
    widget = _run_docked(viewer, WIDGETS["detect"], image)
    widget._with_heatmap.value = True
    widget._run.clicked.emit()
    wait_for(widget)
    truth.visible = True
    if widget._goto.choices:
        widget._go_to_lesion(widget._goto.value)
    return _save(viewer, viewer.layers[-1], "detect_heatmap")


def shoot_uncertainty() -> Path:
    """MC-dropout uncertainty, at the most uncertain slice."""
    viewer = _sample_viewer()
    image = viewer.layers[0]
    widget = _run_docked(viewer, "Segmentation uncertainty", image)
    widget._run.clicked.emit()
    wait_for(widget)
    if widget._goto.choices:
        widget._go_to(widget._goto.choices[0])
    return _save(viewer, viewer.layers[-1], "uncertainty")


def shoot_generate() -> Path:
    """A 3× thicker copy of the sample CT (every 3rd slice kept), upsampled ×3 by the
    generator; input and result side by side in a coronal view, where slices show."""
    viewer = _sample_viewer()
    ct = viewer.layers[0]
    scale = list(ct.scale)
    thick = viewer.add_image(
        ct.data[::3], name="thick input (every 3rd slice)", colormap="gray",
        contrast_limits=ct.contrast_limits, scale=[scale[0] * 3, *scale[1:]],
        translate=ct.translate, units=ct.units, axis_labels=ct.axis_labels,
        metadata={"medseg": {"modality": "CT"}})
    ct.visible = False
    widget = _run_docked(viewer, "Generate slices (upsample, fill gaps)", thick)
    widget._factor.value = 3
    widget._method.value = "model"  # the generator (linear is the default)
    widget._run.clicked.emit()
    wait_for(widget)
    viewer.dims.order = (1, 0, 2)  # coronal: z runs up the screen
    viewer.dims.set_point(1, thick.data_to_world([0, thick.data.shape[1] * 0.55, 0])[1])
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    grid.enabled = True
    grid.shape = (1, 2)
    for layer in viewer.layers:
        layer.visible = layer in (thick, viewer.layers[-1])
    viewer.reset_view()
    viewer.camera.zoom *= 1.2
    return _save(viewer, viewer.layers[-1], "generate")


def shoot_phantom() -> Path:
    """The Synthetic phantom widget after Generate: image, ground-truth labels, lesion points."""
    viewer = napari.Viewer(title="napari-medseg")
    viewer.window.resize(1500, 1000)
    viewer.scale_bar.visible = True
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Synthetic phantom")
    widget._seed.value = 3
    widget._run.clicked.emit()
    wait_for(widget)
    lesions = [layer for layer in viewer.layers if layer.name.startswith("lesions, ground truth")]
    if lesions and len(lesions[0].data):
        largest = int(lesions[0].features["diameter_mm"].argmax())
        viewer.dims.set_point(0, lesions[0].data_to_world(lesions[0].data[largest])[0])
    viewer.layers.selection.active = viewer.layers[0]
    return _save(viewer, viewer.layers[0], "phantom")


SPECIAL = {"retrain": shoot_retrain, "phantom": shoot_phantom, "retrain_detector": shoot_retrain_detector,
           "gradcam": shoot_gradcam, "detect_heatmap": shoot_detect_heatmap,
           "uncertainty": shoot_uncertainty,
           "generate": shoot_generate}


if __name__ == "__main__":
    import os
    import tempfile

    # a clean home: no user models, no autosave banner from an earlier run
    os.environ["NAPARI_MEDSEG_HOME"] = tempfile.mkdtemp(prefix="medseg-shots-")
    for name in sys.argv[1:] or [*WIDGETS, *SPECIAL]:
        print(SPECIAL[name]() if name in SPECIAL else shoot(name))

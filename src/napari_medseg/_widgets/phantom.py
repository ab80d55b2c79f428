"""Dock widget: generate a synthetic abdominal CT with exact ground truth."""

from __future__ import annotations

import napari
from dataclasses import dataclass

from magicgui.widgets import (
    CheckBox,
    Container,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)
from qtpy.QtWidgets import QSizePolicy

from .. import _jobs
from .._layers import watch_added_lesions
from .._sample_data import phantom_layer_data
from ..core.errors import MedsegInputError
from ..core.phantom import phantom_job
from ..core.text import counted
from ._model_widget import DockWatch, ScrollableDock, plain_viewer, set_status, widget_closed


@dataclass(frozen=True)
class PhantomRequest:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    seed: int
    n_lesions: int | None
    lesion_radius_mm: tuple[float, float]
    noise_hu: float


def _make_phantom(request: PhantomRequest):
    """The phantom as a job: progress per slab, and Cancel stops it between slabs."""
    try:
        return (yield from phantom_job(
            request.shape,
            request.spacing,
            request.seed,
            n_lesions=request.n_lesions,
            lesion_radius_mm=request.lesion_radius_mm,
            noise_hu=request.noise_hu,
        ))
    except MedsegInputError as exc:  # said in the widget's words, not the core's names
        raise MedsegInputError(
            exc.reason.replace("field of view (shape x spacing)",
                               "field of view (more rows / columns, or a larger spacing)")
            .replace("lesion_radius_mm minimum", "Lesion radius min")
            .replace("lesion_radius_mm", "Lesion radius max").replace("n_lesions", "Lesions"),
            exc.path) from exc


def _precise(box: FloatSpinBox, decimals: int = 3) -> FloatSpinBox:
    """``box`` taking values to ``decimals`` places: Qt's default of 2 turned a CT's
    0.625 mm slices into 0.62 (0.63 when set from code), and the layers opened at that.
    Not more: Qt shows every decimal place ("2.500000")."""
    value = box.value
    box.native.setDecimals(decimals)
    box.value = value
    return box


class PhantomWidget(Container):
    """Shape, spacing, seed, lesions, noise → image, labels and lesion points layers."""

    native = ScrollableDock.native

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer = plain_viewer(viewer)
        self._worker = None
        self._z = SpinBox(label="Slices (z)", value=48, min=1, max=1024)
        self._y = SpinBox(label="Rows (y)", value=192, min=16, max=1024)
        self._x = SpinBox(label="Columns (x)", value=192, min=16, max=1024)
        self._dz = _precise(FloatSpinBox(label="Slice spacing (mm)", value=2.5, min=0.1,
                                         max=20, step=0.1))
        self._dxy = _precise(FloatSpinBox(label="Pixel spacing (mm)", value=1.0, min=0.1,
                                          max=5, step=0.05))
        self._seed = SpinBox(label="Seed", value=0, min=0, max=2**31 - 1)
        self._random_lesions = CheckBox(text="Random number of lesions", value=False)
        self._n_lesions = SpinBox(label="Lesions", value=4, min=0, max=30)
        self._rmin = _precise(FloatSpinBox(label="Lesion radius min (mm)", value=2.0, min=0.5,
                                           max=50))
        self._rmax = _precise(FloatSpinBox(label="Lesion radius max (mm)", value=15.0, min=0.5,
                                           max=50))
        self._noise = FloatSpinBox(label="Noise (HU, σ)", value=15.0, min=0.0, max=200)
        self._run = PushButton(text="Generate")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = Label(value="")
        # wrapped: an unwrapped error line widened the dock until the canvas was a sliver
        self._status.native.setWordWrap(True)
        # the dock's width, as the model widgets' status lines: in the value column it
        # wrapped into a narrow indented strip
        self._status.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                          QSizePolicy.Policy.Minimum)
        tips = {
            self._z: "Slices along z (the body fills a fixed share of them)",
            self._y: "Rows per slice: the field is rows × pixel spacing (the body is about "
                     "133 × 165 mm whatever the field)",
            self._x: "Columns per slice",
            self._dz: "Distance between slices, mm",
            self._dxy: "Pixel size in-plane, mm",
            self._seed: "The same seed and settings give the same phantom",
            self._random_lesions: "Let the seed pick how many lesions (the CLI's default)",
            self._n_lesions: "Lesions to place; those that do not fit in an organ are left "
                             "out and said",
            self._rmin: "Smallest lesion radius, mm (at most the max)",
            self._rmax: "Largest lesion radius, mm",
            self._noise: "Standard deviation of the image noise, HU",
            self._run: "Make the phantom: a CT image, its labels and the lesion points",
            self._cancel: "Stop making it; nothing is added",
        }
        for control, tip in tips.items():
            control.tooltip = tip
        self._random_lesions.changed.connect(
            lambda on: setattr(self._n_lesions, "enabled", not on)
        )
        self._run.changed.connect(self._on_run)
        self._cancel.changed.connect(self._on_cancel)
        super().__init__(
            widgets=[
                self._z, self._y, self._x, self._dz, self._dxy, self._seed,
                self._random_lesions, self._n_lesions, self._rmin, self._rmax, self._noise,
                Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
                self._status,
            ],
            scrollable=True,  # see ScrollableDock
        )
        ScrollableDock.fit_width(self)
        self._dock_watch = DockWatch(self, self._on_cancel)  # closed: its phantom is dropped

    def request(self) -> PhantomRequest:
        return PhantomRequest(
            shape=(self._z.value, self._y.value, self._x.value),
            spacing=(self._dz.value, self._dxy.value, self._dxy.value),
            seed=int(self._seed.value),
            n_lesions=None if self._random_lesions.value else int(self._n_lesions.value),
            lesion_radius_mm=(self._rmin.value, self._rmax.value),
            noise_hu=self._noise.value,
        )

    def _on_run(self) -> None:
        if self._worker is not None:  # one run at a time (a scripted double click)
            return
        request = self.request()
        low, high = request.lesion_radius_mm
        if low > high:  # said in the widget's own words, not the core's parameter name
            from napari.utils.notifications import show_error

            message = (f"Lesion radius min ({low:g} mm) is above max ({high:g} mm); "
                       "make min ≤ max")
            show_error(f"Synthetic phantom: {message}")
            self._status.value = message
            return
        self._set_running(True)
        self._status.value = "Generating…"
        self._worker = _jobs.start_job(
            _make_phantom,
            request,
            description="Synthetic phantom",
            on_result=self._add_layers,
            on_finished=self._on_finished,
            on_progress=self._on_progress,
            on_error=self._on_failed,
            viewer=self._viewer,
        )

    def _on_progress(self, report) -> None:
        if report.message and not widget_closed(self._status):
            self._status.value = f"Generating: {report.message}…"

    def _on_cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            # it stops at the end of the slab it is drawing
            self._cancel.enabled = False
            self._status.value = "Cancelling…"

    def _on_finished(self) -> None:
        self._set_running(False)
        if widget_closed(self._status):  # the viewer was closed mid-run: its labels are gone
            return
        if self._status.value.startswith("Cancelling"):
            set_status(self._status, "Cancelled")

    def _add_layers(self, phantom) -> None:
        if widget_closed(self._status):  # the viewer was closed mid-run: nowhere to add
            return
        for data, kwargs, layer_type in phantom_layer_data(phantom):
            layer = getattr(self._viewer, f"add_{layer_type}")(data, **kwargs)
            if layer_type == "points":
                watch_added_lesions(layer)
        self._status.value = (
            f"seed {phantom.volume.metadata.get('phantom_seed')}: "
            f"{counted(len(phantom.lesions), 'lesion')}, {counted(int((phantom.slice_classes == 2).sum()), 'lesion slice')}"
        )
        drawn = phantom.volume.metadata.get("phantom_settings", {}).get("lesions_drawn", 0)
        if len(phantom.lesions) < drawn:  # a random number: those that did not fit are left out
            from napari.utils.notifications import show_warning

            message = (f"{len(phantom.lesions)} of the {drawn} lesions drawn fit into the organs; "
                       "a smaller Lesion radius min or a larger field of view fits more")
            show_warning(f"Synthetic phantom: {message}")
            self._status.value += f" ({message})"

    def _on_failed(self, message: str, refused: bool) -> None:
        set_status(self._status, message if refused else f"Failed: {message}")

    def _set_running(self, running: bool) -> None:
        if not running:
            self._worker = None
        try:
            self._run.enabled = not running
            self._cancel.enabled = running
        except RuntimeError:  # the viewer was closed mid-run: its Qt widgets are gone
            pass

"""Dock widget: detect lesions on an image layer into a new Points layer."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSlider

from .._layers import (detection_layer_data, hide_unshown, image_number_note, instance_numbers,
                       set_shown, watch_detection_edits)
from ..core.inference import card_peak_threshold, detect_lesions
from ..core.models.detector import at_or_above
from ..core.progress import Progress
from ._model_widget import ModelRunWidget, provenance
from .explain import _add_map, _hidden_note, _map_layer_kwargs
from ._navigate import camera, go_to_slice, go_to_world

# Detections are kept down to this score so the threshold slider can reveal weaker ones
# without running the model again.
KEEP_SCORE = 0.05
MAX_LISTED = 200  # the "go to" list; the layer itself keeps every detection


class DetectWidget(ModelRunWidget):
    architecture = "LesionDetector"
    task = "Detect"
    result_layer_type = "Points"

    def extra_widgets(self) -> list:
        self._with_heatmap = CheckBox(text="Also add the heatmap (why each point is there)",
                                      value=False)
        return [self._with_heatmap]

    def result_widgets(self) -> list:
        self._points = None
        self._source, self._maps_hidden = "", 0  # what the count line names
        self._numbers: list | None = None  # the scan's InstanceNumber per slice, if known
        self._threshold = FloatSlider(label="Score threshold", value=0.5, min=KEEP_SCORE, max=1.0,
                                      step=0.01)
        self._threshold.changed.connect(self._apply_threshold)
        self._enable_threshold(False)
        self._threshold.tooltip = (
            "Detections below this centre score are hidden (kept in the layer down to "
            f"{KEEP_SCORE:g}); off until a run. Moving it after a slice was reviewed in "
            "Retrain unticks that slice")
        # callable choices: napari's reset_choices (on every layer added) re-reads them
        self._goto_items: list = []
        self._goto = ComboBox(label="Go to lesion", choices=lambda _w=None: self._goto_items,
                              enabled=False)
        self._goto.changed.connect(self._go_to_lesion)
        self._goto.tooltip = (
            "The shown detections, strongest first: pick one to go to its slice. Its size "
            "is the detector's estimate, rough below 15 mm (held-out: 5–10 mm lesions "
            "reported at about twice their size): an upper bound for a small one")
        # picking the entry that is already current changes nothing, but the user still
        # expects to be taken there
        self._goto.native.activated.connect(lambda _i: self._go_to_lesion(self._goto.value))
        return [self._threshold, self._goto]

    def _enable_threshold(self, on: bool) -> None:
        """The slider and its number box together: magicgui switches the slider alone, and
        a threshold typed into the box before any detection moved the greyed slider."""
        self._threshold.enabled = on
        self._threshold.native.setEnabled(on)

    def viewer_events(self) -> list:
        return [*super().viewer_events(), (self._viewer.layers.events.removed,
                                           self._on_layer_removed)]

    def drop_result(self) -> None:
        """The latest detections layer is left as it is: no slider rewrites its points."""
        if self._points is not None:
            self._points.events.data.disconnect(self._on_points_data)
            self._points.events.size.disconnect(self._apply_threshold)
        self._points = None
        self._enable_threshold(False)
        self._goto_items = []
        self._goto.enabled = False

    def result_went_stale(self, image) -> None:
        """The list's slices and the count are of the image before: the list goes (it
        went to another slice), the layer stays as the user left it."""
        self.drop_result()
        with self._goto.changed.blocked():
            self._goto.reset_choices()
        self._result_note = ""
        super().result_went_stale(image)

    def _on_layer_removed(self, event) -> None:
        """The latest detections layer deleted: its slider and list no longer look live."""
        if self._points is None or event.value is not self._points:
            return
        self._points.events.data.disconnect(self._on_points_data)
        self._points.events.size.disconnect(self._apply_threshold)
        self._points = None
        self._enable_threshold(False)
        with self._goto.changed.blocked():
            self._goto_items = []
            self._goto.reset_choices()
        self._goto.enabled = False
        self._status.value = "The detections layer was removed"

    def options(self) -> dict:
        return {"heatmap": bool(self._with_heatmap.value)}  # as it was when Run was clicked

    def core_job(self, volume, model, card, options):
        result = yield from detect_lesions(volume, model, card,
                                           threshold=min(KEEP_SCORE, card_peak_threshold(card)))
        if options.get("heatmap"):
            # here, in the worker: resampling a long series' heatmap onto the image's grid
            # on napari's thread froze it
            yield Progress(1, 1, "the heatmap onto the image's grid")
            options["heatmap_on_input"] = result.heatmap_on_input_grid()
        return result

    def show_result(self, result, card, image_layer, volume, options) -> None:
        threshold = card_peak_threshold(card)
        data, kwargs, _ = detection_layer_data(result, image_layer,
                                               provenance(card, image_layer.name), threshold)
        hidden = 0
        if options.get("heatmap"):  # under the points, so they stay clickable
            heat = options["heatmap_on_input"]
            # as Grad-CAM and Uncertainty do: an earlier map of this image (an uncertainty
            # map) is hidden, not summed with it in additive colours
            _, hidden = _add_map(self._viewer, heat if image_layer.ndim == 3 else heat[0],
                                 _map_layer_kwargs(
                image_layer, f"lesion heatmap · {image_layer.name} ({card.get('name')})", "cyan",
                provenance(card, image_layer.name), method="detector centre heatmap (sigmoid)"),
                image_layer)
        # which scan and model the count is of (the picker may already name the next scan)
        self._source = f"'{image_layer.name}' ({card.get('name')})"
        self._maps_hidden = hidden
        self._numbers = instance_numbers(image_layer)
        if self._points is not None:
            self._points.events.data.disconnect(self._on_points_data)
            self._points.events.size.disconnect(self._apply_threshold)
        self._points = self._viewer.add_points(data, **kwargs)
        # for good, not only while it is the latest run's layer: a point added to or moved
        # on an earlier layer is the user's too
        watch_detection_edits(self._points)
        self._points.events.data.connect(self._on_points_data)
        # a resized detection is the user's (mark_resized_points): list and count again
        self._points.events.size.connect(self._apply_threshold)
        with self._threshold.changed.blocked():
            # a card may set its threshold below KEEP_SCORE (the job ran down to it):
            # the slider must reach it (setting a value below its minimum raised)
            self._threshold.min = min(KEEP_SCORE, threshold)
            self._threshold.value = threshold
        self._enable_threshold(True)
        self._apply_threshold()

    def _on_points_data(self, event) -> None:
        """Points added, moved or deleted by the user (marked as the user's by the handler
        connected before this one): rebuild the list and the count (the list holds row
        numbers, which a deletion shifts)."""
        if str(getattr(event, "action", "")) in ("added", "removed", "changed"):
            self._apply_threshold()

    def _apply_threshold(self, _value=None) -> None:
        points = self._points
        if points is None or points not in self._viewer.layers:
            return
        scores = np.asarray(points.features["score"], dtype=float)
        added = np.isnan(scores)  # points the user added have no score: always shown
        shown = added | at_or_above(scores, self._threshold.value)
        set_shown(points, shown)  # a Retrain widget unticks the reviewed slices it changes
        hide_unshown(points)  # the 3D view and a 2D layer draw every point otherwise
        # numbered, so that equal-looking lesions stay separate entries; only the rows
        # listed are formatted (all 2000 of a noisy scan's, read one pandas value at a
        # time, held napari's thread 60 ms at each slider step)
        order = np.argsort(-scores, kind="stable")
        listed = order[(shown & ~added)[order]][:MAX_LISTED]
        diameters = np.asarray(points.features["diameter_mm"], dtype=float)[listed]
        # a 2D image has no slices: "z=0" on every entry said nothing (and misled beside
        # a 3D series)
        zs = (np.rint(points.data[listed, 0]).astype(int) if points.ndim == 3
              else [None] * len(listed))
        # the image number last: a narrow dock cuts the end of an entry
        choices = [(f"#{rank + 1}{'' if z is None else f' z={z}'} · score {scores[i]:.2f} · "
                    f"{d:.0f} mm{self._image_number(z)}", int(i))
                   for rank, (i, z, d) in enumerate(zip(listed, zs, diameters))]
        with self._goto.changed.blocked():
            self._goto_items = choices
            self._goto.reset_choices()
        self._goto.enabled = bool(choices)
        found = shown & ~added
        mine = f"; {int(added.sum())} added or moved by you" if added.any() else ""
        self._status.value = (f"{self._source}: {int(found.sum())} of {int((~added).sum())} "
                              f"detections at score ≥ {self._threshold.value:.2f}{mine}")
        if self._maps_hidden:
            self._status.value += _hidden_note(self._maps_hidden).rstrip()
        if self._result_note:  # the missing slices stay said
            self._status.value += f"\n{self._result_note}"

    def _image_number(self, z) -> str:
        return image_number_note(self._numbers, z)

    def _go_to_lesion(self, index) -> None:
        points = self._points
        if index is None or points is None or points not in self._viewer.layers or index >= len(points.data):
            return
        point = points.data[index]
        if points.ndim != 3:  # a 2D image's lesions: no slice to find
            go_to_world(self._viewer, points, points.data_to_world(point))
            return
        z, y, x = (float(v) for v in point)
        # the slice as go_to_slice finds it: napari slices by the world z alone, and a
        # sheared layer's lesion has a world z that depends on its y and x too (the jump
        # landed 4 slices off); y and x as drawn on that slice (without z's share)
        go_to_slice(self._viewer, points, round(z))
        go_to_world(self._viewer, points, points.data_to_world([0.0, y, x]), axes=[1, 2])


_camera = camera  # the old name, for scripts and tests

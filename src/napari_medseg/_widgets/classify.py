"""Dock widget: per-slice classes and probabilities, following the slice slider."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import ComboBox, Label
from qtpy.QtWidgets import QSizePolicy

from .._layers import generated_planes, image_number_note, instance_numbers
from ..core.inference import classify_volume
from ..core.text import counted
from ._model_widget import (
    ModelRunWidget,
    _geometry,
    _same_geometry,
    connect_layer_events,
    provenance,
    rewatch_geometry,
)
from ._navigate import go_to_slice, slice_at, slice_axis_shown
from ._strip import ProbabilityStrip

FLAG_CLASS = "lesion"


class ClassifyWidget(ModelRunWidget):
    architecture = "SliceClassifier"
    task = "Classify"
    unmeasured_effect = "each slice's class is read from its measured voxels only"

    def result_widgets(self) -> list:
        self._result = None
        self._layer = None
        self._current = Label(value="")
        self._current.native.setWordWrap(True)
        # as the status line above it: it sat 85-100 px further in, in a column of its own
        self._current.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                           QSizePolicy.Policy.Minimum)
        self._generated: set[int] = set()
        self._strip = ProbabilityStrip()
        self._strip.slice_clicked.connect(self._go_to_slice)
        # callable choices: napari's reset_choices (on every layer added) re-reads them
        self._goto_items: list = []
        self._goto = ComboBox(label="Lesion slices", choices=lambda _w=None: self._goto_items,
                              enabled=False)
        self._goto.changed.connect(lambda z: z is not None and self._go_to_slice(z))
        self._goto.tooltip = ("The slices the model calls lesion, with its probability: "
                              "pick one to go there (off until a run finds one)")
        self._goto.native.activated.connect(
            lambda _i: self._goto.value is not None and self._go_to_slice(self._goto.value)
        )
        # the strip is plain Qt; wrap it so it sits in the magicgui layout
        from magicgui.widgets import Container

        holder = Container(labels=False)
        holder.native.layout().addWidget(self._strip)
        return [self._current, holder, self._goto]

    def viewer_events(self) -> list:
        dims = self._viewer.dims.events
        return [*super().viewer_events(),
                (dims.current_step, self._follow_slice), (dims.order, self._follow_slice),
                (dims.ndisplay, self._follow_slice),  # axes reordered, 2D ↔ 3D
                # a removal moves no slider when another image of that extent stays open
                (self._viewer.layers.events.removed, self._on_layer_removed)]

    def drop_result(self) -> None:
        self._watch_layer(None)
        self._result = self._layer = None
        self._strip.set_values([])
        self._clear_goto()
        # docked again, it must not show a slice's classes the slider no longer follows
        self._current.value = ""
        self._status.value = "The result was dropped when the widget was closed; run it again"

    def core_job(self, volume, model, card, options):
        return classify_volume(volume, model, card)

    def _watch_layer(self, layer) -> None:
        rewatch_geometry(self._layer, layer, self._follow_slice)
        # the classes are said to be of the layer by its name: a renamed layer's new one
        connect_layer_events(self._layer, ("name",), self._on_renamed, False)
        connect_layer_events(layer, ("name",), self._on_renamed)

    def _on_renamed(self, _event=None) -> None:
        if self._result is None or self._layer is None:
            return
        self._strip.setToolTip(f"Probability of '{self._flag_name}' per slice of "
                               f"'{self._layer.name}' (click to go to a slice)")
        self._follow_slice()

    def show_result(self, result, card, image_layer, volume, options) -> None:
        self._watch_layer(image_layer)
        self._result, self._layer = result, image_layer
        self._classified = _geometry(image_layer)
        self._provenance = provenance(card, image_layer.name)
        names = list(result.class_names)
        flag = names.index(FLAG_CLASS) if FLAG_CLASS in names else len(names) - 1
        flagged = result.predicted == flag
        self._strip.set_values(result.probabilities[:, flag], flagged)
        self._flag_name = names[flag]
        self._goto.label = f"{names[flag].capitalize()} slices"
        # said under every slice's classes: no layer holds them, and the image picker
        # (another image, picked for the next run) does not name what they belong to
        self._model_name = card.get("name", "the model")
        # slices the Generate widget made: a class read from an interpolated image is
        # the generator's, and nothing in the list or under the slice said so
        planes = generated_planes(image_layer)
        self._generated = ({int(z) for z in planes["indices"]}
                           if planes and planes["axis"] == "z" else set())
        zs = np.flatnonzero(flagged)
        numbers = instance_numbers(image_layer)
        with self._goto.changed.blocked():
            # a first entry that goes nowhere: the first slice read as the one shown
            self._goto_items = ([(f"{counted(len(zs), 'slice')}: pick one to go there", None)]
                                if len(zs) else []) + [
                (f"slice {z} · p={result.probabilities[z, flag]:.2f}"
                 + (" · generated" if int(z) in self._generated else "")
                 + image_number_note(numbers, int(z)), int(z))
                for z in zs
            ]
            self._goto.reset_choices()
        self._goto.enabled = bool(flagged.any())
        self._status.value = f"{int(flagged.sum())} of {len(flagged)} slices flagged '{names[flag]}'"
        self._on_renamed()  # the tooltip, and the current slice's classes

    def _slice_index(self) -> int:
        """Current slice of the classified layer (0 for a 2D image)."""
        layer = self._layer
        if layer is None or layer.ndim == 2 or layer not in self._viewer.layers \
                or self._viewer.dims.ndim < 3:  # deleted, and the viewer went 2D
            return 0
        return int(round(slice_at(self._viewer, layer)))

    def _on_layer_removed(self, event) -> None:
        if self._layer is not None and event.value is self._layer:
            self._follow_slice()

    def _follow_slice(self, _event=None) -> None:
        result = self._result
        if result is None:
            return
        if self._layer is not None and self._layer not in self._viewer.layers:
            self._current.value = "The classified layer was removed"
            self._status.value = "Result dropped: the classified layer was removed"
            # its strip and lesion list would look live but go nowhere; the layer is
            # let go (its volume with it)
            self._strip.set_values([])
            self._clear_goto()
            self._watch_layer(None)
            self._result = self._layer = None
            return
        if self._layer is not None and not _same_geometry(self._classified,
                                                          _geometry(self._layer)):
            # its data or placement changed: the classes are another image's
            self._current.value = "The classified image changed since; run Classify again"
            self._status.value = "Result out of date: the image changed after the run"
            self._strip.set_values([])
            self._clear_goto()
            self._result = None
            return
        if self._layer is not None and slice_axis_shown(self._viewer, self._layer):
            self._strip.set_current(-1)  # every slice is on screen, none is "current"
            self._current.value = ("Slices run across the view (axes reordered): no current "
                                   "slice; a click on the strip centres the view on one")
            return
        z = self._slice_index()
        self._strip.set_current(z)
        if not 0 <= z < len(result.predicted):
            text = "Current slice: outside the classified image"
        elif result.predicted[z] < 0:
            text = f"Slice {z}: missing (not classified)"
        else:
            probs = ", ".join(f"{n} {p:.2f}"
                              for n, p in zip(result.class_names, result.probabilities[z]))
            made = " (generated, not acquired)" if z in self._generated else ""
            text = f"Slice {z}{made}: {result.class_names[result.predicted[z]]}\n{probs}"
        name = self._layer.name if self._layer is not None else "?"
        self._current.value = f"{text}\n(of '{name}' by {self._model_name})"

    def _clear_goto(self) -> None:
        with self._goto.changed.blocked():  # its entries would name the old slices
            self._goto_items = []
            self._goto.reset_choices()
        self._goto.enabled = False

    def _go_to_slice(self, z: int) -> None:
        go_to_slice(self._viewer, self._layer, z)

"""Dock widgets: Grad-CAM of the slice classifier, MC-dropout uncertainty of the segmenter.

Both add a NEW Image layer on the image's grid (same scale, translate, affine), drawn
with a colormap and additive blending over the CT, with provenance metadata.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Label, SpinBox
from qtpy.QtWidgets import QSizePolicy

from .._layers import _like_layer, _result_metadata, image_number_note, instance_numbers
from ..core.explain import gradcam_volume, segmentation_uncertainty
from ..core.models.registry import read_card
from ..core.text import counted, slice_ranges
from ._model_widget import (
    ModelRunWidget,
    _geometry,
    _same_geometry,
    provenance,
    rewatch_geometry,
)
from ._navigate import go_to_slice, slice_at, slice_axis_shown
from ._retrain_base import annotated_in_viewer

PREDICTED = "predicted class"


def _map_layer_kwargs(image_layer, name: str, colormap: str, prov: dict, **extra) -> dict:
    """An explanation map over the CT. Additive blending adds the colormap's colour at 0
    too, so ``colormap`` must start at black (inferno, magma, cyan; not viridis)."""
    return {
        "name": name,
        "colormap": colormap,
        "blending": "additive",
        "opacity": 0.7,
        "contrast_limits": (0.0, 1.0),
        "rgb": False,  # a last axis of 3 or 4 is slices here, not colour channels
        **_like_layer(image_layer),
        "metadata": _result_metadata(prov, explanation_map=True, **extra),
    }


#: explanation map layer -> the image layer it was made over (both weakly: by identity,
#: as a name changes with a rename and passes to another layer)
_MAPS_OVER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _add_map(viewer, data, kwargs: dict, image_layer) -> tuple[Any, int]:
    """Add an explanation map over ``image_layer``, hiding the maps added over it before
    (not removing them): additive maps summed their colours, and a hot spot could not be
    told to one of them. Returns the new layer and how many were hidden."""
    hidden = 0
    for layer in viewer.layers:
        over = _MAPS_OVER.get(layer)
        if over is not None and over() is image_layer and layer.visible:
            layer.visible = False
            hidden += 1
    layer = viewer.add_image(data, **kwargs)
    _MAPS_OVER[layer] = weakref.ref(image_layer)
    return layer, hidden


def _hidden_note(hidden: int) -> str:
    return (f" ({counted(hidden, 'earlier map')} of this image hidden: tick its eye to "
            "compare)" if hidden else "")


class GradCamWidget(ModelRunWidget):
    architecture = "SliceClassifier"
    task = "Grad-CAM"
    unmeasured_effect = ("no heat there, and each slice's class is read from its measured "
                         "voxels only")

    def extra_widgets(self) -> list:
        self._target = ComboBox(label="Explain", choices=self._target_choices)
        self._target.tooltip = (
            "The class whose evidence the map shows: each slice's own predicted class, or one "
            "class on every slice. Each slice's map is scaled to its own peak: it shows where "
            "the evidence is, not how strong; the line under the result gives the slice's "
            "probability of the class shown")
        # the class the user picked, kept over a model without it (the pick went to
        # "predicted class" without a word, and stayed there when the model came back)
        self._wanted_target = PREDICTED
        self._target.changed.connect(self._on_target_picked)
        self._model.changed.connect(lambda _v: self._refresh_targets())
        return [self._target]

    def _on_target_picked(self, value) -> None:
        if value is not None:
            self._wanted_target = value

    def _refresh_targets(self) -> None:
        wanted = self._wanted_target
        with self._target.changed.blocked():
            self._target.reset_choices()
            if wanted in self._target.choices:
                self._target.value = wanted
            else:
                self._target.value = PREDICTED
        if wanted not in self._target.choices:
            self._status.value = (f"'{wanted}' is not a class of this model: Explain shows "
                                  f"each slice's {PREDICTED}")

    def result_widgets(self) -> list:
        # the last map this widget added (weakly: a deleted map is let go) and, per slice,
        # the class it shows and that class's probability
        self._map: weakref.ref | None = None
        self._explained: tuple[list, list, list, list] | None = None
        self._explained_image = self._explained_on = None  # the image and its geometry
        self._current = Label(value="")
        self._current.native.setWordWrap(True)
        # as the status line above it: it sat 10 px further in, in a column of its own
        self._current.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                           QSizePolicy.Policy.Minimum)
        return [self._current]

    def viewer_events(self) -> list:
        dims = self._viewer.dims.events
        return [*super().viewer_events(),
                (dims.current_step, self._follow_slice), (dims.order, self._follow_slice),
                (dims.ndisplay, self._follow_slice),
                (self._viewer.layers.events.removed, self._follow_slice)]

    def drop_result(self) -> None:
        self._map = self._explained = None
        self._watch_image(None)
        self._current.value = ""

    def _watch_image(self, image) -> None:
        rewatch_geometry(self._explained_image, image, self._on_image_changed)
        self._explained_image = image
        self._explained_on = _geometry(image) if image is not None else None

    def _on_image_changed(self, _event=None) -> None:
        """The explained image got new data or another placement: the map stays where it
        was made, off the image, and its line named classes of slices no longer shown
        there; the line goes and the status says so, as Classify's does."""
        image = self._explained_image
        if image is None or _same_geometry(self._explained_on, _geometry(image)):
            return
        self._watch_image(None)
        self._explained = None
        self._current.value = ""
        self._status.value = (f"'{image.name}' changed (new data or placement) since the map "
                              "was made: the map no longer lies on it; run Grad-CAM again")

    def _follow_slice(self, _event=None) -> None:
        """Which class the map shows on the current slice, and how likely the model
        finds it there: every slice's map peaks at 1, so a class the model rules out on
        a slice (P 0.05) glowed as brightly as a likely one, and in "predicted class"
        mode nothing said that the bright frame of a slice past the body was the
        evidence for 'no_body'."""
        if (self._explained_image is not None
                and self._explained_image not in self._viewer.layers):
            self._watch_image(None)  # removed: not kept in memory by this widget
        layer = self._map() if self._map is not None else None
        if self._explained is None:
            return  # dropped: the image changed since
        if layer is None or layer not in self._viewer.layers:
            if self._map is not None:
                self._map = self._explained = None
                self._watch_image(None)
                self._current.value = ""
                # the counts were of that map: they stayed, as if still on screen
                self._status.value = "The Grad-CAM map was removed"
            return
        if layer.ndim == 2 or self._viewer.dims.ndim < 3:
            z = 0
        elif slice_axis_shown(self._viewer, layer):
            self._current.value = ("Slices run across the view (axes reordered): no current "
                                   "slice")
            return
        else:
            z = int(round(slice_at(self._viewer, layer)))
        shown, p_shown, predicted, p_predicted = self._explained
        if not 0 <= z < len(shown):
            text = "Current slice: outside the explained image"
        elif shown[z] is None:
            text = f"Slice {z}: missing (nothing explained)"
        else:
            text = f"Slice {z}: the map shows '{shown[z]}', P {p_shown[z]:.2f}"
            if predicted[z] != shown[z]:
                text += f"; the model's class here: {predicted[z]}, P {p_predicted[z]:.2f}"
        self._current.value = f"{text}\n(map '{layer.name}')"

    def _target_choices(self, _widget=None) -> list:
        path = getattr(self, "_model", None) and self._model.value
        try:
            classes = read_card(path)["classes"] if path else []
        except Exception:  # an unreadable card is reported when the model loads
            classes = []
        return [PREDICTED, *classes]

    def options(self) -> dict:
        return {"target": self._target.value or PREDICTED}

    def core_job(self, volume, model, card, options):
        target = None if options["target"] == PREDICTED else options["target"]
        return gradcam_volume(volume, model, card, target=target)

    def show_result(self, result, card, image_layer, volume, options) -> None:
        what = options["target"]
        prov = provenance(card, image_layer.name)
        maps = result.maps if image_layer.ndim == 3 else result.maps[0]
        # "predicted class" explains another class on each slice: the layer says which
        # (None: a missing slice, nothing explained)
        per_slice = [result.class_names[int(t)] if t >= 0 else None for t in result.target]
        probs = np.nan_to_num(np.asarray(result.probabilities, dtype=float))
        p_shown = [round(float(probs[z, t]), 4) if t >= 0 else None
                   for z, t in enumerate(result.target)]
        top = probs.argmax(axis=1) if probs.size else np.zeros(0, int)
        predicted = [result.class_names[int(top[z])] if t >= 0 else None
                     for z, t in enumerate(result.target)]
        p_predicted = [float(probs[z, top[z]]) if t >= 0 else None
                       for z, t in enumerate(result.target)]
        # the kind first: a narrow layer list elides a name's middle, and two maps of one
        # image read "phantom CT (se…n (classifier)" and "phantom CT (se…s (classifier)"
        name = f"Grad-CAM {what} · {image_layer.name} ({card.get('name')})"
        layer, hidden = _add_map(self._viewer, maps, _map_layer_kwargs(
            image_layer, name, "inferno",
            prov, explains=what, explained_class_per_slice=per_slice,
            explained_class_probability_per_slice=p_shown,
            method="Grad-CAM, last conv block, per-slice max = 1"), image_layer)
        self._map = weakref.ref(layer)
        self._explained = (per_slice, p_shown, predicted, p_predicted)
        self._watch_image(image_layer)
        self._follow_slice()
        explained = result.target[result.target >= 0]
        if not explained.size:  # every slice missing: no model saw anything
            self._status.value = "No acquired slice: nothing to explain"
            return
        if what != PREDICTED:
            # "Explained: lesion on 48 slices" read as a finding on every slice
            calls = sum(1 for c in predicted if c == what)
            self._status.value = (
                f"Map of the evidence for '{what}' on {counted(int(explained.size), 'slice')} "
                f"(the model gives '{what}' to {counted(calls, 'slice')})"
                + _hidden_note(hidden))
            return
        counts = np.bincount(explained, minlength=len(result.class_names))
        self._status.value = "Explained: " + ", ".join(
            f"{n} on {c} slice{'s' if c != 1 else ''}"
            for n, c in zip(result.class_names, counts) if c) + _hidden_note(hidden)


class UncertaintyWidget(ModelRunWidget):
    architecture = "RecurrentSegmenter"
    task = "Uncertainty"

    def extra_widgets(self) -> list:
        self._samples = SpinBox(label="Samples", value=8, min=2, max=64)
        self._samples.tooltip = ("How many times the segmenter's decoder runs with dropout on: "
                                 "more samples give a steadier map and take longer")
        return [self._samples]

    def result_widgets(self) -> list:
        self._layer = None
        self._goto_items: list = []
        self._goto = ComboBox(label="Correct first", choices=lambda _w=None: self._goto_items,
                              enabled=False)
        self._goto.tooltip = (
            "The slices with the highest mean uncertainty over the voxels predicted as a "
            "structure, most uncertain first: where the segmenter most likely erred (on "
            "held-out phantoms the ranking follows each slice's number of wrong voxels). "
            "Pick one to go there, then correct it in 'Retrain on my annotations'")
        self._goto.changed.connect(lambda z: z is not None and self._go_to(z))
        # picking the entry already shown (the most uncertain slice, after a run) changes
        # nothing, but the user still expects to be taken there
        self._goto.native.activated.connect(
            lambda _i: self._goto.value is not None and self._go_to(self._goto.value))
        return [self._goto]

    def viewer_events(self) -> list:
        return [*super().viewer_events(), (self._viewer.layers.events.removed,
                                           self._on_layer_removed)]

    def drop_result(self) -> None:
        if self._layer is not None:
            self._drop_ranking("Closed")

    def _on_layer_removed(self, event) -> None:
        """The image the ranking was made on deleted: its list no longer looks live."""
        if self._layer is None or event.value is not self._layer:
            return
        self._drop_ranking("The image layer of the uncertainty ranking was removed")

    def _on_layer_changed(self, _event=None) -> None:
        """New data or placement: the list must not look live (it offered slices a cut
        volume no longer has until one was picked)."""
        if self._layer is not None and not _same_geometry(self._ranked_on,
                                                          _geometry(self._layer)):
            self._drop_ranking("The image changed since the uncertainty ranking was made:"
                               " run Uncertainty again")

    def _watch(self, layer) -> None:
        rewatch_geometry(self._layer, layer, self._on_layer_changed)

    def _drop_ranking(self, message: str) -> None:
        self._watch(None)
        self._layer = self._ranked_on = None
        with self._goto.changed.blocked():
            self._goto_items = []
            self._goto.reset_choices()
        self._goto.enabled = False
        self._status.value = message

    def options(self) -> dict:
        return {"samples": int(self._samples.value)}

    def core_job(self, volume, model, card, options):
        result = yield from segmentation_uncertainty(volume, model, card,
                                                     samples=options["samples"])
        # the colours' top (here, not on napari's thread): the map's values are mostly a
        # few hundredths, near black under a 0-1 window; a sample of its voxels suffices
        sample = result.entropy[:, ::4, ::4]
        positive = sample[sample > 0]
        top = float(np.percentile(positive, 99.5)) if positive.size else 1.0
        options["display_max"] = float(min(1.0, max(top, 0.01)))
        return result

    def show_result(self, result, card, image_layer, volume, options) -> None:
        prov = provenance(card, image_layer.name)
        # slices a Retrain list already holds were corrected (or checked): offering them
        # sent the user back to work done, as Retrain's own Suggest does not
        one_slice = volume.shape[0] == 1  # nothing to rank or to leave out
        annotated = set() if one_slice else annotated_in_viewer(self._viewer, image_layer)
        ranked = result.most_uncertain(10, exclude=annotated)
        # those the list would have shown: the listed slices ranked above its last entry
        everything = result.most_uncertain(len(result.per_slice))
        # with room left in the list (fewer than 10 shown) every listed slice was left out
        cut = (everything.index(ranked[-1]) if ranked and len(ranked) == 10
               else len(everything))
        left_out = [z for z in everything[:cut] if z in annotated]
        ent = result.entropy if image_layer.ndim == 3 else result.entropy[0]
        top = float(options.get("display_max", 1.0))
        _, hidden = _add_map(self._viewer, ent, {**_map_layer_kwargs(
            image_layer, f"uncertainty · {image_layer.name} ({card.get('name')})", "magma", prov,
            method=f"MC dropout, {result.samples} samples, entropy / log(classes)",
            most_uncertain_slices=result.most_uncertain(10)), "contrast_limits": (0.0, top)},
            image_layer)
        self._watch(image_layer)
        self._layer, self._ranked_on = image_layer, _geometry(image_layer)
        # one slice (a 2D image, or a one-slice volume): nothing to rank or go to
        with self._goto.changed.blocked():
            numbers = instance_numbers(image_layer)
            self._goto_items = ([] if one_slice else
                                [(f"slice {z} · uncertainty {result.per_slice[z]:.3g}"
                                  + image_number_note(numbers, z), z)
                                 for z in ranked])
            self._goto.reset_choices()
        self._goto.enabled = bool(ranked) and not one_slice
        if volume.missing.all():  # no model saw anything
            self._status.value = "No acquired slice: nothing to rank"
        elif one_slice:
            self._status.value = (f"Mean uncertainty {result.per_slice[0]:.3f}" if ranked
                                  else "No structure found")
        else:
            self._status.value = ("Most uncertain slices (correct these first): "
                                  + ", ".join(map(str, ranked[:5])) if ranked
                                  else "No structure found outside the Retrain lists"
                                  if annotated else "No structure found")
            if left_out and ranked:
                self._status.value += (f"\n{counted(len(left_out), 'slice')} already in a "
                                       f"Retrain list left out ({slice_ranges(left_out)})")
        if ranked:  # what the numbers mean: nothing on screen said it
            self._status.value += ("\nThe map: 0 where every sample agrees, 1 where all "
                                   f"classes are equally likely; its colours span 0–{top:.2g}")
        self._status.value += _hidden_note(hidden)

    def _go_to(self, z: int) -> None:
        if self._layer is None:
            return
        if not _same_geometry(self._ranked_on, _geometry(self._layer)):
            # new data or placement: the ranked slices may not exist, or show other tissue
            self._drop_ranking("The image changed since the uncertainty ranking was made:"
                               " run Uncertainty again")
            return
        go_to_slice(self._viewer, self._layer, z)

"""Dock widget: what the plugin knows about an image or labels layer (geometry, gaps,
source, how a result was made)."""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import Container, TextEdit
from qtpy.QtWidgets import QSizePolicy

from .._layers import _recorded_gaps_fit, mm_per_unit, voxel_spacing, world_matrix_mm
from ..core.text import brief_numbers
from ..core.volume import SAFE_METADATA_KEYS
from ._model_widget import (DockWatch, KeepingComboBox, LayerNameFollower, connect_layer_events,
                            hand_keys_to_napari, layer_choices, name_controls, plain_viewer,
                            slice_ranges)


def _unit(layer) -> str:
    """The spacing's unit as the text says it: mm, converted from the layer's own
    physical unit when it has another (napari's default, "pixel", is no statement)."""
    ndim = len(getattr(layer, "units", ()))
    units = {str(u) for u, f in zip(getattr(layer, "units", ()), mm_per_unit(
        getattr(layer, "units", None), ndim)) if f != 1.0}
    if not units:
        return "mm"
    return f"mm, converted from {', '.join(sorted(units))}"


def _provenance(medseg: dict) -> list[str]:
    """How a result layer was made (model, input, time), and what in it is synthetic."""
    lines = []
    if medseg.get("synthetic"):
        generated = medseg.get("generated_slices", [])
        lines.append(f"SYNTHETIC: {len(generated)} generated slices (not acquired) along "
                     f"{medseg.get('slice_axis', 'z')}: {slice_ranges(generated) or 'none'}")
    if "input_layer" in medseg:
        model = medseg.get("model")
        made = (f"model {model}" + (f" v{medseg['model_version']}" if medseg.get("model_version")
                                    else "")
                if model else f"{medseg.get('method', 'linear')} interpolation")
        lines.append(f"Made by: {made} from layer '{medseg['input_layer']}'"
                     + (f" at {medseg['created']}" if medseg.get("created") else ""))
    for key in ("method", "explains", "threshold"):
        if medseg.get(key) is not None and (key != "method" or medseg.get("model")):
            lines.append(f"{key.capitalize()}: {medseg[key]}")
    if medseg.get("note"):
        lines.append(f"Note: {medseg['note']}")
    return lines


def describe_layer(layer, missing: list[int] | None = None) -> str:
    """Plain-text summary of an image or labels layer: shape, spacing, window, gaps,
    how a result was made, warnings. ``missing``: :func:`missing_slices` of the layer
    when the caller kept it (finding it reads the whole volume)."""
    if layer is None:
        return "No image or labels layer open."
    medseg = layer.metadata.get("medseg", {})
    rgb = bool(getattr(layer, "rgb", False))
    ndim = len(layer.data.shape) - (1 if rgb else 0)
    axes = {2: "y, x", 3: "z, y, x"}.get(ndim, f"{ndim} axes; the models take 2D or 3D")
    if rgb:
        axes += ", colour"
    world = world_matrix_mm(layer)
    spacing = voxel_spacing(layer)  # what the models use
    unit = _unit(layer)
    lines = [
        f"Layer: {layer.name}",
        f"Shape ({axes}): {tuple(layer.data.shape)}",
        f"Spacing ({unit}): {tuple(round(float(s), 4) for s in spacing)}",
        f"Origin ({unit}): {tuple(round(float(t), 2) for t in world[:ndim, ndim])}",
    ]
    lines += _provenance(medseg)
    if medseg.get("explanation_map") is True:  # made by this plugin, of no modality
        lines.append("Kind: explanation map (0–1), not a scan")
    elif medseg.get("modality") or hasattr(layer, "contrast_limits"):
        lines.append(f"Modality: {medseg.get('modality', 'unknown (not opened by napari-medseg)')}")
    if hasattr(layer, "contrast_limits"):
        low, high = (float(c) for c in layer.contrast_limits)
        # as radiologists say it (W 400 / L 40), with the limits napari's slider shows
        lines.append(f"Contrast window: W {high - low:.4g} / L {(low + high) / 2:.4g} "
                     f"({round(low, 1)}, {round(high, 1)})")
    if missing is None:
        missing = missing_slices(layer)
    lines.append(f"Missing slices: {', '.join(map(str, missing)) if missing else 'none'}")
    unlabelled = medseg.get("unlabelled_slices")  # a result's slices a model did not label
    if unlabelled:
        lines.append(f"Unlabelled slices (no input there, not segmented): "
                     f"{slice_ranges(unlabelled)}")
    planes = medseg.get("source", {}).get("missing_planes")  # a turned coronal series' gaps
    if planes:
        lines.append(f"Missing planes along {planes['axis']}: {slice_ranges(planes['indices'])}"
                     " (the series' own slices; never labelled)")
    if not isinstance(layer.data, np.ndarray) and not getattr(layer, "multiscale", False):
        lines.append("(a lazy image: slices with no finite voxel show up when a model reads it)")
    source = medseg.get("source", {})
    made = source.get("synthetic_planes")  # a generated file's, while it has its shape
    if isinstance(made, dict) and list(source.get("shape_zyx", layer.data.shape)) == list(
            layer.data.shape):
        lines.append(f"SYNTHETIC: {len(made.get('indices', []))} generated slices (not "
                     f"acquired) along {made.get('axis')}: "
                     f"{slice_ranges(made.get('indices', [])) or 'none'}")
    for warning in source.get("warnings", []):
        lines.append(f"Warning: {warning}")
    for key in sorted(k for k in source if k in SAFE_METADATA_KEYS
                      and k not in ("warnings", "missing_planes", "synthetic_planes")):
        value = source[key]
        empty = value is None or (isinstance(value, (str, list, tuple, dict)) and not value)
        if not empty:  # a field the file leaves empty: not "None"
            lines.append(f"{key}: {_readable(_short(brief_numbers(value)))}")
    if medseg.get("disclaimer"):
        lines.append(medseg["disclaimer"])
    return "\n".join(lines)


def _readable(value) -> str:
    """A metadata value as text to read: a dict as "key value · key value" and a list as
    "a, b" (a phantom's settings showed as a Python dict, braces and quotes)."""
    if isinstance(value, dict):
        return " · ".join(f"{k} {_readable(v)}" for k, v in value.items()
                          if v is not None and v != [] and v != {})
    if isinstance(value, (list, tuple)):
        return ", ".join(f"({_readable(v)})" if isinstance(v, (list, tuple)) else _readable(v)
                         for v in value)
    return str(value)


def _short(value):
    """``value`` with its floats in 4 significant digits (a phantom's settings printed
    15-digit noise levels)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_short(v) for v in value)
    return value


def missing_slices(layer) -> list[int]:
    """The slices the models take as missing: recorded gaps that still fit the data,
    and slices with no finite voxel."""
    medseg = layer.metadata.get("medseg", {})
    return sorted({int(z) for z in _recorded_missing(layer, medseg)} | _empty_slices(layer))


def _recorded_missing(layer, medseg: dict) -> list:
    """The slices recorded as missing, as the models take them: in-memory 3D data only
    while the record still fits it (not after a flip or a crop); a lazy image's as
    recorded (checking would read it on napari's thread)."""
    recorded = medseg.get("missing_slices", [])
    data = layer.data
    if not isinstance(data, np.ndarray):
        return recorded
    if getattr(layer, "rgb", False) or data.ndim != 3:
        return []
    return recorded if _recorded_gaps_fit(data, recorded, medseg) else []


def _empty_slices(layer) -> set[int]:
    """Slices with no finite voxel, which the models treat as missing (in-memory 3D
    grayscale data only: reading a lazy store here would freeze the GUI)."""
    data = layer.data
    if (getattr(layer, "rgb", False) or not isinstance(data, np.ndarray)
            or isinstance(data, np.memmap) or data.ndim != 3):
        return set()  # a memmap reads its file: 0.23 s of a 300 × 512² one, on napari's thread
    if not np.issubdtype(data.dtype, np.floating):
        return set()  # integers are always finite
    # a slice with a finite voxel in a coarse sample holds one: most are read no further
    # (a mask of the whole volume held napari 0.1-0.2 s at 300 × 512², at every edit)
    return {z for z, plane in enumerate(data)
            if not np.isfinite(plane[::8, ::8]).any() and not np.isfinite(plane).any()}


#: the picked layer's events that change what this widget shows
WATCHED_EVENTS = ("data", "scale", "translate", "rotate", "shear", "affine", "units",
                  "contrast_limits", "metadata")
#: those after which the missing slices may differ (the others only re-render: a
#: contrast slider drag re-read a whole CT volume at every step, 24 ms each at 512² × 200)
CONTENT_EVENTS = ("data", "metadata")


class VolumeInfoWidget(Container):
    """Pick an image or labels layer; read its spacing, window, missing slices, source
    and, for a result, how it was made."""

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer = plain_viewer(viewer)
        self._layer = KeepingComboBox(label="Layer", choices=self._image_layers)
        self._text = TextEdit(value="", enabled=True)
        self._text.native.setReadOnly(True)
        # room for the geometry; more scrolls (260 px held the window taller than the
        # screen with the other docks; see ScrollableDock)
        self._text.min_height = 120
        # and the dock's whole height when there is more (the disclaimer was scrolled out
        # of a 330 px box under an empty half dock)
        self._text.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                        QSizePolicy.Policy.Expanding)
        super().__init__(widgets=[self._layer, self._text])
        # wanting height itself: napari's dock otherwise adds a stretch under it (the
        # text box is inside magicgui's labelled row, where napari does not look)
        self.native.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        hand_keys_to_napari(self.native)
        name_controls(self)
        self._watched = None  # the layer whose events refresh the text
        self._missing: list[int] | None = None  # its missing slices, while its data stay
        self._layer.changed.connect(self._refresh)
        self._names = LayerNameFollower(viewer, self._on_layers_changed)
        self._follow_viewer()
        self._refresh()
        # closed: it follows nothing (each closed instance went on re-reading the picked
        # volume at every layer change); docked again: it follows again
        self._dock_watch = DockWatch(self, lambda: self._follow_viewer(False),
                                     self._on_reopened)

    def _follow_viewer(self, follow: bool = True) -> None:
        for event in (self._viewer.layers.events.inserted, self._viewer.layers.events.removed):
            (event.connect if follow else event.disconnect)(self._on_layers_changed)
        self._names.connect(follow)
        if not follow:
            connect_layer_events(self._watched, WATCHED_EVENTS, self._on_layer_event, False)
            self._watched, self._missing = None, None

    def _on_reopened(self) -> None:
        self._follow_viewer()
        self._on_layers_changed()

    def _image_layers(self, _widget=None):
        from napari.layers import Image, Labels

        return layer_choices(layer for layer in self._viewer.layers
                             if isinstance(layer, (Image, Labels)))

    def _on_layers_changed(self, _event=None) -> None:
        self._layer.reset_choices()
        self._refresh()

    def _refresh(self, _value=None) -> None:
        layer = self._layer.value
        if layer is not self._watched:
            connect_layer_events(self._watched, WATCHED_EVENTS, self._on_layer_event, False)
            connect_layer_events(layer, WATCHED_EVENTS, self._on_layer_event)
            self._watched = layer
            self._missing = None
        # the same layer (another one added, removed or renamed): its missing slices are
        # known; its own content events reset them (each rescan of a float CT held
        # napari's thread 0.1-0.2 s, inside every Segment and Detect result added)
        self._describe()

    def _describe(self) -> None:
        layer = self._watched
        if self._missing is None and layer is not None:
            self._missing = missing_slices(layer)
        self._text.value = describe_layer(layer, self._missing)

    def _on_layer_event(self, event=None) -> None:
        if event is None or getattr(event, "type", None) in CONTENT_EVENTS:
            self._missing = None
        try:
            self._describe()
        except RuntimeError:  # the viewer was closed: its Qt widgets are gone
            pass

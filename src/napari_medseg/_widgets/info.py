"""Dock widget: what the plugin knows about an image layer (geometry, gaps, source)."""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, TextEdit

from .._layers import voxel_spacing, world_matrix
from ..core.volume import SAFE_METADATA_KEYS
from ._model_widget import follow_layer_names


def describe_layer(layer) -> str:
    """Plain-text summary of an image layer: shape, spacing, window, gaps, warnings."""
    if layer is None:
        return "No image layer open."
    medseg = layer.metadata.get("medseg", {})
    ndim = len(layer.data.shape) - (1 if layer.rgb else 0)
    axes = {2: "y, x", 3: "z, y, x"}.get(ndim, f"{ndim} axes; the models take 2D or 3D")
    if layer.rgb:
        axes += ", colour"
    world = world_matrix(layer)
    spacing = voxel_spacing(layer)  # what the models use
    lines = [
        f"Layer: {layer.name}",
        f"Shape ({axes}): {tuple(layer.data.shape)}",
        f"Spacing (mm): {tuple(round(float(s), 4) for s in spacing)}",
        f"Origin (mm): {tuple(round(float(t), 2) for t in world[:ndim, ndim])}",
        f"Modality: {medseg.get('modality', 'unknown (not opened by napari-medseg)')}",
        f"Contrast window: {tuple(round(float(c), 1) for c in layer.contrast_limits)}",
    ]
    missing = sorted({int(z) for z in medseg.get("missing_slices", [])} | _empty_slices(layer))
    lines.append(f"Missing slices: {', '.join(map(str, missing)) if missing else 'none'}")
    if not isinstance(layer.data, np.ndarray):
        lines.append("(a lazy image: slices with no finite voxel show up when a model reads it)")
    source = medseg.get("source", {})
    for warning in source.get("warnings", []):
        lines.append(f"Warning: {warning}")
    for key in sorted(k for k in source if k in SAFE_METADATA_KEYS and k != "warnings"):
        lines.append(f"{key}: {source[key]}")
    if medseg.get("disclaimer"):
        lines.append(medseg["disclaimer"])
    return "\n".join(lines)


def _empty_slices(layer) -> set[int]:
    """Slices with no finite voxel, which the models treat as missing (in-memory 3D
    grayscale data only: reading a lazy store here would freeze the GUI)."""
    data = layer.data
    if layer.rgb or not isinstance(data, np.ndarray) or data.ndim != 3:
        return set()
    if not np.issubdtype(data.dtype, np.floating):
        return set()  # integers are always finite
    return {int(z) for z in np.flatnonzero(~np.isfinite(data).reshape(len(data), -1).any(1))}


#: the picked layer's events that change what this widget shows
WATCHED_EVENTS = ("data", "scale", "translate", "rotate", "shear", "affine", "contrast_limits")


class VolumeInfoWidget(Container):
    """Pick an image layer; read its spacing, window, missing slices and source."""

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        self._layer = ComboBox(label="Image", choices=self._image_layers)
        self._text = TextEdit(value="", enabled=True)
        self._text.native.setReadOnly(True)
        self._text.min_height = 260  # room for geometry, gaps and warnings without scrolling
        super().__init__(widgets=[self._layer, self._text])
        self._watched = None  # the layer whose events refresh the text
        self._layer.changed.connect(self._refresh)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        follow_layer_names(viewer, self._on_layers_changed)
        self._refresh()

    def _image_layers(self, _widget=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _on_layers_changed(self, _event=None) -> None:
        self._layer.reset_choices()
        self._refresh()

    def _refresh(self, _value=None) -> None:
        layer = self._layer.value
        if layer is not self._watched:
            self._follow(self._watched, False)
            self._follow(layer, True)
            self._watched = layer
        self._text.value = describe_layer(layer)

    def _follow(self, layer, connect: bool) -> None:
        for name in WATCHED_EVENTS if layer is not None else ():
            emitter = getattr(layer.events, name, None)
            if emitter is not None:
                (emitter.connect if connect else emitter.disconnect)(self._on_layer_event)

    def _on_layer_event(self, _event=None) -> None:
        try:
            self._text.value = describe_layer(self._watched)
        except RuntimeError:  # the viewer was closed: its Qt widgets are gone
            pass

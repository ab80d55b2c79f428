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
    missing = medseg.get("missing_slices", [])
    lines.append(f"Missing slices: {', '.join(map(str, missing)) if missing else 'none'}")
    source = medseg.get("source", {})
    for warning in source.get("warnings", []):
        lines.append(f"Warning: {warning}")
    for key in sorted(k for k in source if k in SAFE_METADATA_KEYS and k != "warnings"):
        lines.append(f"{key}: {source[key]}")
    if medseg.get("disclaimer"):
        lines.append(medseg["disclaimer"])
    return "\n".join(lines)


class VolumeInfoWidget(Container):
    """Pick an image layer; read its spacing, window, missing slices and source."""

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        self._layer = ComboBox(label="Image", choices=self._image_layers)
        self._text = TextEdit(value="", enabled=True)
        self._text.native.setReadOnly(True)
        self._text.min_height = 260  # room for geometry, gaps and warnings without scrolling
        super().__init__(widgets=[self._layer, self._text])
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
        self._text.value = describe_layer(self._layer.value)

"""The one place that turns core results into napari layer data.

Everything here returns napari ``LayerDataTuple``s ``(data, kwargs, layer_type)`` so it
works for readers, sample data and widgets alike, and is testable without a viewer.
Layers get the volume's spacing as ``scale`` and its origin as ``translate`` so every
result sits exactly on the image it came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .core.volume import Volume

DISCLAIMER = "Research use only: not for diagnostic use."

# Colours a radiologist can tell apart on a grey CT; index = label value.
STRUCTURE_COLORS = {
    "body": (0.55, 0.55, 0.45, 0.25),
    "liver": (0.80, 0.40, 0.20, 1.0),
    "spleen": (0.60, 0.30, 0.80, 1.0),
    "kidney_left": (0.95, 0.85, 0.20, 1.0),
    "kidney_right": (0.85, 0.95, 0.30, 1.0),
    "spine": (0.95, 0.95, 0.95, 1.0),
    "aorta": (0.90, 0.10, 0.10, 1.0),
    "lesion": (0.10, 0.95, 0.30, 1.0),
}


def _geometry(volume: Volume) -> dict[str, Any]:
    """Layer kwargs that put a layer on the volume's physical grid, axes named, in mm."""
    return {
        "scale": volume.spacing,
        "translate": volume.origin,
        "axis_labels": ("z", "y", "x"),
        "units": ("mm", "mm", "mm"),
    }


def _medseg_metadata(volume: Volume, **extra: Any) -> dict[str, Any]:
    return {
        "medseg": {
            "spacing_mm_zyx": volume.spacing,
            "origin_mm_zyx": volume.origin,
            "modality": volume.modality,
            "missing_slices": volume.missing_slices(),
            "source": dict(volume.metadata),
            "disclaimer": DISCLAIMER,
            **extra,
        }
    }


def volume_layer_data(volume: Volume, name: str) -> tuple:
    """An Image layer for a volume: physical scale, origin, CT/MR window, metadata."""
    kwargs = {
        "name": name,
        **_geometry(volume),
        "contrast_limits": volume.display_window(),
        "colormap": "gray",
        "metadata": _medseg_metadata(volume),
    }
    return (volume.array, kwargs, "image")


def labels_layer_data(
    labels: np.ndarray, volume: Volume, name: str, label_names: dict[int, str], **extra: Any
) -> tuple:
    """A Labels layer aligned with ``volume``, its structures named and coloured."""
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} does not match image {volume.shape}")
    colormap: dict[Any, Any] = {0: "transparent", None: (1.0, 0.0, 1.0, 1.0)}
    for value, label_name in label_names.items():
        if value and label_name in STRUCTURE_COLORS:
            colormap[value] = STRUCTURE_COLORS[label_name]
    values = sorted(label_names)
    kwargs = {
        "name": name,
        **_geometry(volume),
        "opacity": 0.5,
        "colormap": colormap,
        "features": {"index": values, "name": [label_names[v] for v in values]},
        "metadata": _medseg_metadata(volume, label_names=dict(label_names), **extra),
    }
    return (labels, kwargs, "labels")


def points_layer_data(
    centers_zyx: np.ndarray,
    diameters_mm: np.ndarray,
    volume: Volume,
    name: str,
    features: dict[str, Any] | None = None,
    **extra: Any,
) -> tuple:
    """A Points layer of lesions in voxel coordinates, sized by diameter, on the image grid."""
    centers = np.asarray(centers_zyx, dtype=float).reshape(-1, 3)
    diameters = np.asarray(diameters_mm, dtype=float).reshape(-1)
    in_plane_mm = float(np.mean(volume.spacing[1:]))
    feats = {"diameter_mm": diameters, **(features or {})}
    kwargs = {
        "name": name,
        **_geometry(volume),
        # marker size is in data pixels; the in-plane spacing turns mm into pixels
        "size": np.maximum(diameters / in_plane_mm, 3.0) if len(diameters) else 6.0,
        "border_color": "lime",
        "face_color": "transparent",
        "border_width": 0.12,
        "features": feats,
        "text": {"string": "{diameter_mm:.0f} mm", "color": "lime", "size": 9,
                 "translation": (0, -4, 0)} if len(diameters) else None,
        "metadata": _medseg_metadata(volume, **extra),
    }
    if kwargs["text"] is None:
        del kwargs["text"]
    return (centers, kwargs, "points")

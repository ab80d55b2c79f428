"""The one place that turns core results into napari layer data.

Everything here returns napari ``LayerDataTuple``s ``(data, kwargs, layer_type)`` so it
works for readers, sample data and widgets alike, and is testable without a viewer.
Layers get the volume's spacing as ``scale`` and its origin as ``translate`` so every
result sits exactly on the image it came from.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import numpy as np
import pandas as pd

from .core.volume import Volume, planes_still_missing

DISCLAIMER = "Research use only: not for diagnostic use."

# Colours a radiologist can tell apart on a grey CT, and from one another (at least
# _MIN_COLOUR_DISTANCE apart, none grey); index = label value. The spine was near-white
# (0.95 grey) over bone that is white in the window: 7 RGB levels between labels on and
# off; the two kidneys 0.17 apart, both yellow.
STRUCTURE_COLORS = {
    "body": (0.55, 0.55, 0.45, 0.25),
    "liver": (0.80, 0.40, 0.20, 1.0),
    "spleen": (0.60, 0.30, 0.80, 1.0),
    "kidney_left": (0.95, 0.85, 0.20, 1.0),
    "kidney_right": (0.15, 0.80, 0.85, 1.0),
    "spine": (0.25, 0.45, 1.00, 1.0),
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
            # the scan's shape beside its axes: metadata copied onto a layer of another
            # shape must not place that layer by this scan's axes
            "source": {**volume.metadata, "shape_zyx": list(volume.shape)},
            "disclaimer": DISCLAIMER,
            # a saved Grad-CAM / uncertainty / heatmap opened again is a map still: no
            # picker offers it as a scan to run a model on
            **({"explanation_map": True} if volume.metadata.get("explanation_map") else {}),
            **extra,
        }
    }


def _monochrome1(volume: Volume) -> bool:
    return str(volume.metadata.get("photometric") or "").strip().upper() == "MONOCHROME1"


def volume_layer_data(volume: Volume, name: str) -> tuple:
    """An Image layer for a volume: physical scale, origin, CT/MR window, metadata."""
    kwargs = {
        "name": name,
        **_geometry(volume),
        "contrast_limits": volume.display_window(),
        # MONOCHROME1 (radiographs, some CR/DX/MG): the lowest value is white; the values
        # stay as stored, only the display is reversed
        "colormap": "gray_r" if _monochrome1(volume) else "gray",
        # never a colour picture: napari takes a last axis of 3 or 4 for RGB(A), and a
        # 3- or 4-slice sagittal series (slices along x) failed to open
        "rgb": False,
        "metadata": _medseg_metadata(volume),
    }
    return (volume.array, kwargs, "image")


#: label values given napari's own distinct colours when no structure colour names them
_PALETTE_VALUES = np.arange(1, 256)


#: how near (RGB distance) another value's colour may come to a structure's: napari's
#: colour for 9, the value its "new label" button gives after the 8 structures, was the
#: left kidney's yellow (0.16 away), and 10 the liver's red: a new structure painted in
#: them read as those organs
_MIN_COLOUR_DISTANCE = 0.3


@functools.lru_cache(maxsize=1)
def _palette() -> dict[int, tuple]:
    """napari's default label colours (its Labels layer's cyclic colormap) for 1–255,
    those too near a structure's colour drawn from napari's colormap of another seed."""
    from napari.utils.colormaps import label_colormap

    named = np.array([c[:3] for n, c in STRUCTURE_COLORS.items() if n != "body"])
    seeds = [label_colormap(num_colors=49, seed=s).map(_PALETTE_VALUES)
             for s in (0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875)]
    colours = {}
    for i, value in enumerate(_PALETTE_VALUES):
        for rgba in seeds:  # napari's own first; the first far enough from every structure
            if np.linalg.norm(named - rgba[i, :3], axis=1).min() >= _MIN_COLOUR_DISTANCE:
                break
        colours[int(value)] = tuple(float(c) for c in rgba[i])
    return colours


def _colours_of(values: Any) -> dict[int, tuple]:
    """napari's default label colours for ``values``."""
    from napari.utils.colormaps import label_colormap

    values = np.asarray(values, dtype=np.int64)
    rgba = label_colormap(num_colors=49, seed=0.5).map(values)
    return {int(v): tuple(float(c) for c in color) for v, color in zip(values, rgba)}


#: the largest label value a colour is listed for: napari maps a direct colormap with
#: larger keys only with numba installed (it raised without; larger values keep the
#: default colour)
_MAX_COLOURED_VALUE = 2**16


def _values_above_palette(labels: np.ndarray) -> np.ndarray:
    """The label values in 256–65536 in ``labels`` (none for 8-bit data)."""
    if np.dtype(labels.dtype).itemsize == 1 or not labels.size:
        return np.zeros(0, dtype=np.int64)
    return np.unique(labels[(labels > _PALETTE_VALUES[-1]) & (labels <= _MAX_COLOURED_VALUE)])


def _labels_kwargs(name: str, label_names: dict[int, str],
                   more_values: Any = ()) -> dict[str, Any]:
    # values without a structure colour (another tool's label map, a structure the user
    # adds) get napari's own distinct colours: a single default drew them all in magenta
    # (``more_values``: those above 1–255, e.g. FreeSurfer's 1000s and 2000s)
    colormap: dict[Any, Any] = {**_palette(), **_colours_of(more_values), 0: "transparent",
                                None: (1.0, 0.0, 1.0, 1.0)}
    for value, label_name in label_names.items():
        if value and label_name in STRUCTURE_COLORS:
            colormap[value] = STRUCTURE_COLORS[label_name]
    values = sorted(label_names)
    return {
        "name": name,
        "opacity": 0.5,
        "colormap": colormap,
        "features": {"index": values, "name": [label_names[v] for v in values]},
    }


def labels_layer_data(
    labels: np.ndarray, volume: Volume, name: str, label_names: dict[int, str], **extra: Any
) -> tuple:
    """A Labels layer aligned with ``volume``, its structures named and coloured."""
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} does not match image {volume.shape}")
    metadata = _medseg_metadata(volume, label_names=dict(label_names), **extra)
    # a label map, not the scan it was drawn on: no modality, no intensity unit (Info
    # called the phantom's ground truth "CT" in "HU")
    medseg = metadata["medseg"]
    del medseg["modality"]
    medseg["source"] = {k: v for k, v in medseg["source"].items()
                        if k not in _INTENSITY_KEYS}
    more = set(_values_above_palette(labels).tolist()) | {
        v for v in label_names if 255 < v <= _MAX_COLOURED_VALUE}
    kwargs = {**_labels_kwargs(name, label_names, sorted(more)), **_geometry(volume),
              "metadata": metadata}
    return (labels, kwargs, "labels")


#: source metadata that describe an image's intensities, not its geometry
_INTENSITY_KEYS = ("rescale_type", "photometric", "kvp")


def marker_sizes(diameters_mm: Any, layer_scale: Any) -> np.ndarray:
    """Points ``size`` that draws each lesion at its diameter in mm (at least 3).

    napari draws a point ``size × |scale[-1]|`` wide in world units, whatever the other
    axes' scale or an affine say, so that is the one factor to divide by (a mean of the
    y and x spacing, or the spacing held in an affine, drew non-square or affine-placed
    images' lesions too large). Unknown (NaN) diameters are drawn at the one retraining
    gives such a point (a restored added point came back at the 3-pixel minimum)."""
    from .core.volume import DEFAULT_DIAMETER_MM

    step = abs(float(np.asarray(layer_scale, dtype=float)[-1])) or 1.0
    diameters = np.asarray(diameters_mm, dtype=float)
    return np.maximum(np.where(np.isnan(diameters), DEFAULT_DIAMETER_MM, diameters) / step, 3.0)


def _points_kwargs(
    name: str, diameters_mm: np.ndarray, layer_scale: Any, features: dict[str, Any], label: str
) -> dict[str, Any]:
    kwargs = {
        "name": name,
        "size": marker_sizes(diameters_mm, layer_scale) if len(diameters_mm) else 6.0,
        "border_color": "lime",
        "face_color": "transparent",
        "border_width": 0.12,
        "features": {"diameter_mm": diameters_mm, **features},
    }
    # a layer with a text for added points has it when empty too (a point the user adds
    # to an empty Detect result went unlabelled); a size label with no sizes has no text
    if len(diameters_mm) or "label" in features:
        kwargs["text"] = {"string": label, "color": "yellow", "size": 10, "anchor": "upper_left"}
    return kwargs


def points_layer_data(
    centers_zyx: np.ndarray,
    diameters_mm: np.ndarray,
    volume: Volume,
    name: str,
    features: dict[str, Any] | None = None,
    colour: str | None = None,
    **extra: Any,
) -> tuple:
    """A Points layer of lesions in voxel coordinates, sized by diameter, on the image grid.
    A point the user adds is none of these lesions: no diameter, "added", numbers NaN and
    text empty (napari would copy the last lesion's features into it, and save them).
    ``colour``: ring and text (ground truth is drawn apart from detections)."""
    centers = np.asarray(centers_zyx, dtype=float).reshape(-1, 3)
    diameters = np.asarray(diameters_mm, dtype=float).reshape(-1)
    features = dict(features or {})
    defaults = {k: "" if np.asarray(v).dtype.kind in "OUS" else np.nan
                for k, v in features.items()}
    # object dtype: an empty list would make a float column that cannot take "added"
    features["label"] = np.asarray([f"{d:.0f} mm" for d in diameters], dtype=object)
    kwargs = _points_kwargs(name, diameters, volume.spacing, features, "{label}")
    if colour is not None:
        kwargs["border_color"] = colour
        if "text" in kwargs:
            kwargs["text"] = {**kwargs["text"], "color": colour}
    kwargs = {
        **kwargs,
        "feature_defaults": {**defaults, "diameter_mm": np.nan, "label": ADDED_LABEL},
        **_geometry(volume),
        "metadata": _medseg_metadata(volume, **extra),
    }
    return (centers, kwargs, "points")


# -- model results on a user's image layer ------------------------------------------------
def _like_layer(layer: Any) -> dict[str, Any]:
    """Geometry kwargs that put a result exactly on ``layer``: all of napari's
    data-to-world parts (scale, translate, rotate, shear and affine are separate)."""
    return {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": np.array(layer.rotate, dtype=float),
        "shear": np.array(layer.shear, dtype=float),
        "affine": layer.affine.affine_matrix,
        "axis_labels": tuple(layer.axis_labels),
        "units": tuple(str(u) for u in layer.units),
    }


def _result_metadata(provenance: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"medseg": {**provenance, **extra, "disclaimer": DISCLAIMER}}


def is_explanation_map(layer: Any) -> bool:
    """Whether ``layer`` is a Grad-CAM, uncertainty or heatmap layer this plugin made (a
    0-1 map, not a scan: no model runs on one)."""
    meta = getattr(layer, "metadata", None) or {}
    medseg = meta.get("medseg") if isinstance(meta, dict) else None
    return isinstance(medseg, dict) and medseg.get("explanation_map") is True


def scan_axes(layer: Any, shape: Any = None) -> dict[str, Any]:
    """The scan's axes a reader recorded on ``layer`` (``{"axes_lps": …}``, with a NIfTI
    file's ``stored_orientation``, or empty): a labels layer made on it carries them, so
    that saving it writes where the scan lies (a coronal or oblique scan's labels were
    saved as axial), in the scan file's own voxel order."""
    source = (getattr(layer, "metadata", None) or {}).get("medseg", {}).get("source", {})
    axes = source.get("axes_lps") if isinstance(source, dict) else None
    if axes is None:
        return {}
    # ``shape``: the data the axes are now recorded for, when a result layer has another
    # shape than ``layer`` (a Generate result's extra slices)
    shape = source.get("shape_zyx") if shape is None else [int(n) for n in shape][-3:]
    # a NIfTI scan's own voxel order: a result saved from the layer is stored in it
    stored = source.get("stored_orientation")
    return {"axes_lps": axes, **({"shape_zyx": shape} if shape is not None else {}),
            **({"stored_orientation": stored} if isinstance(stored, str) else {}),
            **({"stored_ndim": 2} if source.get("stored_ndim") == 2 else {})}


def instance_numbers(image_layer: Any) -> list | None:
    """The InstanceNumber per slice the DICOM reader recorded on ``image_layer``, while
    the layer still has one slice per number (not after a crop or a new array)."""
    from .core.volume import instance_numbers_of

    if getattr(image_layer, "ndim", 0) != 3:
        return None
    source = ((getattr(image_layer, "metadata", None) or {}).get("medseg") or {}).get("source")
    return instance_numbers_of(source, image_layer.data.shape[0])


def image_number_note(numbers: list | None, z: Any) -> str:
    """For a DICOM series, the image a PACS shows slice ``z`` as, for a list entry:
    " · image 49" (a series numbered from the head counts the other way); "" otherwise.
    Last in an entry: a narrow dock cuts an entry's end."""
    number = (numbers[z] if z is not None and numbers is not None and 0 <= z < len(numbers)
              else None)
    return "" if number is None else f" · image {number}"


def axes_for(source: Any, shape: tuple) -> Any:
    """``source["axes_lps"]`` (a layer's medseg source metadata) if it was recorded for
    data of ``shape`` (z, y, x), else None: metadata copied from another scan, of another
    shape, would place the data in that scan's orientation."""
    if not isinstance(source, dict) or source.get("axes_lps") is None:
        return None
    recorded = source.get("shape_zyx")
    if recorded is not None and tuple(int(n) for n in recorded) != tuple(int(n) for n in shape):
        return None
    return source["axes_lps"]


def segmentation_layer_data(result: Any, image_layer: Any, provenance: dict[str, Any]) -> tuple:
    """A new Labels layer for a SegmentationResult, on the image layer's grid."""
    labels = result.labels if image_layer.ndim == 3 else result.labels[0]
    names = dict(enumerate(result.class_names))
    kwargs = {
        **_labels_kwargs(f"segmentation · {image_layer.name} ({provenance['model']})", names),
        **_like_layer(image_layer),
        "metadata": _result_metadata(
            provenance, label_names=names,
            unlabelled_slices=[int(z) for z in np.flatnonzero(~result.labelled)],
            source=scan_axes(image_layer),
        ),
    }
    return (labels, kwargs, "labels")


def detection_labels(scores: np.ndarray, diameters: np.ndarray) -> np.ndarray:
    """The text shown by each point of a detection layer: its score and size, or what
    :func:`mark_added_points` calls a point the user placed (no score)."""
    # object dtype: with no detections an empty list would make a float column, which
    # then cannot take the "added" default
    return np.asarray([f"{s:.2f} · {d:.0f} mm" if s == s else
                       (ADDED_LABEL if d != d else MOVED_LABEL)
                       for s, d in zip(scores, diameters)], dtype=object)


def detection_layer_data(
    result: Any, image_layer: Any, provenance: dict[str, Any], threshold: float
) -> tuple:
    """A new Points layer for a DetectionResult: score and diameter as features, points
    below ``threshold`` hidden (not deleted) so a slider can bring them back."""
    from .core.models.detector import at_or_above

    rows = np.asarray(result.as_rows(), dtype=float).reshape(-1, 5)
    centers, scores, diameters = rows[:, :3], rows[:, 3], rows[:, 4]
    if image_layer.ndim == 2:
        centers = centers[:, 1:]
    labels = detection_labels(scores, diameters)
    kwargs = {
        **_points_kwargs(
            f"lesions · {image_layer.name} ({provenance['model']})", diameters,
            scale_mm(image_layer),
            {"score": scores, "label": labels}, "{label}",
        ),
        "feature_defaults": dict(ADDED_POINT_FEATURES),
        **_like_layer(image_layer),
        "shown": at_or_above(scores, threshold),
        "metadata": _result_metadata(provenance, threshold=threshold),
    }
    return (centers, kwargs, "points")


#: who is told when a points layer's shown rows change through :func:`set_shown` (napari
#: has no event for it): layer → weak methods called with the rows whose state changed
_SHOWN_WATCHERS: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()


def watch_shown(layer: Any, method: Any) -> None:
    """Call ``method(rows)`` when :func:`set_shown` shows or hides rows of ``layer``."""
    watchers = _SHOWN_WATCHERS.setdefault(layer, [])
    watchers[:] = [w for w in watchers if w() is not None and w() != method]
    watchers.append(weakref.WeakMethod(method))


def unwatch_shown(layer: Any, method: Any) -> None:
    watchers = _SHOWN_WATCHERS.get(layer)
    if watchers is not None:
        watchers[:] = [w for w in watchers if w() is not None and w() != method]


def set_shown(layer: Any, shown: np.ndarray) -> None:
    """``layer.shown = shown``, telling the watchers which rows changed (a score
    threshold moved after a slice was reviewed changed what a round trains on there)."""
    before = np.asarray(layer.shown, dtype=bool).copy()
    layer.shown = shown
    after = np.asarray(layer.shown, dtype=bool)
    changed = np.flatnonzero(before != after) if before.shape == after.shape else np.arange(len(after))
    if changed.size:
        for watcher in list(_SHOWN_WATCHERS.get(layer, ())):
            method = watcher()
            if method is not None:
                method(changed)


def hide_unshown(layer: Any) -> None:
    """Draw the points ``layer.shown`` hides as nothing, in every view: napari honours
    ``shown`` only while an axis of the layer is off screen, so in the 3D view, and on a
    2D layer, it drew every weak detection with its text while the Detect widget counted
    them hidden. Hidden rows get a transparent ring and no text; a row shown again gets
    an opaque ring and its text (score and size, "added", "moved") back. Rows shown all
    along keep what the user set (a ring's colour, a label edited in the features
    table). ``shown`` itself stays what slicing, the count and the writer go by; hidden
    rows are also kept out of a selection (see :func:`watch_detection_edits`)."""
    n = len(layer.data)
    shown = np.asarray(layer.shown, dtype=bool)
    if not n or len(shown) != n:
        return
    colors = np.array(layer.border_color, dtype=float, copy=True)
    if colors.shape == (n, 4):
        alpha = np.where(shown, np.where(colors[:, 3] == 0, 1.0, colors[:, 3]), 0.0)
        if not np.array_equal(colors[:, 3], alpha):
            colors[:, 3] = alpha
            layer.border_color = colors
    features = layer.features
    if {"score", "diameter_mm", "label"} <= set(features.columns):
        labels = np.asarray(features["label"], dtype=object).copy()
        blank = np.array([not isinstance(t, str) or t == "" for t in labels], dtype=bool)
        back = shown & blank  # shown again: its text, as the layer first had it
        if back.any():
            labels[back] = detection_labels(
                np.asarray(features["score"], dtype=float)[back],
                np.asarray(features["diameter_mm"], dtype=float)[back])
        labels[~shown] = ""
        if list(features["label"]) != list(labels):
            features = features.copy()
            features["label"] = labels
            layer.features = features


def _unselect_hidden(layer: Any) -> None:
    """Hidden rows are drawn as nothing but napari still selects them (select all, a
    drag box in the 3D view), and Delete then removed weak detections the user never
    saw (a deletion tells the detector's retraining "no lesion here")."""
    selected = set(layer.selected_data)
    shown = np.asarray(layer.shown, dtype=bool)
    if selected and len(shown) == len(layer.data):
        visible = {i for i in selected if 0 <= i < len(shown) and shown[i]}
        if visible != selected:
            layer.selected_data = visible


ADDED_LABEL = "added"
MOVED_LABEL = "moved"
# a point the user adds to a detection layer has no score (not a detection's, as napari
# would copy) and no diameter (retraining takes 10 mm)
ADDED_POINT_FEATURES = {"diameter_mm": np.nan, "score": np.nan, "label": ADDED_LABEL}


def row_keys(points: Any) -> list[tuple]:
    """One hashable key per point (row), equal for equal coordinates, NaN included (two
    NaN floats are different keys as they are)."""
    return [tuple("nan" if v != v else float(v) for v in row) for row in np.asarray(points, float)]


def unmatched_rows(reference: Any, points: Any) -> list[int]:
    """Indices of the rows of ``points`` with no equal row left in ``reference``, each
    reference row matching once (a multiset: of two identical points, one deleted is one
    change; NaN equals NaN)."""
    return [int(r) for r in np.flatnonzero(_matched_rows(reference, points) < 0)]


def _matched_rows(reference: Any, points: Any) -> np.ndarray:
    """For each row of ``points``, the index of an equal row of ``reference`` (each used
    once, in order; NaN equals NaN), or -1."""
    free: dict[Any, list[int]] = {}
    for i, key in enumerate(row_keys(reference)):
        free.setdefault(key, []).append(i)
    out = np.full(len(points), -1, dtype=int)
    for r, key in enumerate(row_keys(points)):
        if free.get(key):
            out[r] = free[key].pop(0)
    return out


#: layer -> (rows, features, shown) before a "changing" event
_BEFORE_CHANGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: layer -> its number of rows at an "adding" event: napari < 0.6's Points.add names only
#: the last new row (data_indices=(-1,)) however many it appended
_ROWS_BEFORE_ADD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _added_rows(layer: Any, event: Any, n: int) -> list[int]:
    """The rows an "added" event of ``layer`` (``n`` rows now) appended: those it names,
    and every row past the count at its "adding" event."""
    rows = {int(i) % n for i in getattr(event, "data_indices", ()) if n and -n <= int(i) < n}
    rows |= set(range(min(_ROWS_BEFORE_ADD.get(layer, n), n), n))  # appended at the end
    return sorted(rows)


_MARKED_LAYERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_ROWS_WHEN_WATCHED: "weakref.WeakKeyDictionary[Any, np.ndarray]" = weakref.WeakKeyDictionary()


def watch_detection_edits(layer: Any) -> None:
    """Connect :func:`mark_added_points` to a detection layer's data events, once per
    layer: on the layers Detect and Retrain make, and on one the Retrain widget is given
    that has a score or a diameter column but was made elsewhere (a detection CSV opened
    again, Retrain's empty or restored points layer), where an added point took the
    diameter and score of the point selected last."""
    if layer in _MARKED_LAYERS:
        return
    _MARKED_LAYERS.add(layer)
    # its points as they were: a Retrain widget opened after the user corrected them
    # lists the slices of what was added, moved, resized or deleted since
    _ROWS_WHEN_WATCHED[layer] = point_rows(layer)
    layer.events.data.connect(lambda event, layer=layer: mark_added_points(layer, event))
    layer.events.size.connect(lambda _event, layer=layer: mark_resized_points(layer))
    layer.events.highlight.connect(lambda event, layer=layer: _unselect_hidden(layer))


def point_rows(layer: Any) -> np.ndarray:
    """Each point's coordinates and ``diameter_mm`` (NaN without one), a row per point:
    what a Retrain widget compares to tell which points were edited meanwhile (not the
    shown flags: Detect's threshold slider hides and shows weak detections, which edits
    nothing)."""
    coords = np.array(layer.data, dtype=float, copy=True).reshape(-1, layer.ndim)
    try:
        diameters = np.asarray(layer.features["diameter_mm"], dtype=float).reshape(-1)
    except (KeyError, TypeError, ValueError):
        diameters = np.full(len(coords), np.nan)
    if len(diameters) != len(coords):
        diameters = np.full(len(coords), np.nan)
    return np.column_stack([coords, diameters])


def rows_when_watched(layer: Any) -> np.ndarray | None:
    """A detection layer's :func:`point_rows` when they were last accounted for: when
    :func:`watch_detection_edits` first saw it (Detect's layers: as detected), or when a
    Retrain widget let it go (its lists went with it); None if never."""
    return _ROWS_WHEN_WATCHED.get(layer)


def account_rows(layer: Any) -> None:
    """The layer's points as they are now are accounted for (a Retrain widget let it go
    with its lists): a later widget lists only the edits made after (a slice the user
    removed from the list came back in the next widget)."""
    _ROWS_WHEN_WATCHED[layer] = point_rows(layer)


def watch_added_lesions(layer: Any) -> None:
    """A ground-truth lesions layer (the phantom's): a point the user adds gets the
    "added" label and no diameter, organ or contrast. ``feature_defaults`` alone do not
    hold: napari sets them to the features of the last point selected, and the next point
    added posed as that lesion (and was saved so)."""
    def on_data(event: Any) -> None:
        if str(getattr(event, "action", "")) == "adding":
            _ROWS_BEFORE_ADD[layer] = len(layer.data)
        if str(getattr(event, "action", "")) != "added" or "label" not in layer.features:
            return
        n = len(layer.data)
        rows = _added_rows(layer, event, n)
        if not rows:
            return
        features = layer.features
        for name in features.columns:
            if name == "label":
                features[name] = features[name].astype(object)
                features.loc[rows, name] = ADDED_LABEL
            elif features[name].dtype.kind in "fiu":
                features[name] = features[name].astype(float)
                features.loc[rows, name] = np.nan
            else:
                features[name] = features[name].astype(object)
                features.loc[rows, name] = ""
        layer.features = features
        if "diameter_mm" in features:  # not the ring of the lesion selected before
            _draw_at_training_size(layer, rows)

    layer.events.data.connect(on_data)


def mark_resized_points(layer: Any) -> list[int]:
    """After the user set the size of the selected points (napari's point size slider,
    the one way it emits ``events.size``): each one's ``diameter_mm`` is the ring it now
    draws, and it is the user's (no score, so no threshold hides it; its text gives the
    size). Retraining read the old diameter and the text kept it. Returns the rows."""
    n = len(layer.data)
    rows = sorted(int(i) for i in layer.selected_data if 0 <= int(i) < n)
    if not rows or "diameter_mm" not in layer.features.columns:
        return []
    step = abs(float(scale_mm(layer)[-1])) or 1.0
    diameters = np.asarray(layer.size, dtype=float)[rows] * step
    features = layer.features.copy()
    features["diameter_mm"] = features["diameter_mm"].astype(float)
    features.loc[rows, "diameter_mm"] = diameters
    if "score" in features:
        features["score"] = features["score"].astype(float)
        features.loc[rows, "score"] = np.nan
    if "label" in features:
        features["label"] = features["label"].astype(object)
        features.loc[rows, "label"] = [f"{d:.0f} mm" for d in diameters]
    layer.features = features
    return rows


def mark_added_points(layer: Any, event: Any) -> bool:
    """After napari adds or moves points of a detection layer (or of a lesion layer with
    diameters, such as Retrain's own): they are the user's now.
    An added point gets no score, no diameter and the "added" label: napari fills new rows
    from ``feature_defaults``, which it sets to the features of the last point selected,
    so without this it would pose as that detection (and hide below the score threshold).
    A moved detection keeps its diameter and loses its score ("moved"): the user placed
    it, so no threshold may hide it from the view or from retraining. Returns whether any
    point was marked."""
    action = str(getattr(event, "action", ""))
    if action == "adding":
        _ROWS_BEFORE_ADD[layer] = len(layer.data)
    if action == "changing":  # the rows before a change: a script setting the whole data
        _BEFORE_CHANGE[layer] = (np.array(layer.data, dtype=float, copy=True),
                                 layer.features.copy(),
                                 np.asarray(layer.shown, dtype=bool).copy())
        return False
    before = _BEFORE_CHANGE.pop(layer, None) if action == "changed" else None
    if action not in ("added", "changed") or not (
            {"score", "diameter_mm"} & set(layer.features.columns)):
        return False
    n = len(layer.data)
    rows = _added_rows(layer, event, n) if action == "added" else sorted(
        {int(i) % n for i in getattr(event, "data_indices", ()) if n and -n <= int(i) < n})
    added = action == "added"
    moved: list[int] = []
    if before is not None:
        # napari names every row when a script sets the whole data, and keeps features
        # and shown flags by row position: a row deleted shifted a weak detection under
        # the deleted one's score and flag. Each point keeps its own (rows matched by
        # coordinates); only the rows that moved or are new are the user's (marking all
        # unhid every weak detection, then trained on as a lesion)
        old, old_features, old_shown = before
        now = np.asarray(layer.data, dtype=float).reshape(n, -1)
        source = _matched_rows(old.reshape(len(old), -1), now)
        unmatched_old = set(range(len(old))) - {int(i) for i in source if i >= 0}
        # a row whose old point is gone from its place: moved (it keeps its diameter)
        moved = [r for r in range(n) if source[r] < 0 and r in unmatched_old]
        rows = [r for r in range(n) if source[r] < 0]
        kept = [int(source[r]) if source[r] >= 0 else (r if r in moved else -1)
                for r in range(n)]
        if any(k >= 0 for k in kept) and len(old_features) == len(old):
            features = old_features.iloc[[max(k, 0) for k in kept]].reset_index(drop=True)
            shown = np.array([old_shown[k] if k >= 0 else True for k in kept], dtype=bool)
            layer.features = features
            layer.shown = shown
        added = False
    if not rows:
        return False
    features = layer.features
    if before is not None:  # each row added or moved, as found above
        fresh = [r for r in rows if r not in moved]
        if "score" in features:
            features.loc[rows, "score"] = np.nan
        if "diameter_mm" in features:
            features.loc[fresh, "diameter_mm"] = np.nan
        if "label" in features:
            if isinstance(features["label"].dtype, pd.CategoricalDtype):
                features["label"] = features["label"].astype(object)
            features.loc[fresh, "label"] = ADDED_LABEL
            features.loc[moved, "label"] = MOVED_LABEL
        layer.features = features
        if "diameter_mm" in features:
            _draw_at_training_size(layer, fresh)
        shown = np.asarray(layer.shown, dtype=bool).copy()
        shown[rows] = True
        layer.shown = shown
        hide_unshown(layer)  # a hidden detection moved is the user's: drawn again
        return True
    if "score" in features:
        features.loc[rows, "score"] = np.nan
    if "diameter_mm" in features and added:
        features.loc[rows, "diameter_mm"] = np.nan
    if "label" in features:
        if isinstance(features["label"].dtype, pd.CategoricalDtype):
            features["label"] = features["label"].astype(object)
        features.loc[rows, "label"] = ADDED_LABEL if added else MOVED_LABEL
    layer.features = features
    if "diameter_mm" in features and added:
        _draw_at_training_size(layer, rows)
    shown = np.asarray(layer.shown, dtype=bool).copy()
    shown[rows] = True
    layer.shown = shown
    hide_unshown(layer)
    return True


def _draw_at_training_size(layer: Any, rows: list[int]) -> None:
    """Added points (no diameter) drawn at the diameter retraining gives them: napari
    drew them at the size of the point selected last (a 21 mm ring for a point trained
    as 10 mm)."""
    from .core.volume import DEFAULT_DIAMETER_MM

    if not rows:
        return
    sizes = np.array(layer.size, dtype=float, copy=True)
    # in mm: on a layer in cm, its scale drew a point 100 mm wide
    sizes[rows] = marker_sizes([DEFAULT_DIAMETER_MM], scale_mm(layer))[0]
    layer.size = sizes


def world_matrix(layer: Any) -> np.ndarray:
    """``layer``'s whole data-to-world transform as one (ndim + 1)² matrix: napari keeps
    scale, translate, rotate, shear and affine apart, and a check on only some of them
    misses a layer moved by the others."""
    return world_matrix_of(layer.scale, layer.translate, layer.rotate, layer.shear,
                           layer.affine.affine_matrix)


def world_matrix_of(scale: Any, translate: Any, rotate: Any = None, shear: Any = None,
                    affine: Any = None) -> np.ndarray:
    """:func:`world_matrix` from the parts themselves (as a writer gets them)."""
    from napari.utils.transforms import Affine

    ndim = len(scale)
    parts = Affine(scale=scale, translate=translate,
                   rotate=np.eye(ndim) if rotate is None else rotate,
                   shear=np.zeros(ndim * (ndim - 1) // 2) if shear is None else shear)
    outer = Affine(affine_matrix=np.eye(ndim + 1) if affine is None else np.asarray(affine))
    return np.asarray(outer.compose(parts).affine_matrix, dtype=float)


def length_mm(unit: Any) -> float | None:
    """Millimetres in one ``unit`` (a pint unit or its name); None when it is no length
    (napari's "pixel", an unknown name)."""
    try:
        import pint

        quantity = pint.get_application_registry().Quantity(1.0, str(unit))
        if quantity.dimensionality == {"[length]": 1}:
            return float(quantity.to("mm").magnitude)
    except Exception:  # an unknown or dimensionless unit ("pixel")
        pass
    return None


def mm_per_unit(units: Any, ndim: int) -> np.ndarray:
    """Millimetres per world unit on each of the last ``ndim`` axes; 1 for pixels, no
    unit or one that is no length (the numbers are then taken as mm)."""
    factors = np.ones(ndim)
    if units is None:
        return factors
    units = ([units] * ndim if isinstance(units, str) else list(units))[-ndim:]
    offset = ndim - len(units)
    for i, unit in enumerate(units):
        mm = length_mm(unit)
        if mm is not None:
            factors[offset + i] = mm
    return factors


def scale_mm(layer: Any) -> np.ndarray:
    """``layer.scale`` in mm per voxel (its units converted): what a diameter in mm is
    divided by to give napari's point size on it."""
    scale = np.asarray(layer.scale, dtype=float)
    return scale * mm_per_unit(getattr(layer, "units", None), len(scale))


def world_matrix_mm(layer: Any) -> np.ndarray:
    """:func:`world_matrix` in mm: a layer whose units are cm or µm is converted (napari
    keeps the numbers in the layer's own units; the models and files count in mm)."""
    world = world_matrix(layer)
    ndim = world.shape[0] - 1
    world[:ndim, :] *= mm_per_unit(getattr(layer, "units", None), ndim)[:, None]
    return world


def voxel_spacing(layer: Any) -> tuple[float, ...]:
    """Each data axis's step in the world (mm), from the layer's whole transform and
    units: what the models take as the voxel size (a reader may put the spacing into
    ``affine``)."""
    world = world_matrix_mm(layer)
    ndim = world.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(world[:ndim, :ndim], axis=0))


def voxel_size_mm(layer: Any) -> float:
    """A voxel's true volume (mm³; a 2D layer's pixel area, mm²): |det| of the layer's
    transform, which a shear makes smaller than the product of :func:`voxel_spacing`."""
    world = world_matrix_mm(layer)
    ndim = world.shape[0] - 1
    return float(abs(np.linalg.det(world[:ndim, :ndim])))


def pixel_area_mm2(layer: Any) -> float:
    """The area (mm²) of a pixel in the layer's y-x plane: the parallelogram its y and x
    axes span in the world (a shear makes it smaller than the product of the spacings);
    a 3D layer's slice thickness is no part of it."""
    world = world_matrix_mm(layer)
    ndim = world.shape[0] - 1
    if ndim == 2:
        return voxel_size_mm(layer)
    y_axis, x_axis = world[:ndim, ndim - 2], world[:ndim, ndim - 1]
    return float(np.linalg.norm(np.cross(y_axis, x_axis)))


def check_image_layer(layer: Any) -> None:
    """MedsegInputError unless ``layer`` is a single-scale grayscale 2D or 3D Image layer
    (checks only what is known without reading the data)."""
    from napari.layers import Image

    from .core.errors import MedsegInputError

    if layer is None:
        raise MedsegInputError("no image layer selected; open or pick a grayscale image first")
    if not isinstance(layer, Image):
        raise MedsegInputError(
            f"'{layer.name}' is a {type(layer).__name__} layer; pick an Image layer"
        )
    if layer.rgb:
        raise MedsegInputError(f"'{layer.name}' is an RGB image; convert it to grayscale first")
    if layer.multiscale:
        raise MedsegInputError(f"'{layer.name}' is multiscale; open it as a single-scale image")
    shape, dtype = tuple(layer.data.shape), np.dtype(layer.data.dtype)
    if len(shape) not in (2, 3):
        # a 4D file of one time point (a NIfTI with t = 1) is a volume: the way on is said
        extra = len(shape) - 3
        ones = extra > 0 and all(n == 1 for n in shape[:extra])
        index = ", ".join(["0"] * extra)
        hint = ((": its first axis has length 1" if extra == 1 else
                 f": its first {extra} axes have length 1") +
                f"; in napari's console, viewer.add_image(layer.data[{index}], "
                f"scale=layer.scale[{extra}:], translate=layer.translate[{extra}:]) adds it "
                "as a volume to pick" if ones else "")
        raise MedsegInputError(
            f"'{layer.name}' has {len(shape)} dimensions {shape}; expected a 2D slice or a "
            f"3D (z, y, x) volume{hint}"
        )
    if 0 in shape:
        raise MedsegInputError(f"'{layer.name}' is empty")
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise MedsegInputError(f"'{layer.name}' holds {dtype} values, not real numbers")


def volume_from_layer(layer: Any, defer: bool = False) -> Any:
    """A private copy of an Image layer as a Volume, or MedsegInputError saying why not.

    The model runs on a copy, so a layer whose data is replaced or removed mid-run
    cannot race it. With ``defer``, only what is known without reading the voxels is
    checked now (:func:`check_image_layer`) and a function is returned that copies the
    data and makes the Volume (call it in the worker, :func:`read_deferred`): the copy
    held napari's thread 0.12-1.1 s on a 400 × 512² float32 CT, the checks that read
    every voxel (finite values, missing slices, the modality guess) 0.2-0.5 s on a
    200 × 512² one, and a lazy array's (dask, zarr) store may be slow. The worker holds
    the layer's array itself until it has copied it: napari never writes into an Image
    layer's data (only a script could, in those moments). Without ``defer`` the copy is
    taken here. The voxel spacing is the length of each data axis's step in the world,
    from the layer's whole transform (a reader may put it in ``affine`` rather than
    ``scale``).
    """
    check_image_layer(layer)
    world = world_matrix_mm(layer)
    ndim = world.shape[0] - 1
    spacing = voxel_spacing(layer)
    origin = tuple(float(v) for v in world[:ndim, ndim])
    if ndim == 2:
        spacing, origin = (1.0, *spacing), (0.0, *origin)
    read = functools.partial(_volume_from_data, layer.data, layer.name, spacing, origin,
                             dict(layer.metadata.get("medseg", {})))
    return read if defer else read()


def read_deferred(volume: Any):
    """Generator returning the Volume; a deferred one (``volume_from_layer(...,
    defer=True)``) is made here, in the worker that runs it."""
    if callable(volume):
        from .core.progress import Progress

        yield Progress(0, 0, "reading the image")
        volume = volume()
    return volume


def volume_outline(layer: Any) -> Any:
    """What the slice checks need of a lazy image before it is read: its (z, y, x) shape
    and the missing slices its reader recorded (slices with no finite voxel are found
    when the data is read, and the core checks again then)."""
    from types import SimpleNamespace

    shape = tuple(layer.data.shape)
    shape = (1, *shape) if len(shape) == 2 else shape
    missing = np.zeros(shape[0], dtype=bool)
    medseg = layer.metadata.get("medseg", {})
    recorded = [z for z in medseg.get("missing_slices", []) if 0 <= z < shape[0]]
    if len(layer.data.shape) != 3 or (isinstance(layer.data, np.ndarray) and recorded and not
                                      _recorded_gaps_fit(layer.data, recorded, medseg)):
        # as the Volume takes them: a record of a 2D image's, or a stale one (the data
        # flipped or cropped), names no missing slice
        recorded = []
    missing[recorded] = True
    return SimpleNamespace(shape=shape, missing=missing)


def _recorded_gaps_fit(data: np.ndarray, recorded: Any, medseg: dict) -> bool:
    """Whether the missing slices recorded with a layer still describe its data (a volume
    may mark slices missing whatever they hold, e.g. zero-filled gaps). Not after the data
    was flipped or cropped: a slice with no finite voxel that the list leaves out, or a
    shape other than the recorded one, says the list names measured slices now (they
    were left unlabelled and said "not acquired")."""
    try:
        indices = [int(z) for z in recorded]
    except (TypeError, ValueError):
        return False
    if not indices or min(indices) < 0 or max(indices) >= data.shape[0]:
        return False
    source = medseg.get("source") if isinstance(medseg.get("source"), dict) else {}
    shape = source.get("shape_zyx")
    if shape is not None and list(shape) != list(data.shape):
        return False
    empty = np.flatnonzero(~np.isfinite(data).reshape(data.shape[0], -1).any(axis=1))
    return set(empty.tolist()) <= set(indices)


def _generated_slice_count(data: np.ndarray, medseg: dict, source: dict) -> int:
    """How many generated slices a layer holds, by its record: the Generate widget's
    (``generated_slices``) or the reader's of a generated NIfTI file
    (``source.synthetic_slices``); 0 once the data no longer has the recorded shape
    (e.g. the acquired slices kept, ``data[::2]``)."""
    generated = medseg.get("generated_slices")
    if medseg.get("synthetic") is True and isinstance(generated, list):
        count = len(generated)
    else:
        count = source.get("synthetic_slices")
        count = count if isinstance(count, int) and not isinstance(count, bool) else 0
    shape = source.get("shape_zyx")
    if count <= 0 or data.ndim != 3 or (shape is not None and list(shape) != list(data.shape)):
        return 0
    return count


def generated_planes(layer: Any) -> dict | None:
    """``{"axis", "indices"}`` of the slices a layer's record says napari-medseg generated
    (the Generate widget's, or the reader's of a generated file), while its data has the
    recorded shape; None when it holds none."""
    medseg = (getattr(layer, "metadata", None) or {}).get("medseg")
    medseg = medseg if isinstance(medseg, dict) else {}
    source = medseg.get("source") if isinstance(medseg.get("source"), dict) else {}
    shape = tuple(getattr(layer.data, "shape", ()))
    if len(shape) != 3 or _generated_slice_count(layer.data, medseg, source) <= 0:
        return None
    generated = medseg.get("generated_slices")
    if medseg.get("synthetic") is True and isinstance(generated, list):
        planes = {"axis": medseg.get("slice_axis") or "z", "indices": generated}
    else:
        planes = source.get("synthetic_planes")
    try:
        return {"axis": str(planes["axis"]), "indices": [int(i) for i in planes["indices"]]}
    except (TypeError, KeyError, ValueError):
        return None


def _volume_from_data(source: Any, name: str, scale: tuple, translate: tuple,
                      medseg: dict) -> Volume:
    """The Volume of a copy of ``source`` (a lazy array read here)."""
    from .core.errors import MedsegInputError

    data = np.asarray(source)
    # a private copy (the user may paint the layer while a model reads it): the Volume's
    # float32 conversion makes one of any other dtype or order, and a copy first as well
    # took 3 times a float32 volume's memory for a float64 layer
    if (data.dtype == np.float32 and data.dtype.isnative and data.flags.c_contiguous
            and np.may_share_memory(data, source)):
        data = data.copy()
    if data.dtype.kind == "f" and not any(np.isfinite(plane).any()
                                          for plane in data.reshape(-1, *data.shape[-2:])):
        raise MedsegInputError(f"'{name}' has no finite values (all NaN)")
    mask = np.zeros(1 if data.ndim == 2 else data.shape[0], dtype=bool)
    recorded = medseg.get("missing_slices", [])
    if data.ndim == 3 and _recorded_gaps_fit(data, recorded, medseg):
        mask[list(recorded)] = True
    modality = medseg.get("modality")
    if modality is None:
        from .core.volume import guess_modality

        modality = guess_modality(data)
    source = medseg.get("source") if isinstance(medseg.get("source"), dict) else {}
    # where a turned coronal / sagittal series' slices lie, so generation makes slices
    # between its own (the spacing alone picks z for 1 mm slices of 2 mm pixels)
    kept = {k: source[k] for k in ("slice_axis", "missing_planes")
            if k in source and data.ndim == 3}
    if "missing_planes" in kept:  # the same: only planes that hold no measurement
        kept["missing_planes"] = planes_still_missing(data, kept["missing_planes"])
        if kept["missing_planes"] is None:
            del kept["missing_planes"]
    synthetic = _generated_slice_count(data, medseg, source)
    if synthetic:
        kept["synthetic_slices"] = synthetic  # generation refuses to take them as acquired
    axes = axes_for(source, data.shape if data.ndim == 3 else (1, *data.shape))
    if axes is not None:  # the models refuse a single coronal or sagittal image
        kept["axes_lps"] = axes
    return Volume.from_array(
        data, spacing=scale, origin=translate, modality=modality, missing=mask, metadata=kept
    )

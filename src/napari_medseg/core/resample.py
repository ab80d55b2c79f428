"""In-plane resampling shared by training, evaluation and inference (one function, one grid).

Models run at a fixed in-plane spacing (the card's ``input_spacing_mm[1:]``); z stays
native (``"resample_axes": "yx"`` in the card). Training resamples phantoms with
:func:`resample_yx` and inference must use the same function, so both see the same grid.

Grid convention ("pixel areas", like ``align_corners=False``): an axis of ``n_in`` pixels
of spacing ``s_in`` covers the same field of view as ``n_out = round(n_in · s_in / s_out)``
pixels; pixel *centres* map as ``i_out = (i_in + 0.5) · n_out / n_in − 0.5``. Going back
(``out_shape_yx`` = the original size) uses the same shape ratio, so a round trip lands on
the original pixels exactly. Use :func:`map_index` to move point coordinates (lesion
centres, detections) between the two grids.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedsegInputError

__all__ = ["map_index", "resample_yx", "resampled_shape_yx"]


def _pair(values: Any, what: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"{what} must be two numbers (y, x), got {values!r}") from exc
    if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0):
        raise MedsegInputError(f"{what} must be two positive numbers (y, x), got {values!r}")
    return a, b


def resampled_shape_yx(
    shape_yx: Sequence[int], spacing_yx_from: Sequence[float], spacing_yx_to: Sequence[float]
) -> tuple[int, int]:
    """Size (y, x) of the grid at ``spacing_yx_to`` covering the same field of view."""
    (fy, fx), (ty, tx) = _pair(spacing_yx_from, "spacing_yx_from"), _pair(spacing_yx_to, "spacing_yx_to")
    ny, nx = (int(s) for s in shape_yx)
    return max(1, int(round(ny * fy / ty))), max(1, int(round(nx * fx / tx)))


def map_index(
    index: Any, n_from: Sequence[int] | int, n_to: Sequence[int] | int
) -> np.ndarray:
    """Pixel-centre coordinates on an ``n_from`` grid → the same points on an ``n_to`` grid.

    ``index``: (..., k) float coordinates for the last k axes (k = len(n_from)), e.g.
    (y, x) per point. ``i_to = (i_from + 0.5) · n_to / n_from − 0.5``.
    """
    n_from_arr = np.atleast_1d(np.asarray(n_from, dtype=np.float64))
    n_to_arr = np.atleast_1d(np.asarray(n_to, dtype=np.float64))
    idx = np.asarray(index, dtype=np.float64)
    return (idx + 0.5) * (n_to_arr / n_from_arr) - 0.5


def resample_yx(
    array: Any,
    spacing_yx_from: Sequence[float],
    spacing_yx_to: Sequence[float],
    order: int = 1,
    out_shape_yx: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample the last two axes (y, x) of ``array`` from one pixel spacing to another.

    ``order=1``: bilinear, antialiased when shrinking (images, probabilities, logits);
    float32 out.
    ``order=0``: nearest (label maps), the input dtype is kept.
    Leading axes (z, channels, …) are untouched. ``out_shape_yx`` forces the output size
    (use it to go back to the original grid); by default it is
    :func:`resampled_shape_yx`. Equal spacing and size returns a float32 / same-dtype copy.
    NaN (missing slices) stays NaN where it was (linear interpolation spreads it only
    within its own slice).
    """
    arr = np.asarray(array)
    if arr.ndim < 2:
        raise MedsegInputError(f"resample_yx needs at least 2 axes (y, x), got shape {arr.shape}")
    if order not in (0, 1):
        raise MedsegInputError(f"order must be 0 (nearest, labels) or 1 (linear), got {order!r}")
    ny, nx = arr.shape[-2:]
    if out_shape_yx is None:
        out = resampled_shape_yx((ny, nx), spacing_yx_from, spacing_yx_to)
    else:
        _pair(spacing_yx_from, "spacing_yx_from"), _pair(spacing_yx_to, "spacing_yx_to")
        out = tuple(int(s) for s in out_shape_yx)
        if len(out) != 2 or min(out) < 1:
            raise MedsegInputError(f"out_shape_yx must be two positive sizes, got {out_shape_yx!r}")
    if arr.size == 0:
        raise MedsegInputError(f"cannot resample an empty array of shape {arr.shape}")
    lead = arr.shape[:-2]
    if (ny, nx) == tuple(out):
        return arr.astype(np.float32 if order == 1 else arr.dtype, copy=True)
    flat = arr.reshape(-1, 1, ny, nx)
    if order == 1:
        src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        res = F.interpolate(src, size=out, mode="bilinear", align_corners=False, antialias=True)
        return res.numpy().reshape(*lead, *out)
    # nearest: index gather with the pixel-centre rule (same as torch "nearest-exact")
    iy = np.clip(np.floor((np.arange(out[0]) + 0.5) * ny / out[0]).astype(np.int64), 0, ny - 1)
    ix = np.clip(np.floor((np.arange(out[1]) + 0.5) * nx / out[1]).astype(np.int64), 0, nx - 1)
    res = flat[:, :, iy[:, None], ix[None, :]]
    return np.ascontiguousarray(res.reshape(*lead, *out))

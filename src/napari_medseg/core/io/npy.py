"""NumPy ``.npy`` reader: a bare array with no geometry, read without unpickling."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedsegInputError
from ..volume import Volume
from ._common import guess_modality, label_map_values, short_reason, source_name

__all__ = ["read_npy"]

_PICKLED = (
    "holds pickled Python objects, which are not loaded for safety; save a plain numeric array"
)


def read_npy(path: str | Path) -> Volume:
    """Read a 2D (y, x) or 3D (z, y, x) numeric array; 2D becomes one slice.

    The file carries no geometry, so spacing is 1 mm and origin 0, and a warning says so.
    Pickled (object) arrays are refused rather than executed.
    """
    path = Path(path).expanduser()
    return _volume(_load(path), path)


def read_npy_or_label_map(path: str | Path) -> Any:
    """The file as a :class:`~.nifti.LabelMap` when it holds a mask or a label map (a
    bool array, or integers as :func:`~._common.looks_like_label_map` says; ``np.save`` of a
    segmentation opened as a grey float image), else as a Volume; read once."""
    from .nifti import LabelMap

    path = Path(path).expanduser()
    data = _load(path)
    volume = _volume(data, path)
    values = None if data.dtype == bool else label_map_values(data)
    if not (data.dtype == bool or values is not None):
        return volume
    if data.dtype == bool:
        labels, what = data.astype(np.uint8), "a mask (bool)"
    else:
        labels, what = data, f"integer values 0–{int(values[-1])} ({len(values)} besides 0)"
    volume = replace(volume, metadata={**volume.metadata, "warnings": [
        *volume.metadata["warnings"], f"{what}: opened as a label map"]})
    # native byte order: napari drew a big-endian label 1 as 256 (a colour no label has)
    native = labels.astype(labels.dtype.newbyteorder("="), copy=False)
    return LabelMap(np.ascontiguousarray(native), volume, {})


def _load(path: Path) -> np.ndarray:
    """The checked (z, y, x) array as stored (a 2D array as one slice)."""
    if not path.exists():
        raise MedsegInputError("no such file or folder", path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise MedsegInputError(f"cannot open the file ({exc.strerror})", path) from exc
    # np.load would take any other bytes for a pickle; say what the file really is instead.
    if magic.startswith(b"PK"):
        raise MedsegInputError("is a .npz archive, not a single .npy array", path)
    if magic.startswith(b"\x80"):
        raise MedsegInputError(_PICKLED, path)
    if magic != b"\x93NUMPY":
        raise MedsegInputError("not a .npy file (no NumPy header)", path)
    try:
        # allow_pickle=False: unpickling a file runs arbitrary code from whoever wrote it
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():  # an object array inside a real .npy
            raise MedsegInputError(_PICKLED, path) from exc
        raise MedsegInputError(f"not a readable .npy file ({short_reason(exc, path=path)})", path) from exc
    except Exception as exc:
        raise MedsegInputError(f"not a readable .npy file ({short_reason(exc, path=path)})", path) from exc

    # timedelta64 counts as an integer type to NumPy, yet holds no number to show
    if data.dtype.names is not None or data.dtype.kind == "m" or not (
        np.issubdtype(data.dtype, np.number) or data.dtype == bool
    ):
        raise MedsegInputError(f"expected a numeric array, got dtype {data.dtype}", path)
    # a volume saved with a batch or channel axis of length 1 ((1, z, y, x) from PyTorch,
    # (z, y, x, 1)): read as the volume, as a NIfTI's trailing 1 is
    if data.ndim > 3:
        while data.ndim > 3 and data.shape[0] == 1:
            data = data[0]
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim == 3 and data.shape[-1] == 1:  # (1, y, x, 1): one 2D image, not y
            data = data[..., 0]                      # slices one column wide
    looks_rgb = data.shape[-1:] in ((3,), (4,))
    if (data.ndim == 3 and looks_rgb and min(data.shape[:2]) > 4) or (
        data.ndim == 4 and looks_rgb
    ):
        raise MedsegInputError(
            f"this looks like an RGB(A) image (shape {data.shape}); "
            "convert it to grayscale first",
            path,
        )
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise MedsegInputError(
            f"expected a 2D (y, x) or 3D (z, y, x) array, got shape {data.shape}", path
        )
    return data


def _volume(data: np.ndarray, path: Path) -> Volume:
    try:
        return Volume(
            array=data,
            spacing=(1.0, 1.0, 1.0),
            modality=guess_modality(data),
            metadata={
                "source_format": "npy",
                "source_name": source_name(path),
                "n_files": 1,
                "warnings": [".npy files carry no geometry; spacing set to 1 mm"],
            },
        )
    except MedsegInputError as exc:
        raise MedsegInputError(exc.reason, path) from exc

"""npe2 reader: DICOM (file, multi-frame, folder), NIfTI and .npy into an Image layer; a
NIfTI label map (label intent, as this plugin's writer saves one) into a Labels layer."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from .core.errors import MedsegInputError
from .core.io import LabelMap, is_supported_path, read_scan_or_labels
from .core.io.dicom import SERIES_BESIDE_WARNING
from ._layers import labels_layer_data, volume_layer_data

# napari's "opened, but nothing to add" sentinel: it stops napari trying other readers
# and adding a half-made layer after we have already told the user why.
_NOTHING_OPENED = [(None,)]
#: folder → when a file of it last came with the "one slice of a series" warning
_SAID_SERIES: dict[str, float] = {}
#: seconds between two files of one folder that make them one pick (napari opens the
#: files picked together one after the other)
SAME_PICK_S = 3.0


def _say_warnings(volume, name: str, folder: Path | None = None) -> None:
    """The reader's warnings as notifications; "one slice of a series" once for the files
    of a folder picked together (it was said once per folder for the whole session:
    a file of it opened later was not warned)."""
    from napari.utils.notifications import show_warning

    for warning in volume.metadata.get("warnings", []):
        if warning.startswith(SERIES_BESIDE_WARNING) and folder is not None:
            now, key = time.monotonic(), str(folder)
            last = _SAID_SERIES.get(key)
            _SAID_SERIES[key] = now
            if last is not None and now - last < SAME_PICK_S:
                continue
        show_warning(f"{name}: {warning}")


def get_reader(path: str | list[str]) -> Callable | None:
    if isinstance(path, list):
        if len(path) > 1:
            # a stack asked for (napari's "Open Files as Stack"): DICOM files are read as
            # their folder is, as one series; a stack of other files is left to napari
            return read_dicom_stack if all(map(_is_dicom_file, path)) else None
        if not path:
            return None
        path = path[0]
    if len(urlsplit(str(path)).scheme) > 1:
        # an address (https://, s3://; one letter is a Windows drive): left to a reader
        # that fetches; claimed, it was said to be a missing file and no other was tried
        return None
    return read_layers if is_supported_path(path) else None


def read_layers(path: str | list[str]) -> list:
    if isinstance(path, list):
        path = path[0]
    try:
        opened = read_scan_or_labels(path)
    except MedsegInputError as exc:
        from napari.utils.notifications import show_error

        show_error(f"napari-medseg could not open {exc}")
        return _NOTHING_OPENED
    volume = opened.volume if isinstance(opened, LabelMap) else opened
    _say_warnings(volume, Path(path).name, Path(path).expanduser().resolve().parent)
    if isinstance(opened, LabelMap):
        return [labels_layer_data(opened.labels, volume, _layer_name(path), opened.names)]
    return [volume_layer_data(volume, name=_layer_name(path))]


def _is_dicom_file(path: str) -> bool:
    suffix = "".join(Path(path).suffixes[-2:]).lower()
    return (not suffix.endswith((".nii", ".nii.gz", ".npy")) and Path(path).is_file()
            and is_supported_path(path))


def read_dicom_stack(paths: list[str]) -> list:
    """DICOM files picked together as a stack: one volume, as their folder gives."""
    from .core.io.dicom import read_dicom_files

    try:
        volume = read_dicom_files(paths)
    except MedsegInputError as exc:
        from napari.utils.notifications import show_error

        show_error(f"napari-medseg could not open {exc}")
        return _NOTHING_OPENED
    name = Path(os.path.commonpath([str(Path(p).parent) for p in paths])).name
    _say_warnings(volume, name)
    return [volume_layer_data(volume, name=name or "DICOM series")]


def _layer_name(path: str) -> str:
    from .core.io import named_path

    name = named_path(path).name
    for suffix in (".nii.gz", ".nii", ".npy", ".dcm", ".dicom", ".ima"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name

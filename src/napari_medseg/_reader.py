"""npe2 reader: DICOM (file, multi-frame, folder), NIfTI and .npy into an Image layer; a
NIfTI label map (label intent, as this plugin's writer saves one) into a Labels layer."""

from __future__ import annotations

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
#: folders whose "one slice of a series" warning was shown
_SAID_SERIES: set[str] = set()


def get_reader(path: str | list[str]) -> Callable | None:
    if isinstance(path, list):
        if len(path) != 1:
            # a stack asked for (napari's "Open Files as Stack"): not taken (a DICOM
            # series opens from its folder; plain Open Files hands one file at a time)
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
    for warning in volume.metadata.get("warnings", []):
        from napari.utils.notifications import show_warning

        if warning.startswith(SERIES_BESIDE_WARNING):
            folder = str(Path(path).expanduser().resolve().parent)
            if folder in _SAID_SERIES:
                continue  # every slice of a series picked at once: said for the first only
            _SAID_SERIES.add(folder)
        show_warning(f"{Path(path).name}: {warning}")
    if isinstance(opened, LabelMap):
        return [labels_layer_data(opened.labels, volume, _layer_name(path), opened.names)]
    return [volume_layer_data(volume, name=_layer_name(path))]


def _layer_name(path: str) -> str:
    from .core.io import named_path

    name = named_path(path).name
    for suffix in (".nii.gz", ".nii", ".npy", ".dcm", ".dicom", ".ima"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name

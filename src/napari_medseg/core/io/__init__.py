"""Medical image readers and writer: DICOM, NIfTI and .npy → :class:`Volume`.

All readers share one geometry convention (axes (z, y, x), spacing and origin in mm,
origin in DICOM's LPS patient frame; see ``_common``) and raise
:class:`~napari_medseg.core.errors.MedsegInputError` with a one-line reason for bad input.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MedsegInputError
from ..volume import Volume
from ._common import guess_modality, walk_folder
from .dicom import read_dicom
from .nifti import LabelMap, read_label_map, read_nifti, read_nifti_or_label_map, write_nifti
from .npy import read_npy, read_npy_or_label_map

__all__ = [
    "LabelMap",
    "SUPPORTED_SUFFIXES",
    "guess_modality",
    "is_supported_path",
    "read_dicom",
    "read_label_map",
    "read_nifti",
    "read_npy",
    "read_scan_or_labels",
    "read_volume",
    "write_nifti",
]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = DICOM_SUFFIXES + NIFTI_SUFFIXES + (".npy",)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _maybe_dicom(path: Path) -> bool:
    """DICOM files are often named without a suffix, or by UID ("1.2.840.….37"): sniff
    the "DICM" marker after the 128-byte preamble, or a bare dataset's first element."""
    from .dicom import is_bare_dataset

    try:
        if not path.is_file():  # a named pipe would block open() forever
            return False
        with open(path, "rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM":
                return True
    except OSError:
        return False
    return is_bare_dataset(path)


# how many files to sniff before saying a folder holds no DICOM (a zarr store or a folder
# of PNGs must go to other readers): a few per subfolder, so that 250 previews beside a
# DICOM/ subfolder do not hide it, and a cap over the whole tree
FOLDER_SNIFF_PER_DIR = 200
FOLDER_SNIFF_LIMIT = 2000


def folder_has_dicom(folder: Path, per_dir: int = FOLDER_SNIFF_PER_DIR,
                     limit: int = FOLDER_SNIFF_LIMIT) -> bool:
    """Whether a DICOM file is among the first ``per_dir`` files of ``folder`` or of any
    folder under it (at most ``limit`` files sniffed in all)."""
    seen = 0
    for root, dirs, names in walk_folder(folder):
        dirs.sort()
        candidates = [n for n in sorted(names)
                      if _suffix(Path(n)) not in NIFTI_SUFFIXES + (".npy",)]
        for name in candidates[:per_dir]:
            if _maybe_dicom(Path(root) / name):
                return True
            seen += 1
            if seen >= limit:
                return False
    return False


def is_supported_path(path: str | Path) -> bool:
    """True for a folder holding DICOM files, a supported suffix, or a file that looks like
    DICOM. napari gives a path to the first reader that claims it, so a folder or file we
    cannot read must not be claimed."""
    path = Path(path).expanduser()
    if path.is_dir():
        return folder_has_dicom(path)
    if _suffix(path) in SUPPORTED_SUFFIXES:
        return path.is_file() or not path.exists()  # a pipe named x.npy would block napari
    return path.is_file() and _maybe_dicom(path)


def named_path(path: str | Path) -> Path:
    """``path`` with a name to show: "." or ".." (a folder opened from inside it) have none.
    They are taken from the shell's working folder ($PWD) when that is where we are, so a
    folder reached through a link keeps the name the user sees, not its target's. An
    empty path (an unset $SCAN) is refused: Path("") is the working folder, which was
    searched for a series in silence."""
    if not str(path).strip():
        raise MedsegInputError("the input path is empty; give a file or folder to read")
    path = Path(path).expanduser()
    if path.name not in ("", ".", ".."):
        return path
    logical = os.environ.get("PWD")
    try:
        if logical and os.path.samefile(logical, os.getcwd()) and not path.is_absolute():
            return Path(os.path.normpath(os.path.join(logical, path)))
    except OSError:
        pass
    return path.resolve()


def read_volume(path: str | Path) -> Volume:
    """Read a DICOM file/folder, NIfTI file or .npy array, chosen by folder-ness and suffix."""
    path = named_path(path)
    if not path.exists():
        raise MedsegInputError("no such file or folder", path)
    if not (path.is_dir() or path.is_file()):  # opening a pipe blocks until a writer comes
        raise MedsegInputError("not a regular file or folder (a pipe or device)", path)
    suffix = _suffix(path)
    if path.is_dir() or suffix in DICOM_SUFFIXES:
        return read_dicom(path)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path)
    if suffix == ".npy":
        return read_npy(path)
    if _maybe_dicom(path):
        return read_dicom(path)
    raise MedsegInputError(
        f"unsupported file type {suffix!r}; supported: a DICOM folder or "
        + ", ".join(SUPPORTED_SUFFIXES),
        path,
    )


def read_scan_or_labels(path: str | Path) -> Volume | LabelMap:
    """What napari should open: a :class:`LabelMap` for a NIfTI label map (one this
    plugin saved, or any tool's file marked with the label intent or looking like one) or
    a .npy mask or label map, else the Volume."""
    path = named_path(path)
    if path.is_file() and _suffix(path) in NIFTI_SUFFIXES:
        return read_nifti_or_label_map(path)
    if path.is_file() and _suffix(path) == ".npy":
        return read_npy_or_label_map(path)
    return read_volume(path)

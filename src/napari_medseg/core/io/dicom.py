"""DICOM reader: one file, a multi-frame file, or a folder of series → :class:`Volume`.

Geometry (see ``_common``): slices are sorted by their position along the slice normal
``n = row_dir × col_dir`` (from ImageOrientationPatient) and stacked as (n, col_dir,
row_dir); the stack is then turned (:func:`._common.turned_to_spl`: axes swapped and
flipped, no resampling) so that (z, y, x) run nearest to +S, +P, +L, as the NIfTI reader
turns every file. An axial series stays as stored; a coronal one's slices lie along y, a
sagittal one's along x; a single image stays 2D. ``origin`` is the first voxel's
position measured along the final axes.

Pixel values go through the modality LUT (Rescale Slope/Intercept, or a LUT sequence), so
CT comes out in Hounsfield units, as float32. Gaps in a series become NaN slices flagged in
``Volume.missing`` (NaN planes listed in ``metadata["missing_planes"]`` when the series was
turned so that its slices lie along y or x). Anything the reader had to guess or drop is listed, without patient
data, in ``metadata["warnings"]``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from pydicom.pixels import apply_modality_lut, get_decoder  # pydicom >= 3

from ..errors import MedsegInputError
from ..text import counted, slice_ranges
from ..volume import Volume
from ._common import (axis_code, obliquity_deg, origin_along, short_reason, source_name,
                      turned_to_spl, walk_folder)

__all__ = ["read_dicom"]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A step this many times the median step means slices were not acquired (or were lost).
_GAP_FACTOR = 1.5
# Steps that deviate more than this from the median (relative) make the volume inexact.
_UNEVEN_TOLERANCE = 0.01
# Positions closer than this (mm) are the same slice: DS values carry ~6 digits.
_SAME_POSITION_MM = 1e-2
# Direction cosines differing by more than this are different orientations.
_SAME_ORIENTATION = 1e-3
# Beyond this many inserted NaN slices, a "gap" is really a second stack in the series.
_MAX_GAP_FACTOR = 2


@dataclass
class _Frame:
    """One 2D image: a single-frame file or one frame of a multi-frame file."""

    source: "_Source"
    index: int  # frame number inside the source file
    order: float  # InstanceNumber or frame number: the sort key when positions are absent
    rows: int
    cols: int
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    orientation: np.ndarray | None  # ImageOrientationPatient: row_dir, col_dir
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    thickness: float | None
    between: float | None  # SpacingBetweenSlices
    # (tag, value) pairs that tell apart acquisitions sharing positions in one series:
    # echoes, phases, time points (a multi-echo MR, a multi-phase CT under one UID)
    acquisition: tuple = ()


class _Source:
    """One DICOM file. A folder is scanned header-only; pixels are read when stacked."""

    def __init__(self, path: Path, dataset: Dataset, has_pixels: bool):
        self.path = path
        self.header = dataset
        self._full = dataset if has_pixels else None
        # Enhanced multi-frame: per-frame (slope, intercept); None → the file's modality LUT
        self.frame_rescale: list[tuple[float, float]] | None = None
        # how its frames were placed when the file does not say (a reader warning)
        self.frame_note: str | None = None
        # where its pixel spacing came from when PixelSpacing is absent (a reader warning)
        self.spacing_note: str | None = None

    def copy_frames(self, out: np.ndarray, frames: list[tuple[int, int]]) -> None:
        """Frame ``index`` as real-world values (HU for CT) into ``out[z]``, for each
        ``(index, z)``: rescaled frame by frame in float64, as a whole file was (the same
        float32 values), without a float64 and a float32 copy of the whole file (a
        multi-frame file peaked at 5 times its volume)."""
        raw, rescale = self._decoded()
        for index, z in frames:
            if index >= len(raw):
                raise MedsegInputError(
                    f"holds {len(raw)} frames but its header declares more", self.path)
            out[z] = rescale(raw[index], index)

    def _decoded(self) -> tuple[np.ndarray, Any]:
        """The raw frames (frames, rows, cols) and ``rescale(raw_frame, index)``."""
        ds = self._full
        if ds is None:
            ds = _dcmread(self.path)
        _check_pixels(ds, self.path)
        try:
            raw = np.asarray(ds.pixel_array)
        except Exception as exc:
            meta = getattr(ds, "file_meta", None)
            syntax = meta.get("TransferSyntaxUID") if meta is not None else None
            if syntax is not None and syntax.is_compressed and "does not support" in str(exc):
                # a decoder is installed (Pillow) but not for this flavour (12-bit JPEG)
                raise MedsegInputError(
                    f"pixel data is compressed ({syntax.name}) and no installed decoder reads "
                    f"this kind; {_install_hint(syntax.name)}", self.path) from exc
            raise MedsegInputError(
                f"pixel data could not be decoded ({short_reason(exc, path=self.path)})", self.path
            ) from exc
        rows, cols = int(ds.Rows), int(ds.Columns)
        if raw.size % (rows * cols):
            raise MedsegInputError(
                f"pixel data does not match its size tags ({rows}×{cols})", self.path
            )
        raw = raw.reshape(-1, rows, cols)
        # RT dose grids store integers; DoseGridScaling turns them into Gy.
        scaling = _float(ds, "DoseGridScaling")
        if scaling is None or str(ds.get("Modality", "")) != "RTDOSE":
            scaling = None
        if self.frame_rescale is not None:
            per_frame = self.frame_rescale

            def rescale(frame: np.ndarray, index: int) -> np.ndarray:
                slope, icpt = per_frame[index]
                return _scaled(frame * np.float64(slope) + np.float64(icpt), scaling)
            return raw, rescale
        if "ModalityLUTSequence" not in ds and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
            # read here, not by apply_modality_lut: it applies neither when one of the two
            # is absent (a slope alone was silently dropped) and fails on an empty one
            slope, icpt = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
            try:
                slope = 1.0 if slope is None and "RescaleSlope" not in ds else float(slope)
                icpt = 0.0 if icpt is None and "RescaleIntercept" not in ds else float(icpt)
            except (TypeError, ValueError) as exc:
                raise MedsegInputError(
                    f"invalid RescaleSlope / RescaleIntercept ({ds.get('RescaleSlope')!r}, "
                    f"{ds.get('RescaleIntercept')!r})", self.path) from exc

            def rescale(frame: np.ndarray, index: int) -> np.ndarray:
                return _scaled(frame * np.float64(slope) + np.float64(icpt), scaling)
            return raw, rescale

        def lut(frame: np.ndarray, index: int) -> np.ndarray:  # a LUT, or nothing to apply
            return _scaled(apply_modality_lut(frame, ds), scaling)
        return raw, lut


def _scaled(values: np.ndarray, scaling: float | None) -> np.ndarray:
    return values if scaling is None else values * scaling


def read_dicom(path: str | Path) -> Volume:
    """Read a DICOM file, multi-frame file or folder (searched recursively) as a Volume.

    A folder with several series opens the one with the most slices and says so in
    ``metadata["warnings"]``. Raises :class:`MedsegInputError` (one line, naming the file
    or folder) for anything it cannot turn into a grayscale volume.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MedsegInputError("no such file or folder", path)
    return _reading(path, lambda: _read_folder(path) if path.is_dir() else _read_file(path))


def read_dicom_files(paths: Sequence[str | Path]) -> Volume:
    """Read the given DICOM files as a folder of them is read (the largest series among
    them): every slice of a series picked at once in a file dialog."""
    files = sorted(Path(p).expanduser() for p in paths)
    if not files:
        raise MedsegInputError("no files given")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise MedsegInputError("no such file", missing[0])
    where = Path(os.path.commonpath([str(f.parent) for f in files]))
    return _reading(where, lambda: _read_files(files, where))


def _reading(path: Path, read: Callable[[], Volume]) -> Volume:
    """``read()``, its failures turned into one-line MedsegInputErrors naming ``path``."""
    try:
        # pydicom warns about every odd value it meets; our own warnings list what matters.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read()
    except MedsegInputError as exc:
        if exc.path is None:  # e.g. raised by Volume: attach the file the user opened
            raise MedsegInputError(exc.reason, path) from exc
        raise
    except MemoryError as exc:
        raise MedsegInputError("not enough memory to load this image", path) from exc
    except Exception as exc:  # never let a raw pydicom/numpy traceback reach the user
        raise MedsegInputError(
            f"could not read DICOM ({type(exc).__name__}: {short_reason(exc, path=path)})", path
        ) from exc


# --------------------------------------------------------------------------- reading


#: said for a file read without its file header (a bare dataset)
BARE_WARNING = "no DICOM file header (preamble and 'DICM'): read as a bare dataset"


#: explicit-VR value representations with 2 reserved bytes and a 4-byte length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
#: SOP Class UID and Rows: one of them, reached by a walk of ascending elements, makes a
#: file a bare dataset
_BARE_MARKERS = (0x00080016, 0x00280010)


def is_bare_dataset(path: Path) -> bool:
    """A DICOM dataset written without the 128-byte preamble, 'DICM' and file meta
    (ACR-NEMA-era files, some PACS exports): walked element by element from its start
    (implicit or explicit VR, either byte order), the tags ascend from group 0x0002 or
    0x0008 and reach the SOP Class UID or Rows. Any binary file may start with a group's
    four bytes (an int32 array of 8, 0, …); such data breaks the walk at once. Only the
    element headers are read (a forced pydicom read of a mostly-zero 100 MB file took
    40 s, and napari sniffs every file dropped on it)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return any(_walks_to_a_marker(f, size, little, explicit)
                       for little, explicit in ((True, True), (True, False), (False, True)))
    except OSError:
        return False


def _walks_to_a_marker(f: Any, size: int, little: bool, explicit: bool,
                       most: int = 512) -> bool:
    pos, previous = 0, -1
    for _ in range(most):
        f.seek(pos)
        head = f.read(12)
        if len(head) < 8:
            return False
        # file meta (group 0002) is explicit VR little endian whatever the dataset after it
        meta = int.from_bytes(head[:2], "little") == 0x0002
        order = "little" if (little or meta) else "big"
        explicit_here = explicit or meta
        tag = (int.from_bytes(head[:2], order) << 16) | int.from_bytes(head[2:4], order)
        if tag <= previous or (previous < 0 and tag >> 16 not in (0x0002, 0x0008)):
            return False
        if tag in _BARE_MARKERS:
            return True
        if tag > _BARE_MARKERS[-1]:
            return False
        if explicit_here:
            vr = head[4:6]
            if not (vr.isalpha() and vr.isupper()):
                return False
            if vr in _LONG_VRS:
                if len(head) < 12:
                    return False
                length, header = int.from_bytes(head[8:12], order), 12
            else:
                length, header = int.from_bytes(head[6:8], order), 8
        else:
            length, header = int.from_bytes(head[4:8], order), 8
        if length == 0xFFFFFFFF or pos + header + length > size:
            return False  # no undefined-length sequence comes before these tags
        pos, previous = pos + header + length, tag
    return False


def _read_dataset(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """pydicom's read; a bare dataset (no file header) is read too, given the transfer
    syntax its encoding shows (pydicom decodes no pixels without one) and marked
    ``medseg_bare``. Raises what pydicom raises."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        if not is_bare_dataset(path):
            raise
    ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta = meta if meta is not None else FileMetaDataset()
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = meta
    ds.medseg_bare = True
    return ds


def _dcmread(path: Path) -> Dataset:
    try:
        return _read_dataset(path)
    except OSError as exc:  # no permission, a disk error: not a malformed file
        raise MedsegInputError(f"could not read the file ({exc.strerror or short_reason(exc)})",
                               path) from exc
    except InvalidDicomError as exc:
        raise MedsegInputError("not a DICOM file (no 'DICM' file header)", path) from exc
    except Exception as exc:
        raise MedsegInputError(f"malformed DICOM file ({short_reason(exc, path=path)})", path) from exc


def _read_file(path: Path) -> Volume:
    if path.stat().st_size == 0:
        raise MedsegInputError("the file is empty", path)
    ds = _dcmread(path)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if _is_image_storage(ds):  # an image whose file was cut short
            raise MedsegInputError(f"truncated or malformed image: no pixel data ({_kind(ds)})", path)
        meta = getattr(ds, "file_meta", None)
        if _DICOMDIR_UID in (str(ds.get("SOPClassUID", "")),
                             str(getattr(meta, "MediaStorageSOPClassUID", ""))):
            raise MedsegInputError("is a DICOMDIR, an index of the files beside it, not an "
                                   "image: open the folder it lies in", path)
        raise MedsegInputError(f"holds no image ({_kind(ds)})", path)
    if "Rows" not in ds or "Columns" not in ds:
        raise MedsegInputError("malformed DICOM image (no Rows/Columns tags)", path)
    _check_image_header(ds, path)
    source = _Source(path, ds, has_pixels=True)
    warns = [BARE_WARNING] if getattr(ds, "medseg_bare", False) else []
    series = ds.get("SeriesInstanceUID")
    files = _series_files_beside(path, str(series)) if series and _n_frames(ds, path) == 1 else 0
    if files > 1:
        # picking every slice in a file dialog opens each as its own 2D image: say where
        # the volume is (napari hands its reader one file at a time)
        warns.append(f"{SERIES_BESIDE_WARNING} {files} files in its folder: open the folder "
                     "(or pick its files with File › Open Files as Stack) to read them as "
                     "one volume, with its slice spacing")
    return _assemble(_frames_of(source), path, warns=warns, n_files=1)


#: Media Storage Directory Storage: a DICOMDIR
_DICOMDIR_UID = "1.2.840.10008.1.3.10"
#: begins the warning for one file of a series that lies in its folder
SERIES_BESIDE_WARNING = "one slice of a series of"
#: a folder with more files than this is not searched for the rest of a file's series
_SERIES_SEARCH_MAX_FILES = 5000


def _series_files_beside(path: Path, series_uid: str) -> int:
    """How many files directly in ``path``'s folder belong to series ``series_uid``
    (``path`` counted), or 0 where the folder cannot be searched."""
    folder = path.parent
    try:
        stamp = folder.stat().st_mtime_ns
    except OSError:
        return 0
    return _series_counts(str(folder), stamp).get(series_uid, 0)


@functools.lru_cache(maxsize=8)
def _series_counts(folder: str, stamp: int) -> dict[str, int]:
    """Files per SeriesInstanceUID in ``folder`` (not its subfolders), read once per
    folder state: N files of one series opened one by one read the folder once."""
    counts: dict[str, int] = {}
    try:
        files = [p for p in Path(folder).iterdir() if p.is_file()]
    except OSError:
        return counts
    if len(files) > _SERIES_SEARCH_MAX_FILES:
        return counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:
                uid = pydicom.dcmread(f, stop_before_pixels=True,
                                      specific_tags=["SeriesInstanceUID"]).get("SeriesInstanceUID")
            except Exception:  # not DICOM (or no file header): not counted
                continue
            if uid:
                counts[str(uid)] = counts.get(str(uid), 0) + 1
    return counts


def _read_folder(folder: Path) -> Volume:
    files = sorted(Path(root) / name for root, _, names in walk_folder(folder)
                   for name in names if (Path(root) / name).is_file())
    if not files:
        raise MedsegInputError("folder holds no files", folder)
    return _read_files(files, folder)


def _read_files(files: list[Path], folder: Path) -> Volume:
    """The largest series among ``files`` (of ``folder``, named in messages)."""
    images: list[tuple[Path, Dataset]] = []
    skipped = broken = bare = 0
    unreadable: list[str] = []
    for f in files:
        try:
            ds = _read_dataset(f, stop_before_pixels=True)
        except OSError:  # no permission, a disk error: say which, it may be a slice
            unreadable.append(f.name)
            continue
        except Exception:  # not DICOM, or too broken to read a header from
            skipped += 1
            continue
        if "Rows" in ds and "Columns" in ds:
            try:
                _n_frames(ds, f)  # a stray file's bad tag must not fail the whole folder
                _image_size(ds, f)
            except MedsegInputError:
                broken += 1
                continue
            images.append((f, ds))
            bare += bool(getattr(ds, "medseg_bare", False))
        elif _is_image_storage(ds):  # an image file cut short before its image header
            broken += 1
        # else: DICOMDIR, structured report, RT plan ... DICOM but no image
    if not images:
        n = len(files)
        why = f" ({len(unreadable)} could not be read, e.g. {unreadable[0]})" if unreadable else ""
        raise MedsegInputError(f"no DICOM images among {counted(n, 'file')}{why}",
                               folder)

    groups: dict[tuple, list[tuple[Path, Dataset]]] = {}
    for f, ds in images:
        groups.setdefault(_series_key(ds), []).append((f, ds))
    sizes = {key: sum(_n_frames(ds, f) for f, ds in members) for key, members in groups.items()}
    # scans before what is derived from them (a SEG's masks, an RT dose grid often hold
    # more frames than the CT they lie on, and were opened instead of it), then the
    # largest (ties: the first series in file order); if one cannot be opened (mixed
    # sizes or orientations, a localizer sharing its UID, colour), try the next, and say so
    ranks = {key: _series_rank(members[0][1]) for key, members in groups.items()}
    order = sorted(groups, key=lambda k: (ranks[k], -sizes[k]))
    notes: list[str] = []
    if bare:
        notes.append(f"{counted(bare, 'file')} without a DICOM file header "
                     "(preamble and 'DICM'): read as bare datasets")
    if skipped:
        notes.append(f"skipped {counted(skipped, 'non-DICOM file')}")
    if broken:
        notes.append(f"skipped {counted(broken, 'truncated or malformed image file')}")
    if unreadable:
        notes.append(f"could not read {counted(len(unreadable), 'file')}"
                     f" (no permission or a disk error): {', '.join(unreadable[:3])}"
                     + (" …" if len(unreadable) > 3 else ""))
    failures: list[str] = []
    for rank, chosen in enumerate(order):
        warns: list[str] = []
        if len(groups) > 1:
            header = groups[chosen][0][1]
            desc = _text(header, "SeriesDescription")
            label = f"{sizes[chosen]} slices" + (f", {desc!r}" if desc else "")
            which = "the largest" if rank == 0 else "the largest that could be opened"
            if any(ranks[k] > ranks[chosen] and sizes[k] > sizes[chosen] for k in groups):
                kinds = sorted({_text(groups[k][0][1], "Modality") or "derived"
                                for k in groups if ranks[k] > ranks[chosen]})
                which = (f"the largest {_text(header, 'Modality') or 'image'} series"
                         + ("" if rank == 0 else " that could be opened")
                         + f", not the {'/'.join(kinds)} beside it")
            warns.append(f"folder holds {len(groups)} series; opened {which} ({label})")
        warns.extend(failures)
        warns.extend(notes)
        try:
            frames: list[_Frame] = []
            for f, ds in groups[chosen]:
                _check_image_header(ds, f)
                frames.extend(_frames_of(_Source(f, ds, has_pixels=False)))
            return _assemble(frames, folder, warns=warns, n_files=len(groups[chosen]))
        except MedsegInputError as exc:
            if rank == len(order) - 1 or rank >= 4:
                raise _series_error(exc, failures) from exc
            failures.append(
                f"a series of {sizes[chosen]} slices could not be opened ({exc.reason})")
    raise AssertionError("unreachable")  # pragma: no cover


def _series_error(exc: MedsegInputError, failures: list[str]) -> MedsegInputError:
    """The last series' error; with the earlier ones counted when several failed."""
    if not failures:
        return exc
    return MedsegInputError(f"{exc.reason} (and {len(failures)} larger series could not be "
                            "opened either)", exc.path)


def _series_key(ds: Dataset) -> tuple:
    uid = ds.get("SeriesInstanceUID")
    if uid:
        return ("uid", str(uid))
    iop = _vector(ds.get("ImageOrientationPatient"), 6)
    iop_key = tuple(round(float(v), 3) for v in iop) if iop is not None else None
    return ("geometry", int(ds.Rows), int(ds.Columns), iop_key)


#: modalities of series derived from a scan rather than the scan itself: a folder's
#: scan is opened before them, whatever their frame count
_DERIVED_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTIMAGE", "REG", "PR", "KO", "SR"})


def _series_rank(ds: Dataset) -> int:
    """0: a scan (CT, MR ... image storage); 1: another image (secondary capture);
    2: a segmentation, dose grid or other derived object."""
    modality = (_text(ds, "Modality") or "").upper()
    kind = _kind(ds)
    if modality in _DERIVED_MODALITIES or "Segmentation" in kind or "Dose" in kind:
        return 2
    if "Secondary Capture" in kind or modality == "OT":
        return 1
    return 0


def _image_size(ds: Dataset, path: Path) -> tuple[int, int]:
    """(rows, columns) of a header, or a clear error for an empty or invalid tag."""
    rows, cols = _as_float(ds.get("Rows")), _as_float(ds.get("Columns"))
    if rows is None or cols is None or rows < 1 or cols < 1 or rows % 1 or cols % 1:
        raise MedsegInputError("malformed DICOM image (invalid Rows/Columns tags)", path)
    return int(rows), int(cols)


# --------------------------------------------------------------------------- checks


def _kind(ds: Dataset) -> str:
    """What the file is, for messages: its SOP class name, else its modality."""
    sop = ds.get("SOPClassUID")
    if not sop:  # a file cut short may keep only its file meta header: that names it too
        sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    name = getattr(sop, "name", "") if sop else ""
    return name or str(ds.get("Modality", "") or "unknown type")


def _is_image_storage(ds: Dataset) -> bool:
    """Whether the file's SOP class is one that stores an image (CT, MR … Image Storage)."""
    return "Image Storage" in _kind(ds)


def _check_image_header(ds: Dataset, path: Path) -> None:
    """Refuse colour images and pixel data we cannot decode, before decoding anything."""
    _image_size(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or photometric.startswith("PALETTE"):
        label = photometric or f"{samples} samples per pixel"
        raise MedsegInputError(
            f"colour ({label}) DICOM is not supported; expected grayscale CT/MR", path
        )
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed and not _decoder_available(syntax):
        raise MedsegInputError(
            f"pixel data is compressed ({syntax.name}) and no decoder is installed; "
            f"{_install_hint(syntax.name)}",
            path,
        )


def _check_pixels(ds: Dataset, path: Path) -> None:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise MedsegInputError(f"holds no image ({_kind(ds)})", path)
    _check_image_header(ds, path)


def _decoder_available(syntax: Any) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # no decoder exists for this syntax at all
        return False


def _install_hint(syntax_name: str) -> str:
    if "2000" in syntax_name or "High-Throughput" in syntax_name:
        return "pip install pylibjpeg pylibjpeg-openjpeg"
    if "RLE" in syntax_name:
        return "pip install pylibjpeg pylibjpeg-rle"
    if "JPEG" in syntax_name:
        return "pip install pylibjpeg pylibjpeg-libjpeg"
    return "no pydicom plugin is known for it"


# --------------------------------------------------------------------------- tag access


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _float(ds: Dataset, keyword: str) -> float | None:
    return _as_float(ds.get(keyword))


def _vector(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _n_frames(ds: Dataset, path: Path) -> int:
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError("invalid NumberOfFrames tag", path) from exc
    if n < 1:
        raise MedsegInputError(f"invalid NumberOfFrames ({n})", path)
    return n


def _group_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """An enhanced file's functional-group attribute: per-frame, else shared, else top level."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for item in (per[frame] if per and frame < len(per) else None, shared[0] if shared else None):
        if item is None:
            continue
        inner = item.get(sequence)
        if inner and keyword in inner[0] and inner[0].get(keyword) not in (None, ""):
            return inner[0].get(keyword)
    return ds.get(keyword)


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    pair = _vector(value, 2) if value is not None else None
    return (float(pair[0]), float(pair[1])) if pair is not None and np.all(pair > 0) else None


#: tags whose values differ between acquisitions at the same positions in one series
_ACQUISITION_TAGS = ("AcquisitionNumber", "EchoNumbers", "TemporalPositionIdentifier",
                     "TriggerTime")
#: the same for an enhanced multi-frame file's frames (functional group, keyword)
_ENHANCED_ACQUISITION_TAGS = (
    ("FrameContentSequence", "StackID"),
    ("FrameContentSequence", "TemporalPositionIndex"),
    ("MREchoSequence", "EffectiveEchoTime"),
    ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
    ("SegmentIdentificationSequence", "ReferencedSegmentNumber"),
)


def _frames_of(source: _Source) -> list[_Frame]:
    """The 2D frames a file holds, with their geometry (pixels are not read here)."""
    ds, path = source.header, source.path
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = _n_frames(ds, path)
    common = dict(source=source, rows=rows, cols=cols)

    if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame
        frames, rescale = [], []
        for i in range(n):
            g = lambda seq, kw, i=i: _group_value(ds, i, seq, kw)  # noqa: E731
            slope = _as_float(g("PixelValueTransformationSequence", "RescaleSlope"))
            icpt = _as_float(g("PixelValueTransformationSequence", "RescaleIntercept"))
            rescale.append((1.0 if slope is None else slope, 0.0 if icpt is None else icpt))
            frames.append(
                _Frame(
                    **common,
                    index=i,
                    order=float(i),
                    position=_vector(g("PlanePositionSequence", "ImagePositionPatient"), 3),
                    orientation=_vector(
                        g("PlaneOrientationSequence", "ImageOrientationPatient"), 6
                    ),
                    pixel_spacing=_spacing_pair(g("PixelMeasuresSequence", "PixelSpacing")),
                    thickness=_as_float(g("PixelMeasuresSequence", "SliceThickness")),
                    between=_as_float(g("PixelMeasuresSequence", "SpacingBetweenSlices")),
                    acquisition=tuple(
                        (kw, str(v)) for seq, kw in _ENHANCED_ACQUISITION_TAGS
                        if (v := g(seq, kw)) not in (None, "")),
                )
            )
        source.frame_rescale = rescale
        return frames

    position = _vector(ds.get("ImagePositionPatient"), 3)
    orientation = _vector(ds.get("ImageOrientationPatient"), 6)
    shared = dict(
        **common,
        acquisition=tuple((kw, str(ds.get(kw))) for kw in _ACQUISITION_TAGS
                          if ds.get(kw) not in (None, "")),
        orientation=orientation,
        pixel_spacing=_spacing_pair(ds.get("PixelSpacing")) or _imager_spacing(ds, source),
        thickness=_float(ds, "SliceThickness"),
        between=_float(ds, "SpacingBetweenSlices"),
    )
    if n == 1:
        instance = _as_float(ds.get("InstanceNumber"))
        order = np.inf if instance is None else instance
        return [_Frame(**shared, index=0, order=order, position=position)]

    # Classic multi-frame (RT dose, NM): one position plus, at best, offsets along the normal.
    positions: list[np.ndarray | None] = [None] * n
    offsets = _vector(ds.get("GridFrameOffsetVector"), n) if "GridFrameOffsetVector" in ds else None
    steps_through = _frame_increments(ds)
    kept = list(range(n))
    if offsets is None and steps_through and set(steps_through) <= _NOT_SLICE_STEPS:
        # frames that step through time (a cine loop) or projection angles, not space:
        # stacked one slice step apart, ten time points opened as ten slices of a
        # made-up volume
        source.frame_note = (f"the file's {n} frames are not slices (they step through "
                             f"{', '.join(steps_through)}): only the first is opened")
        return [_Frame(**shared, index=0, order=0.0, position=position)]
    if offsets is None and "SliceVector" in steps_through:
        # NM tomography: frames step through slices and, gated or dynamic, also through
        # time slots, phases …: the first of each of those, placed by their slice number
        kept, slice_numbers = _first_of_each_other_vector(ds, steps_through, n)
        if len(kept) < n:
            others = [k for k in steps_through if k != "SliceVector"]
            source.frame_note = (f"{counted(n - len(kept), 'frame')} of later "
                                 f"{', '.join(others)} left out (the first of each opened)")
        step = next((v for v in (shared["between"], shared["thickness"])
                     if v is not None and v > 0), None)
        if slice_numbers is not None and step is not None:
            offsets = np.zeros(n)
            offsets[kept] = step * (slice_numbers - slice_numbers.min())
    if offsets is None and position is not None and orientation is not None:
        # no offsets (NM, legacy MR): frames one SpacingBetweenSlices (else SliceThickness)
        # apart along the normal, from the first frame's position, rather than the
        # position and orientation thrown away (origin 0, axes unknown)
        step = next((v for v in (shared["between"], shared["thickness"])
                     if v is not None and v > 0), None)
        if step is not None:
            offsets = step * np.arange(n, dtype=float)
            source.frame_note = (f"frames placed {step:g} mm apart along the slice normal from"
                                 " the file's one position (it has no GridFrameOffsetVector)")
    if position is not None and orientation is not None and offsets is not None:
        normal = _normal(orientation)
        # Offsets are relative to the first frame whether the vector starts at 0 or not.
        positions = [position + (o - offsets[0]) * normal for o in offsets]
    return [_Frame(**shared, index=i, order=float(i), position=positions[i]) for i in kept]


#: what FrameIncrementPointer may name that does not step through space: time, the
#: cardiac cycle, a SPECT camera's angles (their frames are no slices of a volume)
_NOT_SLICE_STEPS = frozenset({
    "FrameTime", "FrameTimeVector", "TimeSlotVector", "TimeSliceVector", "RRIntervalVector",
    "PhaseVector", "RotationVector", "AngularViewVector", "EnergyWindowVector",
    "DetectorVector", "ActualFrameDuration"})


def _frame_increments(ds: Dataset) -> list[str]:
    """The keywords FrameIncrementPointer names: what a classic multi-frame file's frames
    step through (SliceVector, TimeSlotVector, FrameTime …); [] when it names none."""
    value = ds.get("FrameIncrementPointer")
    if value is None:
        return []
    tags = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    names = []
    for tag in tags:
        try:
            names.append(keyword_for_tag(tag) or str(tag))
        except (TypeError, ValueError):
            continue
    return names


def _first_of_each_other_vector(ds: Dataset, vectors: list[str], n: int
                                ) -> tuple[list[int], np.ndarray | None]:
    """The frames at the first value of every vector other than SliceVector (the first
    gate, time slot, phase …), and their slice numbers (None: no usable SliceVector)."""
    keep = np.ones(n, dtype=bool)
    for name in vectors:
        if name == "SliceVector":
            continue
        values = _vector(ds.get(name), n)
        if values is not None:
            keep &= values == values[0]
    kept = [int(i) for i in np.flatnonzero(keep)]
    slice_numbers = _vector(ds.get("SliceVector"), n)
    return kept, None if slice_numbers is None else slice_numbers[kept]


def _imager_spacing(ds: Dataset, source: "_Source") -> tuple[float, float] | None:
    """A radiograph's ImagerPixelSpacing when it has no PixelSpacing (CR, DX): measured at
    the detector, so a little larger than in the patient (the beam diverges); said."""
    spacing = _spacing_pair(ds.get("ImagerPixelSpacing"))
    if spacing is not None:
        source.spacing_note = ("pixel spacing taken from ImagerPixelSpacing (at the detector:"
                               " sizes in the patient are a little smaller)")
    return spacing


def _normal(orientation: np.ndarray) -> np.ndarray:
    row, col = _unit(orientation[:3]), _unit(orientation[3:])
    return _cross_unit(row, col)


def _cross_unit(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """The slice normal of unit row and column directions, refused when they are
    parallel (no plane: "a zero vector" named neither of the two real vectors)."""
    normal = np.cross(row, col)
    if float(np.linalg.norm(normal)) < 1e-6:
        raise MedsegInputError("ImageOrientationPatient's row and column directions are "
                               "parallel; the slice plane is undefined")
    return normal / float(np.linalg.norm(normal))


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise MedsegInputError("ImageOrientationPatient holds a zero vector")
    return v / norm


# --------------------------------------------------------------------------- assembly


def _assemble(frames: list[_Frame], path: Path, warns: list[str], n_files: int) -> Volume:
    """Sort, de-duplicate and stack frames; work out spacing, gaps and origin."""
    frames = _without_localizers(frames, warns)
    frames = _without_other_orientations(frames, path, warns)
    frames = _without_other_sizes(frames, path, warns)
    _check_stackable(frames, path)
    warns.extend(dict.fromkeys(f.source.frame_note for f in frames if f.source.frame_note))
    warns.extend(dict.fromkeys(f.source.spacing_note for f in frames if f.source.spacing_note))
    frames, keys, axes = _sort(frames, path, warns)
    first = frames[0]
    shift = 0.0  # a gantry tilt's sideways drift across the stack
    steps = np.diff(keys) if keys is not None else np.array([])
    if steps.size:
        out_z, z_spacing = _layout(steps, path, warns)
        frames = [f for f, z in zip(frames, out_z) if z >= 0]
        out_z = out_z[out_z >= 0]
        shift = _warn_if_sheared(frames, axes, warns)
    else:
        out_z = np.arange(len(frames))
        single = len(frames) == 1
        # one slice: its thickness is what it covers; a stack: the step between slices
        candidates = (
            (first.thickness, first.between) if single else (first.between, first.thickness)
        )
        z_spacing = next((v for v in candidates if v is not None and v > 0), None)
        if z_spacing is None:
            z_spacing = 1.0
            if not single:
                warns.append("slice spacing unknown; using 1.0 mm")
        elif not single and z_spacing != first.between:  # slices may overlap or have gaps
            warns.append(f"slice spacing taken from SliceThickness ({z_spacing:.4g} mm): the "
                         "files give no positions or SpacingBetweenSlices")

    if first.pixel_spacing is None:
        warns.append("pixel spacing unknown; using 1.0 mm")
    dy, dx = first.pixel_spacing or (1.0, 1.0)

    nz = int(out_z[-1]) + 1
    missing = np.ones(nz, dtype=bool)
    missing[out_z] = False
    gaps = missing.copy()  # said once the volume has its final layout (below)
    if axes is not None and obliquity_deg(axes) > 1.0:
        warns.append(
            f"oblique slices ({obliquity_deg(axes):.1f}° off the patient axes); "
            "coordinates are measured along the slice axes"
        )

    image_type = [str(v).upper() for v in (first.source.header.get("ImageType") or [])]
    if "MOSAIC" in image_type:
        warns.append("Siemens mosaic: its slices are tiled in one image and are not unpacked;"
                     " the geometry is not that of the tiles")
    array = _load_pixels(frames, out_z, nz)
    # slices of a file that could not be decoded: said, like the gaps, once the volume
    # has its final layout (a flipped series' z=1 is its z=nz-2)
    undecoded = ~np.isfinite(array).reshape(nz, -1).any(axis=1) & ~missing
    missing |= undecoded
    header = first.source.header
    modality = _text(header, "Modality") or "OT"
    rescale_type = _text(header, "RescaleType") or _text_in_groups(header, "RescaleType")
    if rescale_type is None and modality == "CT":
        rescale_type = "HU"  # the CT modality LUT outputs Hounsfield units by definition
    if modality == "CT" and first.source.frame_rescale is None and not any(
            k in header for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence")):
        # required in a CT image; an anonymiser or converter that drops them leaves the
        # stored values, often HU + 1024, which the models would read as HU in silence
        warns.append("CT without a rescale slope or intercept: values taken as stored, "
                     "Hounsfield units only if the scanner stored them so")
    metadata = {
        "source_format": "dicom",
        "source_name": source_name(path),
        "n_files": n_files,
        "series_description": _text(header, "SeriesDescription"),
        "body_part": _text(header, "BodyPartExamined"),
        "manufacturer": _text(header, "Manufacturer"),
        "slice_thickness_mm": first.thickness,
        "kvp": _float(header, "KVP"),
        "rescale_type": rescale_type,
        "photometric": _text(header, "PhotometricInterpretation"),
        "slice_spacings_mm": [round(float(s), 4) for s in steps],
        "warnings": warns,
        # positions off the grid by up to this: no patient position is given
        **({"sideways_shift_mm": round(shift, 1)} if shift else {}),
    }
    spacing = (z_spacing, dy, dx)
    origin = origin_along(first.position, axes) if axes is not None else (0.0, 0.0, 0.0)
    slice_axis, reversed_ = 0, False  # where the series' slices lie in the volume
    # a single image stays the 2D image it is, whatever its plane
    if axes is not None and array.shape[0] > 1:
        normal = np.asarray(axes[0], dtype=float)
        array, spacing, origin, axes = turned_to_spl(array, spacing, origin, axes)
        along = np.asarray(axes) @ normal
        slice_axis = int(np.argmax(np.abs(along)))
        reversed_ = bool(along[slice_axis] < 0)
        if slice_axis:  # the series' missing slices are planes along y / x now, not z
            missing = np.zeros(array.shape[0], dtype=bool)
        elif reversed_:
            missing = missing[::-1]
    if axes is not None and array.shape[0] > 1:
        # where generation makes slices between this series' own: known here, where the
        # pixel spacing alone would guess (an axial series of 0.5 mm slices of
        # 0.6 × 1.0 mm pixels was taken for slices along x, and its gaps left unfilled)
        metadata["slice_axis"] = "zyx"[slice_axis]
    numbers = _instance_numbers(frames, out_z, nz) if slice_axis == 0 else None
    if reversed_:
        gaps, undecoded = gaps[::-1], undecoded[::-1]
        metadata["slice_spacings_mm"] = metadata["slice_spacings_mm"][::-1]
        numbers = numbers[::-1] if numbers is not None else None
    if numbers is not None:
        metadata["instance_numbers"] = numbers
    if undecoded.any():
        n, at = int(undecoded.sum()), slice_ranges(np.flatnonzero(undecoded))
        where = f"z={at}" if slice_axis == 0 else f"NaN planes at {'zyx'[slice_axis]}={at}"
        warns.append(f"{counted(n, 'slice')} whose pixel data could not be decoded "
                     f"left missing ({where})")
    if slice_axis and (gaps | undecoded).any():  # both are NaN planes along y / x
        planes = [int(i) for i in np.flatnonzero(gaps | undecoded)]
        metadata["missing_planes"] = {"axis": "zyx"[slice_axis], "indices": planes}
    if gaps.any():
        at = slice_ranges(np.flatnonzero(gaps))
        n = int(gaps.sum())
        if slice_axis == 0:
            warns.append(f"{counted(n, 'missing slice')} (gaps at z={at})")
        else:  # a coronal or sagittal series: its gaps are planes along y / x, not z slices
            name = "zyx"[slice_axis]
            warns.append(f"{counted(n, 'missing slice')} of the series (NaN planes at"
                         f" {name}={at}: nothing is labelled or detected there)")
    if axes is not None:
        metadata["orientation"] = axis_code(axes[2]) + axis_code(axes[1]) + axis_code(axes[0])
        # + 0.0: a flipped axis's zeros are -0.0, shown as such in Info and the CLI
        metadata["axes_lps"] = (np.round(np.asarray(axes, dtype=float), 6) + 0.0).tolist()
    return Volume(
        array=array,
        spacing=spacing,
        origin=origin,
        modality=modality,
        missing=missing,
        metadata=metadata,
    )


def _instance_numbers(frames: list[_Frame], out_z: np.ndarray, nz: int) -> list | None:
    """Each slice's InstanceNumber (None at a gap), for a series of single-frame files
    that all give a distinct one: the number a PACS shows a slice by (a detection at
    z = 111 was read as image 111 of a series numbered from the head, 55 mm off)."""
    if any(f.source.header.get("NumberOfFrames") not in (None, "", 1, "1") for f in frames):
        return None
    values = [_as_float(f.source.header.get("InstanceNumber")) for f in frames]
    if any(v is None or not math.isfinite(v) or v != int(v) for v in values) \
            or len(set(values)) != len(values):
        return None
    numbers: list = [None] * nz
    for v, z in zip(values, out_z):
        numbers[int(z)] = int(v)
    return numbers


def _without_localizers(frames: list[_Frame], warns: list[str]) -> list[_Frame]:
    """The frames less scout (localizer) images filed in the series they planned: a
    coronal scout among 40 axial slices made the whole series unreadable ("different
    orientations"), and a folder then opened another series instead."""
    def localizer(frame: _Frame) -> bool:
        kinds = frame.source.header.get("ImageType") or []
        kinds = [kinds] if isinstance(kinds, str) else kinds
        return any(str(v).strip().upper() == "LOCALIZER" for v in kinds)

    scouts = [f for f in frames if localizer(f)]
    if not scouts or len(scouts) == len(frames):  # a series of scouts opens as it is
        return frames
    warns.append(f"{counted(len(scouts), 'localizer (scout) image')} "
                 "in the series left out")
    return [f for f in frames if not localizer(f)]


def _orientation_groups(iops: np.ndarray) -> list[list[int]]:
    """Indices of the frames per orientation (direction cosines within
    ``_SAME_ORIENTATION`` of the group's first), groups in order of first appearance."""
    groups: list[list[int]] = []
    for i, iop in enumerate(iops):
        for group in groups:
            if np.abs(iop - iops[group[0]]).max() <= _SAME_ORIENTATION:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def _without_other_orientations(frames: list[_Frame], path: Path,
                                 warns: list[str]) -> list[_Frame]:
    """The frames less those in another orientation than most of the series: a scout or
    a reformat filed under its UID without being marked LOCALIZER made the whole series
    unreadable. With no majority there is nothing to tell which is the series."""
    oriented = [i for i, f in enumerate(frames) if f.orientation is not None]
    if len(oriented) < 2:
        return frames
    groups = _orientation_groups(np.array([frames[i].orientation for i in oriented]))
    if len(groups) == 1:
        return frames
    sizes = sorted((len(g) for g in groups), reverse=True)
    if sizes[0] == sizes[1]:
        raise MedsegInputError(
            "slices in one series have different orientations ("
            + " and ".join(str(n) for n in sizes[:3]) + (" …" if len(sizes) > 3 else "")
            + " slices) and none holds most of them; cannot stack them", path)
    keep = max(groups, key=len)
    others = {oriented[i] for g in groups if g is not keep for i in g}
    warns.append(f"{counted(len(others), 'slice')} in another orientation "
                 f"than the series' other {len(frames) - len(others)} (a scout or a reformat "
                 "filed with it) left out")
    return [f for i, f in enumerate(frames) if i not in others]


def _without_other_sizes(frames: list[_Frame], path: Path, warns: list[str]) -> list[_Frame]:
    """The frames less those of another size (rows × columns) than most of the series: as
    for an orientation, one key image or reformat filed under the series' UID made the
    whole series unreadable. With no majority there is nothing to tell which is the
    series (refused by :func:`_check_stackable`)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault((f.rows, f.cols), []).append(i)
    if len(groups) == 1:
        return frames
    counts = sorted((len(g) for g in groups.values()), reverse=True)
    if counts[0] == counts[1]:
        return frames
    keep = max(groups, key=lambda k: len(groups[k]))
    others = [f for f in frames if (f.rows, f.cols) != keep]
    sizes = ", ".join(sorted({f"{f.rows}×{f.cols}" for f in others}))
    warns.append(f"{counted(len(others), 'slice')} of another size ({sizes}) than the "
                 f"series' other {len(frames) - len(others)} ({keep[0]}×{keep[1]}; a key image "
                 "or a reformat filed with it) left out")
    return [f for f in frames if (f.rows, f.cols) == keep]


def _check_stackable(frames: list[_Frame], path: Path) -> None:
    """Slices of one volume must share size and pixel spacing."""
    shapes = sorted({(f.rows, f.cols) for f in frames})
    if len(shapes) > 1:
        listed = " and ".join(f"{r}×{c}" for r, c in shapes[:2])
        raise MedsegInputError(f"slices in one series differ in size ({listed})", path)
    spacings = {f.pixel_spacing for f in frames if f.pixel_spacing is not None}
    if len(spacings) > 1 and np.ptp(np.array(sorted(spacings)), axis=0).max() > 1e-4:
        raise MedsegInputError("slices in one series have different pixel spacings", path)


def _spread_along_z(frames: list[_Frame]) -> bool:
    """Whether the slice positions step mainly along the patient's z (S): the one case
    where a series without ImageOrientationPatient can be taken as axial. A sagittal
    stack (steps along x) or a cine series (one position) would collapse onto one slice."""
    spread = np.ptp(np.array([f.position for f in frames], dtype=float), axis=0)
    return bool(spread[2] > 0 and spread[2] >= 2 * max(spread[0], spread[1]))


def _placed_by_slice_location(frames: list[_Frame], warns: list[str]) -> list[_Frame]:
    """Files without ImagePositionPatient placed along their normal by SliceLocation,
    when every file has a distinct one: sorted by InstanceNumber and stacked back to
    back instead, a missing file went unnoticed and every later slice sat a slice off.
    (Frames of one multi-frame file, or any file without it: returned as they are.)"""
    if len({id(f.source) for f in frames}) != len(frames):
        return frames
    locations = []
    for f in frames:
        try:
            location = float(f.source.header.get("SliceLocation"))
        except (TypeError, ValueError):
            return frames
        if not np.isfinite(location):
            return frames
        locations.append(location)
    if len(set(np.round(locations, 2))) < len(locations):  # repeats: not one stack's places
        return frames
    axial = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    out = []
    for f, location in zip(frames, locations):
        iop = axial if f.orientation is None else np.asarray(f.orientation, dtype=float)
        out.append(replace(f, position=location * _normal(iop), orientation=iop))
    warns.append("ImagePositionPatient missing; slices placed along their normal by "
                 "SliceLocation (where the stack lies in the patient is unknown)"
                 + ("" if all(f.orientation is not None for f in frames)
                    else "; ImageOrientationPatient missing too, taken as axial"))
    return out


def _sort(
    frames: list[_Frame], path: Path, warns: list[str]
) -> tuple[list[_Frame], np.ndarray | None, np.ndarray | None]:
    """Frames in z order, one per position; their positions along the normal; (z, y, x) axes.

    With every position and orientation known, frames are sorted along the normal (ties by
    InstanceNumber, keeping the first); otherwise by InstanceNumber / frame number, and
    positions and axes are None.
    """
    if (all(f.position is not None and f.orientation is None for f in frames)
            and len(frames) > 1 and _spread_along_z(frames)):
        # positions without ImageOrientationPatient: sorting by InstanceNumber threw the
        # positions away (wrong order, no gaps); axial is the one orientation to assume
        warns.append("ImageOrientationPatient missing; slices taken as axial and sorted by "
                     "their positions")
        frames = [replace(f, orientation=np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])) for f in frames]
    if len(frames) > 1 and all(f.position is None for f in frames):
        frames = _placed_by_slice_location(frames, warns)
    placed = [f.position is not None and f.orientation is not None for f in frames]
    unplaced = len(frames) - sum(placed)
    if sum(placed) >= 2 and 0 < unplaced <= max(2, len(frames) // 5):
        # a few slices without a position: sort the others by theirs (a dropped slice then
        # shows as a gap) rather than give up every slice's position
        dropped = unplaced
        warns.append(f"{counted(dropped, 'slice')} without a position "
                     f"(ImagePositionPatient) left out")
        frames = [f for f, ok in zip(frames, placed) if ok]
    orders = np.array([f.order for f in frames])
    if not all(f.position is not None and f.orientation is not None for f in frames):
        if len(frames) > 1:
            one_file = len({id(f.source) for f in frames}) == 1
            by = "frames kept in file order" if one_file else "sorted by InstanceNumber"
            warns.append(f"slice positions missing; {by}")
        ordering = np.lexsort((np.arange(len(frames)), orders))
        return [frames[i] for i in ordering], None, None

    iops = np.array([f.orientation for f in frames])
    if np.abs(iops - iops[0]).max() > _SAME_ORIENTATION:
        raise MedsegInputError(
            "slices in one series have different orientations; cannot stack them", path
        )
    row_dir, col_dir = _unit(iops[0][:3]), _unit(iops[0][3:])
    normal = _cross_unit(row_dir, col_dir)
    keys = np.array([float(np.dot(f.position, normal)) for f in frames])
    if _repeats(keys):
        frames, keys, orders = _one_acquisition(frames, keys, orders, warns)
    ordering = np.lexsort((orders, keys))
    frames, keys = [frames[i] for i in ordering], keys[ordering]
    keep = np.concatenate([[True], np.diff(keys) > _SAME_POSITION_MM])
    if not keep.all():
        dropped = int((~keep).sum())
        warns.append(
            f"{counted(dropped, 'slice')} at an earlier slice's position "
            "(several echoes or phases?); kept one slice per position"
        )
        frames, keys = [f for f, k in zip(frames, keep) if k], keys[keep]
    return frames, keys, np.array([normal, col_dir, row_dir])


def _repeats(keys: np.ndarray) -> bool:
    return bool(np.any(np.diff(np.sort(keys)) <= _SAME_POSITION_MM))


def _one_acquisition(frames: list[_Frame], keys: np.ndarray, orders: np.ndarray,
                     warns: list[str]) -> tuple[list[_Frame], np.ndarray, np.ndarray]:
    """Where slices repeat positions and their tags (echo, phase, acquisition number)
    split them into acquisitions that each cover (nearly) every position, the frames of
    one acquisition: keeping one slice per position otherwise mixed two phases slice by
    slice. Acquisitions that each cover only part of the range (a step-and-shoot scan's
    overlapping slabs) are kept together, one slice per position."""
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(f.acquisition, []).append(i)
    if len(groups) < 2:
        return frames, keys, orders

    def distinct(idx: list[int]) -> int:
        k = np.sort(keys[idx])
        return int(1 + np.sum(np.diff(k) > _SAME_POSITION_MM))

    everywhere = distinct(list(range(len(frames))))
    coverage = {key: distinct(idx) for key, idx in groups.items()}
    best = min(groups, key=lambda key: (-coverage[key], float(orders[groups[key]].min())))
    if coverage[best] < 0.8 * everywhere:
        return frames, keys, orders
    differ = [tag for tag, _ in best if len({dict(key).get(tag) for key in groups}) > 1]
    named = ", ".join(f"{tag} {value}" for tag, value in best if tag in differ) or "no tag"
    idx = groups[best]
    warns.append(
        f"series holds {len(groups)} acquisitions at the same positions (they differ in "
        f"{', '.join(differ) or 'their tags'}); opened one ({named}: {len(idx)} slices), "
        "not a mix of them")
    return [frames[i] for i in idx], keys[idx], orders[idx]


def _layout(steps: np.ndarray, path: Path, warns: list[str]) -> tuple[np.ndarray, float]:
    """Output z index of each acquired slice (leaving room for gaps), and the z spacing."""
    step = float(np.median(steps))
    smallest = float(steps.min())
    if smallest > 0 and step / smallest >= 1.25:
        # in a short series or one with many gaps the median is itself a gap (steps
        # 2, 1 mm: one slice missing, not 1.5 mm spacing): if every step is a small whole
        # number of the smallest, and steps of that size are not a stray one or two
        # (a range ending off the grid, a near-duplicate slice), that is the spacing
        multiple = steps / smallest
        whole = np.rint(multiple)
        # in a short series one step of the smallest size is enough, unless it is only
        # the first or the last step (a range ending off the grid: 5, 5, 5, 2.5 mm made
        # a 2.5 mm volume with every other slice missing)
        inside = len(steps) < 3 or bool(np.any(whole[1:-1] == 1))
        common = np.sum(whole == 1) >= len(steps) / 3 or (len(steps) <= 4 and inside)
        if common and whole.max() <= 10 and np.all(np.abs(multiple - whole) <= 0.05):
            step = float(np.mean(steps[whole == 1]))
    ratio = steps / step
    n_missing = np.where(ratio > _GAP_FACTOR, np.rint(ratio) - 1, 0).astype(int)
    if int(n_missing.sum()) > _MAX_GAP_FACTOR * (len(steps) + 1) + 10:
        raise MedsegInputError(
            f"slice positions jump by up to {steps.max():.1f} mm with a usual step of "
            f"{step:.3g} mm; the series looks like several separate stacks",
            path,
        )
    position = np.concatenate([[0.0], np.cumsum(steps)])
    index = np.concatenate([[0], np.cumsum(1 + n_missing)])  # counting steps: robust to jitter
    if len(steps) >= 2 and np.all(np.abs(steps / (1 + n_missing) / step - 1) <= 0.1):
        # steps that only jitter (positions rounded in the file: 1.2 / 1.3 mm for 1.25):
        # the spacing fitted through all of them, not the median step (1.3 mm made a
        # 300-slice volume 15 mm too long)
        slope = float(np.polyfit(index, position, 1)[0])
        if abs(slope / step - 1) > 1e-3:
            step = slope
    # counting took a short step as a whole one and moved every later slice (5 mm at
    # two 2.5 mm steps among 5 mm ones; a gap landed on an acquired slice): when some
    # slice lies more than half a step off its place, the slices are placed by their
    # positions instead
    if np.abs(position - index * step).max() > 0.5 * step + 1e-6:
        step, index = _placed_by_position(steps, position, step, smallest)
    effective = steps / np.maximum(np.diff(index), 1)  # a gap of 3 steps is still even
    if np.abs(effective - step).max() / step > _UNEVEN_TOLERANCE:
        off = float(np.abs(position - index * step).max())
        warns.append(
            f"uneven slice spacing ({effective.min():.4g}–{effective.max():.4g} mm); "
            f"the volume uses a {step:.4g} mm grid"
            + (f", slices up to {off:.2g} mm from their recorded positions" if off > 0.01 else "")
        )
    return _one_per_position(index, position, step, warns), step


def _placed_by_position(steps: np.ndarray, position: np.ndarray, step: float,
                        smallest: float) -> tuple[float, np.ndarray]:
    """(spacing, index) for a series whose steps do not count: on the grid of the
    smallest step when every step is a whole number of it (2.5 / 5 mm: the 5 mm part has
    every other slice missing), or when the smallest is no near-duplicate (at least half
    the step: no two slices share a place); else the nearest places on the step's grid,
    where a near-duplicate shares one (:func:`_one_per_position` leaves it out)."""
    multiple = steps / smallest
    whole = np.rint(multiple)
    if whole.max() <= 10 and np.all(np.abs(multiple - whole) <= 0.05):
        grid = float(np.mean(steps[whole == 1]))
        return grid, np.concatenate([[0], np.cumsum(np.maximum(np.rint(steps / grid), 1))]).astype(int)
    if smallest >= 0.5 * step:
        return smallest, np.rint(position / smallest).astype(int)
    return step, np.rint(position / step).astype(int)


def _one_per_position(index: np.ndarray, position: np.ndarray, step: float,
                      warns: list[str]) -> np.ndarray:
    """``index`` with -1 for slices sharing a grid position with one nearer to it (a
    near-duplicate slice, 0.05 mm from another): left out, and said."""
    out = index.copy()
    for z in np.unique(index[np.r_[False, np.diff(index) == 0]]):
        at = np.flatnonzero(index == z)
        nearest = at[np.argmin(np.abs(position[at] - z * step))]
        out[at[at != nearest]] = -1
    dropped = int(np.sum(out < 0))
    if dropped:
        warns.append(f"{counted(dropped, 'slice')} closer to another than the "
                     f"{step:.4g} mm step left out (one slice per position)")
    return out


def _warn_if_sheared(frames: list[_Frame], axes: np.ndarray | None,
                     warns: list[str]) -> float:
    """Positions that drift within the slice plane mean a tilted gantry: say so, and
    return the drift across the stack in mm (0: none)."""
    if axes is None:
        return 0.0
    drift = frames[-1].position - frames[0].position
    along = float(np.dot(drift, axes[0]))
    sideways = float(np.linalg.norm(drift - along * axes[0]))
    if sideways > 0.1 and sideways > 0.01 * abs(along):
        warns.append(
            f"slice positions shift sideways by {sideways:.1f} mm across the stack "
            "(gantry tilt?); the volume is not corrected for this shear"
        )
        return sideways
    return 0.0


def _text_in_groups(ds: Dataset, keyword: str) -> str | None:
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return None
    value = _group_value(ds, 0, "PixelValueTransformationSequence", keyword)
    return (str(value).strip() or None) if value is not None else None


def _load_pixels(frames: list[_Frame], out_z: np.ndarray, nz: int) -> np.ndarray:
    """Decode each file once and copy its frames into place; absent slices, and those of
    a file (one of several) whose pixels cannot be decoded, stay NaN (the caller says
    where, in the volume's final layout)."""
    rows, cols = frames[0].rows, frames[0].cols
    array = np.full((nz, rows, cols), np.nan, dtype=np.float32)
    by_source: dict[int, list[tuple[_Frame, int]]] = {}
    for frame, z in zip(frames, out_z):
        by_source.setdefault(id(frame.source), []).append((frame, int(z)))
    failed: list[int] = []
    first_error: MedsegInputError | None = None
    for members in by_source.values():
        source = members[0][0].source
        try:
            source.copy_frames(array, [(frame.index, z) for frame, z in members])
        except MedsegInputError as exc:
            if len(by_source) == 1 or "header declares more" in exc.reason:
                raise
            # one file of a series whose pixels cannot be decoded (cut short, damaged):
            # its slices become missing, as a gap would, rather than the series failing
            first_error = first_error or exc
            for _, z in members:  # … whole: no frame of it half copied
                array[z] = np.nan
            failed.extend(z for _, z in members)
            continue
    if failed and len(failed) == len(frames):
        raise first_error
    return array

"""NIfTI (.nii, .nii.gz) reader and writer, by way of nibabel.

Convention, shared with the DICOM reader: the image is reoriented (flips and axis
permutations only, no resampling) so that its voxel axes (i, j, k) point to the patient's
Left, Posterior and Superior, then transposed to (k, j, i) = (z, y, x). An axial slice thus
shows anterior at the top and the patient's right on the left (radiological display), and
z runs inferior → superior, exactly as a DICOM series sorted by position.

``spacing`` comes from the reoriented affine's column norms. ``origin`` is the position of
voxel (0, 0, 0) in LPS mm (NIfTI's RAS with x and y negated), measured along the volume's
axes: for an axis-aligned image that is simply its LPS (z, y, x) coordinate.
:func:`write_nifti` applies the inverse, so ``read_nifti(write_nifti(p, a, s, o))`` gives
back ``a``, ``s`` and ``o``.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import threading
import uuid
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, Mapping

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt2axcodes,
    ornt_transform,
)

from ..errors import MedsegInputError
from ..volume import Volume
from ..text import counted, slice_ranges
from ._common import (
    axis_code,
    drop_dead_writers_files,
    guess_modality,
    label_map_values,
    link_target,
    mode_for,
    obliquity_deg,
    origin_along,
    refuse_read_only,
    short_reason,
    source_name,
    temp_prefix,
    triplet,
    whole_number_labels,
)

__all__ = ["LabelMap", "guess_modality", "read_label_map", "read_nifti",
           "read_nifti_or_label_map", "write_nifti"]

_LPS = axcodes2ornt(("L", "P", "S"))
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# dtypes written as given: label maps keep their integers, float32 images stay float32
_KEPT_DTYPES = {np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "int32", "uint32")}
# A label map is marked with NIfTI's standard label intent (NIFTI_INTENT_LABEL, 1002)
# and its structure names ride in a JSON comment extension under this key, so a file this
# plugin wrote opens again as a Labels layer with its names, not as a float32 image.
_NAMES_KEY = "napari-medseg"
_COMMENT_CODE = 6
_MAX_NAME_CHARS = 256  # a structure name, as written and as read back


@dataclass(frozen=True)
class LabelMap:
    """A label map read from NIfTI: integer ``labels`` (z, y, x) exactly as stored (no
    float32 rounding), the ``volume`` giving its geometry, and the structure ``names``
    the file carries (empty when it carries none)."""

    labels: np.ndarray
    volume: Volume
    names: dict[int, str]


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI file as a (z, y, x) Volume in the LPS convention described above."""
    return _read(path, want_labels=False)[0]


def read_nifti_or_label_map(path: str | Path) -> Volume | LabelMap:
    """The file as a :class:`LabelMap` when it is one (NIfTI's label intent on integer
    data, as :func:`write_nifti` writes with ``labels=True``), else as a Volume; read once."""
    volume, labels, names = _read(path)
    return volume if labels is None else LabelMap(labels, volume, names)


def read_label_map(path: str | Path) -> LabelMap | None:
    """The file as a :class:`LabelMap`, or None when it is not a label map."""
    opened = read_nifti_or_label_map(path)
    return opened if isinstance(opened, LabelMap) else None


def _ours(header: Any) -> dict:
    """This plugin's JSON comment extension (see ``write_nifti``); {} when absent or
    malformed (what it says is display text and provenance: it must not stop the file
    opening)."""
    import json

    for ext in getattr(header, "extensions", ()):
        try:
            if ext.get_code() != _COMMENT_CODE:
                continue
            ours = json.loads(ext.get_content().decode("utf-8"))[_NAMES_KEY]
            if isinstance(ours, dict):
                return ours
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError,
                RecursionError):
            continue
    return {}


def label_names_in_header(path: str | Path) -> dict[int, str]:
    """The structure names a NIfTI file's header carries ({} when none), read from the
    header alone: no voxel is loaded (a caller reading the voxels already read them)."""
    try:
        return _label_names(nib.load(str(Path(path).expanduser())).header)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return {}


def _label_names(header: Any) -> dict[int, str]:
    """Structure names from this plugin's JSON comment extension; {} when absent or
    malformed."""
    try:
        names = _ours(header)["label_names"]
        return {int(k): str(v)[:_MAX_NAME_CHARS] for k, v in names.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _synthetic_planes(header: Any, transform: np.ndarray, axes_zyx: np.ndarray,
                      shape_zyx: tuple[int, ...]) -> dict | None:
    """Which slices of the file ``napari-medseg generate`` made, as ``{"axis", "indices"}``
    in the volume as read; None when the file says none, or when it no longer reads in the
    frame the indices were counted in (:func:`_as_written`: cropped or turned since, they
    would name other slices)."""
    ours = _ours(header)
    generated, name = ours.get("generated_slices"), ours.get("slice_axis", "z")
    as_written = len(shape_zyx) == 3 and _as_written(transform, header, axes_zyx, shape_zyx)
    if ours.get("synthetic") is not True or not isinstance(generated, list) \
            or name not in ("z", "y", "x") or len(shape_zyx) != 3 or not as_written:
        return None
    n = shape_zyx["zyx".index(name)]
    if any(isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < n for g in generated):
        return None
    method = ours.get("method")
    return {"axis": name, "indices": sorted(generated),
            **({"method": method[:40]} if isinstance(method, str) and method else {})}


def _as_written(transform: np.ndarray, header: Any, axes_zyx: np.ndarray,
                shape_zyx: tuple[int, ...]) -> bool:
    """Whether slice indices in the file's extension, which name slices of the (z, y, x)
    volume the writer was given, name the same slices of the volume as read now. The
    writer records that volume's frame (``read_frame``: its axes in LPS and its shape);
    it must be the frame read now (another tool that only stored the file in another
    voxel order changes nothing; one that cropped or turned the grid does). A file
    without the record (an older one) must be read unturned, as it was written."""
    frame = _ours(header).get("read_frame")
    if isinstance(frame, dict):
        try:
            axes = np.asarray(frame["axes_lps"], dtype=float)
            shape = tuple(int(n) for n in frame["shape_zyx"])
        except (KeyError, TypeError, ValueError):
            return False
        return (axes.shape == (3, 3) and shape == tuple(shape_zyx)
                and bool(np.allclose(axes, axes_zyx, atol=1e-3)))
    return bool((np.asarray(transform)[:, 0] == np.arange(3)).all()
                and (np.asarray(transform)[:, 1] > 0).all())


def _series_gaps(header: Any, transform: np.ndarray, axes_zyx: np.ndarray,
                 array: np.ndarray) -> dict:
    """A coronal / sagittal series' slice axis and its missing planes, as the file's
    extension records them (this plugin's writer keeps what the DICOM reader found):
    planes that hold no value, while the file lies as written; {} otherwise."""
    from ..volume import planes_still_missing

    ours = _ours(header)
    if array.ndim != 3 or not _as_written(transform, header, axes_zyx, array.shape):
        return {}
    out: dict = {}
    if ours.get("series_slice_axis") in ("y", "x"):
        out["slice_axis"] = ours["series_slice_axis"]
    planes = ours.get("missing_planes")
    if isinstance(planes, dict) and planes.get("axis") in ("y", "x"):
        kept = planes_still_missing(array, planes)
        if kept:
            out["missing_planes"] = kept
    return out


def _synthetic_slices(header: Any, shape_zyx: tuple[int, ...] | None = None) -> int:
    """How many slices of the file ``napari-medseg generate`` made (0: none said); with
    ``shape_zyx``, only those the file still has along its slice axis (a record copied
    onto a cut or projected layer named slices the file did not hold)."""
    ours = _ours(header)
    generated = ours.get("generated_slices")
    if ours.get("synthetic") is not True or not isinstance(generated, list):
        return 0
    name = ours.get("slice_axis", "z")
    if shape_zyx is None or len(shape_zyx) != 3 or name not in ("z", "y", "x"):
        return len(generated)
    n = shape_zyx["zyx".index(name)]
    return sum(1 for g in generated
               if isinstance(g, int) and not isinstance(g, bool) and 0 <= g < n)


@contextlib.contextmanager
def _nibabel_messages():
    """Collect what nibabel logs while reading a header (it prints to stderr through its
    own handler otherwise, past the CLI's "COMMAND: warning:" lines and napari's
    notifications); yields the list of messages."""
    logger = logging.getLogger("nibabel.global")
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    with _NIBABEL_LOG_LOCK:  # two reads at once must not each restore the other's handler
        handlers, propagate = logger.handlers[:], logger.propagate
        logger.handlers[:] = [Collect(level=logging.WARNING)]
        logger.propagate = False
        try:
            yield messages
        finally:
            logger.handlers[:] = handlers
            logger.propagate = propagate


_NIBABEL_LOG_LOCK = threading.Lock()


def _data_and_shape(img: Any, path: Path) -> tuple[np.ndarray, Any, tuple[int, ...]]:
    """The image's data, affine and shape (trailing 1s dropped); MedsegInputError for a
    file napari-medseg cannot use."""
    affine = getattr(img, "affine", None)
    if affine is None:
        raise MedsegInputError("the image has no spatial affine", path)
    if img.get_data_dtype().names is not None:
        raise MedsegInputError("RGB NIfTI is not supported; expected a grayscale volume", path)

    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1): one volume written as 4D
        shape = shape[:-1]
    if len(shape) == 4:
        raise MedsegInputError(
            f"4D NIfTI ({shape[3]} time points) is not supported; pick one volume", path
        )
    if len(shape) > 4:
        raise MedsegInputError(
            f"{len(shape)}D NIfTI (shape {shape}) is not supported; pick one volume", path
        )
    if len(shape) < 2:
        raise MedsegInputError(f"expected a 3D image, got shape {shape}", path)
    try:
        data = _scaled_data(img.dataobj)
        _read_to_the_end(img)
    except Exception as exc:
        raise MedsegInputError(
            f"could not read the image data ({short_reason(exc, path=path)})", path
        ) from exc
    return data, affine, shape


def _read(path: str | Path, want_labels: bool = True
          ) -> tuple[Volume, np.ndarray | None, dict[int, str]]:
    path = Path(path).expanduser()
    if not path.exists():
        raise MedsegInputError("no such file or folder", path)
    if path.is_file() and path.stat().st_size == 0:  # nibabel: "Binary block is wrong size"
        raise MedsegInputError("the file is empty", path)
    try:
        with _nibabel_messages() as fixed:
            img = _load(path)
    except Exception as exc:
        raise MedsegInputError(f"not a readable NIfTI file ({short_reason(exc, path=path)})",
                               path) from exc
    try:  # the header's checks, then the data, read to the end of a gzip stream
        data, affine, shape = _data_and_shape(img, path)
    finally:
        _close(img)
    data = np.asarray(data).reshape(shape if len(shape) == 3 else shape + (1,))

    # what nibabel fixed in the header (e.g. zero voxel sizes set to 1), said as ours
    warns: list[str] = [f"the header was repaired on reading ({m})" for m in fixed]
    qform = _qform_for_degenerate_sform(img.header)
    if qform is not None:
        affine = qform
        warns.append("the header's sform is degenerate (no volume: all zero, or a flat or "
                     "non-finite matrix); its qform is used")
    else:
        warns += _forms_disagree(img.header, shape)
    # the axes' patient directions are what the header says, unless it says none
    oriented = not _no_orientation(img.header)
    if not oriented:
        warns.append("the header gives no orientation (qform and sform codes 0): left-right "
                     "and position unknown; axes taken as stored, origin at the centre")
    affine = np.array(affine, dtype=float)
    # lengths in the file's own unit (NIfTI's xyzt_units): a header in metres read as mm
    # gave 0.0007 mm voxels; "unknown" is taken as mm, as every tool does
    unit = img.header.get_xyzt_units()[0] if hasattr(img.header, "get_xyzt_units") else None
    to_mm = {"meter": 1000.0, "micron": 0.001}.get(unit)
    if to_mm is not None:
        affine[:3, :4] *= to_mm
        warns.append(f"the header gives lengths in {unit}s; converted to mm")
    if not np.isfinite(affine[:3, :4]).all():  # NaN/inf in the header: no geometry to trust
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=float) * (to_mm or 1.0)
        zooms = np.pad(zooms, (0, 3 - len(zooms)), constant_values=1.0)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # stored axes as L, P, S (in RAS terms)
        oriented = False
        usable = bool(np.all(np.isfinite(zooms) & (zooms > 0)))
        if usable:
            affine[:3, :3] *= zooms
        warns.append("the header's affine holds NaN or infinite values; axes taken as stored"
                     + ("" if usable else ", voxel size 1.0 mm"))
    affine = _repair_one_flat_axis(affine, img.header, to_mm or 1.0, warns)
    try:
        ornt = io_orientation(affine)
    except (np.linalg.LinAlgError, ValueError):
        ornt = np.full((3, 2), np.nan)
    if np.isnan(ornt).any():  # degenerate affine: no direction to reorient by
        warns.append("the header's orientation is invalid; axes taken as stored")
        ornt = _LPS
        oriented = False
    # the file's own voxel order (e.g. "RAS": i runs to the right), so results written
    # for it can be stored in that order (write_nifti's ``stored_orientation``); a file
    # without orientation too: nibabel's made-up affine turned it, the result turns back
    stored = "".join(ornt2axcodes(ornt))
    transform = ornt_transform(ornt, _LPS)
    data = apply_orientation(data, transform)
    affine = affine @ inv_ornt_aff(transform, shape if len(shape) == 3 else shape + (1,))

    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # (i, j, k)
    if not np.all(np.isfinite(zooms) & (zooms > 0)):
        warns.append("the header's voxel size is invalid; using 1.0 mm")
        zooms = np.ones(3)
        axes_ijk = np.eye(3)
    else:
        axes_ijk = (_RAS_TO_LPS @ (affine[:3, :3] / zooms)).T  # rows: i, j, k unit axes in LPS
    axes_zyx = axes_ijk[::-1]
    array = data.transpose(2, 1, 0)
    spacing_zyx = zooms[::-1].astype(float)
    first = _RAS_TO_LPS @ affine[:3, 3]  # LPS of voxel (0, 0, 0)
    array, spacing_zyx, axes_zyx, first = _one_plane_as_acquired(
        array, spacing_zyx, axes_zyx, first)
    skew = float(np.degrees(np.arcsin(np.clip(np.abs(axes_zyx @ axes_zyx.T - np.eye(3)).max(),
                                              0.0, 1.0))))
    if skew > 0.1:  # a gantry tilt kept as shear in the affine: not a rotation
        warns.append(f"sheared image (its axes {skew:.1f}° off perpendicular, a gantry "
                     "tilt?); shown unsheared, coordinates are measured along the image axes")
    elif obliquity_deg(axes_zyx) > 1.0:
        warns.append(
            f"oblique image ({obliquity_deg(axes_zyx):.1f}° off the patient axes); "
            "shown unrotated, coordinates are measured along the image axes"
        )
    origin = origin_along(first, axes_zyx)

    marked = img.header.get_intent()[0] == "label"
    if want_labels and marked and np.issubdtype(array.dtype, np.floating):
        array = whole_number_labels(array)  # MONAI's SaveImage writes float32 label maps
    unmarked_values = (None if marked or not want_labels else label_map_values(array))
    is_label_map = want_labels and np.issubdtype(array.dtype, np.integer) and (
        marked or unmarked_values is not None)
    # The affine is stored as float32: round off its noise (0.8 → 0.800000011920929) so
    # written spacings come back as written: 6 significant digits (float32 holds about
    # 7); decimals rounded a 1e-9 voxel to 0. 1e-4 mm is far below any origin's precision.
    spacing = tuple(float(f"{float(z):.6g}") for z in spacing_zyx)
    origin = tuple(round(o, 4) for o in origin)
    synthetic = _synthetic_slices(img.header, array.shape)
    synthetic_planes = (_synthetic_planes(img.header, transform, axes_zyx, array.shape)
                        if synthetic else None)
    explained = _ours(img.header).get("explanation_map")
    explained = explained[:200] if isinstance(explained, str) and explained else None
    if explained:  # saved from a Grad-CAM, uncertainty or heatmap layer: no model runs on it
        warns.append(f"this file is a napari-medseg explanation map ({explained}), not a scan")
    gaps = _series_gaps(img.header, transform, axes_zyx, array)
    if "missing_planes" in gaps:  # as the DICOM reader said it of the series
        planes = gaps["missing_planes"]
        warns.append(f"{counted(len(planes['indices']), 'missing slice')} of the series (NaN "
                     f"planes at {planes['axis']}={slice_ranges(planes['indices'])}: nothing "
                     "is labelled or detected there)")
    if synthetic:  # said on opening, and generation refuses to count them as acquired
        warns.append(f"{counted(synthetic, 'slice')} of this file "
                     f"{'was' if synthetic == 1 else 'were'} generated by napari-medseg:"
                     " synthetic, not acquired, not for diagnosis")
    try:
        volume = Volume(
            array=array,
            spacing=spacing,
            origin=origin,
            modality=guess_modality(array),
            metadata={
                "source_format": "nifti",
                "source_name": source_name(path),
                "n_files": 1,
                # turned to L, P, S, except one plane kept as acquired (a coronal one)
                **({"orientation": "".join(axis_code(a) for a in axes_zyx[::-1])}
                   if oriented else {}),
                "stored_orientation": stored,
                **({"stored_ndim": 2} if len(shape) == 2 else {}),
                # + 0.0: a flipped axis's zeros are -0.0, shown as such in Info and the CLI
                **({"axes_lps": (np.round(axes_zyx, 6) + 0.0).tolist()}
                   if abs(np.linalg.det(axes_zyx)) > 1e-3 else {}),
                "warnings": warns,
                **gaps,
                **({"synthetic_slices": synthetic} if synthetic else {}),
                **({"synthetic_planes": synthetic_planes} if synthetic_planes else {}),
                **({"explanation_map": explained} if explained else {}),
            },
        )
    except MedsegInputError as exc:
        raise MedsegInputError(exc.reason, path) from exc
    if not is_label_map:
        return volume, None, {}
    if not marked:  # said where it opens as labels (read as a scan, it needs no word)
        values = unmarked_values
        volume = replace(volume, metadata={**volume.metadata, "warnings": [
            *warns, f"integer values 0–{int(values[-1])} ({len(values)} besides 0) and no"
                    " label intent: opened as a label map"]})
    # native byte order: napari drew a big-endian label 1 as 256 (a colour no label has)
    native = array.astype(array.dtype.newbyteorder("="), copy=False)
    return volume, np.ascontiguousarray(native), _label_names(img.header)


def _one_plane_as_acquired(array: np.ndarray, spacing: np.ndarray, axes: np.ndarray,
                           first: np.ndarray) -> tuple:
    """A single coronal or sagittal plane (one voxel along P or L) stays one plane:
    (1, rows, columns) with its normal as z, superior at the top, as a single DICOM image
    does. Turned to (S, P, L) like a volume it became a stack of one-row "axial slices"
    that the models segmented and classified. Anything else is returned as it is."""
    flat = [a for a in range(3) if array.shape[a] == 1]
    if len(flat) != 1 or flat[0] == 0 or array.size == 1:
        return array, spacing, axes, first
    order = [flat[0]] + [a for a in range(3) if a != flat[0]]
    array, spacing, axes = np.transpose(array, order), spacing[order], axes[order]
    for a in (1, 2):  # an in-plane axis running superior is shown running down
        if axes[a, 2] > 0 and abs(axes[a, 2]) >= np.abs(axes[a]).max():
            first = first + (array.shape[a] - 1) * float(spacing[a]) * axes[a]
            array, axes = np.flip(array, axis=a), axes.copy()
            axes[a] = -axes[a]
    return np.ascontiguousarray(array), spacing, axes, first


def _qform_for_degenerate_sform(header: Any) -> np.ndarray | None:
    """The qform, when the sform nibabel would use (its code set) spans no volume and the
    qform is set and does: a zeroed sform lost every spacing and the origin."""
    try:
        sform, s_code = header.get_sform(coded=True)
        qform, q_code = header.get_qform(coded=True)
    except Exception:  # not a NIfTI header, or a broken quaternion
        return None
    if not (s_code and q_code) or sform is None or qform is None:
        return None

    def spans(matrix: np.ndarray) -> bool:
        m = np.asarray(matrix, dtype=float)[:3, :3]
        columns = np.linalg.norm(m, axis=0)
        return bool(np.isfinite(m).all() and np.all(columns > 0)
                    and abs(np.linalg.det(m)) > 1e-6 * float(np.prod(columns)))

    return np.array(qform, dtype=float) if not spans(sform) and spans(qform) else None


def _forms_disagree(header: Any, shape: tuple[int, ...]) -> list[str]:
    """A warning when the header's sform and qform both hold a position and place the
    image's corners more than 1 mm apart: the sform is used (as nibabel and FSL do), but
    another tool (ITK's readers among them) may take the qform and show it elsewhere."""
    try:
        sform, s_code = header.get_sform(coded=True)
        qform, q_code = header.get_qform(coded=True)
    except Exception:  # not a NIfTI header, or a broken quaternion: nothing to compare
        return []
    if not (s_code and q_code) or sform is None or qform is None:
        return []
    extent = [n - 1 for n in (tuple(shape) + (1, 1, 1))[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, extent[0]) for j in (0, extent[1])
                        for k in (0, extent[2])]).T
    apart = float(np.max(np.linalg.norm((sform - qform)[:3] @ corners, axis=0)))
    if not np.isfinite(apart) or apart <= 1.0:
        return []
    return [f"the header's sform and qform place the image up to {apart:.1f} mm apart; the "
            "sform is used (as nibabel and FSL do), another viewer may use the qform"]


def _scaled_data(proxy: Any) -> np.ndarray:
    """The voxels with scl_slope/scl_inter applied. nibabel scales integers in float64:
    an int16 CT with a slope (dcm2niix writes one) took 4 bytes per stored byte before
    the float32 the volume keeps; scaled here in float32, in place."""
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    raw_dtype = getattr(proxy, "dtype", None)
    if (not hasattr(proxy, "get_unscaled") or raw_dtype is None
            or not np.issubdtype(raw_dtype, np.integer) or (slope == 1.0 and inter == 0.0)
            or not (np.isfinite(slope) and np.isfinite(inter))):
        return np.asanyarray(proxy)  # nibabel's own rules (and its messages) for the rest
    data = np.asarray(proxy.get_unscaled()).astype(np.float32)
    if slope != 1.0:
        data *= np.float32(slope)
    if inter != 0.0:
        data += np.float32(inter)
    return data


def _no_orientation(header: Any) -> bool:
    """Neither the qform nor the sform is set (NIfTI's "method 1"): nibabel makes up an
    affine, whose left-right and origin the file never said."""
    try:
        return int(header["qform_code"]) <= 0 and int(header["sform_code"]) <= 0
    except (KeyError, TypeError, ValueError):  # not a NIfTI header
        return False


def _nifti_class(head: bytes) -> Any:
    """NIfTI-2 or NIfTI-1, by the header's first four bytes (sizeof_hdr, in either byte
    order)."""
    sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
    return nib.Nifti2Image if 540 in sizes else nib.Nifti1Image


def _load(path: Path) -> Any:
    """``nib.load``, but a ``.gz`` file is read through a gzip stream of ours that
    :func:`_read_to_the_end` finishes: nibabel stops after the data and never reaches the
    gzip trailer, so a file damaged in storage or transfer opened with wrong voxels
    (1 bit flipped: 50 of 58 such files opened, none said so)."""
    from nibabel.fileholders import FileHolder

    if not path.name.lower().endswith(".gz"):
        if path.suffix in (".nii", ".NII") or path.suffix.lower() != ".nii":
            # read, not memory-mapped: a layer that was a view of the file changed when
            # another tool rewrote it, and napari died (SIGBUS) when the file was cut short
            return nib.load(path, mmap=False)
        # "scan.Nii": nibabel knows only all-lower and all-upper names (it looked for
        # "scan.nii", which does not exist); read as the file it is
        with open(path, "rb") as f:
            klass = _nifti_class(f.read(4))
        holder = FileHolder(filename=str(path))
        return klass.from_file_map({"header": holder, "image": holder}, mmap=False)

    stream = gzip.open(path, "rb")
    try:
        klass = _nifti_class(stream.read(4))
        stream.seek(0)
        holder = FileHolder(filename=str(path), fileobj=stream)
        return klass.from_file_map({"header": holder, "image": holder})
    except BaseException:
        stream.close()
        raise


def _read_to_the_end(img: Any) -> None:
    """Read a gzip stream of :func:`_load` to its end, where gzip checks the data's CRC
    and length (the data run to the end of a .nii.gz: little is left to read)."""
    stream = _stream(img)
    if stream is not None:
        while stream.read(1 << 20):
            pass


def _stream(img: Any) -> Any:
    holder = getattr(img, "file_map", {}).get("image")
    stream = getattr(holder, "fileobj", None)
    return stream if isinstance(stream, gzip.GzipFile) else None


def _close(img: Any) -> None:
    stream = _stream(img)
    if stream is not None:
        stream.close()


def _repair_one_flat_axis(affine: np.ndarray, header, to_mm: float,
                          warns: list[str]) -> np.ndarray:
    """One zero column (a 2D image written with a zero slice step, a header zeroed by a
    tool): that axis is taken perpendicular to the other two, pointing along a positive
    patient axis, its size from pixdim (else 1 mm). Without this the whole orientation and
    every voxel size were dropped (0.8 × 0.6 mm pixels read as 1 × 1 mm, left–right
    flipped)."""
    columns = affine[:3, :3]
    norms = np.sqrt((columns ** 2).sum(axis=0))
    flat = norms <= 1e-6 * max(float(norms.max()), 1e-12)
    if int(flat.sum()) != 1:
        return affine
    k = int(np.flatnonzero(flat)[0])
    a, b = (columns[:, i] / norms[i] for i in range(3) if i != k)
    direction = np.cross(a, b)
    if float(np.linalg.norm(direction)) < 1e-6:  # the other two parallel: nothing to go by
        return affine
    direction /= np.linalg.norm(direction)
    direction *= np.sign(direction[int(np.argmax(np.abs(direction)))])
    zooms = header.get_zooms()
    size = float(zooms[k]) * to_mm if len(zooms) > k else 0.0
    usable = np.isfinite(size) and size > 0
    repaired = affine.copy()
    repaired[:3, k] = direction * (size if usable else 1.0)
    warns.append(f"the header's affine gives axis {'ijk'[k]} no direction; taken perpendicular"
                 f" to the other two, {size if usable else 1.0:g} mm"
                 + ("" if usable else " (voxel size unknown)"))
    return repaired


def voxel_order(codes: Any) -> np.ndarray | None:
    """nibabel's orientation for axis ``codes`` of i, j, k (e.g. "RAS": i runs to the
    patient's right, j anterior, k superior), or None if they name no three axes."""
    letters = tuple(codes.upper()) if isinstance(codes, str) else ()
    try:
        want = axcodes2ornt(letters) if len(letters) == 3 else None
    except ValueError:
        return None
    if want is None or np.isnan(want).any() or sorted(want[:, 0].tolist()) != [0, 1, 2]:
        return None
    return want


def _turn_to(affine: np.ndarray, codes: str | None, path: Path) -> np.ndarray | None:
    """The orientation transform (nibabel's) from the voxel order of ``affine`` to the
    axis ``codes`` (e.g. "RAS"); None when there is nothing to turn."""
    if codes is None:
        return None
    want = voxel_order(codes)
    if want is None:
        raise MedsegInputError(f"not a voxel order: {codes!r} (axis codes such as 'RAS')",
                               path)
    try:
        turn = ornt_transform(io_orientation(affine), want)
    except (np.linalg.LinAlgError, ValueError):
        return None  # no clear axis directions: stored as given
    if (turn[:, 0] == np.arange(3)).all() and (turn[:, 1] > 0).all():
        return None
    return turn


def _storage_dtype(array: np.ndarray, path: Path, keep_float64: bool = False) -> np.ndarray:
    """Integers stay integers (label maps), everything else becomes float32 (float64
    stays, with ``keep_float64``)."""
    if keep_float64 and array.dtype == np.float64:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype in _KEPT_DTYPES or array.dtype == np.float32:
        return array
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return array.astype(np.int32)
        if lo >= 0 and hi <= np.iinfo(np.uint32).max:  # a uint64 layer of uint32 values
            return array.astype(np.uint32)
        raise MedsegInputError(f"{array.dtype} values do not fit NIfTI's int32 or uint32", path)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise MedsegInputError(f"cannot write dtype {array.dtype} to NIfTI", path)


def _unit_axes(axes: Any, path: Path) -> np.ndarray:
    """(3, 3) rows z, y, x: unit vectors in LPS; the identity-like (S, P, L) for None."""
    if axes is None:
        return np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    try:
        a = np.asarray(axes, dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"axes must be 3 × 3 numbers, got {axes!r}", path) from exc
    norms = np.linalg.norm(a, axis=1)
    if not (np.isfinite(a).all() and (norms > 1e-6).all()) \
            or abs(np.linalg.det(a / norms[:, None])) < 1e-3:
        raise MedsegInputError(f"axes must be three independent directions, got {a.tolist()}", path)
    return a / norms[:, None]


def write_nifti(
    path: str | Path,
    array: Any,
    spacing: Any,
    origin: Any = (0.0, 0.0, 0.0),
    axes: Any = None,
    matrix: Any = None,
    labels: bool = False,
    label_names: Mapping[int, str] | None = None,
    description: str = "",
    info: Mapping[str, Any] | None = None,
    keep_float64: bool = False,
    stored_orientation: str | None = None,
    stored_ndim: int | None = None,
) -> Path:
    """Write a (z, y, x) array to ``path`` (.nii or .nii.gz) atomically; return the path.

    ``spacing`` and ``origin`` are (z, y, x) mm in the convention of :func:`read_nifti`.
    ``axes``: the (z, y, x) voxel axes as unit vectors in LPS (rows), as the readers
    record them in a Volume's ``metadata["axes_lps"]``; None means (S, P, L). Without
    them a coronal, flipped or oblique input's result would land elsewhere in the patient.
    ``matrix``: instead of ``spacing`` and ``origin``, the whole (4, 4) map from (z, y, x)
    voxel indices to mm along those axes (a napari layer rotated, sheared or given an
    affine on top of its scale and translate).
    Integer arrays keep their dtype (bool → uint8, int64 → int32); others become float32
    (``keep_float64``: a float64 array stays float64).
    ``labels``: mark the file as a label map (NIfTI's label intent; integers only), with
    ``label_names`` (value → structure name) stored beside it, so that
    :func:`read_label_map` gives back the exact values and their names.
    ``description`` goes into the header's 80-character ``descrip`` (what other viewers
    show); ``info`` (JSON-able) into the same extension, e.g. which slices are synthetic.
    ``stored_orientation``: the voxel order to store the array in, as axis codes of the
    file's i, j, k (a NIfTI input's ``metadata["stored_orientation"]``, e.g. "RAS"): a
    result for a NIfTI file then has that file's own voxel order and shape, so
    ``input[result == 2]`` on the two raw arrays picks the same voxels. None: (z, y, x)
    as given, stored as x, y, z. Either way every voxel lies where it lay in the patient.
    ``stored_ndim`` 2 (a 2D input's ``metadata["stored_ndim"]``): one plane is stored
    as a 2D array, as its input was (a (x, y, 1) result did not index it).
    The file is written beside the target and renamed over it, so a failure never leaves a
    half-written file or damages an existing one.
    """
    path = Path(path).expanduser()
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise MedsegInputError("NIfTI file names must end in .nii or .nii.gz", path)
    if not path.parent.is_dir():
        raise MedsegInputError("the folder to write into does not exist", path)
    data = np.asarray(array)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3 or data.size == 0:
        raise MedsegInputError(
            f"expected a non-empty (z, y, x) array, got shape {data.shape}", path
        )
    data = _storage_dtype(data, path, keep_float64)
    if labels and not np.issubdtype(data.dtype, np.integer):
        raise MedsegInputError(f"a label map must hold integers, got {data.dtype}", path)
    if matrix is None:
        try:
            (dz, dy, dx) = triplet(spacing, "spacing", positive=True)
            (oz, oy, ox) = triplet(origin, "origin", positive=False)
        except MedsegInputError as exc:
            raise MedsegInputError(exc.reason, path) from exc
        matrix = np.diag([dz, dy, dx, 1.0])
        matrix[:3, 3] = (oz, oy, ox)
    matrix = np.asarray(matrix, dtype=float)
    # invertible relative to its own scale: a fixed cut-off refused small voxels
    # (0.7 × 0.7 × 2 µm has a determinant of 1e-15 mm³)
    columns = np.linalg.norm(matrix[:3, :3], axis=0) if matrix.shape == (4, 4) else None
    if (matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or not np.all(columns > 0)
            or abs(np.linalg.det(matrix[:3, :3])) < 1e-6 * float(np.prod(columns))):
        raise MedsegInputError("the voxel-to-world matrix must be a finite, invertible 4 × 4", path)

    axes_zyx = _unit_axes(axes, path)
    # voxel (k, j, i) = (z, y, x) sits at matrix · (k, j, i, 1), measured along the scan's
    # axes a_z, a_y, a_x: in LPS that is axesᵀ · it; NIfTI's RAS negates L and P
    steps = axes_zyx.T @ matrix[:3, :3]  # column c: the LPS step of data axis c
    affine = np.eye(4)
    affine[:3, 0] = _RAS_TO_LPS @ steps[:, 2]
    affine[:3, 1] = _RAS_TO_LPS @ steps[:, 1]
    affine[:3, 2] = _RAS_TO_LPS @ steps[:, 0]
    affine[:3, 3] = _RAS_TO_LPS @ (axes_zyx.T @ matrix[:3, 3])
    stored = data.transpose(2, 1, 0)  # a view: no copy
    ours: dict[str, Any] = dict(info or {})
    if ours:  # slice indices in it name slices of ``data``: the frame they count in
        ours["read_frame"] = {
            "axes_lps": (np.round(steps.T / np.linalg.norm(steps, axis=0)[:, None], 6)
                         + 0.0).tolist(),
            "shape_zyx": [int(n) for n in data.shape]}
    turn = _turn_to(affine, stored_orientation, path)
    if turn is not None:  # swaps and flips only: each voxel keeps its position
        affine = affine @ inv_ornt_aff(turn, stored.shape)
        stored = apply_orientation(stored, turn)
    if stored_ndim == 2 and stored.shape[2] == 1:
        stored = stored[:, :, 0]
    img = nib.Nifti1Image(stored, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    # Code 1 (scanner) in both: ITK-based tools read the qform, nibabel prefers the sform.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    qform = img.get_qform()
    if not np.allclose(qform[:3, :3], affine[:3, :3], atol=1e-4):
        # A sheared grid (a gantry tilt): the qform holds only its nearest rotation, which
        # nibabel anchors at voxel 0, so the far corner lay up to 27 mm off. Anchored at
        # the centre, no voxel is more than half that off. (Marked unknown instead, ITK
        # refused the file: it reads no sheared sform.)
        centre = (np.asarray(img.shape[:3], dtype=float) - 1.0) / 2.0
        qform[:3, 3] = affine[:3, :3] @ centre + affine[:3, 3] - qform[:3, :3] @ centre
        img.set_qform(qform, code=1)
    if labels:
        img.header.set_intent("label")
        if label_names:
            ours["label_names"] = {str(int(k)): str(v)[:_MAX_NAME_CHARS]
                                   for k, v in sorted(label_names.items())}
    if ours:
        import json

        text = json.dumps({_NAMES_KEY: ours})
        img.header.extensions.append(
            nib.nifti1.Nifti1Extension(_COMMENT_CODE, text.encode("utf-8")))
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]

    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    # through a link to the file it names: replacing the link left its target old
    target = link_target(path)
    # short: a name near the file system's 255-byte limit must still get its temp file
    tmp = target.with_name(f"{temp_prefix(target)}{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        refuse_read_only(target)
        drop_dead_writers_files(target)
        nib.save(img, tmp)
        os.chmod(tmp, mode_for(target))  # an overwritten private file stays private
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the original error is the one to report
            pass
        if isinstance(exc, OSError):
            reason = exc.strerror or short_reason(exc)
            raise MedsegInputError(f"could not write the file ({reason})", path) from exc
        raise
    return path

"""The core data model: a scalar 3D volume with its geometry.

Axes are (plane, row, column) = (z, y, x), as in scikit-image. Spacing and origin are in
millimetres in the same order, so they map one-to-one onto a napari layer's ``scale`` and
``translate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from .errors import MedsegInputError
from .text import counted

#: Metadata keys a Volume may carry. Everything else (names, IDs, birth dates, UIDs,
#: institution, free-text comments) is dropped on the way in, so nothing downstream can
#: print or log a patient identifier by accident.
SAFE_METADATA_KEYS = frozenset(
    {
        "source_format",  # "dicom", "nifti", "npy", "phantom"
        "source_name",  # file or folder name, never a full path into a patient's study
        "n_files",
        "series_description",
        "body_part",
        "manufacturer",
        "slice_thickness_mm",
        "kvp",
        "rescale_type",
        "photometric",
        "orientation",  # e.g. "LPS" axis codes of (x, y, z)
        "stored_orientation",  # a NIfTI file's own voxel order, axis codes of i, j, k
        "stored_ndim",  # 2: a NIfTI file holding one plane as a 2D array
        "missing_planes",  # a coronal / sagittal series' gaps: {"axis": "y", "indices": […]}
        "slice_axis",  # the axis a DICOM series' slices lie along ("z", "y" or "x")
        "axes_lps",  # the (z, y, x) voxel axes as LPS unit vectors: where results belong
        "slice_spacings_mm",
        "instance_numbers",  # a DICOM series' InstanceNumber per z slice (None: a gap)
        "sideways_shift_mm",  # a gantry-tilted series' positions off the unsheared grid
        "warnings",
        "phantom_seed",
        "phantom_settings",  # the rest of what made a phantom (noise, lesion radii, …)
        "synthetic_slices",  # how many slices napari-medseg generated (not acquired)
        "synthetic_planes",  # which: {"axis", "indices"} in the volume as read
        "explanation_map",  # a map this plugin made (Grad-CAM …), saved and opened again
    }
)

# Soft-tissue window (W 400, L 40): what a radiologist expects an abdominal CT to open in.
CT_WINDOW = (-160.0, 240.0)


def _as_triplet(values: Any, name: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:  # a scalar, None, or text such as "abc"
        raise MedsegInputError(f"{name} must be three numbers (z, y, x), got {values!r}") from exc
    if len(out) != 3:
        raise MedsegInputError(f"{name} must be three numbers (z, y, x), got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise MedsegInputError(f"{name} must be finite, got {out}")
    return out  # type: ignore[return-value]


def _is_pair(values: Any) -> bool:
    """Whether ``values`` is a sequence of two (a 2D image's (y, x) spacing or origin)."""
    if not isinstance(values, (tuple, list, np.ndarray)):
        return False
    try:
        return np.shape(values) == (2,)
    except ValueError:  # ragged: left for _as_triplet to refuse
        return False


#: diameter assumed for a lesion point that does not carry one: retraining gives it this
#: size, and the widgets draw it so (here, not in finetune: drawing must not import torch)
DEFAULT_DIAMETER_MM = 10.0

@dataclass(frozen=True)
class Volume:
    """A (z, y, x) float32 image with spacing/origin in mm and a per-slice missing mask.

    ``missing[z]`` is True where slice ``z`` was not acquired (a gap in a DICOM series,
    filled here with NaN) or holds no finite voxel at all, so models and widgets can leave
    it alone.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    modality: str = "OT"
    missing: np.ndarray | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise MedsegInputError(
                f"expected a 3D (z, y, x) volume, got {array.ndim}D with shape {array.shape}"
            )
        if array.size == 0:
            raise MedsegInputError(f"the volume is empty (shape {array.shape})")
        # timedelta64 is an integer type to NumPy, but no image's values
        if array.dtype.kind == "m" or not (np.issubdtype(array.dtype, np.number)
                                          or array.dtype == bool):
            raise MedsegInputError(f"expected numbers, got dtype {array.dtype}")
        if np.iscomplexobj(array):
            raise MedsegInputError("complex-valued images are not supported")
        if array.dtype.kind == "f" and array.dtype.itemsize > 4:
            # slice by slice: a boolean mask and two float64 copies of the whole volume
            # took 4 times the float32 volume kept
            limit = np.finfo(np.float32).max
            with np.errstate(invalid="ignore"):
                too_large = sum(int(np.count_nonzero(np.isfinite(sl) & (np.abs(sl) > limit)))
                                for sl in array)
            if too_large:
                raise MedsegInputError(
                    f"values outside the float32 range (about ±3.4e38) in {counted(too_large, 'voxel')}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        # NaN marks missing voxels; infinity is not a measurement, and a volume with no
        # finite voxel at all would only yield invented output
        if any(np.isinf(plane).any() for plane in array):  # a plane at a time: no mask of it all
            raise MedsegInputError(f"infinite values in {counted(int(np.isinf(array).sum()), 'voxel')}")
        spacing = _as_triplet(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise MedsegInputError(f"spacing must be positive, got {spacing}")
        origin = _as_triplet(self.origin, "origin")
        if self.missing is None:
            missing = np.zeros(array.shape[0], dtype=bool)
        else:
            missing = np.asarray(self.missing, dtype=bool).copy()
            if missing.shape != (array.shape[0],):
                raise MedsegInputError(
                    f"missing-slice mask has shape {missing.shape}, expected ({array.shape[0]},)"
                )
        # a slice with no finite voxel holds nothing: missing, like a gap, whichever reader
        # made the volume (models must neither label it nor read it as air for context)
        finite = np.array([np.count_nonzero(np.isfinite(plane)) for plane in array], dtype=np.int64)
        no_finite = finite == 0
        # (every slice missing is allowed: nothing runs on it, and it says so)
        if not missing.all() and no_finite[~missing].all():
            raise MedsegInputError("the volume holds no finite voxel (all NaN)")
        missing |= no_finite
        metadata = {k: v for k, v in dict(self.metadata or {}).items()
                    if k in SAFE_METADATA_KEYS}
        # frozen dataclass: normalise fields in place once, then the object is immutable
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "modality", str(self.modality or "OT").upper())
        object.__setattr__(self, "missing", missing)
        object.__setattr__(self, "metadata", metadata)
        # NaN voxels (a masked patch) on each acquired slice: counted here, in the worker
        # that reads the image, for the notes that say where no result is made
        unmeasured = array[0].size - finite
        unmeasured[missing] = 0
        object.__setattr__(self, "_unmeasured", unmeasured)

    @classmethod
    def from_array(cls, array: Any, spacing: Any = None, **kwargs: Any) -> "Volume":
        """Build a Volume from a 2D (y, x) or 3D (z, y, x) array; 2D becomes one slice."""
        try:
            array = np.asarray(array)
        except ValueError as exc:  # ragged nested lists
            raise MedsegInputError(f"not an image array: {exc}") from exc
        if array.ndim == 2:
            array = array[np.newaxis]
            # a 2D image's (y, x) spacing / origin gain z = 1 mm / 0; anything else is
            # left for _as_triplet to judge (and refuse clearly)
            if _is_pair(spacing):
                spacing = (1.0, *tuple(spacing))
            origin = kwargs.get("origin")
            if _is_pair(origin):
                kwargs["origin"] = (0.0, *tuple(origin))
        elif array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
            raise MedsegInputError(
                f"this looks like an RGB(A) image (shape {array.shape}); "
                "convert it to grayscale first"
            )
        return cls(array=array, spacing=(1.0, 1.0, 1.0) if spacing is None else spacing, **kwargs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def has_gaps(self) -> bool:
        return bool(self.missing.any())

    def replace(self, **changes: Any) -> "Volume":
        return replace(self, **changes)

    def value_range(self) -> tuple[float, float]:
        """(min, max) over acquired, finite voxels; raises if there are none."""
        finite = self.array[~self.missing]
        finite = finite[np.isfinite(finite)]
        if finite.size == 0:
            raise MedsegInputError("the volume has no finite voxels (all NaN or missing)")
        return float(finite.min()), float(finite.max())

    def display_window(self) -> tuple[float, float]:
        """A sensible contrast window: soft tissue for CT, 1st–99th percentile otherwise."""
        if self.modality == "CT":
            return CT_WINDOW
        acquired = self.array[~self.missing]
        finite = acquired[np.isfinite(acquired)]
        if finite.size == 0:
            return (0.0, 1.0)
        lo, hi = np.percentile(finite, [1.0, 99.0])
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
        if hi <= lo:  # constant: + 1e-6 vanished at 1e12, and napari refused the window
            hi = lo + max(1e-6, abs(lo) * 1e-6)
        return float(lo), float(hi)

    def patient_mm(self, zyx: Any) -> np.ndarray:
        """Patient coordinates (DICOM's LPS: x to the patient's left, y posterior, z to the
        head; mm) of voxel indices ``zyx`` ((n, 3) z, y, x, fractions allowed) as
        (n, 3) x, y, z: ``origin + index × spacing`` along ``metadata["axes_lps"]``. What
        a PACS shows beside its cursor; an index on the reoriented grid is not what it
        numbers. NaN where the source gives no patient geometry (a .npy file, a NIfTI
        header or DICOM files without orientation) or its positions are off this grid
        (a gantry-tilted series, shown unsheared: up to the tilt's drift, 35 mm)."""
        index = np.asarray(zyx, dtype=float).reshape(-1, 3)
        along = np.asarray(self.origin) + index * np.asarray(self.spacing)
        axes = self.metadata.get("axes_lps")
        try:
            axes = np.asarray(axes, dtype=float) if axes is not None else None
        except (TypeError, ValueError):
            axes = None
        if (axes is None or axes.shape != (3, 3) or not np.isfinite(axes).all()
                or not self.metadata.get("orientation")
                or self.metadata.get("sideways_shift_mm")):
            return np.full_like(along, np.nan)
        return along @ axes  # each row: Σ along[a] · axes[a], an LPS (x, y, z)

    def instance_number(self, z: float) -> int | None:
        """The DICOM InstanceNumber of the slice nearest ``z`` (what a PACS numbers an
        image by), where the reader recorded one per slice; None otherwise (a NIfTI or
        .npy file, a multi-frame file, a gap)."""
        numbers = instance_numbers_of(self.metadata, self.shape[0])
        if numbers is None:
            return None
        return numbers[int(np.clip(np.rint(z), 0, self.shape[0] - 1))]

    def missing_slices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.missing)]

    def unmeasured_voxels(self) -> np.ndarray:
        """Per slice, its voxels without a value (NaN) on an acquired slice (0 on a
        missing one, which is said as a whole)."""
        return self._unmeasured.copy()

    def summary(self) -> dict[str, Any]:
        """What ``napari-medseg info`` prints: geometry and ranges, never identifiers."""
        try:
            vmin, vmax = self.value_range()
        except MedsegInputError:  # no voxel measured: null in JSON (NaN is not JSON)
            vmin = vmax = None
        planes = self.metadata.get("missing_planes")
        return {
            "shape_zyx": list(self.shape),
            "spacing_mm_zyx": [round(s, 4) for s in self.spacing],
            "origin_mm_zyx": [round(o, 3) for o in self.origin],
            "modality": self.modality,
            "value_range": [vmin, vmax],
            "missing_slices": self.missing_slices(),
            # a coronal / sagittal series' gaps lie along y or x: no slice is missing
            **({"missing_planes": planes} if planes else {}),
            "window": [round(float(v), 4) for v in self.display_window()],
            # what the source says of the acquisition (series, scanner, slice thickness …),
            # as the Volume info widget lists it; only SAFE_METADATA_KEYS are ever kept
            "source": {k: v for k, v in self.metadata.items()
                       if k not in ("warnings", "missing_planes", "axes_lps")},
            "warnings": list(self.metadata.get("warnings", [])),
        }


# Below this 0.5th percentile a scalar volume holds air in Hounsfield units: only CT does.
_CT_AIR_THRESHOLD = -500.0
# Subsample large volumes: a percentile over a million voxels is as good as over all.
_MAX_SAMPLES = 1_000_000


def planes_still_missing(data: np.ndarray, planes: Any) -> dict | None:
    """``{"axis", "indices"}`` kept to the recorded planes that still hold no finite
    voxel; None when none does (or the record is not one)."""
    try:
        axis = "zyx".index(planes["axis"])
        indices = [int(i) for i in planes["indices"]]
    except (TypeError, KeyError, ValueError):
        return None
    others = tuple(a for a in range(3) if a != axis)
    empty = ~np.isfinite(data).any(axis=others)
    kept = [i for i in indices if 0 <= i < data.shape[axis] and empty[i]]
    return {"axis": planes["axis"], "indices": kept} if kept else None


def instance_numbers_of(metadata: Any, n_slices: int) -> list | None:
    """``metadata["instance_numbers"]`` (the DICOM reader's InstanceNumber per slice)
    while it still has one entry per slice of ``n_slices``, each an int or None; None
    otherwise (another reader, a crop, a new array)."""
    numbers = metadata.get("instance_numbers") if isinstance(metadata, Mapping) else None
    if not isinstance(numbers, (list, tuple)) or len(numbers) != n_slices:
        return None
    return [n if isinstance(n, int) and not isinstance(n, bool) else None for n in numbers]


def guess_modality(array: np.ndarray) -> str:
    """Guess the modality of an image that carries none (NIfTI, .npy).

    Returns "CT" if the 0.5th percentile of the finite voxels is at most -500 (air in
    Hounsfield units, which no MR or PET intensity reaches), else "OT" (other). MR is not
    guessed: its intensities have no fixed scale to recognise.
    """
    array = np.asarray(array)
    if array.size > _MAX_SAMPLES and array.ndim > 1 and not array.flags.c_contiguous:
        # a regular grid of samples, taken before flattening: a transposed or flipped
        # view (NIfTI reoriented) was copied whole by the reshape
        step = math.ceil((array.size / _MAX_SAMPLES) ** (1.0 / array.ndim))
        array = array[(slice(None, None, step),) * array.ndim]
    flat = array.reshape(-1)
    if flat.size == 0 or not np.issubdtype(flat.dtype, np.number) or np.iscomplexobj(flat):
        return "OT"  # booleans (masks), complex and non-numeric arrays carry no HU
    if flat.size > _MAX_SAMPLES:
        flat = flat[:: flat.size // _MAX_SAMPLES + 1]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if flat.size == 0:
        return "OT"
    return "CT" if float(np.percentile(flat, 0.5)) <= _CT_AIR_THRESHOLD else "OT"


def non_axial_plane(volume: Volume) -> str | None:
    """"coronal" or "sagittal" when the volume's slices are such planes (its z axis, per
    ``metadata["axes_lps"]``, runs nearest to P or L rather than S), else None. A series
    is turned to axial slices when read; a single coronal or sagittal image cannot be, and
    the models, trained on axial slices, would invent a result on it."""
    axes = volume.metadata.get("axes_lps")
    try:
        z_axis = np.abs(np.asarray(axes, dtype=float)[0])
    except (TypeError, ValueError, IndexError):
        return None
    if z_axis.shape != (3,) or not np.isfinite(z_axis).all():
        return None
    # only a plane clearly nearer coronal or sagittal: a 45° tilt is a tie, which the
    # readers leave as axial slices (a whole series tilted so was refused)
    if z_axis[2] >= z_axis[:2].max() - 1e-3:
        return None
    return "sagittal" if z_axis[0] > z_axis[1] else "coronal"

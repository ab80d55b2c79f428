"""Slice generation: fill missing slices and upsample thick slices along z (issue 7).

:func:`generate_slices` puts a volume on a grid ``factor`` times finer along z (the
acquired slices land on every ``factor``-th slice, unchanged) and makes the slices in
between — and, when asked, the slices the reader marked missing — with the recurrent
:class:`~.models.generator.SliceGenerator`: linear interpolation of the two nearest known
slices plus the model's residual. Acquired slices are never changed; the result says,
slice by slice, which ones were generated.

:func:`linear_fill` and :func:`cubic_fill` are the baselines the generator is measured
against (:func:`evaluate_generator`, ``benchmarks/bench_generate.py``): PSNR and SSIM
(scikit-image) on slices removed from held-out phantoms and then regenerated.

:func:`train_generator` trains the bundled model from scratch on phantoms
(``napari-medseg train generator --seed 0``), with the same pool, loop and card as the
other models (:mod:`.training`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .errors import MedsegInputError
from .memory import require_memory
from .inference import ThreadGovernor, prepare_model
from .models.generator import GENERATOR_INPUTS, SliceGenerator
from .models.registry import check_normalisation, percentile_range
from .progress import Job, Progress
from .text import slice_ranges
from .text import counted
from .training import (
    PhantomPool,
    PhantomSettings,
    _crop_yx,
    _fit,
    _start_run,
    deterministic,
    eval_settings,
    make_phantom,
    private_rng,
)
from .volume import Volume

MAX_FACTOR = 3  # the largest thinning trained on
DEFAULT_CHUNK = 8


# ======================================================================================
# Which slices are known, and their neighbours
# ======================================================================================
def neighbours(known: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every slice: the nearest known slice at or below, at or above, and the
    fractional position t between them (0 on a known slice). Beyond the first or last
    known slice both neighbours are that slice (no extrapolation)."""
    known = np.asarray(known, dtype=bool)
    ki = np.flatnonzero(known)
    if ki.size == 0:
        raise MedsegInputError("no acquired slice to generate from")
    z = np.arange(known.size)
    pos = np.searchsorted(ki, z, side="right") - 1  # last known ≤ z
    below = ki[np.clip(pos, 0, ki.size - 1)]
    above_pos = np.searchsorted(ki, z, side="left")  # first known ≥ z
    above = ki[np.clip(above_pos, 0, ki.size - 1)]
    below = np.where(pos < 0, above, below)
    above = np.where(above_pos >= ki.size, below, above)
    gap = above - below
    t = np.where(gap > 0, (z - below) / np.maximum(gap, 1), 0.0).astype(np.float32)
    return below, above, t


def linear_fill(array: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Every unknown slice as the linear interpolation (along z) of its two nearest known
    slices; known slices unchanged. The baseline, and the generator's starting point."""
    from .progress import run_to_completion

    return run_to_completion(linear_fill_job(array, known))


def linear_fill_job(array: np.ndarray, known: np.ndarray, every: int = 16,
                    in_place: bool = False) -> Job[np.ndarray]:
    """:func:`linear_fill` as a generator: a Progress (cancel point) every ``every`` slices
    made (one call gave a 1024-slice run no cancel point for about 13 s). ``in_place``:
    fill ``array`` itself (float32, the caller's own: a copy held a second output-sized
    array, 628 MB for ×2 of a 300 × 512 × 512 scan); it reads known slices only."""
    below, above, t = neighbours(known)
    out = (array if in_place and isinstance(array, np.ndarray) and array.dtype == np.float32
           else np.array(array, dtype=np.float32, copy=True))
    todo = np.flatnonzero(~np.asarray(known, dtype=bool))
    for i, z in enumerate(todo):
        out[z] = (1.0 - t[z]) * array[below[z]] + t[z] * array[above[z]]
        if (i + 1) % every == 0:
            yield Progress(i + 1, len(todo), "linear interpolation")
    return out


def cubic_fill(array: np.ndarray, known: np.ndarray, block_rows: int = 64) -> np.ndarray:
    """Unknown slices from a cubic spline through all known slices along z (scipy's
    ``CubicSpline``, not-a-knot ends), evaluated in blocks of rows to bound memory;
    beyond the first/last known slice the nearest one is copied, as in :func:`linear_fill`.
    """
    from .progress import run_to_completion

    return run_to_completion(cubic_fill_job(array, known, block_rows))


def cubic_fill_job(array: np.ndarray, known: np.ndarray, block_rows: int = 64
                   ) -> Job[np.ndarray]:
    """:func:`cubic_fill` as a generator: one Progress per block of rows (cancel point)."""
    from scipy.interpolate import CubicSpline

    known = np.asarray(known, dtype=bool)
    ki = np.flatnonzero(known)
    out = linear_fill(array, known)  # NaN where a neighbour is NaN: no data, no value
    if ki.size < 3:  # a spline through 2 points is the line
        return out
    todo = np.flatnonzero(~known)
    todo = todo[(todo > ki[0]) & (todo < ki[-1])]
    no_data = np.isnan(out[todo])
    n_rows = array.shape[1]
    # the spline's float64 knots and coefficients (about 40 bytes per known voxel of a
    # block) kept near a fifth of the float32 output: 64 rows of a 64-row image took
    # 10x the output where the memory check budgets 4x
    block_rows = max(1, min(int(block_rows), array.shape[0] * n_rows // (20 * ki.size)))
    for r0 in range(0, n_rows, block_rows):
        knots = np.asarray(array[ki, r0:r0 + block_rows], dtype=np.float64)
        # a spline through a NaN knot (read as 0) would bend that whole z-column, far from
        # the hole: such columns keep the linear result (NaN only next to the hole)
        holes = np.isnan(knots).any(axis=0)
        values = CubicSpline(ki, np.nan_to_num(knots), axis=0)(todo).astype(np.float32)
        if holes.any():
            values[:, holes] = out[todo, r0:r0 + block_rows][:, holes]
        out[todo, r0:r0 + block_rows] = values
        yield Progress(min(r0 + block_rows, n_rows), n_rows, "cubic interpolation")
    part = out[todo]
    part[no_data] = np.nan
    out[todo] = part
    return out


# ======================================================================================
# Model inputs
# ======================================================================================
class GeneratorInputs:
    """The model's input, built lazily chunk by chunk: ``inputs[a:b]`` → (b−a, 6, H, W)
    (channels :data:`~.models.generator.GENERATOR_INPUTS`).

    ``normalised`` holds every slice on the output grid (unknown ones may be anything);
    only known slices are read. ``spacing``: (z, y, x) mm of the output grid.
    """

    def __init__(self, normalised: np.ndarray, known: np.ndarray,
                 spacing: tuple[float, float, float]):
        self.normalised = normalised
        self.known = np.asarray(known, dtype=bool)
        self.below, self.above, self.t = neighbours(self.known)
        self.gap_cm = ((self.above - self.below) * float(spacing[0]) / 10.0).astype(np.float32)
        self.pixel_mm = float(np.sqrt(float(spacing[1]) * float(spacing[2])))

    def __len__(self) -> int:
        return int(self.known.size)

    def __getitem__(self, index: slice) -> np.ndarray:
        zs = np.arange(len(self))[index]
        n, (h, w) = zs.size, self.normalised.shape[1:]
        x = np.empty((n, len(GENERATOR_INPUTS), h, w), dtype=np.float32)
        x[:, 0] = self.normalised[self.below[zs]]
        x[:, 1] = self.normalised[self.above[zs]]
        x[:, 2] = self.t[zs, None, None]
        x[:, 3] = self.known[zs, None, None]
        x[:, 4] = self.gap_cm[zs, None, None]
        x[:, 5] = self.pixel_mm
        return x

    def linear(self, zs: np.ndarray) -> np.ndarray:
        """Linear interpolation (normalised units) at slices ``zs``."""
        t = self.t[zs, None, None]
        return (1.0 - t) * self.normalised[self.below[zs]] + t * self.normalised[self.above[zs]]


# ======================================================================================
# Inference
# ======================================================================================
@dataclass(frozen=True)
class GenerationResult:
    """``volume``: the output grid (acquired slices unchanged, generated ones filled, the
    rest NaN and marked missing). ``generated[z]``: slice z was made (model or
    interpolation); ``acquired[z]``: slice z is an acquired input slice, copied unchanged
    (slices missing from the input are never "acquired", filled or not)."""

    volume: Volume
    generated: np.ndarray
    acquired: np.ndarray
    factor: int
    model_name: str
    #: the volume axis the slices lie along (0: z; 1 or 2 for a sagittal or coronal scan
    #: that a reader turned to (z, y, x) = (S, P, L)); ``generated`` and ``acquired``
    #: index that axis
    axis: int = 0

    @property
    def axis_name(self) -> str:
        return "zyx"[self.axis]

    def summary(self) -> str:
        n_gen, n_acq = int(self.generated.sum()), int(self.acquired.sum())
        left = len(self.generated) - n_gen - n_acq
        text = f"{counted(n_gen, 'slice')} generated, {n_acq} acquired kept unchanged"
        text += f" (slices along {self.axis_name})" if self.axis else ""
        return text + (f", {left} left missing" if left else "")


#: an in-plane axis counts as the slice axis when its spacing is this much above z's
THICK_AXIS_RATIO = 1.5


def slice_axis(volume: Volume) -> int:
    """The axis the slices were acquired along: z, unless y or x is coarser than
    :data:`THICK_AXIS_RATIO` × each of the other two. The NIfTI reader turns every scan to
    (S, P, L), so a sagittal scan's thick slices lie along x and a coronal one's along y;
    upsampling z there would halve an already fine spacing and leave the gaps.

    A DICOM series says its axis (``metadata["slice_axis"]``): a coronal or sagittal
    one's thin slices may be finer than its pixels, an axial one's pixels not square.
    Always z for a single slice (a 2D image: nothing lies between slices) and for square
    pixels coarser than thin slices (0.625 mm slices of 0.98 mm pixels are an axial CT,
    not a coronal one). Missing (all-NaN) z planes do not decide it: a coronal scan's NaN
    padding stays NaN in every generated slice."""
    spacing = np.asarray(volume.spacing, dtype=float)
    if volume.shape[0] == 1:
        return 0
    named = volume.metadata.get("slice_axis")  # a DICOM series says where its slices lie
    if named in ("z", "y", "x"):  # (an axial one too: its pixels need not be square)
        return "zyx".index(named)
    for axis in (1, 2):
        others = np.delete(spacing, axis)
        if (spacing[axis] > THICK_AXIS_RATIO * others).all():
            return axis
    return 0


#: the turned copies whose results will be turned back (by id, weakly): one more
#: output-sized copy at the peak, which the memory check must count (a coronal or
#: sagittal linear run took 2.25x its output where 1.6x was asked for)
_TURNED: "weakref.WeakValueDictionary[int, Volume]" = weakref.WeakValueDictionary()


def _slices_first(volume: Volume, axis: int) -> Volume:
    order = [axis] + [a for a in range(3) if a != axis]
    turned = Volume(np.ascontiguousarray(volume.array.transpose(order)),
                    tuple(volume.spacing[a] for a in order),
                    tuple(volume.origin[a] for a in order), volume.modality,
                    metadata=dict(volume.metadata))
    _TURNED[id(turned)] = turned
    return turned


def _axis_put_back(result: "GenerationResult", axis: int) -> "GenerationResult":
    order = [axis] + [a for a in range(3) if a != axis]
    back = list(np.argsort(order))
    v = result.volume
    volume = Volume(np.ascontiguousarray(v.array.transpose(back)),
                    tuple(v.spacing[a] for a in back), tuple(v.origin[a] for a in back),
                    v.modality, metadata=dict(v.metadata))
    return replace(result, volume=volume, axis=axis)


def _along_slice_axis(job_fn):
    """Run a generation job on the volume turned so that its slice axis comes first, and
    turn the result back (``axis`` records it); a plain z-axis volume runs as it is."""
    import functools

    @functools.wraps(job_fn)
    def wrapper(volume, *args, **kwargs):
        axis = slice_axis(volume) if isinstance(volume, Volume) else 0
        if axis == 0:
            return (yield from job_fn(volume, *args, **kwargs))
        try:
            result = yield from job_fn(_slices_first(volume, axis), *args, **kwargs)
        except MedsegInputError as exc:
            gaps = volume.missing_slices()
            if not gaps or not exc.reason.startswith("nothing to generate"):
                raise
            # "no missing slices" while info lists some: say which axis was taken, and why
            name = "zyx"[axis]
            spacing = ", ".join(f"{s:g}" for s in volume.spacing)
            why = ("as the series records" if volume.metadata.get("slice_axis") == name else
                   f"spacing z, y, x {spacing} mm: {name} over {THICK_AXIS_RATIO:g}× the others")
            raise MedsegInputError(
                f"{exc.reason}: the slices were taken to lie along {name} ({why}), so the "
                f"missing z slices {slice_ranges(gaps)} lie across them, not between "
                "them", exc.path) from exc
        return _axis_put_back(result, axis)

    return wrapper


def residual_scale(card: Mapping[str, Any]) -> float:
    """The card's ``residual_scale`` α (output = linear + α · residual), default 1;
    :func:`calibrate_generator` sets it on validation phantoms."""
    try:
        alpha = float(card.get("residual_scale", 1.0))
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"model card residual_scale must be a number, got {card.get('residual_scale')!r}") from exc
    if not 0.0 <= alpha <= 2.0:
        raise MedsegInputError(f"model card residual_scale must be in [0, 2], got {alpha}")
    return alpha


def _check_factor(factor: Any) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) \
            or not 1 <= int(factor) <= MAX_FACTOR:
        raise MedsegInputError(f"upsampling factor must be an integer 1..{MAX_FACTOR}, got {factor!r}")
    return int(factor)


def plan_generation(volume: Volume, factor: int = 1, fill_missing: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acquired, known, targets) on the output grid of ``(n − 1)·factor + 1`` slices.

    ``acquired``: where the input slices land (gaps included); ``known``: acquired and
    not missing; ``targets``: the slices to generate — every new slice between two known
    slices, and the input's missing slices when ``fill_missing``. Without
    ``fill_missing`` nothing is made across a gap either (a slice whose two known
    neighbours enclose a missing one stays missing). Nothing beyond the first or last
    known slice is made (that would be extrapolation).
    """
    factor = _check_factor(factor)
    synthetic = volume.metadata.get("synthetic_slices")
    if synthetic:  # they would be listed (and fed to the model) as acquired slices
        raise MedsegInputError(
            f"this image already holds {synthetic} generated (synthetic) slices; generate"
            " from the acquired series instead")
    n = volume.shape[0]
    n_out = (n - 1) * factor + 1
    acquired = np.zeros(n_out, dtype=bool)
    acquired[::factor] = True
    known = acquired.copy()
    known[np.flatnonzero(volume.missing) * factor] = False
    ki = np.flatnonzero(known)
    if ki.size < 2:
        raise MedsegInputError(
            "slice generation needs at least two acquired slices to generate between;"
            f" this volume has {ki.size}")
    inside = np.zeros(n_out, dtype=bool)
    inside[ki[0]:ki[-1] + 1] = True
    targets = inside & ~known
    gaps = acquired & ~known
    if not fill_missing and gaps.any():
        below, above, _ = neighbours(known)
        crossed = np.concatenate([[0], np.cumsum(gaps)])  # gap slices before index i
        targets &= (crossed[above] - crossed[below + 1]) == 0
    if not targets.any():
        if gaps.any() and not fill_missing:
            raise MedsegInputError(
                "nothing to generate: filling missing slices is off and every slice to make"
                " lies across a gap in the series")
        outer = np.flatnonzero(volume.missing)
        if outer.size:  # "no missing slices" when the volume has some, only at its ends
            listed = ", ".join(str(int(z)) for z in outer[:6]) + (" …" if outer.size > 6 else "")
            raise MedsegInputError(
                f"nothing to generate: the missing slice{'s' if outer.size > 1 else ''} "
                f"{listed} lie{'' if outer.size > 1 else 's'} beyond the first or last acquired "
                "slice, and slices are not extrapolated (choose an upsampling factor of 2 or "
                "more to make slices between acquired ones)")
        raise MedsegInputError(
            "nothing to generate: the volume has no missing slices between acquired ones"
            " (choose an upsampling factor of 2 or more)")
    return acquired, known, targets


@_along_slice_axis
def generate_slices(
    volume: Volume,
    model: SliceGenerator,
    card: Mapping[str, Any],
    *,
    factor: int = 1,
    fill_missing: bool = True,
    chunk: int = DEFAULT_CHUNK,
    threads: int | None = None,
) -> Job[GenerationResult]:
    """Upsample ``volume`` ``factor``× along its slice axis and/or fill its missing slices
    (a generator yielding Progress; returns a :class:`GenerationResult`; closing it
    cancels).

    The slice axis is z, or y / x for a coronal / sagittal scan (:func:`slice_axis`); its
    spacing becomes ``spacing / factor``; origin and the other two axes are unchanged.
    """
    if not isinstance(volume, Volume):
        raise MedsegInputError(f"expected a Volume, got {type(volume).__name__}")
    if not isinstance(model, SliceGenerator):
        raise MedsegInputError(f"slice generation needs a SliceGenerator, got {type(model).__name__}")
    if not isinstance(card, Mapping) or "normalisation" not in card:
        raise MedsegInputError("model card lacks normalisation")
    spec = check_normalisation(card["normalisation"])
    if spec["type"] != "percentile":
        raise MedsegInputError(f"the slice generator expects percentile normalisation, got {spec['type']!r}")
    factor = _check_factor(factor)
    chunk = int(chunk)
    if chunk < 1:
        raise MedsegInputError(f"chunk must be at least 1 slice, got {chunk}")
    acquired, known, targets = plan_generation(volume, factor, fill_missing)
    check_generation_memory(volume, acquired.size, "model")
    src = np.flatnonzero(acquired)
    n_out = acquired.size
    _, ny, nx = volume.shape
    measured = volume.array[~volume.missing]
    low, high = percentile_range(measured, spec)
    scale = high - low
    alpha = residual_scale(card)
    if np.nanmin(measured) == np.nanmax(measured):
        # a constant image (air, padding): nothing between its slices to model, and the
        # residual times the fallback span (≥ 1, |value|) made ±13 HU up on −1000 HU
        alpha = 0.0

    # the output grid: acquired slices (normalised) in place, the rest filled below
    out = np.full((n_out, ny, nx), np.nan, dtype=np.float32)
    out[src] = volume.array
    normalised = np.zeros((n_out, ny, nx), dtype=np.float32)
    # NaN voxels inside acquired slices would spread through every conv: the network
    # sees the low percentile there, and generated voxels next to them stay NaN below
    normalised[known] = np.nan_to_num((out[known] - low) / scale, nan=0.0, posinf=0.0,
                                      neginf=0.0)
    sz, sy, sx = volume.spacing
    inputs = GeneratorInputs(normalised, known, (sz / factor, sy, sx))
    yield Progress(0, 1, "preparing")
    with ThreadGovernor(threads) as governor:
        chunks = prepare_model(model).iter_chunks(inputs, chunk)
        while True:
            with torch.inference_mode():
                item = next(chunks, None)
                if item is None:
                    break
                if item.logits is not None:
                    zs = np.arange(item.start, item.stop)
                    sel = targets[zs]
                    if sel.any():
                        residual = item.logits[:, 0].numpy()[sel]
                        made = (inputs.linear(zs[sel]) + alpha * residual) * scale + low
                        zt = zs[sel]
                        no_data = np.isnan(out[inputs.below[zt]]) | np.isnan(out[inputs.above[zt]])
                        made[no_data] = np.nan
                        out[zt] = made
            governor.update()
            done = "reading (backward pass)" if item.logits is None else "generating"
            yield Progress(item.step, item.total,
                           f"{done}: slices {item.start}–{item.stop - 1} of {n_out}")
    missing = ~(known | targets)
    out[missing] = np.nan
    result_volume = _generated(out, (sz / factor, sy, sx), volume, missing)
    # a slice made of NaN only (its neighbours' holes cover it) was not made: missing
    return GenerationResult(result_volume, targets & ~result_volume.missing, known.copy(), factor,
                            str(card.get("name", "")))


#: peak memory of a generation run over its float32 output (the input, in memory
#: already, not counted), rounded up from what the largest phantom took (×3: 3–4× for
#: cubic; the model streams its chunks, about 2×). Linear fills its output in place:
#: 1.26× for ×2 of 150 × 512 × 512 (2.50× when it filled a copy)
PEAK_OVER_OUTPUT = {"linear": 1.6, "cubic": 4.0, "model": 3.0}


def check_generation_memory(volume: Volume, n_out: int, method: str) -> None:
    """Refuse before allocating a run whose peak would not fit in the memory left (×3 of
    a 1024 × 512 × 512 volume needs about 10 GB: it ran out of memory, or swapped the
    machine to a halt, with no word first)."""
    output = 4 * n_out * int(np.prod(volume.shape[1:]))
    turned_back = 1.0 if _TURNED.get(id(volume)) is volume else 0.0  # its copy in scan order
    require_memory((PEAK_OVER_OUTPUT[method] + turned_back) * output,  # the input is in memory already
                   f"generating {n_out} slices of {volume.shape[1]} × {volume.shape[2]} "
                   f"({method})", "use a smaller factor, crop the volume, or close other programs")


METHODS = ("model", "linear", "cubic")


def interpolate_slices(volume: Volume, factor: int = 1, fill_missing: bool = True,
                       method: str = "linear") -> GenerationResult:
    """The same output grid and slice choice as :func:`generate_slices`, filled by linear
    or cubic interpolation along z instead of the model (the baselines, for comparison)."""
    from .progress import run_to_completion

    return run_to_completion(interpolation_job(volume, factor, fill_missing, method))


@_along_slice_axis
def interpolation_job(volume: Volume, factor: int = 1, fill_missing: bool = True,
                      method: str = "linear") -> Job[GenerationResult]:
    """:func:`interpolate_slices` as a generator (progress and cancel points)."""
    if method not in ("linear", "cubic"):
        raise MedsegInputError(f"interpolation method must be linear or cubic, got {method!r}")
    if not isinstance(volume, Volume):
        raise MedsegInputError(f"expected a Volume, got {type(volume).__name__}")
    acquired, known, targets = plan_generation(volume, factor, fill_missing)
    check_generation_memory(volume, acquired.size, method)
    grid = np.zeros((acquired.size, *volume.shape[1:]), dtype=np.float32)
    # slab by slab, said as it goes: the bar sat at 0 % through this copy, most of a
    # linear run on a real scan
    positions = np.flatnonzero(acquired)
    for a in range(0, len(positions), 16):
        grid[positions[a:a + 16]] = volume.array[a:a + 16]
        yield Progress(min(a + 16, len(positions)), len(positions), "copying the acquired slices")
    yield Progress(0, 1, f"{method} interpolation")
    if method == "linear":
        filled = yield from linear_fill_job(grid, known, in_place=True)
    else:
        filled = yield from cubic_fill_job(grid, known)
    missing = ~(known | targets)
    filled[missing] = np.nan
    sz, sy, sx = volume.spacing
    out = _generated(filled, (sz / factor, sy, sx), volume, missing)
    return GenerationResult(out, targets & ~out.missing, known.copy(), int(factor), method)


def _generated(array: np.ndarray, spacing: tuple, volume: Volume, missing: np.ndarray) -> Volume:
    """The generated volume; values beyond float32 are the interpolation's overshoot on an
    image near float32's limit, said as such (the Volume check blamed the input)."""
    # slab by slab: a whole-volume mask was one more output-sized array at the peak
    overflow = sum(int(np.count_nonzero(np.isinf(array[z:z + 16]))) for z in range(0, len(array), 16))
    if overflow:
        peak = float(np.nanmax(np.abs(volume.array)))
        raise MedsegInputError(
            f"{overflow} generated voxels overflow float32: the image's values "
            f"reach ±{peak:.1e}, too near float32's limit (±3.4e38) to interpolate")
    # the input's records of its own slices (gap planes, steps between slices, the
    # reader's warnings about them) describe the input grid, not this one
    kept = {k: v for k, v in volume.metadata.items()
            if k not in ("missing_planes", "slice_spacings_mm", "instance_numbers",
                         "warnings")}
    return Volume(array, spacing, volume.origin, volume.modality, missing=missing,
                  metadata=kept)


# ======================================================================================
# Measurement
# ======================================================================================
def psnr_ssim(truth: np.ndarray, estimate: np.ndarray, data_range: float) -> tuple[float, float]:
    """PSNR (dB, over all given slices) and mean per-slice 2D SSIM (scikit-image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    truth = np.asarray(truth, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    psnr = peak_signal_noise_ratio(truth, estimate, data_range=data_range)
    ssim = [structural_similarity(a, b, data_range=data_range) for a, b in zip(truth, estimate)]
    return float(psnr), float(np.mean(ssim))


def removal_pattern(n: int, factor: int) -> np.ndarray:
    """Keep every ``factor``-th slice of ``n``, from the first: the known mask of a thin
    volume made ``factor``× thicker, as the evaluation removes slices (slices after the
    last kept one are not scored: that would be extrapolation)."""
    known = np.zeros(n, dtype=bool)
    known[::factor] = True
    return known


def scored_slices(known: np.ndarray) -> np.ndarray:
    """The removed slices that are scored: between the first and last known slice (the
    generator never extrapolates)."""
    known = np.asarray(known, dtype=bool)
    removed = ~known
    ki = np.flatnonzero(known)
    removed[: ki[0]] = removed[ki[-1] + 1:] = False
    return removed


def regenerate(array: np.ndarray, known: np.ndarray, model: SliceGenerator,
               card: Mapping[str, Any], spacing: tuple[float, float, float],
               threads: int | None = None) -> np.ndarray:
    """``array`` with the slices not in ``known`` removed and made again by the model."""
    from .progress import run_to_completion

    known = np.asarray(known, dtype=bool)
    holes = np.where(known[:, None, None], array, np.nan).astype(np.float32)
    vol = Volume(holes, spacing, (0.0, 0.0, 0.0), "CT", missing=~known)
    # The removed slices are z planes: generate along z (the unwrapped job), not along the
    # axis slice_axis would pick for a whole scan (y or x where the pixels are coarser).
    job = generate_slices.__wrapped__(vol, model, card, threads=threads)
    return run_to_completion(job).volume.array


def compare_on(array: np.ndarray, known: np.ndarray, model: SliceGenerator,
               card: Mapping[str, Any], spacing: tuple[float, float, float],
               threads: int | None = None) -> dict[str, dict[str, float]]:
    """Remove the slices not in ``known`` from ``array``, regenerate them with the model,
    linear and cubic interpolation, and score each against the removed slices."""
    removed = scored_slices(known)
    truth = array[removed]
    data_range = float(np.nanmax(array) - np.nanmin(array))
    estimates = {
        "model": regenerate(array, known, model, card, spacing, threads)[removed],
        "linear": linear_fill(array, known)[removed],
        "cubic": cubic_fill(array, known)[removed],
    }
    out = {}
    for name, est in estimates.items():
        p, s = psnr_ssim(truth, est, data_range)
        out[name] = {"psnr": p, "ssim": s}
    return out


def summarise_scores(items: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Means over volumes of :func:`compare_on` results, and the model's PSNR gain over
    the better baseline (mean, and on how many volumes it is ≥ 1 dB)."""
    out: dict[str, Any] = {m: {k: round(float(np.mean([it[m][k] for it in items])), 4)
                               for k in ("psnr", "ssim")} for m in ("model", "linear", "cubic")}
    gains = [it["model"]["psnr"] - max(it["linear"]["psnr"], it["cubic"]["psnr"]) for it in items]
    out["psnr_gain_over_best_baseline_db"] = round(float(np.mean(gains)), 4)
    out["volumes_better_by_1db"] = int(sum(g >= 1.0 for g in gains))
    out["n_volumes"] = len(items)
    return out


def calibrate_generator(model: SliceGenerator, card: Mapping[str, Any],
                        seeds: int | Iterable[int] | None = 6,
                        on_progress: Callable | None = None,
                        factors: tuple[int, ...] = (2, 3)) -> dict[str, Any]:
    """Shrink the model's residual toward linear interpolation by the factor α that
    minimises the squared error on VALIDATION phantoms (never the evaluation seeds):
    α = Σ r·(truth − linear) / Σ r², clipped to [0, 1], where r is the model's residual.
    α = 0 would mean the residual carries nothing that generalises; the card records α."""
    from .evaluation import seed_list
    from .training import VALIDATION_SEEDS

    seeds = seed_list(seeds, VALIDATION_SEEDS, 6)
    unscaled = {**card, "residual_scale": 1.0}
    num = den = 0.0
    for i, s in enumerate(seeds):
        ph = make_phantom(s, eval_settings(s))
        array = ph.volume.array
        for f in factors:
            known = removal_pattern(array.shape[0], f)
            made = regenerate(array, known, model, unscaled, ph.volume.spacing)
            lin = linear_fill(array, known)
            removed = scored_slices(known)
            r = (made[removed] - lin[removed]).astype(np.float64)
            num += float((r * (array[removed] - lin[removed])).sum())
            den += float((r * r).sum())
        if on_progress is not None:
            on_progress(i + 1, len(seeds), f"calibrating: phantom {i + 1}/{len(seeds)}")
    alpha = float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0
    return {"residual_scale": round(alpha, 4), "validation_seeds": [min(seeds), max(seeds) + 1],
            "factors": list(factors)}


def evaluate_generator(model: SliceGenerator, card: Mapping[str, Any],
                       seeds: int | Iterable[int] | None = None,
                       on_progress: Callable | None = None,
                       factors: tuple[int, ...] = (2, 3)) -> dict[str, Any]:
    """Held-out PSNR/SSIM of the generator next to linear and cubic interpolation.

    Each held-out phantom (:func:`~.training.eval_settings`: shapes, spacings, noise and
    contrast never trained on) is made ``factor``× thicker by removing slices; the removed
    slices are regenerated and scored (PSNR over the removed slices of a volume, SSIM the
    mean per slice; data range = the volume's). Means over volumes per factor.
    """
    from .evaluation import _settings_summary, seed_list

    seeds = seed_list(seeds)
    rows: dict[int, list[dict[str, dict[str, float]]]] = {f: [] for f in factors}
    for i, s in enumerate(seeds):
        settings = eval_settings(s)
        ph = make_phantom(s, settings)
        for f in factors:
            known = removal_pattern(ph.volume.shape[0], f)
            rows[f].append(compare_on(ph.volume.array, known, model, card, ph.volume.spacing))
        if on_progress is not None:
            on_progress(i + 1, len(seeds), f"generator: phantom {i + 1}/{len(seeds)}")
    per_factor = {f"x{f}": summarise_scores(items) for f, items in rows.items()}
    worst = min(v["psnr_gain_over_best_baseline_db"] for v in per_factor.values())
    summary = _settings_summary(seeds)
    summary["path"] = "core.generation.generate_slices (fp32) on slices removed from each volume"
    return {
        "model": "generator",
        "factors": per_factor,
        "min_psnr_gain_db": worst,
        "target": "PSNR >= 1 dB above both linear and cubic interpolation",
        "meets_target": bool(worst >= 1.0),
        **summary,
    }


# ======================================================================================
# Training
# ======================================================================================
def generator_training_settings(phantom_seed: int, max_slices: int = 48) -> PhantomSettings:
    """The generator's training distribution: z 1–6 mm, in-plane 0.55–1.3 mm, FOV
    170–260 mm (non-square), contrast 0.75–1.25, noise 5–35 HU. It spans the held-out
    ranges of :func:`~.training.eval_settings` (whose seeds it never uses): how far
    anatomy moves between two kept slices depends on exactly these, and a model trained
    on 1–5 mm slices over-corrected 2.5 mm gaps (−1.8 dB against linear on one held-out
    phantom) and 12 mm ones."""
    rng = np.random.default_rng([int(phantom_seed), 13])
    sz = float(rng.uniform(1.0, 6.0))
    sxy = float(rng.uniform(0.55, 1.3))
    fov_y, fov_x = (float(rng.uniform(170.0, 260.0)) for _ in range(2))
    nz = int(np.clip(round(float(rng.uniform(60.0, 260.0)) / sz), 13, max_slices))
    return PhantomSettings((nz, int(round(fov_y / sxy)), int(round(fov_x / sxy))),
                           (sz, sxy, sxy), float(rng.uniform(0.75, 1.25)),
                           float(rng.uniform(5.0, 35.0)))


@dataclass(frozen=True)
class _TrainingVolume:
    image: np.ndarray  # (z, y, x) normalised with the volume's own percentile range
    spacing: tuple[float, float, float]


class _NativePool(PhantomPool):
    """Training phantoms at their own in-plane spacing (the generator never resamples),
    normalised with their own percentile range, as :func:`generate_slices` does."""

    def _make(self) -> _TrainingVolume:
        s = self._next_seed()
        vol = make_phantom(s, generator_training_settings(s, self.max_slices)).volume
        low, high = percentile_range(vol.array, self.normalisation)
        return _TrainingVolume(((vol.array - low) / (high - low)).astype(np.float32),
                               vol.spacing)


def training_pattern(rng: np.random.Generator, n: int) -> np.ndarray:
    """A known-slice mask for one training sequence: 40 % ×2 thinning, 30 % ×3, 30 %
    random gaps of 1–3 slices (missing data). The first and last slice stay known."""
    r = rng.uniform()
    if r < 0.7:
        f = 2 if r < 0.4 else 3
        known = np.zeros(n, dtype=bool)
        known[int(rng.integers(f))::f] = True
    else:
        known = np.ones(n, dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            g = int(rng.integers(1, 4))
            z0 = int(rng.integers(1, max(2, n - g)))
            known[z0:z0 + g] = False
    known[0] = known[-1] = True
    return known


def _other_modalities(rng: np.random.Generator, seq: np.ndarray) -> np.ndarray:
    """Make a normalised CT sequence look less like CT: half the time a gamma of
    0.5–2 (other tissue contrasts), a third of the time a background of exactly zero
    (MR and masked images; the phantom's air is noisy, and an exactly flat background
    was where the network drew a grid pattern on nibabel's EPI volume)."""
    out = seq
    if rng.uniform() < 0.5:
        out = np.clip(out, 0.0, None) ** np.float32(np.exp(rng.uniform(-0.7, 0.7)))
    if rng.uniform() < 0.33:
        out = np.where(out < 0.05, np.float32(0.0), out)
    return np.ascontiguousarray(out, dtype=np.float32)


@private_rng
def train_generator(
    seed: int = 0,
    steps: int | None = None,
    seconds: float | None = None,
    *,
    loss: str | None = None,
    sampling: str | None = None,
    widths: tuple[int, int, int] = (16, 32, 64),
    seq_len: int = 9,
    crop: int = 112,
    pool_size: int = 24,
    refresh_every: int = 25,
    max_slices: int = 48,
    lr: float | None = None,
    zero_init: bool = False,
    augment: bool = True,
) -> Job[tuple[SliceGenerator, dict[str, Any]]]:
    """Train the slice generator on phantoms: sequences of ``seq_len`` consecutive
    slices with slices removed (:func:`training_pattern`), inputs built exactly as
    :func:`generate_slices` builds them, loss on the removed slices only (MSE, or L1).
    ``augment``: :func:`_other_modalities` on each sequence (on by default: without it
    the model failed on real MR)."""
    run = _start_run("generator", seed, steps, seconds, loss, sampling, None, lr, 5)
    rng, norm = run.rng, run.norm
    with deterministic(run.seed):
        model = SliceGenerator(widths=widths)
        if zero_init:  # start as linear interpolation (measured: no better, see docs)
            model.zero_residual_()
        pool = _NativePool(run.seeds, pool_size, 1.0, max_slices, norm)
        yield from pool.fill()

        def batch(step: int):
            item = pool.items[int(rng.integers(len(pool.items)))]
            vol = item.image
            nz = vol.shape[0]
            n = min(seq_len, nz)
            z0 = int(rng.integers(0, nz - n + 1))
            seq = vol[z0:z0 + n]
            if rng.uniform() < 0.5:
                seq = seq[::-1]
            (seq,) = _crop_yx(rng, [seq], crop, [0.0])
            if rng.uniform() < 0.5:
                seq = seq[:, ::-1]
            seq = np.ascontiguousarray(seq)
            if augment:
                seq = _other_modalities(rng, seq)
            known = training_pattern(rng, n)
            inputs = GeneratorInputs(seq, known, item.spacing)
            x = torch.from_numpy(inputs[:])
            target = seq - inputs.linear(np.arange(n))
            return x, (torch.from_numpy(np.ascontiguousarray(target)), torch.from_numpy(~known))

        def loss_fn(out, t):
            residual, removed = t
            d = out[:, 0][removed] - residual[removed]
            return (d * d).mean() if run.loss == "mse" else d.abs().mean()

        card = yield from _fit(run, model, pool, batch, loss_fn, refresh_every,
                               ["intensity"], pool_size,
                               {"sequence_length": seq_len, "crop": crop,
                                "max_factor": MAX_FACTOR, "inputs": list(GENERATOR_INPUTS),
                                "output": "residual over linear interpolation, normalised"})
        card["input_spacing_mm"] = [1.0, 1.0, 1.0]
        card["resample_axes"] = "none"
        card["note"] = ("runs on the volume's own grid (no resampling); trained on"
                        " generator_training_settings: in-plane 0.55-1.3 mm, z 1-6 mm,"
                        " thinned 2-3x or with gaps of 1-3 slices")
    return model, card

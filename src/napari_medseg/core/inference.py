"""Inference engine: segment, classify and detect on any volume (docs/architecture.md).

Each entry point is a generator (a :data:`~napari_medseg.core.progress.Job`) that yields
:class:`~napari_medseg.core.progress.Progress` and returns a frozen result dataclass::

    job = segment_volume(volume, model, card)
    result = run_to_completion(job, on_progress=print)   # or a napari thread_worker

Geometry. Models run at the card's in-plane spacing (``input_spacing_mm[1:]``); z stays
native (``"resample_axes": "yx"``). Inputs are normalised as the card says, resampled
in-plane with the grid convention of :mod:`napari_medseg.core.resample` (the same one
training uses), padded to the model's stride inside the model, and every output is mapped
back exactly onto the INPUT grid (labels, probabilities per slice, detection coordinates).
A 2D image is a one-slice :class:`Volume` (``Volume.from_array`` does that).

Missing slices (``volume.missing``) are never labelled, classified or detected: labels 0,
probabilities NaN / class −1, no detections. As *context* for their neighbours (the
segmenter's recurrence along z, the detector's 2.5D input) a missing slice is replaced
by the nearest acquired slice, so a gap does not look like air to the model.

Speed (measured on 2 cores; see benchmarks/ and the module notes below):

- :func:`prepare_model` folds BatchNorm into the convs, sets eval mode and channels_last,
  on a copy cached per model (the caller's module is not touched; the cache notices
  parameter updates, e.g. after fine-tuning). Measured per slice, 1 thread, random
  weights (segmenter 239², classifier 239², detector 358²): naive 16.8 / 26.2 / 21.0 ms,
  BN folded 16.9 / 24.6 / 20.1 ms, folded + channels_last 10.9 / 11.4 / 16.7 ms.
- Small batches (:data:`DEFAULT_CHUNK`, :data:`DEFAULT_BATCH`): batches of 16 were up to
  1.6× slower than 4 on this 2-core CPU (activations fall out of cache).
- ``torch.inference_mode`` around every model call (never across a ``yield``: the
  caller's code between two progress reports runs in its own grad mode).
- Threads: by default every CPU this process may use (``os.sched_getaffinity``, capped
  by a cgroup CPU quota such as ``docker --cpus``) that
  other processes leave free, re-measured between chunks (:class:`ThreadGovernor`: on
  2 cores shared with a training job, 2 threads ran the segmenter ~100× slower than 1);
  ``threads=n`` pins n, ``threads=0`` leaves torch's setting alone; the previous value
  is restored when the job ends or is closed. A job in a worker thread (napari's) counts
  the main thread's CPU as another program's: the event loop keeps a core while the
  user scrolls (a Retrain round's longest event-loop gap: 98–125 ms before, 80–101 after).
- Precision: fp32 by default (bf16 measured 1.4× / 1.9× / 1.5× faster end to end for
  segment / classify / detect on a Zen 4 with avx512_bf16, with 98.9 % of voxels, all
  slice classes and heatmaps within 0.0011 agreeing, random weights). ``precision="bf16"`` runs the convs in bfloat16 (autocast)
  and is refused unless the CPU has native bf16 (``amx_bf16`` / ``avx512_bf16`` in
  /proc/cpuinfo; elsewhere it is emulated and ~100× slower). ``precision="auto"`` uses
  bf16 only where the CPU has it AND a one-time check on the first slices of the actual
  input (cached per model and grid) finds it faster by ≥ 1.2× with the same predictions.
  bf16 runs a fused copy (``_Prepared.model_for``, ``models.fusion``).
- Labels back on the input grid: bilinear interpolation of the logits then argmax, which
  was measured more accurate than nearest-neighbour on the model-grid argmax (phantom
  0.7 → 1.4 mm → 0.7 mm, ideal probabilities: voxel accuracy 0.99981 vs 0.99703, lesion
  Dice 0.956 vs 0.890). It is computed exactly but only where it matters: where the four
  model-grid pixels around an output pixel agree on the argmax, the interpolated argmax is
  that class (a convex combination keeps the maximum), so only the pixels on class
  boundaries interpolate the logits (about 5× cheaper than interpolating every class map).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MedsegInputError
from .models.classifier import SliceClassifier, fold_batchnorm
from .models.detector import LesionDetector, extract_peaks
from .models.fusion import fuse_for_inference, to_bfloat16_weights
from .models.generator import SliceGenerator
# apply_normalisation is re-exported: the engine's in-place variant is tested against it
from .models.registry import (  # noqa: F401
    acquired_sample,
    apply_normalisation,
    check_normalisation,
    percentile_range,
)
from .models.segmenter import RecurrentSegmenter
from .progress import Job, Progress
from .resample import map_index, resampled_shape_yx
from .volume import Volume, non_axial_plane

__all__ = [
    "ClassificationResult",
    "Detection",
    "DetectionResult",
    "PRECISIONS",
    "SegmentationResult",
    "classify_volume",
    "cpu_supports_bf16",
    "detect_lesions",
    "labels_from_logits",
    "model_grid",
    "prepare_model",
    "segment_volume",
]

PRECISIONS = ("fp32", "bf16", "auto")
#: default slices per segmenter chunk. Measured end to end on 48 slices of 512² (model grid
#: 239², 1 thread): chunk 1/2/4/8/16 → 27.2/25.9/26.5/25.8/27.9 ms per slice; 4 is as fast
#: as 8 with half the working set and twice as many chances to cancel
DEFAULT_CHUNK = 4
#: default slices per classifier / detector batch. Same measurement, batch 1/2/4/8/16:
#: classifier 13.5/12.9/12.5/16.3/19.7, detector (358² grid) 23.3/22.5/22.3/22.4/25.7 ms
#: per slice: small batches keep a slice's activations in cache
DEFAULT_BATCH = 4
#: labels_from_logits: above this fraction of boundary pixels, interpolate all class maps
BOUNDARY_FRACTION_MAX = 0.1
#: auto precision: bf16 must be at least this much faster ...
BF16_MIN_SPEEDUP = 1.2
#: ... and agree with fp32 on at least this fraction of argmax decisions (segmenter,
#: classifier) / within this probability (detector heatmap)
BF16_MIN_AGREEMENT = 0.995
BF16_MAX_PROB_DIFF = 0.02


# ======================================================================================
# Results
# ======================================================================================
@dataclass(frozen=True)
class SegmentationResult:
    """Organ labels on the input grid.

    ``labels`` (z, y, x) uint8 class ids (index into ``class_names``), 0 on missing slices.
    ``voxels_per_class`` (z, n_classes) int64: per-slice voxel counts (all zero on missing
    slices); ``labelled`` (z,) bool: False where the slice was missing.
    """

    labels: np.ndarray
    class_names: tuple[str, ...]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    labelled: np.ndarray
    voxels_per_class: np.ndarray
    model_name: str = ""
    precision: str = "fp32"
    model_grid_yx: tuple[int, int] = (0, 0)
    #: (z,) voxels without a value (NaN) on slices that were labelled: left unlabelled
    #: and so in no volume (None: not counted)
    unmeasured_voxels: np.ndarray | None = None

    def volume_ml(self, voxel_mm3: float | None = None) -> dict[str, float]:
        """Volume per class in millilitres (background included). ``voxel_mm3``: the
        voxel's true volume where the grid is sheared (|det| of its transform; the
        product of the spacings, each an axis's step length, is larger then)."""
        voxel_ml = float(np.prod(self.spacing) if voxel_mm3 is None else voxel_mm3) / 1000.0
        totals = self.voxels_per_class.sum(axis=0)
        return {name: float(n) * voxel_ml for name, n in zip(self.class_names, totals)}

    def area_cm2(self, pixel_mm2: float | None = None) -> dict[str, float]:
        """Area per class in cm², summed over the slices: a 2D image's measure (its
        volume would need a slice thickness it does not have). ``pixel_mm2``: as
        ``voxel_mm3`` of :meth:`volume_ml`."""
        pixel = float(self.spacing[1]) * float(self.spacing[2]) if pixel_mm2 is None else pixel_mm2
        pixel_cm2 = float(pixel) / 100.0
        totals = self.voxels_per_class.sum(axis=0)
        return {name: float(n) * pixel_cm2 for name, n in zip(self.class_names, totals)}


def format_measure(value: float) -> str:
    """A volume (ml) or area (cm²) with the digits it needs: a found lesion of 0.04 ml
    read "0 ml" with a fixed precision, as if nothing had been found."""
    # thresholds on the value as it will be shown: 9.96 is "10", not "10.0"
    if round(value, 1) >= 10:
        return f"{value:.0f}"
    if round(value, 2) >= 1:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.005 else "< 0.01"


@dataclass(frozen=True)
class ClassificationResult:
    """Per-slice class probabilities: ``probabilities`` (z, n_classes) float32, NaN on
    missing slices; ``predicted`` (z,) int64 class ids, −1 on missing slices."""

    probabilities: np.ndarray
    predicted: np.ndarray
    class_names: tuple[str, ...]
    missing: np.ndarray
    model_name: str = ""
    precision: str = "fp32"

    def predicted_names(self) -> list[str | None]:
        return [None if c < 0 else self.class_names[c] for c in self.predicted]


@dataclass(frozen=True)
class Detection:
    """One lesion: centre in INPUT voxel coordinates (z, y, x; float, sub-voxel in y, x
    when the model grid differs), score (the detector's centre score, 0–1) and diameter in mm."""

    z: float
    y: float
    x: float
    score: float
    diameter_mm: float


@dataclass(frozen=True)
class DetectionResult:
    """Detections (strongest first) and the centre-score heatmap.

    ``heatmap`` (z, h, w) float32 in [0, 1] lives on the MODEL grid (``heatmap_shape_yx``,
    same z as the input; 0 on missing slices) for explainability overlays; use
    :meth:`heatmap_on_input_grid` for the input grid, or :attr:`heatmap_scale` /
    :attr:`heatmap_translate` (mm, relative to the input origin) to show it as is.
    ``diameter_map`` (same grid; NaN on missing slices) is the predicted lesion diameter
    in mm at every voxel, from which each detection's diameter is read.
    """

    detections: tuple[Detection, ...]
    heatmap: np.ndarray
    input_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    threshold: float
    min_distance_mm: float
    model_name: str = ""
    precision: str = "fp32"
    diameter_map: np.ndarray | None = None
    nms_radius_fraction: float = 0.0
    #: the input slices holding unmeasured (NaN) voxels and their NaN masks,
    #: ((k,) int, (k, y, x) bool); None when every voxel holds a measurement
    unmeasured: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def heatmap_shape_yx(self) -> tuple[int, int]:
        return tuple(self.heatmap.shape[1:])  # type: ignore[return-value]

    @property
    def heatmap_scale(self) -> tuple[float, float, float]:
        """Voxel size (z, y, x) mm of the heatmap grid (same field of view as the input)."""
        (_, ny, nx), (h, w) = self.input_shape, self.heatmap_shape_yx
        return (self.spacing[0], self.spacing[1] * ny / h, self.spacing[2] * nx / w)

    @property
    def heatmap_translate(self) -> tuple[float, float, float]:
        """World position (mm) of heatmap voxel (0, 0, 0): input origin + the grid offset."""
        y0, x0 = map_index([0.0, 0.0], self.heatmap_shape_yx, self.input_shape[1:])
        return (self.origin[0], self.origin[1] + y0 * self.spacing[1],
                self.origin[2] + x0 * self.spacing[2])

    def heatmap_on_input_grid(self) -> np.ndarray:
        """The heatmap resampled (bilinear) onto the input grid: (z, y, x) float32; 0 on
        every unmeasured (NaN) voxel, which the resampling would otherwise give heat
        from measured cells beside it where the input is finer than the model grid."""
        out = np.empty(self.input_shape, dtype=np.float32)
        for z0 in range(0, self.input_shape[0], DEFAULT_BATCH):
            part = torch.from_numpy(self.heatmap[z0 : z0 + DEFAULT_BATCH])[:, None]
            out[z0 : z0 + DEFAULT_BATCH] = resize_yx(part, self.input_shape[1:])[:, 0].numpy()
        if self.unmeasured is not None:
            zs, nan = self.unmeasured
            on_them = out[zs]
            on_them[nan] = 0.0
            out[zs] = on_them
        return out

    def as_rows(self) -> list[tuple[float, float, float, float, float]]:
        return [(d.z, d.y, d.x, d.score, d.diameter_mm) for d in self.detections]


# ======================================================================================
# CPU features, threads, precision
# ======================================================================================
@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX-512 BF16) and PyTorch's oneDNN
    will use it (not where ``ONEDNN_MAX_CPU_ISA`` caps it below, or a VM's flags promise
    more than it runs: the convs would fall back to PyTorch's own, emulated bf16)."""
    if not {"amx_bf16", "avx512_bf16"} & cpu_flags():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without it: the flags decide
        return True


def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup",
                      proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """CPUs a CFS quota lets this process use (``docker --cpus``, a Kubernetes CPU
    limit), rounded up, or None when there is none. The affinity mask does not show a
    quota: a container limited to 2 CPUs on a 64-core host would start 64 threads that
    the kernel runs 2 at a time. The tightest quota on the process's cgroup or any
    ancestor applies (cgroup v2 ``cpu.max``; v1 ``cpu.cfs_quota_us`` / ``_period_us``)."""
    try:
        with open(proc_cgroup, encoding="ascii", errors="replace") as fh:
            entries = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        entries = []

    def ancestors(path: str) -> list[str]:
        parts = [p for p in path.split("/") if p]
        return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]

    def read(path: str) -> str | None:
        try:
            with open(path, encoding="ascii") as fh:
                return fh.read().strip()
        except (OSError, UnicodeDecodeError):
            return None

    limits: list[float] = []
    for entry in entries or [["0", "", "/"]]:
        if len(entry) != 3:
            continue
        hierarchy, controllers, path = entry
        if hierarchy == "0" and controllers == "":  # v2 (unified)
            for rel in ancestors(path):
                text = read(os.path.join(root, rel, "cpu.max"))
                fields = text.split() if text else []
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        limits.append(float(fields[0]) / float(fields[1]))
                    except (ValueError, ZeroDivisionError):
                        pass
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's mount
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                for rel in ancestors(path):
                    base = os.path.join(root, mount, rel)
                    quota = read(os.path.join(base, "cpu.cfs_quota_us"))
                    period = read(os.path.join(base, "cpu.cfs_period_us"))
                    try:
                        q, p = float(quota), float(period)  # type: ignore[arg-type]
                    except (TypeError, ValueError):
                        continue
                    if q > 0 and p > 0:
                        limits.append(q / p)
    positive = [v for v in limits if v > 0]
    return max(1, math.ceil(min(positive) - 1e-9)) if positive else None


def default_threads() -> int:
    """CPUs this process may use: its affinity mask (``os.sched_getaffinity``), capped by
    a cgroup CPU quota where there is one (:func:`_cgroup_cpu_limit`)."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    quota = _cgroup_cpu_limit()
    return cpus if quota is None else max(1, min(cpus, quota))


def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / hz, total / hz


def _main_thread_seconds() -> float:
    """CPU seconds the process's main thread has used, when the caller is another
    thread (a GUI's worker), else 0: the event loop's work is not the job's (Linux)."""
    main = threading.main_thread()
    if threading.current_thread() is main or main.native_id is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{main.native_id}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        hz = os.sysconf("SC_CLK_TCK")
        return (float(fields[11]) + float(fields[12])) / hz  # utime, stime
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _runnable_others() -> int:
    """Runnable tasks on the machine right now, not counting the caller (/proc/loadavg)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            running = int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def free_threads() -> int:
    """The threads a job starts with when not pinned: the usable CPUs minus the tasks
    already running elsewhere (at least 1)."""
    return max(1, default_threads() - _runnable_others())


def _new_thread_count() -> int:
    """torch's thread count in a thread started now (OpenMP: the last count set)."""
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()),
                             name="medseg-thread-count")
    probe.start()
    probe.join()
    return seen[0] if seen else torch.get_num_threads()


class ThreadGovernor:
    """How many threads torch uses during a job, re-decided between chunks.

    ``threads=None`` (the default) starts from all CPUs this process may use
    (``os.sched_getaffinity``) minus the tasks already running elsewhere, and after each
    chunk or batch re-measures, from /proc/stat and this process's CPU time, how many
    cores other processes kept busy during that chunk; torch gets the rest (at least 1).
    Measured on 2 cores while another process trained a model on both: the segmenter's
    forward took 490–620 ms per slice on 2 threads and 4–12 ms on 1 (OpenMP barriers
    wait for a descheduled thread at every op), so all cores is right only when they are
    free. Run from a worker thread, the main thread's CPU time counts as another
    process's (:func:`_main_thread_seconds`): in napari that is the event loop drawing.
    ``threads=n`` pins n threads; ``threads=0`` leaves torch's setting alone. The
    previous setting is restored when the job ends, fails or is closed.
    """

    MIN_INTERVAL_S = 0.2
    # With OpenMP (this torch build) torch.set_num_threads sets the CALLING thread's count
    # and the default that new threads start with. Jobs may overlap (two widgets at once,
    # each in its own worker thread), so each job's thread is set back, when the last job
    # on that thread ends, to the setting from before the first of all overlapping jobs
    # (a worker thread created mid-job would otherwise keep, and later restore, the
    # count that job had pinned)
    _lock = threading.Lock()
    _active = 0
    _original = 1
    # jobs running on each thread (by thread id): a job closed from another thread must
    # count down the thread it entered on (a thread-local counter went to -1 there and
    # the entering thread's count was never restored again)
    _depth: dict[int, int] = {}

    def __init__(self, threads: int | None):
        # a whole number only: 1.7, True and "2" were taken as 1, 1 and 2 threads
        if threads is not None and (isinstance(threads, (bool, np.bool_))
                                    or not isinstance(threads, (int, np.integer))
                                    or threads < 0):
            raise MedsegInputError(
                f"threads must be ≥ 1 (or 0 to leave torch's setting), got {threads!r}")
        self.auto = threads is None
        self.leave = threads == 0
        self.cpus = default_threads()
        if threads is not None and not self.leave:
            self.fixed = int(threads)
        self._last: tuple[float, float, float] | None = None

    def _mark(self) -> None:
        jiffies = _cpu_jiffies()
        if jiffies is None:
            self._last = None
            return
        t = os.times()
        self._last = (time.perf_counter(), t.user + t.system - _main_thread_seconds(), jiffies[0])

    def _set(self, n: int) -> None:
        n = max(1, min(self.cpus, n))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)

    def __enter__(self) -> "ThreadGovernor":
        if self.leave:
            return self
        with ThreadGovernor._lock:
            if ThreadGovernor._active == 0:
                # a worker thread that first ran torch while a job had pinned the count
                # started at that pin (OpenMP's default for new threads) and would hand
                # it on: workers go back to what a new thread gets now, with no job
                # pinning (the main thread's own count is the user's, and is kept)
                ThreadGovernor._original = (
                    torch.get_num_threads() if threading.current_thread() is threading.main_thread()
                    else _new_thread_count())
            ThreadGovernor._active += 1
        self._entered_on = threading.get_ident()
        with ThreadGovernor._lock:
            depth = ThreadGovernor._depth
            depth[self._entered_on] = depth.get(self._entered_on, 0) + 1
        if self.auto:
            self._set(free_threads())
            self._mark()
        else:
            self._set(self.fixed)
        return self

    def update(self) -> None:
        """Between two chunks: give torch the cores other processes left free."""
        if not self.auto or self._last is None:
            return
        wall0, ours0, busy0 = self._last
        wall = time.perf_counter() - wall0
        if wall < self.MIN_INTERVAL_S:
            return
        jiffies = _cpu_jiffies()
        t = os.times()
        if jiffies is None:
            return
        ours = t.user + t.system - _main_thread_seconds()
        others = max(0.0, (jiffies[0] - busy0) - (ours - ours0)) / wall
        self._set(int(self.cpus - others + 0.3))
        self._mark()

    def __exit__(self, *exc: Any) -> None:
        if self.leave:
            return
        with ThreadGovernor._lock:
            ThreadGovernor._active -= 1
            original = ThreadGovernor._original
            depth = ThreadGovernor._depth
            left = depth.get(self._entered_on, 1) - 1
            if left > 0:
                depth[self._entered_on] = left
            else:
                depth.pop(self._entered_on, None)
        # only the entering thread's count was pinned; closed from another thread, the
        # job leaves that thread's count alone
        on_entering_thread = threading.get_ident() == self._entered_on
        if on_entering_thread and left <= 0 and torch.get_num_threads() != original:
            torch.set_num_threads(original)


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise MedsegInputError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and not cpu_supports_bf16():
        raise MedsegInputError(
            "bf16 needs a CPU with native bfloat16 (amx_bf16 or avx512_bf16) that PyTorch's"
            " oneDNN uses; here it would be emulated, ~100× slower than fp32: use precision"
            " 'fp32' or 'auto'"
        )
    return precision


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


# ======================================================================================
# Prepared models (BN folded, eval, channels_last), cached per model
# ======================================================================================
@dataclass
class _Prepared:
    key: tuple
    model: nn.Module
    bf16_ok: dict = field(default_factory=dict)  # (grid, n_slices) → bool (auto precision)
    _bf16_model: nn.Module | None = None

    def model_for(self, bf16: bool) -> nn.Module:
        """The prepared model, or for bf16 (run under autocast) a copy made on first use
        with each conv and its activation fused into one call and the conv and linear
        weights bfloat16 already (``models.fusion``: 1.08× on classify and detect with
        AMX, the same outputs)."""
        if not bf16:
            return self.model
        with _PREPARED_LOCK:  # jobs in two worker threads make one copy
            if self._bf16_model is None:
                self._bf16_model = to_bfloat16_weights(
                    fuse_for_inference(copy.deepcopy(self.model)))
            return self._bf16_model


_PREPARED: "weakref.WeakKeyDictionary[nn.Module, _Prepared]" = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()  # jobs may run in several napari worker threads


def _state_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or updated in place. The sum
    of each tensor is part of it: an edit through ``.data`` (a view with its own version
    counter) changes neither its pointer nor its version (under 1 ms for these models)."""
    with torch.no_grad():
        return tuple((t.data_ptr(), t._version, float(t.detach().sum()))
                     for t in (*model.parameters(), *model.buffers()))


def _prepared(model: nn.Module) -> _Prepared:
    if not isinstance(model, nn.Module):
        raise MedsegInputError(f"expected a torch model, got {type(model).__name__}")
    with _PREPARED_LOCK:
        key = _state_key(model)
        entry = _PREPARED.get(model)
        if entry is None or entry.key != key:
            fast = copy.deepcopy(model)
            fold_batchnorm(fast)  # also sets eval mode
            fast.eval().to(memory_format=torch.channels_last)
            if hasattr(fast, "enable_fast_inference"):  # e.g. pool before ReLU
                fast.enable_fast_inference()
            for p in fast.parameters():
                p.requires_grad_(False)
            entry = _Prepared(key, fast)
            _PREPARED[model] = entry
        return entry


def prepare_model(model: nn.Module) -> nn.Module:
    """An inference copy of ``model``: BatchNorm folded into the convs, eval mode,
    channels_last, no grad, the model's own exact shortcuts on (``enable_fast_inference``).
    Cached per model (and refreshed when its weights change); the caller's module is left
    as it was (still trainable, same state_dict)."""
    return _prepared(model).model


# ======================================================================================
# Geometry: the model grid and back
# ======================================================================================
def card_spacing_yx(card: Mapping[str, Any]) -> tuple[float, float]:
    try:
        spacing = [float(s) for s in card["input_spacing_mm"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise MedsegInputError("model card lacks a valid input_spacing_mm (z, y, x)") from exc
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MedsegInputError(
            f"model card input_spacing_mm must be 3 positive numbers, got {spacing}")
    axes = str(card.get("resample_axes", "yx")).lower()
    if axes != "yx":
        raise MedsegInputError(f"resample_axes {axes!r} is not supported (only 'yx')")
    return spacing[1], spacing[2]


#: the largest model-grid side: 4096 pixels at 1 mm is a 4 m field of view
MAX_GRID_SIDE = 4096


def model_grid(volume: Volume, card: Mapping[str, Any]) -> tuple[int, int]:
    """In-plane size (h, w) of the model grid for ``volume`` (same field of view)."""
    fov = [n * s for n, s in zip(volume.shape[1:], volume.spacing[1:])]
    if not all(math.isfinite(f) for f in fov):  # a pixel spacing of 1e308: round(inf) raised
        raise MedsegInputError(
            f"the pixel size {volume.spacing[1]:.3g} × {volume.spacing[2]:.3g} mm gives no "
            "finite field of view; check the pixel spacing")
    h, w = resampled_shape_yx(volume.shape[1:], volume.spacing[1:], card_spacing_yx(card))
    if max(h, w) > MAX_GRID_SIDE:  # a spacing in cm read as mm would ask for gigabytes
        fov = [round(f) for f in fov]
        if max(fov) <= MAX_GRID_SIDE:  # a field a body fits in: the card's pixels are absurd
            sy, sx = card_spacing_yx(card)
            raise MedsegInputError(
                f"model card '{card.get('name', '?')}' asks for {sy:g} × {sx:g} mm pixels "
                f"(input_spacing_mm): {h} × {w} pixels for this {fov[0]} × {fov[1]} mm "
                "image; the card is damaged or not meant for scans")
        raise MedsegInputError(
            f"the image covers {fov[0]:.4g} × {fov[1]:.4g} mm in-plane (pixel size "
            f"{volume.spacing[1]:g} × {volume.spacing[2]:g} mm), more than any body; "
            "check the pixel spacing")
    return h, w


def resize_yx(x: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """Bilinear (N, C, h, w) → (N, C, *size) on the grid of core.resample.

    ``antialias=True`` is exactly :func:`~napari_medseg.core.resample.resample_yx`
    (order 1), which training uses, so model inputs are made the same way; outputs going
    back to the input grid are sampled at the pixel centres (no antialiasing: labels and
    heatmaps are point estimates, and upsampling is the same either way)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=antialias)


def _axis_weights(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source pixels and weight along one axis (PyTorch align_corners=False)."""
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    src = src.clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0, i1, (src - i0).float()


def labels_from_logits(logits: torch.Tensor, size_yx: Sequence[int]) -> torch.Tensor:
    """argmax over classes of the bilinearly resampled logits, computed at boundaries only.

    ``logits`` (N, C, h, w) → (N, H, W) uint8 = ``argmax(resize_yx(logits, size), dim=1)``
    (up to float rounding at exact ties). Where the four model pixels around an output
    pixel have the same argmax, the interpolated argmax is that class (a convex
    combination of vectors that share their maximum keeps it), so only the other output
    pixels gather their 4 × C logits.
    """
    n, c, h, w = logits.shape
    size = tuple(int(s) for s in size_yx)
    if c > 255:
        raise MedsegInputError(f"at most 255 classes fit a uint8 label map, got {c}")
    # channels_last: the argmax and the per-pixel gathers read C contiguous values
    # (measured 3.5 vs 9.3 ms per 512² slice from NCHW logits, 9 classes, 1 thread)
    logits = logits.contiguous(memory_format=torch.channels_last)
    arg = logits.argmax(dim=1).to(torch.uint8)  # (N, h, w)
    if (h, w) == size:
        return arg
    y0, y1, wy = _axis_weights(h, size[0])
    x0, x1, wx = _axis_weights(w, size[1])
    # Decide on the model grid whether each cell (i, j)..(i + 1, j + 1) has one label,
    # then upsample that once: 255 (no class has it) marks the cells whose corners
    # differ (right, down and diagonal neighbours equal ⇒ all four corners equal). In
    # the last row and column y1, x1 clamp, so those cells compare only two corners.
    # np.take keeps the result C-contiguous and gathers uint8 ~4x faster than two torch
    # index_selects per corner (0.14 vs 2.4 ms for 4 × 512², one thread).
    a = arg.numpy()
    differ = np.zeros(a.shape, dtype=bool)
    differ[:, :-1] |= a[:, :-1] != a[:, 1:]
    differ[:, :, :-1] |= a[:, :, :-1] != a[:, :, 1:]
    differ[:, :-1, :-1] |= a[:, :-1, :-1] != a[:, 1:, 1:]
    packed = np.where(differ, np.uint8(255), a)
    out = np.take(np.take(packed, y0.numpy(), axis=1), x0.numpy(), axis=2)
    idx = np.flatnonzero(out == 255)
    if len(idx) > BOUNDARY_FRACTION_MAX * out.size:
        # boundaries everywhere (an untrained or very uncertain model): interpolating
        # every class map is cheaper than gathering most pixels one by one
        # (two slices at a time: the full-size class maps are the largest temporaries)
        return torch.cat([resize_yx(part.float(), size).argmax(dim=1).to(torch.uint8)
                          for part in logits.split(2)])
    if len(idx):
        H, W = size
        pix = torch.from_numpy(idx)
        b, rest = pix // (H * W), pix % (H * W)
        yy, xx = rest // W, rest % W
        lg = logits.float().permute(0, 2, 3, 1).reshape(n * h * w, c)  # (pixels, C)
        base = b * (h * w)
        ya, yb, xa, xb = y0[yy] * w, y1[yy] * w, x0[xx], x1[xx]
        ay, ax = wy[yy, None], wx[xx, None]
        val = (1 - ay) * ((1 - ax) * lg.index_select(0, base + ya + xa)
                          + ax * lg.index_select(0, base + ya + xb))
        val += ay * ((1 - ax) * lg.index_select(0, base + yb + xa)
                     + ax * lg.index_select(0, base + yb + xb))
        out.reshape(-1)[idx] = val.argmax(dim=1).to(torch.uint8).numpy()
    return torch.from_numpy(out)


def _fill_index(missing: np.ndarray) -> np.ndarray:
    """z → the nearest acquired slice (itself when acquired; ties go to the lower one)."""
    n = len(missing)
    acquired = np.flatnonzero(~missing)
    if len(acquired) == 0 or len(acquired) == n:
        return np.arange(n)
    pos = np.searchsorted(acquired, np.arange(n))
    lo = acquired[np.clip(pos - 1, 0, len(acquired) - 1)]
    hi = acquired[np.clip(pos, 0, len(acquired) - 1)]
    z = np.arange(n)
    return np.where(np.abs(z - lo) <= np.abs(hi - z), lo, hi)


def _planes_filled(src: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """``src`` (slices, y, x) with each slice's all-NaN rows and columns (``holes`` is
    ``isnan(src)``; a turned coronal or sagittal series' gap planes) replaced by the
    nearest measured row / column of that slice, as missing slices are by the nearest
    acquired one. Read as air, a three-plane gap changed labels and detections 20 mm
    away; the outputs there are masked anyway (:func:`segment_volume`,
    :func:`detect_lesions`). Other NaN voxels (a masked patch) are left to the
    normalisation (the window's low end), as before: a nearest-voxel fill of every slice
    with a NaN border cost +65 % of segment's time. Returns ``src`` when nothing moves."""
    rows, cols = holes.all(axis=2), holes.all(axis=1)  # a column empty before the rows
    # are filled is empty after (an empty row is NaN in every column), and vice versa
    todo = [k for k in range(len(src))
            if (rows[k].any() and not rows[k].all()) or (cols[k].any() and not cols[k].all())]
    if not todo:
        return src
    out = np.array(src, copy=True)
    for k in todo:
        if rows[k].any():
            out[k] = out[k][_fill_index(rows[k])]
        if cols[k].any():
            out[k] = out[k][:, _fill_index(cols[k])]
    return out


def _normalised_on_grid(array: np.ndarray, z: np.ndarray, spec: Mapping[str, Any],
                        grid: Sequence[int]) -> torch.Tensor:
    """(len(z), *grid) float32: slices ``z`` of ``array`` normalised as the card says
    (:func:`~napari_medseg.core.models.registry.apply_normalisation`), then resampled
    in-plane to ``grid`` as training's ``resample_yx`` does (antialiased bilinear).

    The same values up to float rounding, in two full-size passes instead of six: the
    affine part of the normalisation commutes with the resampling (a weighted mean,
    weights summing to 1), so it runs after it, on the model grid; only what does not
    commute runs at full size: the window's clip (out of place on a view of a contiguous
    run of slices, so it is also the copy, on every thread) and NaN / inf replaced by
    the value that normalises to 0 (or to 1 for +inf under a window). ``array`` is
    never written."""
    z = np.asarray(z)
    if len(z) and z[-1] - z[0] + 1 == len(z) and (np.diff(z) == 1).all():
        src, owned = array[z[0]:z[-1] + 1], False  # a view: the first op below copies
    else:
        src, owned = array[z], True  # fancy indexing copies
    if src.dtype != np.float32 or not (src.flags.writeable and src.flags.c_contiguous):
        src, owned = np.array(src, dtype=np.float32), True  # torch wants both for a view
    holes = np.isnan(src)
    if holes.any():  # a turned series' gap planes: the nearest measured plane stands in
        filled = _planes_filled(src, holes)
        if filled is not src:
            src, owned = filled, True
    t = torch.from_numpy(src)
    if spec["type"] == "window":
        low, high = float(spec["low"]), float(spec["high"])
        t = t.clamp_(low, high) if owned else t.clamp(low, high)  # ±inf → the window's ends
        torch.nan_to_num_(t, nan=low)
        shift, scale = low, high - low
    else:
        shift, scale = float(spec["mean"]), float(spec["std"])
        fix = torch.nan_to_num_ if owned else torch.nan_to_num
        t = fix(t, nan=shift, posinf=shift, neginf=shift)
    out = resize_yx(t[:, None], grid, antialias=True)[:, 0]  # as resample_yx
    out = out.sub_(shift).div_(scale)
    if not torch.isfinite(out).all():
        # values near float32's limit under a z-score or percentile card fitted to small
        # units overflow here; the network then gave NaN, which argmax read as class 0
        finite = src[np.isfinite(src)]
        span = f"{finite.min():.3g} to {finite.max():.3g}" if finite.size else "none finite"
        raise MedsegInputError(
            f"the image's values ({span}) overflow once normalised as the model's card "
            f"says (subtract {shift:.3g}, divide by {scale:.3g}); voxels near float32's "
            "limit are probably a fill value: replace them or use the scan's usual units")
    return out


class ModelGridSlices:
    """The volume as model input, computed lazily per batch of slices.

    ``self[a:b]`` → (b − a, 2·context + 1, h, w) float32 channels_last tensor: normalised
    as the card says, resampled in-plane to the model grid, neighbours clamped at the
    volume's ends and missing slices replaced by their nearest acquired slice. Only the
    slices a batch needs are processed, so memory follows the batch, not the volume.
    """

    def __init__(self, volume: Volume, card: Mapping[str, Any], context: int = 0):
        self.array = volume.array
        self.norm = check_normalisation(card["normalisation"])
        if self.norm["type"] == "percentile":
            # the volume's own range, fixed once for all batches (acquired slices only):
            # then it is an affine map without a clip, which is how zscore runs; with
            # nothing acquired nothing runs, as with any other card (a unit map stands in)
            if volume.missing.all():
                low, high = 0.0, 1.0
            else:
                low, high = percentile_range(acquired_sample(volume.array, volume.missing),
                                             self.norm)
            self.norm = {"type": "zscore", "mean": low, "std": high - low}
        self.grid = model_grid(volume, card)
        self.context = int(context)
        self.source = _fill_index(volume.missing)
        # the previous batch's resampled slices: with context, consecutive batches share
        # 2·context of them (a third of the input work of a detect run in batches of 4)
        self._kept = (np.zeros(0, dtype=np.int64), None)

    def __len__(self) -> int:
        return len(self.array)

    def _resampled(self, needed: np.ndarray) -> torch.Tensor:
        """(k, h, w) model-grid slices ``needed`` (sorted, unique), reusing the last batch's."""
        kept_z, kept = self._kept
        reuse = np.isin(needed, kept_z)
        x = torch.empty((len(needed), *self.grid), dtype=torch.float32)
        if reuse.any():
            x[torch.from_numpy(np.flatnonzero(reuse))] = kept[
                torch.from_numpy(np.searchsorted(kept_z, needed[reuse]))]
        if not reuse.all():
            x[torch.from_numpy(np.flatnonzero(~reuse))] = _normalised_on_grid(
                self.array, needed[~reuse], self.norm, self.grid)
        self._kept = (needed, x)
        return x

    def batch(self, start: int, stop: int) -> torch.Tensor:
        n = len(self.array)
        z = np.arange(start, stop)[:, None] + np.arange(-self.context, self.context + 1)[None]
        z = self.source[np.clip(z, 0, n - 1)]
        needed, inverse = np.unique(z, return_inverse=True)
        if self.context == 0 and len(needed) == len(z):  # each slice once, in order
            x = _normalised_on_grid(self.array, needed, self.norm, self.grid)[:, None]
            return x.contiguous(memory_format=torch.channels_last)  # C = 1: no copy
        x = self._resampled(needed)[torch.from_numpy(inverse.reshape(z.shape))]  # (b, channels, h, w)
        return x.contiguous(memory_format=torch.channels_last)

    def __getitem__(self, item: slice) -> torch.Tensor:
        start, stop, step = item.indices(len(self.array))
        if step != 1:
            raise IndexError("only contiguous slice ranges")
        return self.batch(start, stop)


# ======================================================================================
# Precision choice
# ======================================================================================
def _main_output(out: Any) -> torch.Tensor:
    return out.heatmap if isinstance(out, tuple) and hasattr(out, "heatmap") else out


def _outputs_agree(ref: torch.Tensor, low: torch.Tensor) -> bool:
    ref, low = ref.float(), low.float()
    if ref.shape[1] == 1:  # heatmap logits
        return float((torch.sigmoid(ref) - torch.sigmoid(low)).abs().max()) <= BF16_MAX_PROB_DIFF
    agree = (ref.argmax(1) == low.argmax(1)).float().mean()
    return float(agree) >= BF16_MIN_AGREEMENT


def _time_call(fn, repeats: int = 2) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _use_bf16(entry: _Prepared, precision: str, sample: torch.Tensor) -> bool:
    """fp32 → False; bf16 → True (already checked supported); auto → measured once per
    model and input size on ``sample`` (the first slices of the actual input)."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if not cpu_supports_bf16():
        return False
    key = tuple(sample.shape)
    if key not in entry.bf16_ok:
        def run(bf16: bool) -> torch.Tensor:
            with torch.inference_mode(), _autocast(bf16):
                return _main_output(entry.model_for(bf16)(sample))

        t32, ref = _time_call(lambda: run(False))
        t16, low = _time_call(lambda: run(True))
        entry.bf16_ok[key] = bool(t32 / t16 >= BF16_MIN_SPEEDUP and _outputs_agree(ref, low))
    return entry.bf16_ok[key]


def _slice_batches(entry: _Prepared, precision: str, slices: ModelGridSlices,
                   todo: np.ndarray, batch: int) -> tuple[list[tuple[int, int]], bool]:
    """Cut the contiguous runs of acquired slices ``todo`` into ``[a, b)`` batches of at
    most ``batch``; say whether bf16 is used (tried on the first batch's first 4 slices)."""
    runs = np.split(todo, np.flatnonzero(np.diff(todo) > 1) + 1)
    batches = [(r[i], r[min(i + batch, len(r)) - 1] + 1)
               for r in runs for i in range(0, len(r), batch)]
    use_bf16 = False
    if precision != "fp32":
        a, b = batches[0]
        use_bf16 = _use_bf16(entry, precision, slices[a : min(b, a + 4)])
    return batches, use_bf16


# ======================================================================================
# Argument checks shared by the three jobs
# ======================================================================================
def slice_context(model: Any) -> int:
    """k, the neighbours on each side a classifier with ``in_channels`` = 2k + 1 sees."""
    context = (model.in_channels - 1) // 2
    if model.in_channels != 2 * context + 1:
        raise MedsegInputError(
            f"in_channels must be odd (slice ± neighbours), got {model.in_channels}")
    return context


def check_model_args(volume: Any, model: Any, card: Any, expected: type, what: str) -> list[str]:
    if not isinstance(volume, Volume):
        raise MedsegInputError(f"expected a Volume, got {type(volume).__name__}")
    # a SliceGenerator IS-A RecurrentSegmenter by code reuse only: it segments nothing
    if not isinstance(model, expected) or (isinstance(model, SliceGenerator)
                                           and not issubclass(expected, SliceGenerator)):
        raise MedsegInputError(
            f"{what} needs a {expected.__name__}, got {type(model).__name__}"
        )
    if not isinstance(card, Mapping) or "classes" not in card or "normalisation" not in card:
        raise MedsegInputError("model card lacks classes / normalisation")
    card_spacing_yx(card)
    check_normalisation(card["normalisation"])
    plane = non_axial_plane(volume)
    if plane is not None:
        raise MedsegInputError(
            f"{what} reads axial slices, and this image's slices are {plane} planes (one "
            f"{plane} image cannot be turned to axial ones; open the whole series, which is)")
    return [str(c) for c in card["classes"]]


#: an in-plane field of view below this (mm) holds no body: likely a spacing in cm
MIN_BODY_FOV_MM = 40.0


#: a 0.5th or 99.5th percentile beyond ± this is no CT in Hounsfield units
HU_PLAUSIBLE = 30_000.0


def input_warnings(volume: Volume, card: Mapping[str, Any]) -> list[str]:
    """What makes a model's result on ``volume`` doubtful without making it impossible
    (said, not refused): data that does not look like the Hounsfield units a CT-window
    model expects (raw DICOM values, MR), and a field of view too small for a body (a
    pixel size in cm read as mm). Both gave organ volumes and "0 detections" in silence."""
    warnings: list[str] = []
    norm = card.get("normalisation")
    if not (isinstance(norm, Mapping) and norm.get("type") == "window"):
        return warnings  # a model for any modality (the slice generator): neither applies
    if volume.modality in ("OT", "", None):  # guessed (no air in it), or a source's "OT"
        warnings.append(
            "the image is not known to be CT in Hounsfield units (modality OT: no air at "
            "-500 HU or below was found, or its source says OT), which this model expects: "
            "its result may be meaningless (raw DICOM values need their rescale slope and "
            "intercept)")
    elif volume.modality != "CT":  # said by its source: the model does not apply
        warnings.append(
            f"the image is {volume.modality}, not CT: this model was trained on CT in "
            "Hounsfield units, so its result on it is meaningless")
    else:
        from .models.registry import percentile_range

        # air below -500 passes for CT however large the scale: the phantom in HU × 1e27
        # was segmented into organ volumes without a word. Padding outside the field of
        # view (-3024) and metal (extended scales, to about 30 000) stay well inside.
        try:
            low, high = percentile_range(volume.array, {"low_percentile": 0.5,
                                                        "high_percentile": 99.5})
        except MedsegInputError:
            low, high = -1000.0, 0.0  # no finite voxel: said elsewhere
        if low < -HU_PLAUSIBLE or high > HU_PLAUSIBLE:
            warnings.append(
                f"the image's values run from {low:.3g} to {high:.3g}, far outside the "
                "Hounsfield units this model expects (air -1000, bone up to about 3000): "
                "a rescale applied twice or a wrong scale factor? Its result may be "
                "meaningless")
    sy, sx = volume.spacing[1:]
    fov = (volume.shape[1] * sy, volume.shape[2] * sx)
    if max(fov) < MIN_BODY_FOV_MM:
        warnings.append(
            f"the image covers only {fov[0]:.0f} × {fov[1]:.0f} mm in-plane (pixel size "
            f"{sy:g} × {sx:g} mm), less than a body, which this model was trained on (if "
            "its pixel size was given in cm, give it in mm)")
    return warnings


def positive_int(value: Any, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"{what} must be a positive integer, got {value!r}") from exc
    if n < 1 or n != value or isinstance(value, (bool, np.bool_)):  # True is not 1 slice
        raise MedsegInputError(f"{what} must be a positive integer, got {value!r}")
    return n


def _model_name(card: Mapping[str, Any]) -> str:
    return str(card.get("name", ""))


# ======================================================================================
# Segmentation
# ======================================================================================
def segment_volume(
    volume: Volume,
    model: RecurrentSegmenter,
    card: Mapping[str, Any],
    *,
    chunk: int | None = None,
    precision: str = "fp32",
    threads: int | None = None,
) -> Job[SegmentationResult]:
    """Organ labels for ``volume`` on its own grid (a generator; see module docs).

    Streams the volume through :meth:`RecurrentSegmenter.iter_chunks` ``chunk`` slices at a
    time (default :data:`DEFAULT_CHUNK`): memory is the output labels plus a few chunks,
    whatever the number of slices. Yields ``Progress`` once per chunk and pass (twice per
    chunk), so a cancel takes effect within one chunk.
    """
    classes = check_model_args(volume, model, card, RecurrentSegmenter, "segmentation")
    if len(classes) != model.n_classes:
        raise MedsegInputError(
            f"card lists {len(classes)} classes, the model has {model.n_classes}")
    if len(classes) > 255:  # uint8 labels; said now, not after the backward pass
        raise MedsegInputError(f"labels hold at most 255 classes, the model has {len(classes)}")
    chunk = DEFAULT_CHUNK if chunk is None else positive_int(chunk, "chunk")
    precision = _check_precision(precision)
    slices = ModelGridSlices(volume, card)
    nz, ny, nx = volume.shape
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labelled = ~volume.missing
    unmeasured_voxels = np.zeros(nz, dtype=np.int64)
    use_bf16 = False
    if labelled.any():
        with ThreadGovernor(threads) as governor:
            entry = _prepared(model)
            if precision != "fp32":
                use_bf16 = _use_bf16(entry, precision, slices[0 : min(nz, 4)])
            chunks = entry.model_for(use_bf16).iter_chunks(slices, chunk)
            total = RecurrentSegmenter.n_steps(nz, chunk)
            yield Progress(0, total, "segmenting")
            while True:
                with torch.inference_mode(), _autocast(use_bf16):
                    item = next(chunks, None)
                    if item is None:
                        break
                    if item.logits is not None:
                        part = labels_from_logits(item.logits, (ny, nx)).numpy()
                        # NaN voxels were never measured (a coronal series' gap planes,
                        # a masked region): left unlabelled, as missing slices are
                        unmeasured = np.isnan(volume.array[item.start : item.stop])
                        if unmeasured.any():
                            part[unmeasured] = 0
                            unmeasured_voxels[item.start : item.stop] = unmeasured.sum(axis=(1, 2))
                        labels[item.start : item.stop] = part
                governor.update()
                done = "encoding (backward pass)" if item.logits is None else "labelling"
                yield Progress(item.step, item.total,
                               f"{done}: slices {item.start}–{item.stop - 1}")
    labels[~labelled] = 0
    counts = np.stack(
        [np.bincount(s.ravel(), minlength=len(classes))[: len(classes)] for s in labels]
    ).astype(np.int64)
    counts[~labelled] = 0
    unmeasured_voxels[~labelled] = 0
    return SegmentationResult(
        labels=labels,
        class_names=tuple(classes),
        spacing=volume.spacing,
        origin=volume.origin,
        labelled=labelled,
        voxels_per_class=counts,
        model_name=_model_name(card),
        precision="bf16" if use_bf16 else "fp32",
        model_grid_yx=slices.grid,
        unmeasured_voxels=unmeasured_voxels,
    )


# ======================================================================================
# Classification
# ======================================================================================
#: the in-plane field of view (mm) a CT slice classifier is shown at most wider than the
#: body: the body's extent (HU above BODY_HU, over all slices) plus a margin, centred and
#: widened to at least this, the widest field of its evaluation phantoms (170–260 mm;
#: training 185–245), so a field it was evaluated on is shown whole. Its global pooling
#: averages over the whole slice, and the air of a wide field (a 384 mm abdominal FOV)
#: diluted what the body shows (benchmarks/results/classifier_field_of_view*.json; 215 mm
#: cut into evaluation fields and lost 0.01 there)
CLASSIFIER_VIEW_MM = 260.0
#: above this (HU) a voxel is body (or table), not air
BODY_HU = -500.0
#: mm kept around the body's extent
BODY_MARGIN_MM = 10.0


def body_window(volume: Volume, card: Mapping[str, Any],
                view_mm: float = CLASSIFIER_VIEW_MM) -> tuple[slice, slice] | None:
    """The (y, x) window of ``volume`` a slice classifier is shown (see
    :data:`CLASSIFIER_VIEW_MM`); None when the whole slice is: a card not for CT in HU, no
    voxel above :data:`BODY_HU`, a field no wider than the view, or a window that would
    leave an acquired slice without a measured voxel."""
    norm = card.get("normalisation")
    if not (isinstance(norm, Mapping) and norm.get("type") == "window") or volume.missing.all():
        return None
    array = volume.array
    projection = np.full(array.shape[1:], -np.inf, dtype=np.float32)
    for z in np.flatnonzero(~volume.missing):  # one slice at a time: no volume-sized mask
        np.fmax(projection, array[z], out=projection)
    body = projection > BODY_HU
    if not body.any():
        return None
    window = []
    for axis, spacing in ((0, volume.spacing[1]), (1, volume.spacing[2])):
        hits = np.flatnonzero(body.any(axis=1 - axis))
        n = array.shape[1 + axis]
        centre = (hits[0] + hits[-1]) / 2.0
        half = max((hits[-1] - hits[0] + 1) / 2.0 + BODY_MARGIN_MM / spacing,
                   view_mm / 2.0 / spacing)
        # a side it would cut by less than a tenth is kept whole (a 262 mm field, cut to
        # 261, changed three held-out slices' classes for nothing)
        size = min(n, int(np.ceil(2.0 * half)) + 1)
        if size > 0.9 * n:
            size = n
        # its full size inside the image where it can be (a body near an edge)
        low = min(max(0, int(round(centre - size / 2.0))), n - size)
        window.append(slice(low, low + size))
    if all(w.start == 0 and w.stop == n for w, n in zip(window, array.shape[1:])):
        return None
    inside = array[:, window[0], window[1]]
    if any(not np.isfinite(inside[z]).any() for z in np.flatnonzero(~volume.missing)):
        return None
    return window[0], window[1]


def body_view(volume: Volume, card: Mapping[str, Any]) -> tuple[Volume, tuple[slice, slice] | None]:
    """``volume`` cut to its :func:`body_window` (the same volume when there is none)."""
    window = body_window(volume, card)
    if window is None:
        return volume, None
    ys, xs = window
    origin = (volume.origin[0], volume.origin[1] + ys.start * volume.spacing[1],
              volume.origin[2] + xs.start * volume.spacing[2])
    return volume.replace(array=np.ascontiguousarray(volume.array[:, ys, xs]),
                          origin=origin), window


def classify_volume(
    volume: Volume,
    model: SliceClassifier,
    card: Mapping[str, Any],
    *,
    batch: int | None = None,
    precision: str = "fp32",
    threads: int | None = None,
) -> Job[ClassificationResult]:
    """Class probabilities for every acquired slice (a generator; see module docs).

    A model with ``in_channels`` = 2k + 1 > 1 gets k neighbours on each side as channels.
    Missing slices are skipped: probabilities NaN, predicted class −1.
    """
    classes = check_model_args(volume, model, card, SliceClassifier, "classification")
    if len(classes) != model.n_classes:
        raise MedsegInputError(
            f"card lists {len(classes)} classes, the model has {model.n_classes}")
    batch = DEFAULT_BATCH if batch is None else positive_int(batch, "batch")
    precision = _check_precision(precision)
    context = slice_context(model)
    # the body's window of each slice, not a wide field's air (see CLASSIFIER_VIEW_MM)
    slices = ModelGridSlices(body_view(volume, card)[0], card, context)
    nz = volume.shape[0]
    probs = np.full((nz, len(classes)), np.nan, dtype=np.float32)
    todo = np.flatnonzero(~volume.missing)
    use_bf16 = False
    if len(todo):
        with ThreadGovernor(threads) as governor:
            entry = _prepared(model)
            batches, use_bf16 = _slice_batches(entry, precision, slices, todo, batch)
            yield Progress(0, len(batches), "classifying")
            for step, (a, b) in enumerate(batches, start=1):
                with torch.inference_mode(), _autocast(use_bf16):
                    logits = entry.model_for(use_bf16)(slices[a:b]).float()
                    probs[a:b] = torch.softmax(logits, dim=1).numpy()
                governor.update()
                yield Progress(step, len(batches), f"classifying: slices {a}–{b - 1}")
    predicted = np.full(nz, -1, dtype=np.int64)
    predicted[todo] = probs[todo].argmax(axis=1)
    return ClassificationResult(
        probabilities=probs,
        predicted=predicted,
        class_names=tuple(classes),
        missing=volume.missing.copy(),
        model_name=_model_name(card),
        precision="bf16" if use_bf16 else "fp32",
    )


# ======================================================================================
# Detection
# ======================================================================================
def nms_radius_fraction(card: Mapping[str, Any]) -> float:
    """The card's "nms_radius_fraction" (0 when absent), checked."""
    value = card.get("nms_radius_fraction", 0.0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= 4):
        raise MedsegInputError(
            f"the card's nms_radius_fraction must be a number in [0, 4], got {card.get('nms_radius_fraction')!r}")
    return value


#: a detector card without a tuned "peak_threshold" shows detections from this score
DEFAULT_PEAK_THRESHOLD = 0.3


def card_peak_threshold(card: dict) -> float:
    """The score from which a detector card's detections are shown (its validation-tuned
    ``peak_threshold``; :data:`DEFAULT_PEAK_THRESHOLD` for a card without one)."""
    return float(card.get("peak_threshold", DEFAULT_PEAK_THRESHOLD))


def _nan_on_grid(planes: np.ndarray, grid: tuple[int, int]) -> np.ndarray | None:
    """Model-grid voxels (k, h, w) whose nearest input voxel in ``planes`` (k, ny, nx) is
    NaN, or None when the planes hold no NaN (the common case costs one pass)."""
    nan = np.isnan(planes)
    if not nan.any():
        return None
    ny, nx = planes.shape[1:]
    iy = np.clip(np.rint(map_index(np.arange(grid[0]), grid[0], ny)), 0, ny - 1).astype(np.intp)
    ix = np.clip(np.rint(map_index(np.arange(grid[1]), grid[1], nx)), 0, nx - 1).astype(np.intp)
    return nan[:, iy[:, None], ix[None, :]]


def detect_lesions(
    volume: Volume,
    model: LesionDetector,
    card: Mapping[str, Any],
    *,
    threshold: float | None = None,
    min_distance_mm: float | None = None,
    batch: int | None = None,
    precision: str = "fp32",
    threads: int | None = None,
) -> Job[DetectionResult]:
    """Lesion centres in input voxel coordinates (a generator; see module docs).

    The 2.5D detector sees each slice with ``in_slices // 2`` neighbours on each side
    (the card's "context_slices" must agree). Peaks are found on the model grid with the
    card's "peak_threshold" (default 0.3), "min_distance_mm" (default 6, measured in mm
    on that grid) and "nms_radius_fraction" (default 0: suppression also within that
    fraction of a kept peak's predicted radius; see ``extract_peaks``), and mapped back
    exactly to the input grid. Missing slices get a zero heatmap and so no detections; no
    detection is kept whose centre voxel is NaN (never measured).
    """
    check_model_args(volume, model, card, LesionDetector, "detection")
    context = model.in_slices // 2
    if "context_slices" in card and int(card["context_slices"]) != context:
        raise MedsegInputError(
            f"card says context_slices={card['context_slices']}, the model sees {model.in_slices}"
            f" slices (context {context})"
        )
    thr = card_peak_threshold(card) if threshold is None else float(threshold)
    mind = float(card.get("min_distance_mm", 6.0) if min_distance_mm is None else min_distance_mm)
    radius_fraction = nms_radius_fraction(card)
    if not (math.isfinite(thr) and 0 <= thr <= 1) or not (math.isfinite(mind) and mind >= 0):
        raise MedsegInputError(
            f"need 0 ≤ threshold ≤ 1 and min_distance_mm ≥ 0, got {thr}, {mind}")
    batch = DEFAULT_BATCH if batch is None else positive_int(batch, "batch")
    precision = _check_precision(precision)
    slices = ModelGridSlices(volume, card, context)
    nz = volume.shape[0]
    h, w = slices.grid
    heat = np.zeros((nz, h, w), dtype=np.float32)
    size = np.full((nz, h, w), np.nan, dtype=np.float32)
    todo = np.flatnonzero(~volume.missing)
    use_bf16 = False
    detections: list[Detection] = []
    if len(todo):
        with ThreadGovernor(threads) as governor:
            entry = _prepared(model)
            batches, use_bf16 = _slice_batches(entry, precision, slices, todo, batch)
            total = len(batches) + 1
            yield Progress(0, total, "detecting")
            for step, (a, b) in enumerate(batches, start=1):
                with torch.inference_mode(), _autocast(use_bf16):
                    out = entry.model_for(use_bf16)(slices[a:b])
                    heat[a:b] = torch.sigmoid(out.heatmap.float())[:, 0].numpy()
                    size[a:b] = torch.exp(out.log_diameter.float())[:, 0].numpy()
                # No score where nothing was measured: a masked block's heat would show as
                # a lesion-like glow, and its peak could suppress a real one nearby in NMS.
                unmeasured = _nan_on_grid(volume.array[a:b], (h, w))
                if unmeasured is not None:
                    heat[a:b][unmeasured] = 0.0
                governor.update()
                yield Progress(step, total, f"detecting: slices {a}–{b - 1}")
        sz, sy, sx = volume.spacing
        ny, nx = volume.shape[1:]
        grid_spacing = (sz, sy * ny / h, sx * nx / w)
        peak_heat = heat
        if thr <= 0 and volume.missing.any():  # a missing slice's 0 is no score, even at 0
            peak_heat = heat.copy()
            peak_heat[volume.missing] = np.nan
        peaks = extract_peaks(peak_heat, size, grid_spacing, threshold=thr, min_distance_mm=mind,
                              radius_fraction=radius_fraction)
        for p in peaks:
            y, x = map_index([p.y, p.x], (h, w), (ny, nx))
            at = tuple(int(np.clip(round(float(v)), 0, n - 1))
                       for v, n in zip((p.z, y, x), volume.shape))
            if np.isnan(volume.array[at]):  # never measured there (a gap plane, a mask)
                continue
            detections.append(Detection(float(p.z), float(y), float(x), p.score, p.diameter_mm))
        yield Progress(total, total, f"{len(detections)} detections")
    return DetectionResult(
        detections=tuple(detections),
        heatmap=heat,
        input_shape=volume.shape,
        spacing=volume.spacing,
        origin=volume.origin,
        threshold=thr,
        min_distance_mm=mind,
        model_name=_model_name(card),
        precision="bf16" if use_bf16 else "fp32",
        diameter_map=size,
        nms_radius_fraction=radius_fraction,
        unmeasured=_unmeasured_voxels(volume),
    )


def _unmeasured_voxels(volume: Volume, slab: int = 16
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """The slices holding NaN voxels and their NaN masks, or None when there are none;
    read ``slab`` slices at a time (a whole-volume mask, one byte per input voxel, raised a
    400-slice detection's peak memory by 100 MB)."""
    nz = volume.shape[0]
    zs = [a + i for a in range(0, nz, slab)
          for i in np.flatnonzero(np.isnan(volume.array[a : a + slab]).any(axis=(1, 2)))]
    if not zs:
        return None
    zs = np.asarray(zs, dtype=np.int64)
    return zs, np.isnan(volume.array[zs])

"""Helpers shared by the readers: modality guess and patient-frame geometry.

Geometry convention (all readers): world coordinates are DICOM patient coordinates, LPS
(x towards the patient's Left, y Posterior, z Superior), in mm. A volume's axes (z, y, x)
run along three unit vectors, turned (swapped, flipped; :func:`turned_to_spl`) to lie
nearest to +S, +P, +L whatever plane the scan was acquired in (a coronal series' slices
lie along y); its ``origin`` is the position of voxel (0, 0, 0) measured along those same
vectors. For a scan that is not oblique the origin is simply the LPS coordinate (z, y, x)
of the first voxel.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import math
import os
import re
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedsegInputError
# the guess lives with Volume: the widgets need it without importing the readers (pydicom)
from ..volume import guess_modality  # noqa: F401


def axis_code(vector: np.ndarray) -> str:
    """The LPS letter of the patient axis closest to ``vector`` (in LPS), e.g. "L" or "R"."""
    v = np.asarray(vector, dtype=float)
    i = int(np.argmax(np.abs(v)))
    return ("L", "P", "S")[i] if v[i] >= 0 else ("R", "A", "I")[i]


def obliquity_deg(axes: np.ndarray) -> float:
    """Largest angle (degrees) between a unit row of ``axes`` and its nearest patient axis."""
    cosines = np.max(np.abs(np.asarray(axes, dtype=float)), axis=1).clip(-1.0, 1.0)
    return float(np.degrees(np.arccos(cosines.min())))


def origin_along(position: np.ndarray, axes_zyx: np.ndarray) -> tuple[float, float, float]:
    """Position (LPS, mm) of voxel (0,0,0) measured along the volume's (z, y, x) unit axes:
    the ``o`` with ``axes.T @ o == position``, which the writers invert. For skew axes (a
    NIfTI affine holding a gantry tilt as shear) that is not the projection on each axis:
    the projection put the origin 100s of mm off."""
    p = np.asarray(position, dtype=float)
    axes = np.asarray(axes_zyx, dtype=float)
    if (not np.allclose(axes @ axes.T, np.eye(3), atol=1e-9)
            and abs(np.linalg.det(axes)) > 1e-3):
        z, y, x = (float(c) for c in np.linalg.solve(axes.T, p))
    else:  # orthonormal: the projection is the same (a singular set: the best there is)
        z, y, x = (float(np.dot(p, a)) for a in axes)
    return z, y, x


def turned_to_spl(array: np.ndarray, spacing, origin, axes_zyx
                  ) -> tuple[np.ndarray, tuple, tuple, np.ndarray]:
    """The volume turned so that its axes (z, y, x) run nearest to +S, +P, +L, as the NIfTI
    reader turns every file: one layout for every reader, so labels saved on a coronal
    DICOM series and opened again lie where they were drawn, and the models see axial
    slices. Axes only swap and flip (no resampling); an oblique rest stays in the axes.

    Returns (array, spacing, origin, axes). Axes with no clear nearest patient axis (45°)
    are left as they are."""
    axes = np.asarray(axes_zyx, dtype=float)
    nearest = np.argmax(np.abs(axes), axis=1)  # LPS component (0 L, 1 P, 2 S) per axis
    if sorted(nearest.tolist()) != [0, 1, 2]:
        return array, tuple(spacing), tuple(origin), axes
    order = np.argsort(2 - nearest)  # new axis t is old axis order[t]: S, P, L
    signs = np.sign(axes[np.arange(3), nearest])
    if order.tolist() == [0, 1, 2] and (signs > 0).all():
        return array, tuple(spacing), tuple(origin), axes
    first = axes.T @ np.asarray(origin, dtype=float)  # LPS of voxel (0, 0, 0)
    for a in np.flatnonzero(signs < 0):  # a flipped axis starts at its other end
        first = first + (array.shape[a] - 1) * float(spacing[a]) * axes[a]
    turned = np.transpose(array, order)
    flips = tuple(t for t in range(3) if signs[order[t]] < 0)
    if flips:
        turned = np.flip(turned, axis=flips)
    new_axes = axes[order] * signs[order][:, None]
    return (np.ascontiguousarray(turned), tuple(float(spacing[a]) for a in order),
            origin_along(first, new_axes), new_axes)


def triplet(values, name: str, *, positive: bool) -> tuple[float, float, float]:
    """Three finite floats (z, y, x), optionally all > 0; MedsegInputError otherwise."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"{name} must be three numbers (z, y, x), got {values!r}") from exc
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise MedsegInputError(f"{name} must be three finite numbers (z, y, x), got {out}")
    if positive and min(out) <= 0:
        raise MedsegInputError(f"{name} must be positive, got {out}")
    return out  # type: ignore[return-value]


def walk_folder(folder: Path):
    """``os.walk(folder)``, into linked subfolders too (a study folder of linked series is
    common in research setups; neither ``rglob`` nor ``os.walk`` follows them), each real
    folder once: a link back up the tree is not a loop."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        yield root, dirs, names


def short_reason(exc: BaseException, limit: int = 120, path: Path | str | None = None) -> str:
    """An exception message on one line (its lines joined by "; "), truncated: error
    messages must stay one line, and a decoder's reason is often on a later line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "; ".join(lines) if lines else type(exc).__name__
    # a library's message often quotes the full path: keep only the file name
    if path is not None:
        for folder in {str(Path(path).parent), str(Path(path).expanduser().resolve().parent)}:
            if folder not in ("", "."):
                text = text.replace(folder + os.sep, "")
    text = _QUOTED_PATH.sub(r"\1\2\1", text)  # a quoted path may hold spaces
    text = _FOLDERS_IN_PATH.sub(r"\1", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# where a path starts: a drive or ~ and a separator, "/", or a doubled backslash (a repr's
# "\\server" or "\\a"); a lone backslash starts an escape in a repr, as in a bytes
# value's b'\x01\x02', which was taken for a path and cut to "x02"
_PATH_START = r"(?:(?:[A-Za-z]:|~)(?:\\\\|[\\/])|/|\\\\)"

# 'C:\\a b\\name' or "/a b/name" in quotes (an OSError's repr doubles backslashes)
_QUOTED_PATH = re.compile(rf"""(['"]){_PATH_START}[^'"]*(?:\\\\|[\\/])([^'"\\/]+)\1""")

# "/a/b/name", "C:\\a\\name", "~/a/name": one or more folders, then a name
_FOLDERS_IN_PATH = re.compile(
    rf"(?<![^\s\"'(=]){_PATH_START}(?:[^\s\"'\\/]+[\\/])*([^\s\"'\\/]+)")


def source_name(path: Path) -> str:
    """Just the file or folder name: a full path can reveal a patient's study folder."""
    return Path(path).name


_UMASK_LOCK = threading.Lock()


def regular_file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (0o666 less the umask):
    ``tempfile.mkstemp``, used for atomic writes, makes 0o600 files instead."""
    return 0o666 & ~_umask()


def mode_for(path: Any) -> int:
    """The permissions an atomic write onto ``path`` should give its file: those of the
    file it replaces (a private 0o600 file must not come back world-readable), else what
    a plain ``open(path, "w")`` would give."""
    try:
        st = os.stat(path)
    except OSError:
        return regular_file_mode()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else regular_file_mode()


def link_target(path: Path) -> Path:
    """The file a write to ``path`` must replace: a symbolic link's target (renaming a
    temporary file over the link replaced the link and left its target old)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def temp_prefix(target: Path) -> str:
    """The start of the name of a hidden file a write to ``target`` makes beside it (its
    temporary file, or the previous content a multi-file write keeps): the target's name,
    cut as a long one must be (255 bytes), this machine's token and this process's id, so
    that a later write on this machine can tell what a killed one left
    (:func:`drop_dead_writers_files`)."""
    return f".{target.name[:40]}.{machine_token()}.{os.getpid()}-"


@functools.lru_cache(maxsize=1)
def machine_token() -> str:
    """Six hex digits naming this host, boot and process-id namespace: a process id says
    whether a writer still runs only where it was taken. A folder shared by containers
    or cluster nodes (NFS) holds other machines' temp files, whose ids mean nothing here:
    one was deleted under a live writer, which then failed."""
    parts = [socket.gethostname()]
    for path in ("/proc/self/ns/pid", "/proc/sys/kernel/random/boot_id"):
        try:
            parts.append(str(os.stat(path).st_ino) if path.endswith("pid")
                         else Path(path).read_text().strip())
        except OSError:
            pass
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:6]


_LEFTOVER_TAIL = re.compile(r"([0-9a-f]{6})\.(\d+)-[^/]*\.(tmp(\.nii|\.nii\.gz)?|previous)")


def drop_dead_writers_files(target: Path) -> list[str]:
    """Delete the hidden files beside ``target`` that writes to it by processes no longer
    running left (:func:`temp_prefix`: a temporary file, a kept previous content): a run
    killed with SIGKILL, by the kernel's out-of-memory killer for one, cleans up nothing,
    and each left a hidden copy as large as the output. A file of a running process (this
    one, or another run writing the same output) is left alone. Returns the names
    deleted; a failure to delete is not an error (the write itself is what matters).
    Only this machine's (:func:`machine_token`): another's may be a live writer's."""
    head, token = f".{target.name[:40]}.", machine_token()
    gone: list[str] = []
    try:
        entries = [e.name for e in os.scandir(target.parent) if e.name.startswith(head)]
    except OSError:
        return gone
    for name in entries:
        found = _LEFTOVER_TAIL.fullmatch(name[len(head):])
        if found is None or found.group(1) != token or _running(int(found.group(2))):
            continue  # another machine's (its process ids are not ours), or still running
        try:
            (target.parent / name).unlink()
            gone.append(name)
        except OSError:
            pass
    return gone


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # another user's (PermissionError), or not a pid: not ours to judge
    return True


def refuse_read_only(path: Any) -> None:
    """An atomic write renames a new file over ``path``, which the file's own permissions
    do not stop: a write-protected file (no write bit, or not writable by this user) is
    refused as a plain ``open(path, "w")`` would refuse it."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and (not st.st_mode & 0o222 or not os.access(path, os.W_OK)):
        raise PermissionError(errno.EACCES, "the file is read-only", str(path))


def refuse_write_protected(path: Any, consequence: str) -> None:
    """``refuse_read_only`` for a command about to compute what it then writes to ``path``:
    said up front, as an input error ending with ``consequence``."""
    try:
        refuse_read_only(path)
    except PermissionError as exc:
        raise MedsegInputError(f"{exc.strerror}; {consequence}", Path(path)) from None


def _umask() -> int:
    """The process's umask, read without changing it where the system allows: setting it
    to 0 and back (the only portable way) would, for that instant, make files another
    thread creates world-writable (autosaves write from a background thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # the brief window errs on the private side
        os.umask(mask)
    return mask


#: an integer file without NIfTI's label intent (or a .npy) of background 0 and at most
#: this many values in 1..255 is a label map: nnU-Net, TotalSegmentator and ITK-SNAP write
#: no intent. A scan holds far more values (HU; an 8-bit image's ~256 grey levels).
FEW_UNMARKED_LABELS = 32
#: more values (TotalSegmentator: 117 classes; FreeSurfer's aparc+aseg: values to 2035)
#: make a label map only in regions: most labelled voxels share their row neighbour's
#: value (a noisy 8-bit image's tissue voxels seldom do), and where two labels meet their
#: values mostly differ by more than a grey level's step or two (a smooth image, such as
#: an upsampled MR quantised to 7 bits, changes by ±1 or ±2: its regions share 0.5–0.74,
#: but 0.79–0.95 of its changes are such small steps; a phantom label map: 0.97, 0.39)
MAX_UNMARKED_LABELS = 128
MAX_UNMARKED_LABEL_VALUE = 65535
MIN_REGION_SHARE = 0.5
MAX_SMALL_STEP_SHARE = 0.5
#: a few values make a label map only if they form regions at all: a low-count SPECT or
#: PET frame (28 values, 0.11 of its voxels beside an equal one) or a noisy 5-bit image
#: (0.05) opened as labels; a label map's structures, a vessel two voxels wide included,
#: are well above this
MIN_FEW_LABELS_REGION_SHARE = 0.2


def looks_like_label_map(array: np.ndarray) -> bool:
    """An integer image of background 0 and a few non-negative values (a segmentation
    from another tool), which would show as a saturated grey image."""
    return label_map_values(array) is not None


def label_map_values(array: np.ndarray) -> np.ndarray | None:
    """The values besides 0 of an array that :func:`looks_like_label_map`, else None:
    counted once (the readers sorted every labelled voxel again to name them, 0.7 s of
    a 1.1 s check on 300 × 512²)."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        return None
    top = int(array.max())
    if int(array.min()) < 0 or top > MAX_UNMARKED_LABEL_VALUE:
        return None
    # slab by slab: np.bincount copies its input to 8-byte integers
    flat = np.asarray(array).reshape(-1)
    step = 1 << 20
    counts = np.zeros(top + 1, dtype=np.int64)
    for start in range(0, flat.size, step):
        counts += np.bincount(flat[start:start + step], minlength=counts.size)
        if np.count_nonzero(counts[1:]) > MAX_UNMARKED_LABELS:
            return None
    values = np.flatnonzero(counts[1:]) + 1
    if not counts[0] or values.size == 0:
        return None
    same, small = _neighbours(np.asarray(array))
    if values.size <= FEW_UNMARKED_LABELS and top <= 255:
        return values if same >= MIN_FEW_LABELS_REGION_SHARE else None
    return values if same >= MIN_REGION_SHARE and small < MAX_SMALL_STEP_SHARE else None


def _neighbours(array: np.ndarray, most_slices: int = 16) -> tuple[float, float]:
    """(share of non-zero voxels whose next voxel along the row holds the same value,
    share of the changes between two non-zero voxels that are steps of 1 or 2), on up to
    ``most_slices`` slices spread through the volume."""
    planes = array.reshape(-1, *array.shape[-2:]) if array.ndim >= 2 else array[None, None]
    picked = planes[np.unique(np.linspace(0, len(planes) - 1, most_slices).astype(int))]
    left, right = picked[..., :-1].astype(np.int64), picked[..., 1:].astype(np.int64)
    labelled = left != 0
    same = float((left == right)[labelled].mean()) if labelled.any() else 0.0
    change = labelled & (right != 0) & (left != right)
    small = float((np.abs(left - right)[change] <= 2).mean()) if change.any() else 0.0
    return same, small


def whole_number_labels(array: np.ndarray) -> np.ndarray:
    """A float array marked as a label map, as integers when every value is a finite whole
    number int32 holds (the smallest type that holds them: a layer's every copy, such as
    an autosave's, costs its bytes); else unchanged (it then opens as an image)."""
    if not np.isfinite(array).all():
        return array
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < -2**31 or high >= 2**31 or not np.array_equal(array, np.round(array)):
        return array
    kind = (np.uint8 if low >= 0 and high <= 255 else
            np.uint16 if low >= 0 and high <= 65535 else np.int32)
    return array.astype(kind)

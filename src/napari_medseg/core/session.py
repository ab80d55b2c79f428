"""Autosave of an annotation session: the labels and the annotated slices, crash-safe.

A session folder holds ``annotations-<sha>.npz`` (the whole label volume, or the points
and their diameters) and ``session.json`` (which slices were edited, which marked correct,
which are excluded, the structure names of a label volume, the kind, the image's name,
shape and fingerprint, the time, and which data file is its). Both are written to temporary files and renamed into place, data
first under a new name, then the record that names it, then the old data file goes: a
crash (or a quit that kills the writing thread) at any moment leaves a record whose data
file is complete and present (the previous autosave or the new one); ``session.json``
also holds the data's sha256, so a restore can tell that both halves belong together.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import MedsegInputError
from .models.registry import _atomic_write as _write_atomic  # temp file + fsync + rename
from .models.registry import user_models_dir

FORMAT = "napari-medseg-session/1"
_NAME_BYTES = 80  # of a session folder's name taken from the image's name


def sessions_dir() -> Path:
    """``$NAPARI_MEDSEG_HOME/sessions`` (default ``~/.napari-medseg/sessions``)."""
    return user_models_dir().parent / "sessions"


def session_key(image_name: str, shape: Sequence[int]) -> str:
    """A folder name for an image: its layer name (made file-safe, any script kept), a
    short hash of the whole name (so names that differ only in what was replaced or cut
    do not share a folder) and its shape."""
    name = str(image_name)
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._")
    # cut by UTF-8 bytes, not characters: file names hold 255 bytes, and 80 CJK characters
    # took 240 of them (with the hash and shape: 261, and every autosave failed)
    safe = (safe.encode("utf-8", "surrogatepass")[:_NAME_BYTES]
            .decode("utf-8", "ignore").strip("._") or "image")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe}-{digest}-{'x'.join(str(int(s)) for s in shape)}"


def image_fingerprint(data: Any) -> str:
    """A short hash of a regular sample of an image's voxels (≤ 16 slices, every 8th
    row and column): two scans of the same shape and name (two patients' "ct") differ
    here, so one's autosave is never offered for the other. Cheap enough for every save."""
    arr = data
    nz = arr.shape[0] if arr.ndim >= 3 else 1
    step_z = max(1, nz // 16)
    sample = arr[::step_z, ::8, ::8] if arr.ndim >= 3 else arr[::8, ::8]
    sample = np.ascontiguousarray(np.asarray(sample), dtype=np.float32)
    h = hashlib.sha256(str(tuple(arr.shape)).encode())
    h.update(sample.tobytes())
    return h.hexdigest()[:16]


class SliceStack:
    """A label volume held as its slices (2D arrays nobody writes to again): an autosave
    copies only the slices that changed since the last one and shares the others, and is
    written slice by slice. A whole-volume copy on napari's thread took 0.1-1.3 s of a
    300 x 512 x 512 int32 layer every 1.5 s while the user painted."""

    def __init__(self, slices: Sequence[np.ndarray]) -> None:
        self.slices = tuple(slices)
        if not self.slices:
            raise MedsegInputError("nothing to save: a label volume without slices")
        first = self.slices[0]
        if any(sl.shape != first.shape or sl.dtype != first.dtype for sl in self.slices):
            raise ValueError("the slices of a SliceStack must share shape and dtype")
        self.shape = (len(self.slices), *first.shape)
        self.dtype = first.dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        stacked = np.stack(self.slices)
        return stacked if dtype is None else stacked.astype(dtype, copy=False)

    @classmethod
    def updated(cls, data: np.ndarray, previous: SliceStack | None) -> SliceStack:
        """``data`` (z, ...) as a stack, taking from ``previous`` every slice still equal
        to it (no copy); comparing costs a fraction of copying (no new memory)."""
        if (previous is None or previous.shape != tuple(data.shape)
                or previous.dtype != data.dtype):
            # one block: 0.09 s for 300 x 512 x 512 int32, slice by slice 0.15 s
            return cls(list(np.array(data, copy=True)))
        slices = [old if np.array_equal(data[z], old) else np.array(data[z])
                  for z, old in enumerate(previous.slices)]
        # a slice kept from that block keeps the whole block alive: once most of it is
        # replaced (a re-predict rewrites every unannotated slice), copy the rest out
        in_block = [z for z, sl in enumerate(slices) if sl.base is not None]
        if 0 < len(in_block) < len(slices) / 2:
            for z in in_block:
                slices[z] = np.array(slices[z])
        return cls(slices)


@dataclass
class AnnotationSession:
    """One widget's work on one image: a label volume (segmenter) or points with their
    diameters (detector), and the slice lists."""

    image_name: str
    shape: tuple[int, ...]
    labels: np.ndarray | SliceStack | None = None
    edited: list[int] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)
    saved_at: str = ""
    points: np.ndarray | None = None
    diameters: np.ndarray | None = None
    image_fingerprint: str = ""
    saved_epoch: float = 0.0
    shown: np.ndarray | None = None  # points: False for a detection hidden below the threshold
    # points: a detection's score, NaN for a point the user placed (absent: no scores);
    # without it a restored detection layer lost its labels and its weak points
    scores: np.ndarray | None = None
    # labels: value → structure name as the layer showed them (a structure the user named
    # that the model does not know would otherwise come back unnamed)
    label_names: dict[int, str] | None = None

    @property
    def annotated(self) -> list[int]:
        return sorted(set(self.edited) | set(self.checked))

    @property
    def kind(self) -> str:
        return "labels" if self.labels is not None else "points"

    def arrays(self) -> dict[str, np.ndarray | SliceStack]:
        names = (("labels",) if self.labels is not None
                 else ("points", "diameters", "shown", "scores"))
        out = {n: (v if isinstance(v, SliceStack) else np.ascontiguousarray(v))
               for n in names if (v := getattr(self, n)) is not None}
        if not out:
            raise MedsegInputError("nothing to save: no labels and no points")
        return out


def save_session(folder: str | Path, session: AnnotationSession) -> Path:
    """Write ``session`` into ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # compressed: a label volume is mostly runs of a few values (a 200 × 512 × 512 int32
    # layer with one stroke: 200 MiB plain, 0.2 MiB compressed), and every image gets
    # its own session folder
    _savez_compressed(buf, session.arrays())
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    data_name = f"annotations-{sha[:16]}.npz"
    _write_atomic(folder / data_name, data)
    meta = {
        "format": FORMAT,
        "kind": session.kind,
        "image_name": session.image_name,
        "shape": [int(s) for s in session.shape],
        "edited": sorted(int(z) for z in session.edited),
        "checked": sorted(int(z) for z in session.checked),
        "excluded": sorted(int(z) for z in session.excluded),
        "image_fingerprint": session.image_fingerprint,
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "saved_epoch": time.time(),
        "annotations_file": data_name,
        "annotations_sha256": sha,
        **({"label_names": {str(int(k)): str(v) for k, v in sorted(session.label_names.items())}}
           if session.label_names else {}),
    }
    _write_atomic(folder / "session.json", (json.dumps(meta, indent=1) + "\n").encode())
    for stale in folder.glob("annotations*.npz"):  # the record names the new file now
        if stale.name != data_name:
            stale.unlink(missing_ok=True)
    for left in folder.glob(".*.tmp"):  # a killed save's temp file (one writer per folder)
        left.unlink(missing_ok=True)
    return folder


def _savez_compressed(buf: io.BytesIO, arrays: dict[str, np.ndarray | SliceStack]) -> None:
    """``np.savez_compressed``, with a SliceStack written slice by slice as the .npy it
    stacks to: stacked first, its copy held the GIL (and napari's thread) as long as the
    copy on napari's thread it replaces."""
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                if isinstance(array, SliceStack):
                    np.lib.format.write_array_header_1_0(member, {
                        "descr": np.lib.format.dtype_to_descr(array.dtype),
                        "fortran_order": False, "shape": array.shape})
                    for sl in array.slices:
                        member.write(np.ascontiguousarray(sl).tobytes())
                else:
                    np.lib.format.write_array(member, array, allow_pickle=False)


def saved_epoch(folder: Path, meta: dict) -> float:
    """When an autosave was last written (its record's time, else the file's mtime)."""
    try:
        return float(meta["saved_epoch"])
    except (KeyError, TypeError, ValueError, OverflowError):
        try:
            return (Path(folder) / "session.json").stat().st_mtime
        except OSError:
            return 0.0


def read_meta(folder: str | Path) -> dict:
    """session.json of an autosave (no arrays read); MedsegInputError if unusable."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "session.json").read_text("utf-8"))
    except FileNotFoundError as exc:
        raise MedsegInputError("no autosave here", folder) from exc
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise MedsegInputError(f"autosave unreadable ({exc})", folder) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MedsegInputError("not a napari-medseg autosave", folder)
    for key in ("edited", "checked", "excluded"):  # what an offer counts, before loading
        value = meta.get(key, [])
        try:
            if not isinstance(value, list):
                raise ValueError(f"{key} is not a list of slices")
            for z in value:
                _slice_index(z)
        except ValueError as exc:
            raise MedsegInputError(f"autosave record is damaged ({exc})", folder) from exc
    return meta


def load_session(folder: str | Path) -> AnnotationSession:
    """Read an autosave; MedsegInputError if it is missing, damaged or inconsistent."""
    folder = Path(folder)
    meta = read_meta(folder)
    if "annotations_file" not in meta and "labels_sha256" in meta:
        # the first format (before 2026-11-26): the labels alone, in labels.npy; it was
        # offered, then "cannot restore: … annotations.npz" hid intact labels
        meta = {**meta, "annotations_file": "labels.npy", "annotations_sha256": meta["labels_sha256"]}
    data_name = str(meta.get("annotations_file", "annotations.npz"))
    if Path(data_name).name != data_name:  # a record names a file in its own folder only
        raise MedsegInputError("autosave record names a file elsewhere", folder)
    try:
        data = (folder / data_name).read_bytes()
    except OSError as exc:
        raise MedsegInputError(f"autosave unreadable ({exc})", folder) from exc
    if hashlib.sha256(data).hexdigest() != meta.get("annotations_sha256"):
        raise MedsegInputError("autosave data do not match their record (interrupted save?)", folder)
    # a record with the right checksum may still be damaged or hand-edited: every way it
    # can be wrong is an input error (the widget then says "cannot restore"), not a crash
    try:
        if data_name == "labels.npy":
            arrays = {"labels": np.load(io.BytesIO(data), allow_pickle=False)}
        else:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        shape = tuple(int(s) for s in meta["shape"])
        lists = {key: [_slice_index(z) for z in meta.get(key, [])]
                 for key in ("edited", "checked", "excluded")}
        label_names = {int(k): str(v) for k, v in meta.get("label_names", {}).items()}
    # (a data file with a matching checksum may still not be a zip, or hold a damaged
    # stream: BadZipFile, zlib.error, EOFError; an "Infinity" in the shape: OverflowError)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, EOFError,
            OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise MedsegInputError(f"autosave record is damaged ({type(exc).__name__}: {exc})",
                               folder) from exc
    if any(not isinstance(a, np.ndarray) for a in arrays.values()):  # a non-.npy member
        raise MedsegInputError("autosave data hold something other than arrays", folder)
    if "labels" not in arrays and "points" not in arrays:
        raise MedsegInputError("autosave data hold neither labels nor points", folder)
    labels = arrays.get("labels")
    if labels is not None and not (labels.dtype.kind in "iu" or labels.dtype == np.bool_):
        raise MedsegInputError(f"autosave labels are not whole numbers ({labels.dtype})", folder)
    if labels is not None and labels.shape != shape:
        raise MedsegInputError(f"autosave labels have shape {labels.shape}, expected {shape}", folder)
    if shape and any(not 0 <= z < shape[0] for zs in lists.values() for z in zs):
        raise MedsegInputError(f"autosave lists slices outside the volume's {shape[0]}", folder)
    points, diameters = arrays.get("points"), arrays.get("diameters")
    if points is not None and (points.ndim != 2 or points.shape[1] != 3 or diameters is None
                               or diameters.shape != (len(points),)):
        raise MedsegInputError("autosave points and diameters do not fit together", folder)
    shown = arrays.get("shown")  # absent from autosaves before 2026-12-03: all shown
    if shown is not None and (points is None or shown.shape != (len(points),)
                              or shown.dtype != np.bool_):
        raise MedsegInputError("autosave points and their shown flags do not fit together", folder)
    scores = arrays.get("scores")  # absent from autosaves before 2026-12-05
    if scores is not None and (points is None or scores.shape != (len(points),)
                               or scores.dtype.kind != "f"):
        raise MedsegInputError("autosave points and their scores do not fit together", folder)
    return AnnotationSession(
        image_name=str(meta.get("image_name", "")), shape=shape, labels=labels,
        edited=lists["edited"], checked=lists["checked"], excluded=lists["excluded"],
        saved_at=str(meta.get("saved_at", "")),
        points=points, diameters=diameters, shown=shown, scores=scores,
        image_fingerprint=str(meta.get("image_fingerprint", "")),
        saved_epoch=saved_epoch(folder, meta),
        label_names=label_names or None,
    )


def _slice_index(z: Any) -> int:
    """A slice number from the record: an integer, not a bool, text or fraction."""
    if isinstance(z, bool) or not isinstance(z, int):
        raise ValueError(f"slice {z!r} is not a whole number")
    return z


#: the file a widget holds an advisory lock on while its autosave folder is live
LOCK_NAME = ".in-use.lock"


class SessionLock:
    """An advisory lock (``flock``) that a widget holds on the autosave folder it writes,
    while it is open: another window, in this process or another, neither offers that
    autosave for restore nor discards it (Discard in a second viewer deleted the first's
    live autosave). The system drops the lock when the process ends, so after a crash
    the autosave is offered again. Where ``fcntl`` is missing (Windows) it does nothing."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fh: Any = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> bool:
        """Take the lock if it is free (again on a later call if not); True if held."""
        if self._fh is not None:
            return True
        try:
            import fcntl
        except ImportError:
            return False
        try:
            fh = open(self.folder / LOCK_NAME, "a+b")
        except OSError:
            return False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another window, or no locks on this filesystem
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing the file drops its flock


def session_in_use(folder: str | Path) -> bool:
    """Whether an open widget (of any process on this machine) holds ``folder``'s lock."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fh = open(Path(folder) / LOCK_NAME, "rb")
    except OSError:  # no lock file: never held
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            # no locks on this filesystem (NFS without its lock service, Lustre without
            # -o flock: ENOLCK, ENOSYS): nothing can hold one, and taking that for "in
            # use" hid every autosave after a crash, without a word
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def discard_session(folder: str | Path) -> None:
    """Delete an autosave: its record, its data and any temp file a killed save left.
    An autosave an open widget is writing (:func:`session_in_use`) is refused."""
    folder = Path(folder)
    if session_in_use(folder):
        raise MedsegInputError("this autosave belongs to a window that is still open", folder)
    for path in [folder / "session.json", *folder.glob("annotations*.npz"), *folder.glob(".*.tmp"),
                 folder / "labels.npy", folder / LOCK_NAME]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass

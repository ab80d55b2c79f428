"""Autosave of an annotation session: the labels and the annotated slices, crash-safe.

A session folder holds ``annotations.npz`` (the whole label volume, or the points and
their diameters) and ``session.json`` (which slices were edited, which marked correct,
which are excluded, the kind, the image's name and shape, the time). Both are written to
temporary files and renamed into place, data first, so a crash at any moment leaves the
previous complete autosave (a half-written file is never visible under its final name);
``session.json`` names the data file's sha256 so a restore can tell that both halves
belong together.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import MedsegInputError
from .models.registry import _atomic_write as _write_atomic  # temp file + fsync + rename
from .models.registry import user_models_dir

FORMAT = "napari-medseg-session/1"


def sessions_dir() -> Path:
    """``$NAPARI_MEDSEG_HOME/sessions`` (default ``~/.napari-medseg/sessions``)."""
    return user_models_dir().parent / "sessions"


def session_key(image_name: str, shape: Sequence[int]) -> str:
    """A folder name for an image: its layer name (made file-safe) and its shape."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(image_name)).strip("._")[:80] or "image"
    return f"{safe}-{'x'.join(str(int(s)) for s in shape)}"


@dataclass
class AnnotationSession:
    """One widget's work on one image: a label volume (segmenter) or points with their
    diameters (detector), and the slice lists."""

    image_name: str
    shape: tuple[int, ...]
    labels: np.ndarray | None = None
    edited: list[int] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)
    saved_at: str = ""
    points: np.ndarray | None = None
    diameters: np.ndarray | None = None

    @property
    def annotated(self) -> list[int]:
        return sorted(set(self.edited) | set(self.checked))

    @property
    def kind(self) -> str:
        return "labels" if self.labels is not None else "points"

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("labels",) if self.labels is not None else ("points", "diameters")
        out = {n: np.ascontiguousarray(getattr(self, n)) for n in names if getattr(self, n) is not None}
        if not out:
            raise MedsegInputError("nothing to save: no labels and no points")
        return out


def save_session(folder: str | Path, session: AnnotationSession) -> Path:
    """Write ``session`` into ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **session.arrays())
    data = buf.getvalue()
    _write_atomic(folder / "annotations.npz", data)
    meta = {
        "format": FORMAT,
        "kind": session.kind,
        "image_name": session.image_name,
        "shape": [int(s) for s in session.shape],
        "edited": sorted(int(z) for z in session.edited),
        "checked": sorted(int(z) for z in session.checked),
        "excluded": sorted(int(z) for z in session.excluded),
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "annotations_sha256": hashlib.sha256(data).hexdigest(),
    }
    _write_atomic(folder / "session.json", (json.dumps(meta, indent=1) + "\n").encode())
    return folder


def read_meta(folder: str | Path) -> dict:
    """session.json of an autosave (no arrays read); MedsegInputError if unusable."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "session.json").read_text("utf-8"))
    except FileNotFoundError as exc:
        raise MedsegInputError("no autosave here", folder) from exc
    except (OSError, ValueError) as exc:
        raise MedsegInputError(f"autosave unreadable ({exc})", folder) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MedsegInputError("not a napari-medseg autosave", folder)
    return meta


def load_session(folder: str | Path) -> AnnotationSession:
    """Read an autosave; MedsegInputError if it is missing, damaged or inconsistent."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        data = (folder / "annotations.npz").read_bytes()
    except OSError as exc:
        raise MedsegInputError(f"autosave unreadable ({exc})", folder) from exc
    if hashlib.sha256(data).hexdigest() != meta.get("annotations_sha256"):
        raise MedsegInputError("autosave data do not match their record (interrupted save?)", folder)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    shape = tuple(int(s) for s in meta["shape"])
    labels = arrays.get("labels")
    if labels is not None and labels.shape != shape:
        raise MedsegInputError(f"autosave labels have shape {labels.shape}, expected {shape}", folder)
    return AnnotationSession(
        image_name=str(meta.get("image_name", "")), shape=shape, labels=labels,
        edited=[int(z) for z in meta.get("edited", [])],
        checked=[int(z) for z in meta.get("checked", [])],
        excluded=[int(z) for z in meta.get("excluded", [])],
        saved_at=str(meta.get("saved_at", "")),
        points=arrays.get("points"), diameters=arrays.get("diameters"),
    )


def discard_session(folder: str | Path) -> None:
    folder = Path(folder)
    for name in ("session.json", "annotations.npz"):
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass

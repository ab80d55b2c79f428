"""Model weights are data, not code: ``<name>.safetensors`` + ``<name>.json`` model card.

The card (JSON) says how to rebuild and feed the model::

    {"format": "napari-medseg-model/1", "name": "classifier", "architecture": "SliceClassifier",
     "arch_params": {...constructor kwargs...}, "classes": ["no_body", "normal", "lesion"],
     "input_spacing_mm": [5.0, 1.5, 1.5], "normalisation": {"type": "window", "low": -200,
     "high": 300}, "version": "1.0", "weights_file": "classifier.safetensors",
     "sha256": "...", "n_parameters": 123, ...anything else: training command, seed, metrics}

Loading reads the card, checks the weights file's sha256 against it (a changed, truncated
or missing file is refused with a one-line :class:`MedsegInputError`), parses the bytes
with safetensors (never pickle), rebuilds the architecture from :data:`ARCHITECTURES` and
loads the state dict strictly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import nn

from ..errors import MedsegInputError
from ..io._common import mode_for, refuse_read_only
from .classifier import SliceClassifier
from .detector import LesionDetector
from .generator import SliceGenerator
from .segmenter import RecurrentSegmenter

log = logging.getLogger(__name__)

CARD_FORMAT = "napari-medseg-model/1"
#: weights shipped with the package; every file here is reproduced by
#: ``napari-medseg train MODEL --seed S`` (see weights/README.md)
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"
#: architecture name (the card's "architecture") → class; other modules may add entries
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "SliceClassifier": SliceClassifier,
    "RecurrentSegmenter": RecurrentSegmenter,
    "LesionDetector": LesionDetector,
    "SliceGenerator": SliceGenerator,
}
REQUIRED_CARD_KEYS = ("classes", "input_spacing_mm", "normalisation")
NORMALISATIONS = ("window", "zscore", "percentile")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def user_models_dir(create: bool = False) -> Path:
    """Folder for the user's own (fine-tuned) models: ``$NAPARI_MEDSEG_HOME/models``,
    default ``~/.napari-medseg/models``."""
    home = os.environ.get("NAPARI_MEDSEG_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".napari-medseg"
    path = base / "models"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def default_search_dirs() -> list[Path]:
    """Where :func:`load_model` looks for a bare name: the user folder, then the bundled one."""
    return [user_models_dir(), BUNDLED_DIR]


# -- normalisation --------------------------------------------------------------------
def check_normalisation(spec: Any) -> dict[str, Any]:
    """Validate a card's "normalisation" entry; returns it as a plain dict."""
    if not isinstance(spec, Mapping) or spec.get("type") not in NORMALISATIONS:
        raise MedsegInputError(
            f"normalisation must be a dict with type one of {', '.join(NORMALISATIONS)},"
            f" got {spec!r}"
        )
    spec = dict(spec)
    keys = {"window": ("low", "high"), "zscore": ("mean", "std"),
            "percentile": ("low_percentile", "high_percentile")}[spec["type"]]
    try:
        a, b = (float(spec[k]) for k in keys)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MedsegInputError(
            f"normalisation {spec['type']!r} needs numbers {keys}, got {spec!r}"
        ) from exc
    ok = math.isfinite(a) and math.isfinite(b) and b > (0 if spec["type"] == "zscore" else a)
    if spec["type"] == "percentile":
        ok = ok and 0 <= a < b <= 100
    if not ok:
        raise MedsegInputError(
            f"normalisation {spec!r}: need low < high (window, percentile in 0..100)"
            " or std > 0 (zscore)"
        )
    return spec


def apply_normalisation(array: Any, spec: Mapping[str, Any]) -> np.ndarray:
    """Model input from raw intensities (HU for CT), as the card says; float32.

    ``window``: clip to [low, high], scale to [0, 1]. ``zscore``: (x − mean) / std.
    ``percentile``: the array's own low/high percentiles (finite voxels) map to 0 and 1,
    not clipped (:func:`percentile_range`; for any modality, e.g. the slice generator).
    NaN (missing slices) becomes 0 (the window's low end / the mean / the low percentile).
    """
    spec = check_normalisation(spec)
    x = np.asarray(array, dtype=np.float32)
    if spec["type"] == "percentile":
        low, high = percentile_range(x, spec)
        out = (x - low) / (high - low)
    elif spec["type"] == "window":
        low, high = float(spec["low"]), float(spec["high"])
        out = (np.clip(x, low, high) - low) / (high - low)
    else:
        out = (x - float(spec["mean"])) / float(spec["std"])
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)


#: voxels ``percentile_range`` looks at, at most (a regular subsample)
PERCENTILE_SAMPLES = 2_000_000


def acquired_sample(array: np.ndarray, missing: np.ndarray,
                    max_samples: int | None = None) -> np.ndarray:
    """The voxels ``percentile_range(array[~missing])`` looks at, gathered slice by slice
    without that copy of every acquired slice (a whole volume's worth, at the start of a
    job whose memory otherwise follows its batch)."""
    max_samples = PERCENTILE_SAMPLES if max_samples is None else int(max_samples)
    acquired = np.flatnonzero(~np.asarray(missing, dtype=bool))
    per_slice = int(np.prod(array.shape[1:], dtype=np.int64))
    step = max(1, acquired.size * per_slice // max_samples)
    # every step-th voxel of the acquired slices laid end to end: slice j's first is
    # the one at a multiple of step in that run
    parts = [np.asarray(array[z]).ravel()[(-j * per_slice) % step::step]
             for j, z in enumerate(acquired)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def percentile_range(array: Any, spec: Mapping[str, Any],
                     max_samples: int | None = None) -> tuple[float, float]:
    """(low, high) intensities at the spec's percentiles of the finite voxels of
    ``array`` (a regular subsample of at most ``max_samples``); high > low always."""
    max_samples = PERCENTILE_SAMPLES if max_samples is None else int(max_samples)
    x = np.asarray(array, dtype=np.float32).ravel()
    x = x[:: max(1, x.size // max_samples)]
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise MedsegInputError("the volume has no finite voxels (all NaN or missing)")
    low, high = (float(v) for v in np.percentile(
        x, [float(spec["low_percentile"]), float(spec["high_percentile"])]))
    # Only a range too flat for float32 is widened, relative to the values: an absolute
    # floor (1e-3) squeezed an image in small units (ADC in mm²/s, 0–1e-6) into a sliver
    # of [0, 1], and the generator's residual, scaled back, swamped it.
    if high - low > _flat(low, high):
        return low, high
    low_all, high_all = float(x.min()), float(x.max())  # e.g. 99.9 % of voxels one value
    if high_all - low_all > _flat(low_all, high_all):
        return low_all, high_all
    return low, low + max(abs(low), 1.0)  # a constant image: any span maps it to 0


def _flat(low: float, high: float) -> float:
    """A span below this holds too few float32 steps (about 100) to scale to [0, 1]."""
    return max(1e-5 * max(abs(low), abs(high)), float(np.finfo(np.float32).tiny))


# -- writing ----------------------------------------------------------------------------
def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable: the file's own fsync does not cover its new
    directory entry, and a power cut could bring back the old file (POSIX; elsewhere,
    or on a file system that refuses it, nothing to do)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, os.replace onto ``path``."""
    refuse_read_only(path)
    try:  # the name cut short: a long one must still leave room for the temp suffix
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # no write access: said of the file asked for, not a temp name
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode_for(path))
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            # "No space left on device", or os.replace's "Is a directory" (which names the
            # temp file), then says which file
            raise _naming(exc, path) from exc
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` alone. (Setting ``filename2 = None`` on it printed
    "... -> None": OSError keeps None as a second name.)"""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


#: the longest model name: ``<name>.<sha256[:12]>.safetensors`` must fit a file name (255)
MAX_NAME_LENGTH = 200


def check_model_name(name: Any) -> None:
    """MedsegInputError unless ``name`` can name a saved model (before any work that
    ends in a save: a round or a training that then failed to save was time lost)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise MedsegInputError(
            f"model name must be letters, digits, '_', '-' or '.', got {name!r}"
        )
    if name.lower().endswith((".json", ".safetensors")):  # saved as x.json.json: no name finds it
        raise MedsegInputError(f"model name must not end in a file suffix, got {name!r}")
    if len(name.encode()) > MAX_NAME_LENGTH:
        raise MedsegInputError(f"model name must be at most {MAX_NAME_LENGTH} characters, "
                               f"got {len(name)}")


def save_model(model: nn.Module, directory: str | Path, name: str, card: Mapping[str, Any],
               unique_weights: bool = False) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``directory``; returns the card path.

    Replacing a model is crash-safe at every instant, a kill included: the card on disk
    always names a complete file with its checksum (the old model or the new one). With a
    fixed file name the new weights are staged under a hidden name first (see
    :func:`_replace_fixed_name`); ``unique_weights`` names them
    ``<name>.<sha256[:12]>.safetensors`` instead, and deletes the weights the previous
    ``<name>.json`` pointed to only after the new card is in place.

    ``card`` must give "classes", "input_spacing_mm" and "normalisation"; anything else in
    it (training command, seed, metrics, …) is kept. The registry fills in "format",
    "name", "architecture", "arch_params" (from ``model.arch_params``), "version" (default
    "1.0"), "weights_file", "sha256" and "n_parameters". Each file is written atomically.
    """
    check_model_name(name)
    arch = type(model).__name__
    if ARCHITECTURES.get(arch) is not type(model):
        raise MedsegInputError(
            f"cannot save a {arch}: known architectures are {', '.join(ARCHITECTURES)}"
        )
    arch_params = getattr(model, "arch_params", None)
    if not isinstance(arch_params, Mapping):
        raise MedsegInputError(f"{arch} has no arch_params to rebuild it from")
    card = dict(card)
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise MedsegInputError(f"model card for {name!r} lacks {', '.join(missing)}")
    if "arch_params" in card and _jsonable(card["arch_params"]) != _jsonable(arch_params):
        raise MedsegInputError(
            f"card arch_params {card['arch_params']!r} differ from the model's"
            f" {dict(arch_params)!r}"
        )
    if "architecture" in card and card["architecture"] != arch:
        raise MedsegInputError(
            f"card architecture {card['architecture']!r} differs from the model's {arch!r}"
        )
    classes = list(card["classes"])
    n_out = arch_params.get("n_classes")
    if n_out is not None and len(classes) != n_out:
        raise MedsegInputError(f"card lists {len(classes)} classes, the model has {n_out} outputs")
    spacing = [float(s) for s in card["input_spacing_mm"]]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MedsegInputError(
            "input_spacing_mm must be three positive numbers (z, y, x),"
            f" got {card['input_spacing_mm']!r}"
        )
    normalisation = check_normalisation(card["normalisation"])

    directory = Path(directory)
    # every level this save makes, deepest first: a failed save removes them all (only
    # the deepest was, and a full disk left "out/n1" behind from "out/n1/n2")
    created = [d for d in [directory, *directory.parents] if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return _save(model, directory, name, arch, arch_params, classes, spacing,
                     normalisation, card, unique_weights)
    except BaseException:
        for folder in created:  # a failed save leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _save(model, directory: Path, name: str, arch: str, arch_params, classes, spacing,
          normalisation, card, unique_weights: bool) -> Path:
    card_path = directory / f"{name}.json"
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    problem = _weights_problem(tensors)
    if problem:  # a diverged run must not become a model that loads and predicts nonsense
        raise MedsegInputError(f"cannot save {name!r}: {problem}")
    # ONE metadata key: safetensors writes the metadata map in hash order, which changes
    # from process to process, so several keys would make the same weights hash
    # differently on every save (and `train --seed S` could not reproduce a file's sha256)
    # the card's entries that say what the tensors mean ride in the hashed bytes too: the
    # card is outside the checksum, and an edited class order or activation loaded and
    # predicted differently with no complaint
    meaning = {"arch_params": _jsonable(arch_params), "classes": [str(c) for c in classes],
               "input_spacing_mm": spacing, "normalisation": _jsonable(normalisation)}
    metadata = {"napari_medseg": json.dumps(
        {"format": CARD_FORMAT, "name": name, "architecture": arch, **meaning}, sort_keys=True)}
    data = safetensors.torch.save(tensors, metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()
    weights_path = directory / (f"{name}.{digest[:12]}.safetensors" if unique_weights
                                else f"{name}.safetensors")
    ours = {
        "format": CARD_FORMAT,
        "name": name,
        "architecture": arch,
        "arch_params": _jsonable(arch_params),
        "classes": [str(c) for c in classes],
        "input_spacing_mm": spacing,
        "normalisation": _jsonable(normalisation),
        "version": str(card.get("version", "1.0")),
        "weights_file": weights_path.name,
        "sha256": digest,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    extra = {k: v for k, v in card.items() if k not in ours and k != "card_path"}
    try:  # serialise before writing anything: a bad card must not replace the weights
        text = json.dumps(_jsonable({**ours, **extra}), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"model card for {name!r} is not plain JSON ({exc})") from exc
    if not unique_weights:
        _replace_fixed_name(directory, name, card_path, weights_path, data, digest, ours, extra)
        _drop_orphans(directory, name, weights_path)  # its killed writes' temp files
        return card_path
    previous = None
    if card_path.is_file():
        try:
            named = str(json.loads(card_path.read_text("utf-8"))["weights_file"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            named = ""
        # only a weights file this save would have named itself: a damaged card naming
        # another model's weights (or the card) must not get them deleted
        if re.fullmatch(rf"{re.escape(name)}(\.[0-9a-f]{{12}})?\.safetensors", named):
            previous = directory / named
    try:
        _atomic_write(weights_path, data)
        _atomic_write(card_path, text.encode("utf-8"))
    except BaseException:
        # what the card on disk names decides, not how far the writes got: an interrupt
        # can land after a rename, inside _atomic_write (the new card was in place and
        # the weights it names were deleted: a model no load accepted)
        if _card_names(card_path, weights_path.name):
            _drop_previous(previous, weights_path, directory)  # the new model is whole
        elif weights_path != previous:
            weights_path.unlink(missing_ok=True)  # nothing points at it
        raise
    _drop_previous(previous, weights_path, directory)
    _drop_orphans(directory, name, weights_path)
    return card_path


#: a weights file no card names is deleted by a later save once it is this old
ORPHAN_AGE_S = 600.0


_TEMP_RE = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")  # _atomic_write's mkstemp names


def _our_temp(file_name: str, name: str) -> bool:
    """Whether ``file_name`` is a temp file :func:`_atomic_write` made for model ``name``
    (its card, its weights, or their staged copies). mkstemp's name keeps 40 characters
    of the target: of two names alike in their first 40, each takes the other's temp
    files too (only leftovers: the caller deletes none younger than ORPHAN_AGE_S)."""
    found = _TEMP_RE.fullmatch(file_name)
    if found is None:
        return False
    target = found.group(1)
    if len(target) < 40:
        return re.fullmatch(rf"\.?{re.escape(name)}(\.[0-9a-f]{{12}})?\.(safetensors|json)",
                            target) is not None
    return target.startswith((f"{name}."[:40], f".{name}."[:40]))


def _drop_orphans(directory: Path, name: str, weights_path: Path) -> None:
    """Delete ``<name>.<sha12>.safetensors`` files no card in ``directory`` names: what a
    save killed between its weights and its card left (each later save of that name
    left it there for good), and the hidden temp files of this model's writes a kill
    left (up to a whole weights file each). Only files older than :data:`ORPHAN_AGE_S`:
    a save of the same name in another process may have written its weights and not yet
    its card, or be writing a temp file."""
    pattern = re.compile(rf"{re.escape(name)}\.[0-9a-f]{{12}}\.safetensors")
    now = time.time()

    def old(path: Path) -> bool:  # one unreadable entry (a dangling link) spoils no other
        try:
            return path.is_file() and now - path.stat().st_mtime > ORPHAN_AGE_S
        except OSError:
            return False

    try:
        entries = list(directory.iterdir())
    except OSError:
        return  # tidying only: the save itself succeeded
    for temp in [p for p in entries if _our_temp(p.name, name) and old(p)]:
        with contextlib.suppress(OSError):
            temp.unlink()
    orphans = [p for p in entries if pattern.fullmatch(p.name) and p != weights_path and old(p)]
    if not orphans:
        return
    try:
        named = b"".join(card.read_bytes() for card in directory.glob("*.json")
                         if card.is_file())
    except OSError:
        return  # tidying only: the save itself succeeded
    for orphan in orphans:
        if orphan.name.encode() not in named:
            try:
                orphan.unlink()
            except OSError:
                pass


def _card_names(card_path: Path, weights_file: str) -> bool:
    """Whether the card on disk now names ``weights_file``."""
    try:
        return json.loads(card_path.read_text("utf-8")).get("weights_file") == weights_file
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _drop_previous(previous: Path | None, weights_path: Path, directory: Path) -> None:
    if previous is not None and previous != weights_path and previous.parent == directory:
        previous.unlink(missing_ok=True)


def _replace_fixed_name(directory: Path, name: str, card_path: Path, weights_path: Path,
                        data: bytes, digest: str, ours: dict, extra: dict) -> None:
    """Write ``<name>.safetensors`` and ``<name>.json`` so that the card on disk names a
    complete file with its checksum at every instant, a kill included: the new weights
    go first under a hidden staged name, then a card naming them, then the fixed name,
    then the final card. (Replacing the weights first and the card after left, when
    killed between the two, an old card beside new weights: a model no load accepts.)"""
    def card_text(weights_file: str) -> bytes:
        card = {**ours, "weights_file": weights_file, **extra}
        return (json.dumps(_jsonable(card), indent=2, allow_nan=False) + "\n").encode("utf-8")

    staged = directory / f".{name}.{digest[:12]}.safetensors"
    stale = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.safetensors")
    try:
        old_card = card_path.read_bytes() if card_path.is_file() else None
    except OSError:
        old_card = None
    for left in directory.iterdir():  # what a killed save left, unless the card names it
        if stale.fullmatch(left.name) and left != staged and (
                old_card is None or left.name.encode() not in old_card):
            left.unlink(missing_ok=True)
    try:
        _atomic_write(staged, data)
        _atomic_write(card_path, card_text(staged.name))
        _atomic_write(weights_path, data)
        _atomic_write(card_path, card_text(weights_path.name))
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.filename == str(staged):
            exc.filename = str(weights_path)  # "No space left" names the file the user asked for
        # decided by what is on disk, not by how far the writes got: an interrupt can land
        # after a rename, inside _atomic_write (the old card was put back beside the new
        # weights: a checksum mismatch; or the staged file the card named was deleted)
        if _card_names(card_path, staged.name):
            try:
                new_weights_in_place = weights_path.read_bytes() == data
            except OSError:
                new_weights_in_place = False
            if new_weights_in_place:  # the new model, whole either way: finish it
                with contextlib.suppress(OSError):
                    _atomic_write(card_path, card_text(weights_path.name))
            else:  # the old model's weights are still in place: the old card again
                with contextlib.suppress(OSError):
                    if old_card is None:
                        card_path.unlink()
                    else:
                        _atomic_write(card_path, old_card)
        if not _card_names(card_path, staged.name):
            staged.unlink(missing_ok=True)
        raise
    staged.unlink(missing_ok=True)


# -- reading ----------------------------------------------------------------------------
def read_card(card_path: str | Path) -> dict[str, Any]:
    """Parse and check a model card (no weights are read)."""
    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MedsegInputError("model card not found", card_path) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = f"not a readable model card ({type(exc).__name__}: {exc})".splitlines()[0]
        raise MedsegInputError(reason, card_path) from exc
    if not isinstance(card, dict):
        raise MedsegInputError("not a model card (expected a JSON object)", card_path)
    _check_format(card.get("format"), card_path)
    needed = ("name", "architecture", "arch_params", "sha256", *REQUIRED_CARD_KEYS)
    missing = [k for k in needed if k not in card]
    if missing:
        raise MedsegInputError(f"model card lacks {', '.join(missing)}", card_path)
    if not isinstance(card["architecture"], str) or card["architecture"] not in ARCHITECTURES:
        raise MedsegInputError(
            f"unknown architecture {card['architecture']!r}; known: {', '.join(ARCHITECTURES)}",
            card_path,
        )
    if not isinstance(card["arch_params"], dict):
        raise MedsegInputError("arch_params must be a JSON object", card_path)
    try:
        _check_card_values(card, card_path)
    except OverflowError as exc:  # a number past float's range (damage): one line, not a traceback
        raise MedsegInputError("the card holds a number too large to be a setting",
                               card_path) from exc
    return card


def _check_format(fmt: Any, card_path: Path) -> None:
    """A card of a later format (a newer napari-medseg saved it) is refused: it loaded
    without a word, what it adds ignored. No format (a card written by hand) is read as
    this one."""
    if fmt is None:
        return
    family, _, version = str(fmt).partition("/")
    major = version.split(".")[0]  # "1.1": a later minor version of the same major
    ours, _, our_major = CARD_FORMAT.partition("/")
    if family != ours or not major.isdigit():
        raise MedsegInputError(f"not a napari-medseg model card (format {str(fmt)[:60]!r})",
                               card_path)
    if int(major) > int(our_major):
        raise MedsegInputError(f"saved by a newer napari-medseg (card format {fmt}, this one "
                               f"reads {CARD_FORMAT}): update napari-medseg to load it",
                               card_path)


# optional numeric card entries the engine reads: (low, high, integer?)
_CARD_NUMBERS = {
    "peak_threshold": (0.0, 1.0, False),
    "min_distance_mm": (0.0, 1000.0, False),
    "nms_radius_fraction": (0.0, 4.0, False),
    "context_slices": (0, 16, True),
}


def _check_card_values(card: Mapping[str, Any], card_path: Path) -> None:
    """Types and ranges of the entries inference reads, so a hand-edited or damaged card
    gets one clear line here instead of a traceback deep in a run."""
    classes = card["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise MedsegInputError(f"the card's classes must be a list of names, got {classes!r}",
                               card_path)
    try:
        check_normalisation(card["normalisation"])
    except MedsegInputError as exc:
        raise MedsegInputError(exc.reason, card_path) from exc
    for key, (low, high, integer) in _CARD_NUMBERS.items():
        if key not in card:
            continue
        value = card[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and low <= value <= high
        ok = ok and (not integer or float(value).is_integer())
        if not ok:
            kind = "a whole number" if integer else "a number"
            raise MedsegInputError(f"the card's {key} must be {kind} in [{low}, {high}], "
                                   f"got {value!r}", card_path)


def resolve_card(
    card_path_or_name: str | Path, search_dirs: Iterable[str | Path] | None = None
) -> Path:
    """A card path from a path (``.json`` or the ``.safetensors`` beside it) or a bare name."""
    text = str(card_path_or_name)
    path = Path(text).expanduser()
    looks_like_path = os.sep in text or bool(os.altsep and os.altsep in text)
    if path.suffix in (".json", ".safetensors") or looks_like_path:
        if path.suffix == ".safetensors":
            # <name>.<sha256[:12]>.safetensors (a unique-named save) sits beside <name>.json
            stem = re.sub(r"\.[0-9a-f]{12}$", "", path.stem)
            path = path.with_name(f"{stem}.json")
        if not path.is_file():
            raise MedsegInputError("model card not found", path)
        return path
    dirs = [Path(d) for d in (default_search_dirs() if search_dirs is None else search_dirs)]
    for d in dirs:
        candidate = d / f"{text}.json"
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.json")})
    raise MedsegInputError(
        f"no model named {text!r} in {', '.join(map(_folder_name, dirs)) or 'no folders'}"
        f" (available: {', '.join(available) or 'none'})"
    )


def _folder_name(folder: Path) -> str:
    """A model folder as a message names it: no install path, the home folder as ~."""
    if folder == BUNDLED_DIR:
        return "the bundled models"
    try:
        return f"~/{folder.relative_to(Path.home())}"
    except ValueError:
        return folder.name


def build_for_weights(card: Mapping[str, Any]) -> nn.Module:
    """:func:`build_model` for weights about to be loaded (every parameter and buffer:
    ``load_state_dict(strict=True)``), with no initialisation at all: built on torch's
    meta device, then given empty CPU storage. Its random initialisation drew from
    torch's global generator, which a seeded job holds while each step runs
    (``core.rng``): Retrain's Save waited about 0.4 s on napari's thread for a step of
    the Uncertainty widget to end."""
    with torch.device("meta"):
        model = build_model(card)
    try:
        return model.to_empty(device="cpu")
    except (RuntimeError, MemoryError) as exc:  # as build_model: absurd sizes in a card
        raise MedsegInputError(f"arch_params for {type(model).__name__} cannot be built"
                               f" ({type(exc).__name__}: {_first_line(exc)[:80]})") from exc


def build_model(card: Mapping[str, Any]) -> nn.Module:
    """An untrained model of the card's architecture and arch_params."""
    cls = ARCHITECTURES.get(card.get("architecture"))  # type: ignore[arg-type]
    if cls is None:
        raise MedsegInputError(
            f"unknown architecture {card.get('architecture')!r};"
            f" known: {', '.join(ARCHITECTURES)}"
        )
    try:
        return cls(**card["arch_params"])
    except (MedsegInputError, TypeError, ValueError, OverflowError) as exc:
        # first line only: torch's own errors carry a C++ stack of 40 lines
        raise MedsegInputError(f"bad arch_params for {cls.__name__}: {_first_line(exc)}") from exc
    except (RuntimeError, MemoryError) as exc:  # e.g. absurd layer sizes in an edited card
        raise MedsegInputError(f"arch_params for {cls.__name__} cannot be built"
                               f" ({type(exc).__name__}: {_first_line(exc)[:80]})") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _state_dict_mismatch(model: nn.Module, tensors: Mapping[str, Any]) -> str | None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} with wrong shape (e.g. {k}: file {got[k]} vs model {expected[k]})"
        )
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(parts)


def _stored_metadata(data: bytes) -> dict[str, Any]:
    """The napari_medseg entry save_model writes into a safetensors header ({} if none)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = (header.get("__metadata__") or {}).get("napari_medseg")
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def _implausible_arch(arch_params: Mapping[str, Any], tensors: Mapping[str, Any]) -> str | None:
    """Why the card's arch_params cannot describe these weights, seen before the model is
    built (the card is outside the checksum: a damaged ``convs_per_block: 100000`` took
    minutes and 10 GB to build, then failed): every whole number (a layer count, a width)
    is at most the file's tensor count or its largest tensor dimension, every list at most
    that long."""
    largest = max((max(v.shape) for v in tensors.values() if v.dim()), default=0)
    limit = max(len(tensors), largest)

    def problem(key: str, value: Any) -> str | None:
        if isinstance(value, bool):
            return None
        # a float too: the constructors take 3000.0 as 3000 (and fail on inf only deep inside)
        if isinstance(value, (int, float)) and not (value <= limit):
            return f"{key} = {value}"
        if isinstance(value, (list, tuple)):
            if len(value) > limit:
                return f"{key} lists {len(value)} values"
            return next((p for v in value if (p := problem(key, v))), None)
        return None

    found = next((p for k, v in arch_params.items() if (p := problem(str(k), v))), None)
    return None if found is None else (
        f"the card's arch_params ({found}) cannot describe these weights ({len(tensors)} "
        f"tensors, largest dimension {largest})")


def _weights_problem(tensors: Mapping[str, Any]) -> str | None:
    """Why these weights cannot be a model's (None if they can): a model's tensors are
    floating point and finite; BatchNorm's counter is the one integer tensor."""
    if not tensors:  # said of the file: the card was blamed ("cannot describe these weights")
        return "the weights file holds no tensors"
    for key, value in tensors.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not value.is_floating_point():
            return f"tensor {key} holds {value.dtype} values, not floating point weights"
        if not bool(torch.isfinite(value).all()):
            return f"tensor {key} holds NaN or infinite values (a diverged run?)"
    return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(
    card_path_or_name: str | Path, search_dirs: Iterable[str | Path] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from its card (path) or name; returns ``(model in eval mode, card)``.

    A bare name is looked up as ``<name>.json`` in ``search_dirs`` (default: the user
    folder, then the bundled weights). The weights file's sha256 must match the card's.
    """
    card_path = resolve_card(card_path_or_name, search_dirs)
    card, weights_path, data = _card_and_weights(card_path)
    if data is None:  # a save replacing the model between our two reads: read its new card
        card, weights_path, data = _card_and_weights(card_path)
    if data is None:
        raise MedsegInputError(
            f"weights file missing (card {card_path.name} needs it)", weights_path)
    digest = hashlib.sha256(data).hexdigest()
    expected = str(card["sha256"]).lower()
    if digest != expected:
        raise MedsegInputError(
            f"checksum mismatch (file changed or truncated); expected {expected}, got {digest}",
            weights_path,
        )
    try:
        tensors = safetensors.torch.load(data)
        stored = _stored_metadata(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        reason = f"not a valid safetensors file ({exc})".splitlines()[0]
        raise MedsegInputError(reason, weights_path) from exc
    # the card is not under the checksum: it must at least name the file's architecture,
    # and say what the file was saved with (weights saved before that was stored: unchecked)
    if stored.get("architecture") not in (None, card.get("architecture")):
        raise MedsegInputError(
            f"the card says {card.get('architecture')!r}, the weights file was saved from a "
            f"{stored['architecture']!r}", card_path)
    edited = [k for k in _MEANING_KEYS if k in stored and _jsonable(card[k]) != stored[k]]
    if edited:
        raise MedsegInputError(
            f"the card's {' and '.join(edited)} differ from what the weights were saved with "
            f"(the card was edited or damaged; a structure the model learnt new is named "
            f"by fine-tuning with --class-names VALUE=NAME or in the Retrain widget's "
            f"layer, a known one keeps its name); saved: "
            f"{json.dumps({k: stored[k] for k in edited}, sort_keys=True)[:200]}", card_path)
    problem = _weights_problem(tensors) or _implausible_arch(card["arch_params"], tensors)
    if problem:
        raise MedsegInputError(problem, weights_path)
    model = build_for_weights(card)
    problem = _state_dict_mismatch(model, tensors)
    if problem:
        raise MedsegInputError(
            f"weights do not fit {card['architecture']}"
            f"({json.dumps(card['arch_params'], sort_keys=True)}): {problem}",
            weights_path,
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        reason = f"weights do not fit {card['architecture']}: {exc}".splitlines()[0]
        raise MedsegInputError(reason, weights_path) from exc
    model.eval()
    card["card_path"] = str(card_path)
    return model, card


#: card entries save_model also stores inside the hashed weights file
_MEANING_KEYS = ("arch_params", "classes", "input_spacing_mm", "normalisation")


def _card_and_weights(card_path: Path) -> tuple[dict[str, Any], Path, bytes | None]:
    """The card, its weights file's path and bytes (None: the file is missing)."""
    card = read_card(card_path)
    weights_file = card.get("weights_file", f"{card_path.stem}.safetensors")
    if not isinstance(weights_file, str) or "\0" in weights_file:
        raise MedsegInputError("weights_file must be a file name beside the card", card_path)
    weights_path = card_path.parent / weights_file
    if weights_path.parent.resolve() != card_path.parent.resolve():
        raise MedsegInputError("weights_file must be a file beside the card", card_path)
    try:
        return card, weights_path, weights_path.read_bytes()  # hash and parse the same bytes
    except FileNotFoundError:
        return card, weights_path, None
    except OSError as exc:
        raise MedsegInputError(
            f"cannot read weights ({exc.strerror or exc})", weights_path
        ) from exc


def _named_architecture(path: Path) -> str | None:
    """The "architecture" an unreadable card still names, if its JSON parses that far."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("architecture")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def list_models(dirs: Iterable[str | Path] | None = None,
                skipped: list[tuple[str, str, str | None]] | None = None) -> list[dict[str, Any]]:
    """The valid cards in ``dirs`` (default: user folder, then bundled), each with its
    "card_path"; unreadable cards are skipped with a logged warning, and added to
    ``skipped`` (when given) as (path, why, the architecture the file names or None).
    Weights are not read or verified here (:func:`load_model` does that)."""
    cards: list[dict[str, Any]] = []
    for d in [Path(p) for p in (default_search_dirs() if dirs is None else dirs)]:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.json")):
            try:
                card = read_card(path)
            except MedsegInputError as exc:
                log.warning("skipping %s", exc)
                if skipped is not None:
                    skipped.append((str(path), str(exc), _named_architecture(path)))
                continue
            card["card_path"] = str(path)
            cards.append(card)
    return cards

"""``napari-medseg finetune``: fine-tune the segmenter or the detector on slices, headless.

``finetune MODEL --image INPUT --labels LABELS.nii.gz --slices 10,20,30 --out DIR``
reads the image and a label volume on the same grid, fine-tunes a copy of MODEL (a name
or a card path) on those slices only (every other voxel is ignored by the loss), and
writes ``DIR/NAME.<sha>.safetensors`` + ``DIR/NAME.json`` (crash-safe), loadable by
every widget and command. ``--points LESIONS.csv`` (z, y, x[, diameter_mm], e.g. what
``detect`` writes, then corrected) fine-tunes a detector instead: the points are all the
lesions on the given slices. Everything that can fail on bad input is checked before any
training, and nothing is written unless training finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .cli_infer import _read_and_warn, recorded_threads_arg
from .core.errors import MedsegInputError
from .core.text import counted, slice_ranges


#: more slices than any volume holds (a range longer than this is a typo)
MAX_SLICES = 100_000
#: passes over the annotated slices: a 15 s round makes about 150 steps, so 10 000 passes
#: over 5 slices are hours; more is a typo
MAX_EPOCHS = 10_000


def parse_slices(text: str) -> list[int]:
    """"10,20,30" or "10-14,30" → sorted unique slice indices."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError(part)
                if hi - lo >= MAX_SLICES:  # no volume is that deep; do not build the range
                    raise MedsegInputError(f"--slices range {part} is longer than any volume")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except MedsegInputError:
        raise
    except ValueError as exc:
        raise MedsegInputError(
            f"--slices must be comma-separated slice numbers or ranges like 10,20-22, got {text!r}"
        ) from exc
    if not out:
        raise MedsegInputError("--slices is empty")
    return sorted(out)


def read_label_volume(path: str, image: Any, slices: Any = None) -> np.ndarray:
    """A label volume as integers, on ``image``'s grid: the same shape after reorientation
    and, when the file has geometry (not an .npy), the same spacing, origin and axes.
    Only ``slices`` (all when None) must hold whole numbers: the others are ignored, and
    what is not a label there reads as 0."""
    from .core.finetune import MAX_LABEL
    from .core.io import read_volume

    volume = read_volume(path)
    labels = volume.array
    if labels.shape != tuple(image.shape):
        raise MedsegInputError(f"labels have shape {labels.shape}, the image {tuple(image.shape)}", path)
    if "npy" not in (volume.metadata.get("source_format"), image.metadata.get("source_format")):
        # the same shape on another grid would teach the model shifted or mirrored labels
        spacing, origin = np.array(image.spacing), np.array(image.origin)
        if not np.allclose(volume.spacing, spacing, rtol=1e-3, atol=1e-4):
            raise MedsegInputError(f"labels have spacing {tuple(volume.spacing)} mm, the image "
                                   f"{tuple(image.spacing)}: not drawn on this image", path)
        if np.abs(np.array(volume.origin) - origin).max() > 0.05 * spacing.min():
            raise MedsegInputError(f"labels start at {tuple(round(o, 2) for o in volume.origin)} "
                                   f"mm, the image at {tuple(round(o, 2) for o in image.origin)}:"
                                   " not drawn on this image", path)
        axes = [v.metadata.get("axes_lps") for v in (volume, image)]
        if None not in axes and not np.allclose(axes[0], axes[1], atol=1e-3):
            raise MedsegInputError("labels lie along other axes than the image (flipped or "
                                   "turned): not drawn on this image", path)
    whole = np.isfinite(labels) & (labels == np.round(labels))
    used = (np.ones(len(labels), dtype=bool) if slices is None
            else np.isin(np.arange(len(labels)), list(slices)))
    if not whole[used].all():
        raise MedsegInputError("labels must be whole numbers on the slices given (a label "
                               "map, not an image)", path)
    # past int64 the cast wraps (1e20 read as -9.2e18, with numpy's warning): say the
    # value the file holds, as the fine-tuning's own range check words it
    given = labels[used]
    if given.size and (given.min() < 0 or given.max() > MAX_LABEL):
        raise MedsegInputError(f"label values must be 0–{MAX_LABEL}, found "
                               f"{given.min():g}–{given.max():g}", path)
    # only the slices given: a huge value elsewhere, ignored, printed numpy's cast warning
    return np.where(whole & used[:, None, None], labels, 0).astype(np.int64)


def parse_class_names(text: str | None) -> dict[int, str]:
    """``--class-names "10=gallbladder,11=stent"`` → {10: "gallbladder", 11: "stent"}."""
    if not text:
        return {}
    names: dict[int, str] = {}
    for part in str(text).split(","):
        value, sep, name = part.partition("=")
        name = " ".join(name.split())
        if not sep or not value.strip().isdigit() or not name:
            raise MedsegInputError(f"--class-names takes VALUE=NAME pairs separated by commas "
                                   f"(e.g. 10=gallbladder), got {part.strip()!r}")
        if int(value) == 0:
            raise MedsegInputError("--class-names: 0 is the background, not a structure")
        names[int(value)] = name[:256]
    return names


def check_given_names(given: dict[int, str], classes: Any) -> None:
    """--class-names names new structures: one naming a structure the model knows as
    another was refused as the labels file's numbering (a name typed on the command line)."""
    from .core.finetune import label_name_conflicts

    known = np.array(sorted(given), dtype=np.int64)[None, None] if given else np.zeros((1, 1, 0))
    wrong = label_name_conflicts(given, classes, known, [0])
    if wrong:
        said = "; ".join(f"{v} is '{theirs}' in the model, not '{mine}'"
                         for v, mine, theirs in wrong[:4])
        raise MedsegInputError(f"--class-names names new structures; {said}: a structure "
                               "the model knows keeps its name")


def label_names_in(path: str) -> dict[int, str]:
    """The structure names a NIfTI label map carries (this plugin's writer stores them);
    {} for any other file."""
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        return {}
    from .core.io.nifti import label_names_in_header

    # the header alone: read_label_volume has read (and checked) the voxels already
    return label_names_in_header(path)


def check_label_names(names: dict[int, str], classes: Any, labels: np.ndarray,
                      slices: Any, path: str) -> None:
    """Refuse a label map whose names say its values are other structures than the
    model's classes of those numbers (core.finetune.label_name_conflicts)."""
    from .core.finetune import label_name_conflicts

    wrong = label_name_conflicts(names, classes, labels, slices)
    if wrong:
        said = "; ".join(f"{v} is '{mine}' in the file, '{theirs}' in the model"
                         for v, mine, theirs in wrong[:4])
        raise MedsegInputError(
            f"the labels number their structures otherwise than the model ({said}): "
            "renumber them to the model's classes (" + ", ".join(
                f"{i} {c}" for i, c in enumerate(classes)) + ")", path)


def read_points_csv(path: str, volume: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Points (z, y, x voxel indices) and diameters from a CSV with a header naming at
    least z, y, x (and optionally diameter_mm, or radius_mm as ``phantom`` writes it),
    e.g. the output of ``detect``; or, with ``volume``, napari's axis-0, axis-1, axis-2 in
    world mm as napari-medseg's points writer saves a layer (voxel = (mm − origin) /
    spacing, where napari draws the volume)."""
    import csv

    try:
        # utf-8-sig: spreadsheet programs write a byte-order mark before the header
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [dict(zip(header, row)) for row in reader if any(c.strip() for c in row)]
            columns = set(header)
    except FileNotFoundError as exc:
        raise MedsegInputError("no such file", path) from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedsegInputError(f"not a readable CSV ({exc})", path) from exc
    world = ["axis-0", "axis-1", "axis-2"]
    if not {"z", "y", "x"} <= columns and volume is not None and set(world) <= columns \
            and "axis-3" not in columns:  # saved from napari (File › Save, world mm)
        columns |= {"z", "y", "x"}
        origin, spacing = np.asarray(volume.origin, float), np.asarray(volume.spacing, float)
        for r in rows:
            try:
                r["z"], r["y"], r["x"] = ((float(r[a]) - o) / d
                                          for a, o, d in zip(world, origin, spacing))
            except (KeyError, TypeError, ValueError):
                r["z"] = "not a number"  # said below, as any other non-numeric cell
    if not {"z", "y", "x"} <= columns:  # a header of z,y,x alone is a list of no lesions
        raise MedsegInputError("the CSV needs a header naming columns z, y, x (and optionally"
                               " diameter_mm)", path)
    twice = sorted(c for c in ("z", "y", "x", "diameter_mm", "radius_mm") if header.count(c) > 1)
    if twice:
        raise MedsegInputError(f"the CSV names column {', '.join(twice)} twice", path)
    if {"diameter_mm", "radius_mm"} <= columns:
        raise MedsegInputError("the CSV gives both diameter_mm and radius_mm; keep one", path)
    # phantom's lesions.csv gives radius_mm: its sizes were silently dropped (10 mm each)
    size, factor = ("radius_mm", 2.0) if "radius_mm" in columns else ("diameter_mm", 1.0)
    pts, diam = np.zeros((len(rows), 3)), np.zeros(len(rows))
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        try:
            pts[line - 2] = [float(r["z"]), float(r["y"]), float(r["x"])]
            diam[line - 2] = factor * float(r.get(size) or "nan")
        except (KeyError, TypeError, ValueError) as exc:
            # the line named: a hand-corrected list of dozens had no clue where to look
            raise MedsegInputError(
                f"line {line}: the CSV needs numeric columns z, y, x (and optionally "
                f"diameter_mm or radius_mm), got {_cells(r, size)}", path) from exc
        if not np.all(np.isfinite(pts[line - 2])):
            raise MedsegInputError(f"line {line}: coordinates must be finite numbers, got "
                                   f"{_cells(r, size)}", path)
        if np.isinf(diam[line - 2]) or diam[line - 2] < 0:  # the core's refusal named no line
            raise MedsegInputError(f"line {line}: {size} must be positive millimetres (or "
                                   f"empty: unknown), got {_cells(r, size)}", path)
        if volume is not None and np.any((pts[line - 2] < -0.5)
                                         | (pts[line - 2] > np.asarray(volume.shape) - 0.5)):
            raise MedsegInputError(
                f"line {line}: the point lies outside the image {tuple(volume.shape)} (z, y, x "
                f"= {', '.join(f'{v:g}' for v in pts[line - 2])})", path)
    return pts, diam


def _cells(row: dict, size: str) -> str:
    return ", ".join(f"{c}={str(row.get(c) or '')!r}" for c in ("z", "y", "x", size)
                     if c in row)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .cli_infer import _run
    from .core.finetune import finetune_detector, finetune_segmenter, new_structure_advice
    from .core.models import LesionDetector, RecurrentSegmenter, load_model, save_model
    from .core.models.registry import check_model_name
    from .core.training import MAX_SEED

    from .cli_train import can_write_into

    option = getattr(args, "model_option", None)
    if option is not None and args.model is not None and option != args.model:
        raise MedsegInputError(f"two models given ({args.model} and --model {option}); give one")
    args.model = args.model if args.model is not None else option
    if args.model is None:
        raise MedsegInputError("no model given: segmenter, detector or a saved model's card "
                               "(.json), as MODEL or --model")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise MedsegInputError("--out must be a folder", out)
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) \
            or not can_write_into(parent):
        raise MedsegInputError("--out cannot be created or written here", out)
    name = args.name or f"{Path(str(args.model)).stem}-finetuned"
    try:
        check_model_name(name)  # said now, not after the training
    except MedsegInputError as exc:
        raise MedsegInputError(f"{exc}; pass --name" if args.name is None else str(exc)) from exc
    if (out / f"{name}.json").is_dir():  # --overwrite cannot replace it: said before training
        raise MedsegInputError(f"{name}.json in --out is a folder; remove it or pass another "
                               "--name", out)
    if (out / f"{name}.json").exists() and not args.overwrite:
        raise MedsegInputError(f"{name}.json exists; pass --overwrite or another --name", out)
    from .core.models.registry import BUNDLED_DIR, user_models_dir

    from .cli_train import _refuse_write_protected, same_path

    if (BUNDLED_DIR / f"{name}.json").exists() and same_path(out, user_models_dir()):
        # found first by name, it would stand in for the bundled model in every command
        # and widget that names it (the Retrain widget refuses the same)
        raise MedsegInputError(f"'{name}' is a bundled model's name; in the user models "
                               "folder this model would replace it everywhere: pass another "
                               "--name", out)
    _refuse_write_protected(out, [f"{name}.json"])  # said now, not after the training
    if not 0 <= args.seed <= MAX_SEED:
        raise MedsegInputError(f"--seed must be 0..{MAX_SEED}, got {args.seed}")
    if args.threads is not None and args.threads < 1:  # 0 ("torch's own") is not recordable
        raise MedsegInputError(f"--threads must be at least 1, got {args.threads}")
    if args.epochs is not None and not 1 <= args.epochs <= MAX_EPOCHS:
        # a typo of many digits trained for days, its progress stuck at 0 %
        raise MedsegInputError(f"--epochs must be 1..{MAX_EPOCHS}, got {args.epochs}")
    if args.class_names and args.labels is None:
        raise MedsegInputError("--class-names names the structures of --labels (a segmenter)")
    parse_class_names(args.class_names)  # a malformed one said before any reading
    if (args.labels is None) == (args.points is None):
        raise MedsegInputError("give --labels (segmenter) or --points (detector), one of them")
    slices = parse_slices(args.slices)
    model, card = load_model(args.model)
    volume = _read_and_warn(args.image, "finetune")  # a synthetic file, gaps, 1 mm guessed …
    _warn_synthetic_slices(volume, slices)
    # an epoch: each annotated slice is the centre of one training sequence, on average
    steps = None if args.epochs is None else args.epochs * len(slices)
    threads = args.threads
    if threads is None and steps is not None:
        # a fixed number of steps gives the same weights only on the same thread count
        # (float sums): pin the count the engine would start with, and record it below
        from .core.inference import free_threads

        threads = free_threads()
    # this round's number in the model's lineage: it picks the held-out slice (rotating
    # along a chain of rounds, as in the widget) and is recorded in the card
    version = len(card.get("finetune_history", [])) + 1
    if args.labels is not None:
        if not isinstance(model, RecurrentSegmenter):
            raise MedsegInputError(f"--labels fine-tunes a segmenter; {args.model} is a {type(model).__name__}")
        labels = read_label_volume(args.labels, volume, slices)
        # the names given win over the file's (a .npy or another tool's NIfTI has none:
        # a new structure was called structure_10 with no way to name it here)
        given = parse_class_names(args.class_names)
        check_given_names(given, card.get("classes", []))
        names = {**label_names_in(args.labels), **given}
        check_label_names(names, card.get("classes", []), labels, slices, args.labels)
        # a new structure's name from the file (it was called "structure_9")
        job = finetune_segmenter(volume, model, card, labels, slices, steps=steps,
                                 seconds=args.seconds, seed=args.seed, threads=threads,
                                 version=version, class_names=names or None)
        source = f"--labels {shlex.quote(str(args.labels))}"
    else:
        if not isinstance(model, LesionDetector):
            raise MedsegInputError(f"--points fine-tunes a detector; {args.model} is a {type(model).__name__}")
        points, diam = read_points_csv(args.points, volume)
        job = finetune_detector(volume, model, card, points, diam, slices, steps=steps,
                                seconds=args.seconds, seed=args.seed, threads=threads,
                                version=version)
        source = f"--points {shlex.quote(str(args.points))}"
    result = _run(job, "finetune", args.quiet)
    if result.report.steps == 0:  # an untrained copy must not pass for a fine-tuned model
        raise MedsegInputError(f"--seconds {args.seconds:g} ended before one training step; "
                               "give it a few seconds")
    card_out = dict(result.card)
    # exact (repr, not :g's 6 digits) and quoted: a path with a space must rerun as given
    budget = (f" --epochs {args.epochs}" if args.epochs is not None else "") + (
        f" --seconds {args.seconds!r}" if args.seconds is not None else "")
    q = lambda value: shlex.quote(str(value))  # noqa: E731
    card_out["finetune_history"][-1]["command"] = (
        f"napari-medseg finetune {q(args.model)} --image {q(args.image)} {source}"
        f" --slices {q(args.slices)} --out {q(args.out)} --name {q(name)}{budget}"
        + (f" --class-names {q(args.class_names)}" if args.class_names else "") +
        f" --seed {args.seed}" + (f" --threads {threads}" if threads is not None else ""))
    path = save_model(result.model, out, name, {**card_out, "name": name}, unique_weights=True)
    print(f"wrote {path} ({counted(result.report.steps, 'step')}, {result.report.seconds:.1f} s)")
    print(json.dumps(result.report.as_dict()))
    advice = new_structure_advice(result.report)
    if advice:
        print(f"note: {advice.replace('Seconds', '--seconds')}", file=sys.stderr)
    return 0


def _warn_synthetic_slices(volume: Any, slices: Any) -> None:
    """Annotated slices the file says ``generate`` made: the round would teach the model
    the generator's image as if acquired (said, not refused: the user may mean it)."""
    planes = volume.metadata.get("synthetic_planes") or {}
    if planes.get("axis") != "z":
        return
    made = sorted(set(int(z) for z in slices) & set(planes.get("indices", ())))
    if made:
        print(f"finetune: warning: {counted(len(made), 'annotated slice')} "
              f"({slice_ranges(np.array(made))}) were generated (synthetic), not acquired: "
              "the model learns from the generator's image there", file=sys.stderr)


def register(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune the segmenter (--labels) or the detector "
                       "(--points) on annotated slices of one volume")
    p.add_argument("model", nargs="?", default=None,
                   help="model name (segmenter, detector) or a saved model's card (.json)")
    # as segment and detect take it: `finetune --model CARD.json` was refused
    p.add_argument("--model", dest="model_option", default=None,
                   help="the same as MODEL (give one of the two)")
    p.add_argument("--image", required=True, help="DICOM file/folder, NIfTI or .npy")
    p.add_argument("--labels", help="segmenter: label volume on the image's grid (NIfTI/.npy)")
    p.add_argument("--points", help="detector: CSV with z, y, x[, diameter_mm] (voxel indices), "
                   "or napari's axis-0, axis-1, axis-2 (world mm, as napari and the Detect "
                   "widget save points): all the lesions on the given slices")
    p.add_argument("--slices", required=True, help="annotated (reviewed) slices, numbered from 0 along the "
                   "image's z as napari's slider shows them (and detect's CSV), e.g. 10,20,30 or 10-14")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model")
    p.add_argument("--name", help="model name (default MODEL-finetuned)")
    p.add_argument("--epochs", type=int, help="training passes over the annotated slices (with "
                   "--seconds: whichever comes first)")
    p.add_argument("--seconds", type=float, help="time budget (default without --epochs: 15 s, or 30 s"
                   " when the labels hold a new structure); for the segmenter it includes the "
                   "passes over the volume, but training keeps at least half of it, so on a "
                   "long series the round may run longer; for the detector, preparing the "
                   "volume and the rehearsal phantoms comes before it (a few seconds)")
    p.add_argument("--class-names", default=None, metavar="VALUE=NAME,…",
                   help="names of the structures the labels paint, e.g. 10=gallbladder: a new "
                        "structure takes it (else structure_10, or the name a label map "
                        "written by napari-medseg carries); a known one must match the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=recorded_threads_arg, default=None,
                   help="torch threads, 1 or more (default: free cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_finetune)

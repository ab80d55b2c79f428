"""``napari-medseg segment | detect | classify | gradcam | uncertainty | generate``: the
engine, headless.

Each command reads any input the readers take (DICOM file or folder, NIfTI, .npy), loads a
model by name (bundled or user folder) or by card path (``--model path/to/name.json``),
runs :mod:`napari_medseg.core.inference` with progress on stderr, and writes its output
atomically (temp file + rename): bad input or a crash leaves no partial output. Bad input
raises :class:`MedsegInputError`, which ``cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import MedsegInputError
from .core.io._common import link_target, refuse_write_protected, temp_prefix
from .core.text import counted, slice_ranges

DEFAULT_MODELS = {"segment": "segmenter", "detect": "detector", "classify": "classifier",
                  "gradcam": "classifier", "uncertainty": "segmenter",
                  "generate": "generator"}


def threads_arg(text: str) -> int:
    """``--threads``: a whole number, 0 or more (0: leave torch's own setting); refused as
    the arguments are read, for every command (one that ran no model took -3 in silence)."""
    return _int_at_least(text, 0, "a whole number, 0 or more (0: torch's own setting)")


def recorded_threads_arg(text: str) -> int:
    """``--threads`` of finetune: 1 or more (its count is recorded in the card so that the
    round can be rerun; torch's own setting cannot be). The shared text offered 0, which
    finetune then refused."""
    return _int_at_least(text, 1, "a whole number, 1 or more (recorded in the card)")


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _bundled(command: str) -> str:
    """The bundled model's card, as the help promises for no --model: a user model saved
    under the same bare name (found first by name) must not replace the default."""
    from .core.models import BUNDLED_DIR

    return str(BUNDLED_DIR / f"{DEFAULT_MODELS[command]}.json")


def _check_output(path: str, suffixes: tuple[str, ...], source: str | None = None,
                  overwrite: bool = False, others: tuple[Path | None, ...] = ()) -> Path:
    """The output refused now, before minutes of computing, if it cannot or must not be
    written; an existing file is replaced only with ``--overwrite`` (it may be a label
    map a radiologist corrected by hand since the last run). ``others``: the command's
    outputs checked before this one (two outputs must not be one file)."""
    out = Path(path).expanduser()
    # a symbolic link's target is what the write replaces: every check is on it
    target = link_target(out)
    if source is not None and (_same_file(out, Path(source).expanduser())
                               or _same_file(target, Path(source).expanduser())):
        raise MedsegInputError("the output would overwrite the input; choose another name", out)
    if not out.name.lower().endswith(suffixes):
        raise MedsegInputError(f"output must end in {' or '.join(suffixes)}", out)
    for other in others:
        if other is not None and _same_file(target, link_target(other)):
            raise MedsegInputError(f"the same file as the output {other.name}; give each "
                                   "output its own file", out)
    if target != out and not target.name.lower().endswith(suffixes):
        # a link named seg.nii.gz to a slice of the DICOM input replaced that slice
        raise MedsegInputError(f"a link to {target}, which is not a {' or '.join(suffixes)} "
                               "file; not written through", out)
    if not target.parent.is_dir():
        raise MedsegInputError("the folder to write into does not exist", out)
    if target.is_dir():
        raise MedsegInputError("output is a folder, expected a file name", out)
    if not os.access(target.parent, os.W_OK | os.X_OK):  # said now, not after the computing
        raise MedsegInputError("the folder to write into is not writable", out)
    if target.exists() and not overwrite:
        raise MedsegInputError("the output exists; pass --overwrite to replace it", out)
    refuse_write_protected(target, "not replaced")  # said now, not after the computing
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # links and other spellings of one file too
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _grid(volume) -> dict:
    """write_nifti's spacing, origin and placing (:func:`_placing`) for a result on the
    input's grid."""
    return {"spacing": volume.spacing, "origin": volume.origin, **_placing(volume)}


def _placing(volume) -> dict:
    """write_nifti's axes and voxel order for a result of ``volume``: it lands where its
    input lies in the patient, whatever the input's orientation (coronal, flipped,
    oblique), and a NIfTI input's result is stored in that file's own voxel order."""
    return {"axes": volume.metadata.get("axes_lps"),
            "stored_orientation": volume.metadata.get("stored_orientation"),
            "stored_ndim": volume.metadata.get("stored_ndim")}


#: the CSV columns that say where a row lies in the patient, after the indices on the
#: reoriented grid: DICOM patient coordinates (LPS) and, for a DICOM series, the slice's
#: InstanceNumber (a scanner numbering from the head made "slice 111" 55 mm off)
_WHERE = ("patient_x_mm", "patient_y_mm", "patient_z_mm", "instance_number")
_WHERE_SLICE = ("patient_z_mm", "instance_number")


def _where(volume, z: float, y: float, x: float) -> tuple[str, ...]:
    """Empty cells where the input gives no patient position or InstanceNumber."""
    position = volume.patient_mm([[z, y, x]])[0]
    number = volume.instance_number(z)
    return (*("" if v != v else f"{v:.2f}" for v in position),
            "" if number is None else str(number))


def _where_slice(volume, z: int) -> tuple[str, ...]:
    """A slice's patient z at its centre (an oblique slice's varies across it)."""
    _, ny, nx = volume.shape
    return _where(volume, z, (ny - 1) / 2, (nx - 1) / 2)[2:]


def _write_all(*writes: tuple[Path | None, Any], overwrite: bool = True) -> None:
    """Run each ``(path, write)`` in turn (``path`` None: skipped); each write replaces its
    file atomically. All or nothing: if a later write fails, every file an earlier one
    wrote is put back as it was (removed, or its previous content restored from a hard
    link kept until the end), so a command with two outputs never leaves a new one next
    to an old one. Without ``overwrite``, a file that appeared under an output's name
    while the command computed (another run, a file the user saved) is refused then, not
    replaced: checked only at the start, it was silently replaced."""
    done: list[tuple[Path, Path | None]] = []
    try:
        for index, (path, write) in enumerate(writes):
            if path is None:
                continue
            # a link's target is what the write replaces, and what to put back
            path = link_target(path)
            if not overwrite and (path.exists() or path.is_symlink()):
                raise MedsegInputError(
                    "the output was created by something else while this command ran; "
                    "not replaced (pass --overwrite to replace it)", path)
            keep = None
            if path.exists():
                # (the name cut as the atomic writers cut theirs: a long one overflows; the
                # index keeps two outputs of one long stem apart)
                keep = path.with_name(f"{temp_prefix(path)}{index}.previous")
                try:
                    os.link(path, keep)  # the old content survives the atomic replace
                except OSError:
                    shutil.copy2(path, keep)
            done.append((path, keep))
            write()
    except BaseException:
        for path, keep in reversed(done):
            if keep is not None:
                os.replace(keep, path)
                # a write that failed before its replace left ``path`` and ``keep`` one
                # file: renaming a link onto itself keeps both names (POSIX)
                keep.unlink(missing_ok=True)
            else:
                path.unlink(missing_ok=True)
        raise
    for _, keep in done:
        if keep is not None:
            keep.unlink(missing_ok=True)


def _load(args: argparse.Namespace, command: str) -> tuple[Any, Any, dict]:
    """Output checked, volume read, model loaded: everything that can fail on bad input
    happens here, before any computing or writing."""
    from .core.models import load_model

    from .core.inference import input_warnings

    volume = _read_and_warn(args.input, command)
    model, card = load_model(_model_arg(args, command))
    _PENDING_WARNINGS[command] = input_warnings(volume, card)  # said by _run (see there)
    return volume, model, card


#: warnings on the input for a model (core.inference.input_warnings), said once the job's
#: own checks passed: a refused input (a wrong model) gets its one error line alone
_PENDING_WARNINGS: dict[str, list[str]] = {}


def _model_arg(args: argparse.Namespace, command: str) -> str:
    """--model, or the bundled model when it is not given (an empty one is a mistake,
    e.g. an unset shell variable, not a request for the bundled model)."""
    if args.model is not None and not str(args.model).strip():
        raise MedsegInputError("--model is empty; give a model card (.json) or a model name")
    return args.model if args.model is not None else _bundled(command)


def _missing_info(volume: Any, explanation: str | None = None) -> dict | None:
    """What an output file's napari-medseg extension says beyond its voxels: the input's
    missing slices (0 there read as background, or as no evidence, in another viewer) and,
    for a map, that it is an explanation, not a scan (the plugin then opens it as one)."""
    info: dict[str, Any] = {}
    if volume.missing.any():
        info["missing_slices"] = volume.missing_slices()
    if explanation:
        info["explanation_map"] = explanation
    return info or None


def _model_record(card: Any) -> dict:
    """The model an output was made by, for its file's extension (the files named none:
    which of two models made a segmentation could not be told from it)."""
    return {k: card.get(c) for k, c in (("model", "name"), ("model_version", "version"),
                                         ("model_sha256", "sha256")) if card.get(c)}


def _made_by(card: Any) -> str:
    """The model as the summary line names it."""
    version = card.get("version")
    return f"{card.get('name')}{f' {version}' if version else ''}"


def _map_kwargs(volume: Any, kind: str, card: Any = None) -> dict:
    """write_nifti's marks of an explanation map, as the plugin's writer gives them."""
    return {"info": {**(_missing_info(volume, kind) or {}),
                     **(_model_record(card) if card else {})},
            "description": f"napari-medseg: explanation map ({kind}), not a scan"}


#: what a command does with a slice, and with voxels, that hold no value (NaN)
_MISSING_EFFECT = {"finetune": ("left out of training", "ignored by the loss"),
                   "generate": ("filled in the output",
                                "kept without a value, as on the generated slices beside them"),
                   "generate --keep-missing": ("kept missing (NaN) in the output",
                                               "kept without a value, as on the generated "
                                               "slices beside them")}


def _read_and_warn(path: str, command: str, effects: str | None = None) -> Any:
    """The volume at ``path``, its reader's warnings and its NaN slices and voxels said on
    stderr with what ``command`` (or ``effects``: a key of _MISSING_EFFECT) does with them."""
    from .core.io import read_volume

    volume = read_volume(path)
    warnings = list(volume.metadata.get("warnings", ()))  # what `info` would say: mixed series, gaps …
    # a NIfTI or .npy volume's NaN slices and masked patches: the widgets said so, the
    # commands did not (organ volumes with a quarter of the scan never looked at)
    slice_effect, voxel_effect = _MISSING_EFFECT.get(
        effects or command, ("left without a result",
                             "each slice's class is read from its measured voxels only"
                             if command in ("classify", "gradcam") else "left without a result"))
    if volume.missing.any() and not any("missing slice" in w for w in warnings):
        missing = volume.missing_slices()
        warnings.append(f"{counted(len(missing), 'slice')} without any value (NaN), at z="
                        f"{slice_ranges(missing)}: taken as missing, {slice_effect}")
    unmeasured = volume.unmeasured_voxels()
    if unmeasured.any() and not volume.metadata.get("missing_planes"):
        effect = voxel_effect
        zs = np.flatnonzero(unmeasured)
        warnings.append(f"{counted(int(unmeasured.sum()), 'voxel')} without a value (NaN) on "
                        f"{'slice' if len(zs) == 1 else 'slices'} {slice_ranges(zs)}: {effect}")
    for warning in warnings:
        print(f"{command}: warning: {warning}", file=sys.stderr)
    return volume


def _progress_printer(command: str, quiet: bool):
    last = {"pct": -1}
    start = time.perf_counter()

    def report(p) -> None:
        if quiet or not p.total:
            return
        pct = int(100 * p.step / p.total)
        if pct == last["pct"]:
            return
        last["pct"] = pct
        print(f"{command}: {pct:3d}% {p.message} ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr, flush=True)

    return report


def _run(job, command: str, quiet: bool):
    from .core.progress import run_to_completion

    printer, pending = _progress_printer(command, quiet), _PENDING_WARNINGS.pop(command, [])

    def report(p) -> None:
        while pending:  # the job's first report: its checks passed
            print(f"{command}: warning: {pending.pop(0)}", file=sys.stderr)
        printer(p)

    return run_to_completion(job, report)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return {"precision": args.precision, "threads": args.threads}


def cmd_segment(args: argparse.Namespace) -> int:
    from .core.inference import format_measure, segment_volume
    from .core.io import write_nifti

    out = _check_output(args.output, (".nii.gz", ".nii"), args.input, args.overwrite)
    volume, model, card = _load(args, "segment")
    result = _run(segment_volume(volume, model, card, chunk=args.chunk, **_engine_kwargs(args)),
                  "segment", args.quiet)
    _write_all((out, lambda: write_nifti(
        out, result.labels, **_grid(volume), labels=True,
        label_names=dict(enumerate(result.class_names)),
        info={**(_missing_info(volume) or {}), **_model_record(card)})),
        overwrite=args.overwrite)
    # one slice (a 2D image): areas, as the widget gives; a volume would need a slice
    # thickness the image does not have (the 1 mm a 2D file is read with is made up)
    one_slice = result.labels.shape[0] == 1
    measures, unit = (result.area_cm2(), "cm²") if one_slice else (result.volume_ml(), "ml")
    found = [f"{name} {format_measure(value)} {unit}" for name, value in measures.items()
             if value > 0 and name != result.class_names[0]]
    # (z, y, x) named: a NIfTI input's file keeps its own order, e.g. (x, y, z) for RAS
    print(f"wrote {out.name} ({_made_by(card)}): labels {list(result.labels.shape)} "
          f"(z, y, x; {result.precision});"
          f" {', '.join(found) or 'no structures found'}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .cli import _write_csv_atomic
    from .core.inference import classify_volume

    out = _check_output(args.output, (".csv",), args.input, args.overwrite)
    volume, model, card = _load(args, "classify")
    result = _run(classify_volume(volume, model, card, batch=args.batch, **_engine_kwargs(args)),
                  "classify", args.quiet)
    header = ("slice", "class_name", *(f"p_{name}" for name in result.class_names),
              *_WHERE_SLICE)
    rows = []
    for z, (cls, probs) in enumerate(zip(result.predicted, result.probabilities)):
        name = "missing" if cls < 0 else result.class_names[cls]
        rows.append((z, name, *("" if p != p else f"{p:.5f}" for p in probs),
                     *_where_slice(volume, z)))
    _write_all((out, lambda: _write_csv_atomic(out, header, rows)), overwrite=args.overwrite)
    print(f"wrote {out.name} ({_made_by(card)}): {counted(len(rows), 'slice')} "
          f"({result.precision})")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from .cli import _write_csv_atomic
    from .core.inference import detect_lesions

    out = _check_output(args.output, (".csv",), args.input, args.overwrite)
    heat_out = None if args.heatmap is None else _check_output(
        args.heatmap, (".nii.gz", ".nii"), args.input, args.overwrite, others=(out,))
    volume, model, card = _load(args, "detect")
    result = _run(
        detect_lesions(volume, model, card, threshold=args.threshold,
                       min_distance_mm=args.min_distance_mm, batch=args.batch,
                       **_engine_kwargs(args)),
        "detect", args.quiet)
    rows = [(f"{d.z:.2f}", f"{d.y:.2f}", f"{d.x:.2f}", f"{d.score:.4f}", f"{d.diameter_mm:.2f}",
             *_where(volume, d.z, d.y, d.x)) for d in result.detections]
    from .core.io import write_nifti

    _write_all(  # the heatmap: the explanation behind each detection, on the input grid
        (heat_out, lambda: write_nifti(heat_out, result.heatmap_on_input_grid(),
                                       **_grid(volume),
                                       **_map_kwargs(volume, "lesion heatmap", card))),
        (out, lambda: _write_csv_atomic(out, ("z", "y", "x", "score", "diameter_mm", *_WHERE),
                                        rows)),
        overwrite=args.overwrite)
    print(f"wrote {out.name} ({_made_by(card)}): {counted(len(rows), 'detection')} "
          f"(threshold {result.threshold:g},"
          f" {result.precision})")
    return 0


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _common(p: argparse.ArgumentParser, command: str, precision: bool = True) -> None:
    """The arguments every model command takes; ``precision`` only where the core has a
    reduced-precision path (the explanations run fp32: gradients, dropout samples)."""
    p.add_argument("input", help="DICOM file or folder, NIfTI (.nii/.nii.gz) or .npy")
    p.add_argument(
        "--model", default=None,
        help=f"model name or card path (.json); default: the bundled {DEFAULT_MODELS[command]!r}",
    )
    if precision:
        p.add_argument(
            "--precision", choices=("fp32", "bf16", "auto"), default="fp32",
            help="fp32 (default); bf16 only on CPUs with native bfloat16; auto: bf16 where it is"
                 " measured faster with the same predictions",
        )
    p.add_argument("--threads", type=threads_arg, default=None,
                   help="torch threads (default: the CPUs other processes leave free, re-checked"
                        " as it runs; 0: leave torch's own setting)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def cmd_gradcam(args: argparse.Namespace) -> int:
    from .core.explain import gradcam_volume
    from .core.io import write_nifti

    out = _check_output(args.output, (".nii.gz", ".nii"), args.input, args.overwrite)
    volume, model, card = _load(args, "gradcam")
    target = args.target
    if target is not None and target not in card["classes"] and target.isdigit():
        target = int(target)  # a class index, as the core takes it
    result = _run(gradcam_volume(volume, model, card, target=target, threads=args.threads),
                  "gradcam", args.quiet)
    explained = card["classes"][target] if isinstance(target, int) else target
    _write_all((out, lambda: write_nifti(
        out, result.maps, **_grid(volume),
        **_map_kwargs(volume, f"Grad-CAM {explained or 'predicted class'}", card))),
        overwrite=args.overwrite)
    print(f"wrote {out.name} ({_made_by(card)}): Grad-CAM of {explained or 'the predicted class'} per slice, 0–1")
    return 0


def cmd_uncertainty(args: argparse.Namespace) -> int:
    from .cli import _write_csv_atomic
    from .core.explain import segmentation_uncertainty
    from .core.io import write_nifti

    out = _check_output(args.output, (".nii.gz", ".nii"), args.input, args.overwrite)
    csv_out = None if args.slices_csv is None else _check_output(
        args.slices_csv, (".csv",), args.input, args.overwrite, others=(out,))
    volume, model, card = _load(args, "uncertainty")
    result = _run(segmentation_uncertainty(volume, model, card, samples=args.samples,
                                           threads=args.threads), "uncertainty", args.quiet)
    _write_all(
        (out, lambda: write_nifti(out, result.entropy, **_grid(volume),
                                  **_map_kwargs(volume, "uncertainty", card))),
        (csv_out, lambda: _write_csv_atomic(csv_out, ("slice", "mean_entropy", *_WHERE_SLICE), [
            (z, "" if v != v else f"{v:.5f}", *_where_slice(volume, z))
            for z, v in enumerate(result.per_slice)])),
        overwrite=args.overwrite)
    # a DICOM series' image numbers beside the slices: what a PACS goes to
    worst = [f"{z} (image {n})" if (n := volume.instance_number(z)) is not None else str(z)
             for z in result.most_uncertain(5)]
    print(f"wrote {out.name} ({_made_by(card)}): MC-dropout entropy ({result.samples} samples); most uncertain"
          f" slices: {', '.join(worst) or 'none'}")
    return 0


def _input_image_number(volume, result, k: int) -> str:
    """The InstanceNumber of output slice ``k`` when it is an acquired slice of a DICOM
    series (input slice k / factor: acquired slices keep every factor-th place), else ""."""
    if result.axis != 0 or not result.acquired[k] or k % result.factor:
        return ""
    number = volume.instance_number(k // result.factor)
    return "" if number is None else str(number)


def cmd_generate(args: argparse.Namespace) -> int:
    from .cli import _write_csv_atomic
    from .core.generation import generate_slices, interpolation_job
    from .core.io import write_nifti
    from .core.models import load_model

    if args.model is not None and args.method != "model":  # it was silently ignored
        raise MedsegInputError(f"--model applies to --method model, not {args.method}")
    out = _check_output(args.output, (".nii.gz", ".nii"), args.input, args.overwrite)
    csv_out = None if args.slices_csv is None else _check_output(
        args.slices_csv, (".csv",), args.input, args.overwrite, others=(out,))
    volume = _read_and_warn(  # e.g. ".npy has no geometry": 1 mm
        args.input, "generate", "generate --keep-missing" if args.keep_missing else None)
    from .core.io import LabelMap, read_scan_or_labels

    # only a NIfTI or .npy file can hold a label map: a DICOM series was read twice
    if (volume.modality != "CT" and volume.metadata.get("source_format") in ("nifti", "npy")
            and isinstance(read_scan_or_labels(args.input), LabelMap)):
        # interpolated, structure 1 beside 3 became a "2" and cubic made negatives
        print("generate: warning: this file holds a label map (structure numbers, not "
              "intensities): the slices made between its own hold values that are no "
              "structure", file=sys.stderr)
    fill = not args.keep_missing
    card = {}
    if args.method == "model":
        model, card = load_model(_model_arg(args, "generate"))
        result = _run(generate_slices(volume, model, card, factor=args.factor, fill_missing=fill,
                                      threads=args.threads), "generate", args.quiet)
    else:
        result = _run(interpolation_job(volume, args.factor, fill, args.method), "generate",
                      args.quiet)
    v = result.volume
    # along the slice axis (z, or y / x for a coronal / sagittal scan)
    status = np.where(result.generated, "generated",
                      np.where(result.acquired, "acquired", "missing"))
    _write_all(
        (out, lambda: write_nifti(
            out, v.array, v.spacing, v.origin, **_placing(volume),
            # other viewers show descrip; the extension says which slices are synthetic
            description=f"napari-medseg: SYNTHETIC slices ({args.method}), not for diagnosis",
            info={"synthetic": True, "method": args.method, "factor": result.factor,
                  "slice_axis": result.axis_name,
                  "generated_slices": np.flatnonzero(result.generated).tolist(),
                  "acquired_slices": np.flatnonzero(result.acquired).tolist(),
                  **_model_record(card)})),
        (csv_out, lambda: _write_csv_atomic(csv_out, ("slice", "status", "instance_number"), [
            (k, kind, _input_image_number(volume, result, k))
            for k, kind in enumerate(status.tolist())])),
        overwrite=args.overwrite)
    print(f"wrote {out.name}: {counted(v.shape[result.axis], 'slice')} at {v.spacing[result.axis]:g} mm"
          f"{'' if result.axis == 0 else ' along ' + result.axis_name} ({args.method}"
          f"{', ' + _made_by(card) if card else ''});"
          f" {result.summary()}. Generated slices are synthetic, not acquired.")
    return 0


def register(subparsers: Any) -> None:
    """Add the segment, detect and classify commands to ``napari-medseg``."""
    p = subparsers.add_parser("segment", help="label organs; writes a NIfTI label map")
    _common(p, "segment")
    p.add_argument("output", metavar="OUT.nii.gz", help="label map on the input grid")
    p.add_argument("--chunk", type=_positive_int, default=None,
                   help="slices per chunk (memory vs speed; default 4)")
    p.set_defaults(func=cmd_segment)

    p = subparsers.add_parser("detect", help="find lesions; writes z, y, x, score, diameter_mm and "
                                              "where each lies in the patient")
    _common(p, "detect")
    p.add_argument("output", metavar="OUT.csv",
                   help="one row per lesion: z, y, x voxel indices on the grid napari-medseg "
                        "reads the input as (NIfTI turned to LPS axes, see docs/data.md), "
                        "score, diameter_mm, patient_x_mm, patient_y_mm, patient_z_mm (DICOM "
                        "LPS, mm; empty without patient geometry), instance_number (a DICOM "
                        "series' image number)")
    p.add_argument("--threshold", type=float, default=None,
                   help="minimum centre score, 0-1 (default: the model card's)")
    p.add_argument("--min-distance-mm", type=float, default=None,
                   help="merge detections closer than this (default: the model card's; a card's"
                        " nms_radius_fraction also merges peaks inside a detection's radius)")
    p.add_argument("--batch", type=_positive_int, default=None, help="slices per batch")
    p.add_argument("--heatmap", default=None, metavar="HEAT.nii.gz",
                   help="also write the detector's centre heatmap (0-1) on the input grid")
    p.set_defaults(func=cmd_detect)

    p = subparsers.add_parser("classify", help="classify every slice; writes a CSV")
    _common(p, "classify")
    p.add_argument("output", metavar="OUT.csv",
                   help="one row per slice: slice, class_name ('missing' for a slice not "
                        "acquired), p_<class> per class, patient_z_mm (DICOM LPS, mm), "
                        "instance_number (a DICOM series' image number)")
    p.add_argument("--batch", type=_positive_int, default=None, help="slices per batch")
    p.set_defaults(func=cmd_classify)

    p = subparsers.add_parser("gradcam", help="explain the slice classifier: Grad-CAM maps (NIfTI)")
    _common(p, "gradcam", precision=False)
    p.add_argument("output", metavar="OUT.nii.gz", help="one 0–1 map per slice on the input grid")
    p.add_argument("--class", dest="target", default=None,
                   help="class to explain, by name or index (default: each slice's predicted class)")
    p.set_defaults(func=cmd_gradcam)

    p = subparsers.add_parser("uncertainty", help="segmenter uncertainty (MC dropout) as NIfTI; --slices-csv adds"
                                   " each slice's mean")
    _common(p, "uncertainty", precision=False)
    p.add_argument("output", metavar="OUT.nii.gz", help="entropy / log(classes) per voxel, 0–1")
    p.add_argument("--samples", type=_positive_int, default=8, help="dropout samples (≥ 2)")
    p.add_argument("--slices-csv", default=None,
                   help="also write the per-slice mean entropy (slice, mean_entropy, "
                        "patient_z_mm, instance_number)")
    p.set_defaults(func=cmd_uncertainty)

    p = subparsers.add_parser(
        "generate", help="upsample thick slices (x2, x3) and fill missing ones; writes NIfTI")
    p.add_argument("input", help="DICOM file or folder, NIfTI (.nii/.nii.gz) or .npy")
    p.add_argument("output", metavar="OUT.nii.gz",
                   help="the volume on the finer grid; acquired slices unchanged")
    # a plain int: the core's check says what is allowed in one line (argparse's own
    # refusal printed its whole usage block)
    p.add_argument("--factor", type=int, default=1,
                   help="slices per acquired slice interval (default 1: only fill gaps; 2 or 3: upsample)")
    p.add_argument("--keep-missing", action="store_true",
                   help="leave slices missing from the series missing (NaN) instead of filling them")
    p.add_argument("--method", choices=("linear", "cubic", "model"), default="linear",
                   help="linear (default: measured as good as the generator on held-out"
                        " phantoms, better on real MR), cubic, or the recurrent generator")
    p.add_argument("--model", default=None,
                   help="generator name or card path (.json); default: the bundled 'generator'")
    p.add_argument("--slices-csv", default=None,
                   help="also write each output slice's status: acquired, generated or "
                        "missing, and an acquired slice's instance_number (a DICOM series' "
                        "image number)")
    p.add_argument("--threads", type=threads_arg, default=None, help="torch threads")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_generate)

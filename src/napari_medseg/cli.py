"""``napari-medseg``: the core, headless, for batch work.

Bad input prints one line ``napari-medseg: error: <file>: <reason>`` to stderr and exits
with status 2; no partial output is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

from . import cli_finetune, cli_infer, cli_train
from ._entry import first_of_a_burst
from .core.errors import MedsegInputError
from .core.io._common import (drop_dead_writers_files, link_target, mode_for, refuse_read_only,
                              refuse_write_protected, short_reason, temp_prefix)
from .core.text import counted

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cat big | head`


def _write_csv_atomic(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    # through a link to the file it names: replacing the link left its target old
    path = link_target(path)
    # the name cut short: a long one must still leave room for the temp suffix
    try:
        refuse_read_only(path)
        drop_dead_writers_files(path)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:  # an unwritable folder: name the output, not the temp file
        raise MedsegInputError(f"could not write the file ({exc.strerror or exc})", path) from exc
    try:
        # UTF-8 whatever the locale: the readers (finetune --points) read UTF-8, and a
        # detection's label ("0.90 · 12 mm") is not ASCII
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        os.chmod(tmp, mode_for(path))
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # name the output, not the temp file
            raise MedsegInputError(f"could not write the file ({exc.strerror or exc})", path) from exc
        if isinstance(exc, UnicodeError):  # a lone surrogate from a mangled file name
            raise MedsegInputError(f"could not write the file: text UTF-8 cannot hold ({exc})",
                                   path) from exc
        raise


PHANTOM_OUTPUTS = ("image.nii.gz", "labels.nii.gz", "lesions.csv", "slice_classes.csv")


def cmd_phantom(args: argparse.Namespace) -> int:
    from .core.phantom import generate_phantom

    if not str(args.out_dir).strip():  # an unset $OUT: not the current folder in silence
        raise MedsegInputError("the output folder is empty; give a folder to write into")
    out = Path(args.out_dir).expanduser()  # a quoted "~/x" reaches us unexpanded
    if out.exists() and not out.is_dir():  # said now, not after drawing the phantom
        raise MedsegInputError("is a file, expected a folder to write into", out)
    # the first folder that exists must take new entries: said before the drawing
    there = next((p for p in [out, *out.parents] if p.exists()), None)
    if there is None or not os.access(there, os.W_OK | os.X_OK):
        raise MedsegInputError("cannot be created or written here", out)
    folders = [name for name in PHANTOM_OUTPUTS if (out / name).is_dir()]
    if folders:
        raise MedsegInputError(f"holds a folder named {folders[0]}, where that output goes",
                               out)
    existing = [name for name in PHANTOM_OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        raise MedsegInputError(
            f"already holds {', '.join(existing)}; pass --overwrite to replace them", out
        )
    for name in existing:
        refuse_write_protected(out / name, "--overwrite cannot replace it")
    try:
        phantom = generate_phantom(
            tuple(args.shape), tuple(args.spacing), args.seed, n_lesions=args.lesions
        )
    except MedsegInputError as exc:  # say it in this command's options, not the API's
        reason = (exc.reason.replace("(shape x spacing), a smaller lesion_radius_mm minimum or "
                                     "fewer lesions", "(--shape x --spacing) or fewer --lesions")
                  .replace(", a smaller lesion_radius_mm minimum, or no lesions (n_lesions 0)",
                           " or --lesions 0")
                  .replace("n_lesions must be None or an integer", "--lesions must be an integer")
                  .replace("n_lesions", "--lesions"))
        raise MedsegInputError(reason, exc.path) from exc
    created = [p for p in [out, *out.parents] if not p.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_phantom(out, phantom)
    except BaseException:
        for folder in created:  # nor empty folders, each one this run made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    volume = phantom.volume
    print(
        f"wrote {', '.join(PHANTOM_OUTPUTS)} to {out} "
        f"(shape {volume.shape}, spacing {volume.spacing} mm, {counted(len(phantom.lesions), 'lesion')})"
    )
    return 0


def _write_phantom(out: Path, phantom) -> None:
    """All four files or none: a new image must never sit next to an old ground truth."""
    from .core.io import write_nifti
    from .core.phantom import LABEL_NAMES, SLICE_CLASSES

    volume = phantom.volume
    lesion_rows = [(*(round(float(c), 2) for c in lesion.center_zyx), round(lesion.radius_mm, 2))
                   for lesion in phantom.lesions]
    class_rows = [(z, int(c), SLICE_CLASSES[int(c)]) for z, c in enumerate(phantom.slice_classes)]
    cli_infer._write_all(
        (out / "image.nii.gz", lambda: write_nifti(out / "image.nii.gz", volume.array,
                                                   volume.spacing, volume.origin)),
        (out / "labels.nii.gz", lambda: write_nifti(
            out / "labels.nii.gz", phantom.labels, volume.spacing, volume.origin, labels=True,
            label_names=dict(LABEL_NAMES))),
        (out / "lesions.csv", lambda: _write_csv_atomic(out / "lesions.csv",
                                                        ("z", "y", "x", "radius_mm"), lesion_rows)),
        (out / "slice_classes.csv", lambda: _write_csv_atomic(
            out / "slice_classes.csv", ("slice", "class_id", "class_name"), class_rows)),
    )


def _finite_or_none(value):
    """``value`` with every non-finite float in it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from .core.io import LabelMap, named_path, read_scan_or_labels

    read = read_scan_or_labels(args.input)  # as napari opens it: a label map has no window
    labels = read if isinstance(read, LabelMap) else None
    volume = read.volume if labels is not None else read
    summary = volume.summary()
    if labels is not None:
        values = [int(v) for v in np.unique(labels.labels) if v != 0]
        summary.pop("window")
        summary["label_map"] = {str(v): labels.names.get(v, "") for v in values}
    if args.json:
        # strict JSON: a header's "NaN" or "inf" (KVP, SliceThickness) printed NaN /
        # Infinity, which jq and JSON.parse reject
        print(json.dumps(_finite_or_none(summary), allow_nan=False))
        return 0
    vmin, vmax = summary["value_range"]
    missing = summary["missing_slices"]
    print(f"input:    {named_path(args.input).name}")  # "." named as the folder it is
    print(f"shape:    {summary['shape_zyx']} (z, y, x)")
    print(f"spacing:  {summary['spacing_mm_zyx']} mm (z, y, x)")
    print(f"origin:   {summary['origin_mm_zyx']} mm (z, y, x)")
    print(f"modality: {summary['modality']}")
    hu = " HU" if summary["modality"] == "CT" else ""
    print(f"values:   {vmin:g} .. {vmax:g}{hu}" if vmin is not None
          else "values:   none (no voxel measured)")
    if "label_map" in summary:  # opened as a Labels layer: structures, not a window
        named = [f"{v} {n}".strip() for v, n in summary["label_map"].items()]
        print(f"labels:   {len(named)} structures: {', '.join(named) or 'none'}")
    else:
        low, high = summary["window"]
        print(f"window:   {low:g} .. {high:g}{hu} (what napari-medseg opens it in)")
    planes = summary.get("missing_planes")  # a turned coronal / sagittal series'
    if planes:
        print(f"gaps:     {len(planes['indices'])} missing planes along {planes['axis']}"
              f" {planes['indices']}")
    if missing or not planes:
        print(f"gaps:     {counted(len(missing), 'missing slice')} {missing}" if missing
              else "gaps:     none")
    for warning in summary["warnings"]:
        print(f"warning:  {warning}")
    for key, value in sorted(summary["source"].items()):  # as the Volume info widget lists
        if value not in (None, [], ""):
            print(f"{key}: {_brief(value)}")
    return 0


def _brief(value: Any) -> Any:
    """A long list of numbers summed up for the text report; --json keeps them all."""
    from .core.text import brief_numbers

    return brief_numbers(value, hint="; --json lists them")


# the last widget tabified into a group is the one shown: Segment, then Volume info
DEMO_WIDGETS = ("Detect lesions", "Classify slices", "Segment organs", "Synthetic phantom",
                "Volume info")


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import napari
    except ImportError as exc:  # the core and CLI install without the GUI
        raise MedsegInputError(f"the demo needs napari ({exc}); "
                               'pip install "napari-medseg[gui]"') from exc

    viewer = napari.Viewer(title="napari-medseg demo")
    viewer.window.resize(1500, 950)
    viewer.scale_bar.visible = True
    viewer.open_sample("napari-medseg", "synthetic_ct")
    # model widgets tabbed together on the right, tools below them
    for index, widget in enumerate(DEMO_WIDGETS):
        viewer.window.add_plugin_dock_widget("napari-medseg", widget, tabify=index in (1, 2, 4))
    # open on the largest lesion, so the first thing a user sees is a finding
    points = viewer.layers[-1]
    if len(points.data):
        largest = int(points.features["diameter_mm"].argmax())
        world_z = points.data_to_world(points.data[largest])[0]
        viewer.dims.set_point(0, world_z)
        viewer.layers.selection.active = viewer.layers[0]
    if args.screenshot:
        # headless docs/CI use: render once, save what the user would see, quit
        from qtpy.QtCore import QTimer

        def _shoot() -> None:
            viewer.screenshot(args.screenshot, canvas_only=False)
            viewer.close()

        QTimer.singleShot(1500, _shoot)
    napari.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-medseg", description="Deep learning for medical images (research use only)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic abdominal CT with ground truth",
                       description="Writes image.nii.gz, labels.nii.gz, lesions.csv (z, y, x"
                       " voxel indices, radius_mm in mm) and slice_classes.csv. The phantom's"
                       " slices run head to feet; see docs/data.md.")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0, help="which synthetic patient (default: 0)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"),
                   help="voxels along z, y, x (default: 64 256 256)")
    p.add_argument(
        "--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8), metavar=("Z", "Y", "X"),
        help="voxel size in mm",
    )
    p.add_argument("--lesions", type=int, default=None, help="number of lesions (default: random)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("info", help="print shape, spacing, modality, value range and gaps")
    p.add_argument("input", help="DICOM file or folder, NIfTI (.nii/.nii.gz) or .npy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="open napari with the synthetic CT and the widgets")
    p.add_argument("--screenshot", help="save a screenshot of the window to this PNG and quit")
    p.set_defaults(func=cmd_demo)

    cli_infer.register(sub)
    cli_train.register(sub)
    cli_finetune.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler), raised where the job is so that
    the outputs are put back as for Ctrl-C: it ended the process with a temporary file
    and half a phantom left behind."""


def _terminate(_signum, _frame) -> None:
    if first_of_a_burst():  # a second signal soon after is the same request
        raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    # a closed stderr (or stdout) is None: print(file=None) wrote progress and errors
    # into the piped output
    for name in ("stderr", "stdout"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # argparse's messages load gettext: a Ctrl-C lands there too
        print("napari-medseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    import signal

    # not for the demo: raised inside Qt's event loop, napari would take it for an error
    # in a callback instead of ending
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and getattr(args, "func", None) is cmd_demo:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the entry point's start-up handler
    on_term = (signal.signal(signal.SIGTERM, _terminate)
               if main_thread and getattr(args, "func", None) is not cmd_demo else None)
    try:
        return _run_command(args)
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


#: the commands that load torch (generate too, whatever its method: core.generation
#: imports it)
_LOADS_TORCH = frozenset({"segment", "detect", "classify", "gradcam", "uncertainty",
                          "generate", "train", "evaluate", "finetune"})


def _import_torch_uninterrupted() -> None:
    """Load torch with SIGINT and SIGTERM only noted until it is done: the exception a
    signal's handler raised inside torch's C++ start-up aborted the process (pybind11's
    terminate: status 134, a core dump, 96 lines) in about 1 run in 20 interrupted then.
    A noted signal is handled as soon as the load ends, where it is caught as ever. (Not
    by blocking the signal: the kernel hands a process's signal to any thread that does
    not block it, such as OpenBLAS's, and Python's handler then ran all the same.)"""
    import signal

    if threading.current_thread() is not threading.main_thread():
        import torch  # noqa: F401
        return
    noted: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, _frame: noted.append(signum)) for s in kinds}
    try:
        import torch  # noqa: F401
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if noted:
        handler = before[noted[0]]
        if callable(handler):
            handler(noted[0], None)  # raises KeyboardInterrupt or Terminated here
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), noted[0])


def _run_command(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "command", None) in _LOADS_TORCH:
            _import_torch_uninterrupted()
        return args.func(args)
    except MedsegInputError as exc:
        print(f"napari-medseg: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away (`| head`): nothing to say, as cat
        with contextlib.suppress(OSError):  # … and no second error when Python flushes
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # unwritable output folder, disk full, ...
        where = f"{Path(exc.filename).name}: " if exc.filename else ""
        print(f"napari-medseg: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Terminated:  # the outputs were put back as they were
        print("napari-medseg: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:  # Ctrl-C: the outputs were put back as they were
        print("napari-medseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    # a bug or an input no check foresaw: one line. BaseException: a panic in Rust code
    # (safetensors) is pyo3's PanicException, no Exception, and escaped as a traceback
    except BaseException as exc:
        if os.environ.get("NAPARI_MEDSEG_DEBUG", "").strip().lower() not in ("", "0", "no",
                                                                            "false", "off"):
            raise
        print(f"napari-medseg: internal error: {type(exc).__name__}: {short_reason(exc)}"
              " (set NAPARI_MEDSEG_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

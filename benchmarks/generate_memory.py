"""Peak memory of linear slice generation over its output, in a process of its own.

    .venv/bin/python benchmarks/generate_memory.py [--shape 150 512 512] [--factor 2]
        [--axis z|x] [--out JSON]

The peak resident size (VmHWM, reset before the run) grows by what the run holds at
once; over the float32 output's size that is the factor ``check_generation_memory``
must ask for (``PEAK_OVER_OUTPUT["linear"]``, plus one output for a scan whose slices
lie along x or y, turned back at the end). Linux only (/proc).
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import emit, machine
from napari_medseg.core.generation import PEAK_OVER_OUTPUT, interpolate_slices
from napari_medseg.core.volume import Volume


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(150, 512, 512))
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--axis", choices=("z", "x"), default="z", help="the thick (slice) axis")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    spacing = [1.0, 0.7, 0.7]
    spacing["zyx".index(args.axis)] = 2.5 if args.axis == "z" else 4.0
    volume = Volume(np.random.default_rng(0).normal(size=args.shape).astype(np.float32),
                    tuple(spacing))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM from here
    before = peak_mb()
    result = interpolate_slices(volume, args.factor)
    grown = peak_mb() - before
    output_mb = result.volume.array.nbytes / 2 ** 20
    emit({"benchmark": "generate_memory", "shape": list(args.shape), "factor": args.factor,
          "slice_axis": args.axis, "peak_growth_mb": grown, "output_mb": output_mb,
          "peak_over_output": grown / output_mb,
          "budgeted": PEAK_OVER_OUTPUT["linear"] + (args.axis != "z"),
          "machine": machine()}, args.out)


if __name__ == "__main__":
    main()

"""Two signals in a burst at a random moment of a CLI run: what the user is left with.

    .venv/bin/python benchmarks/cli_signal_bursts.py [--runs 40] [--command detect]
                                                    [--gap-ms 2 8] [--out JSON]

Not a timing. A phantom (48 × 192², seed 3) is written once; then ``--runs`` times the
command (``segment``, ``detect`` with ``--heatmap``, or ``phantom`` 96 × 320²) is started
and, after a random 0.2–2.5 s, sent one of SIGINT/SIGTERM and, ``--gap-ms`` later (random
in that range), a second one (Ctrl-C pressed twice, a scheduler's SIGTERM then SIGINT).
Counted: exit statuses (130/143 after a signal, 0 when the run had finished; negative:
killed by the signal), runs whose stderr holds a traceback or more than one line, and
runs that left a hidden file (a temporary or kept previous file) in the output folder.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import emit, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--command", choices=("segment", "detect", "phantom"), default="detect")
    ap.add_argument("--gap-ms", type=float, nargs=2, default=(2.0, 8.0))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    exe = str(Path(sys.executable).with_name("napari-medseg"))
    work = Path(tempfile.mkdtemp(prefix="signal-bursts-"))
    subprocess.run([exe, "phantom", str(work / "ph"), "--shape", "48", "192", "192", "--seed",
                    "3"], check=True, capture_output=True)
    src = work / "ph" / "image.nii.gz"
    statuses: Counter = Counter()
    tracebacks = extra_lines = hidden_left = 0
    for i in range(args.runs):
        out = work / f"run{i}"
        out.mkdir()
        argv = {"segment": [exe, "segment", str(src), str(out / "seg.nii.gz"), "-q"],
                "detect": [exe, "detect", str(src), str(out / "d.csv"), "--heatmap",
                           str(out / "h.nii.gz"), "-q"],
                "phantom": [exe, "phantom", str(out / "p"), "--shape", "96", "320", "320"],
                }[args.command]
        run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.2, 2.5))
        first, second = rng.choice([(signal.SIGINT, signal.SIGINT),
                                    (signal.SIGTERM, signal.SIGINT),
                                    (signal.SIGINT, signal.SIGTERM),
                                    (signal.SIGTERM, signal.SIGTERM)])
        try:
            run.send_signal(first)
            time.sleep(rng.uniform(*args.gap_ms) / 1000.0)
            run.send_signal(second)
        except ProcessLookupError:
            pass
        _, err = run.communicate()
        statuses[run.returncode] += 1
        tracebacks += "Traceback" in err
        extra_lines += len(err.strip().splitlines()) > 1
        hidden_left += any(p.name.startswith(".") for p in out.rglob("*"))
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    emit({"benchmark": "cli_signal_bursts", "command": args.command, "runs": args.runs,
          "gap_ms": list(args.gap_ms), "exit_statuses": {str(k): v for k, v in
                                                         sorted(statuses.items())},
          "killed_by_the_signal": sum(v for k, v in statuses.items() if k < 0),
          "tracebacks": tracebacks, "more_than_one_line": extra_lines,
          "hidden_files_left": hidden_left, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()

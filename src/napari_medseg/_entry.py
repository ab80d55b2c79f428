"""The ``napari-medseg`` command's entry point: a Ctrl-C while the CLI's modules load
(numpy, torch and the readers: most of a second) is said in one line and exits 130, as
one later does; it printed a 40-line traceback and the process died of the signal."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        if sys.stderr is not None:
            print("napari-medseg: interrupted", file=sys.stderr)
        return 130
    return run()

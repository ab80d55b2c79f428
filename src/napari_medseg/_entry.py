"""The ``napari-medseg`` command's entry point: a Ctrl-C while the CLI's modules load
(numpy, torch and the readers: most of a second) is said in one line and exits 130, as
one later does; it printed a 40-line traceback and the process died of the signal. A
SIGTERM then exits 143 in one line likewise."""

from __future__ import annotations

import signal
import sys


class _TerminatedWhileStarting(Exception):
    pass


def _terminate_start(_signum, _frame) -> None:
    raise _TerminatedWhileStarting()


def main() -> int:
    try:
        signal.signal(signal.SIGTERM, _terminate_start)
        from .cli import main as run
    except KeyboardInterrupt:
        return _said("interrupted", 130)
    except _TerminatedWhileStarting:
        return _said("terminated", 143)
    # kept until the command sets its own (the default for the demo: raised inside Qt's
    # event loop, napari would take it for an error in a callback); reset to the default
    # here, a SIGTERM before that killed the process without a word
    try:
        return run()
    except _TerminatedWhileStarting:  # before the command's own handler: nothing written
        return _said("terminated", 143)
    finally:
        # done: the outputs are written and said. A Ctrl-C or SIGTERM while Python shuts
        # down (torch's teardown: a few tenths of a second) killed the process with 130 /
        # 143, the status that says "outputs put back", over outputs that are new
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _said(what: str, status: int) -> int:
    if sys.stderr is not None:
        print(f"napari-medseg: {what}", file=sys.stderr)
    return status

"""The ``napari-medseg`` command's entry point: a Ctrl-C while the CLI's modules load
(numpy, torch and the readers: most of a second) is said in one line and exits 130, as
one later does; it printed a 40-line traceback and the process died of the signal. A
SIGTERM then exits 143 in one line likewise.

A second signal soon after the first (Ctrl-C pressed twice, a scheduler's SIGTERM then
SIGINT) is the same request, already being carried out: raised again inside the first
one's clean-up, it printed a traceback, or killed the process while it shut down, and
once left a temporary file behind."""

from __future__ import annotations

import signal
import sys
import threading
import time

#: a signal within this many seconds of the one acted on is taken as the same request;
#: later, it interrupts again (a clean-up that hangs can still be stopped)
REPEAT_WINDOW_S = 2.0
_acted_on: list[float] = []  # when the last signal acted on arrived (monotonic)


def first_of_a_burst() -> bool:
    """Whether a signal arriving now is to be acted on (raised): not when one was acted
    on less than :data:`REPEAT_WINDOW_S` ago."""
    now = time.monotonic()
    if _acted_on and now - _acted_on[0] < REPEAT_WINDOW_S:
        return False
    _acted_on[:] = [now]
    return True


def interrupt(_signum, _frame) -> None:
    """SIGINT: KeyboardInterrupt, as Python's own handler, once per burst."""
    if first_of_a_burst():
        raise KeyboardInterrupt


class _TerminatedWhileStarting(BaseException):
    """Not an Exception: a module's ``except Exception`` around an optional import
    (nibabel's for scipy) took it for a missing package and the run went on, the signal
    used up and a second one, within the window, ignored with it."""


def _terminate_start(_signum, _frame) -> None:
    if first_of_a_burst():
        raise _TerminatedWhileStarting()


def main() -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()
    try:
        return _main(on_main_thread)
    finally:
        # done: the outputs are written (or put back) and said. A Ctrl-C or SIGTERM while
        # Python shuts down (torch's teardown: a few tenths of a second; Python then
        # resets its handlers to the default, which kills) ended the process with the
        # status of a signal over outputs that are new, or a second status over the first
        if on_main_thread:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _main(on_main_thread: bool) -> int:
    try:
        if on_main_thread:
            signal.signal(signal.SIGINT, interrupt)
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


def _said(what: str, status: int) -> int:
    if sys.stderr is not None:
        print(f"napari-medseg: {what}", file=sys.stderr)
    return status

"""Run core jobs in a napari thread worker: progress, cancel and errors in one place.

Widgets call :func:`start_job` with a core generator (yielding ``Progress``) or a plain
function; the GUI thread never waits on numpy/torch. Input arrays must be copied by the
caller *before* calling this, so a user who keeps painting cannot race the job.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import warnings
import weakref
from typing import Any, Callable

from napari.qt.threading import GeneratorWorker, FunctionWorker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QThreadPool, Qt
from superqt.utils import create_worker

from .core.errors import MedsegInputError
from .core.progress import Progress

log = logging.getLogger(__name__)


class JobRuntimeError(Exception):
    """An error superqt's workers would not report, carried as its ``__cause__``: a
    RuntimeError from a generator job (torch's "not enough memory" among them; the
    GeneratorWorker takes it for a deleted Qt object), or a BaseException that is no
    Exception (KeyboardInterrupt, a Rust panic in safetensors: the workers catch only
    Exception). Either way neither ``errored`` nor ``finished`` came: no message, and the
    widget stayed "running" for good."""


def _reportable(exc: BaseException) -> bool:
    """Whether the worker would lose ``exc`` (GeneratorExit is how a cancel closes a job)."""
    return not isinstance(exc, (Exception, GeneratorExit))


def _releasable(job: Callable[..., Any], wrapper: Callable[..., Any],
                held: list) -> Callable[..., Any]:
    """``wrapper`` named as ``job``, holding it only in ``held``: ``wrapper.release()``
    lets go of it. superqt's worker signals keep the function a worker was made with, and a
    worker can outlive its job (napari's ``create_worker`` kept every one for the session,
    in its task list): a widget's method as a job kept the widget
    (and, a Retrain widget, its model versions) after its dock was closed."""
    functools.update_wrapper(wrapper, job)
    del wrapper.__wrapped__
    wrapper.release = held.clear  # type: ignore[attr-defined]
    return wrapper


def _runtime_errors_raised(job: Callable[..., Any]) -> Callable[..., Any]:
    held = [job]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return (yield from held[0](*args, **kwargs))
        except RuntimeError as exc:
            raise JobRuntimeError(str(exc)) from exc
        except BaseException as exc:
            if _reportable(exc):
                raise JobRuntimeError(str(exc)) from exc
            raise

    return _releasable(job, wrapper, held)


def _base_exceptions_raised(job: Callable[..., Any]) -> Callable[..., Any]:
    held = [job]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return held[0](*args, **kwargs)
        except BaseException as exc:
            if _reportable(exc):
                raise JobRuntimeError(str(exc)) from exc
            raise

    return _releasable(job, wrapper, held)


class _JobRun:
    """superqt's ``WorkerBase.run`` without its ``warnings.catch_warnings()``, which set
    the process-wide ``warnings.showwarning`` to this worker's signal for the whole job
    and put back, at its end, whatever it found: while any job ran, a warning raised on
    napari's thread went to a signal nobody heard, and two overlapping jobs ending in the
    order they started left the first job's dead hook (and an "always" filter) for the
    rest of the session. A job's warnings now go where any thread's go (napari's
    notifications, which show them on its thread)."""

    def run(self) -> None:
        self.started.emit()
        self._running = True
        try:
            result = self.work()
            if isinstance(result, Exception):
                if isinstance(result, RuntimeError):  # as superqt: a deleted worker
                    warnings.warn(f"RuntimeError in aborted thread: {result}",
                                  RuntimeWarning, stacklevel=2)
                    return
                raise result
            if not self.abort_requested:
                self.returned.emit(result)
        except Exception as exc:
            self.errored.emit(exc)
        self._running = False
        self.finished.emit()
        self._finished.emit(self)


class _GeneratorJob(_JobRun, GeneratorWorker):
    pass


class _FunctionJob(_JobRun, FunctionWorker):
    pass


def _room_in_the_pool() -> None:
    """Workers run on Qt's global thread pool, one thread per core: on 2 cores a third
    job (Classify while two Retrain rounds ran) waited unseen, its widget saying
    "running", and its Cancel did nothing until another ended. A job starts at once
    (ThreadGovernor shares the cores between the jobs that run)."""
    pool = QThreadPool.globalInstance()
    # the threads busy now and every job of ours not ended (counted as it starts; superqt
    # hands a worker to the pool one event-loop turn later): more than enough, never short
    need = pool.activeThreadCount() + _jobs_running
    if need > pool.maxThreadCount():
        pool.setMaxThreadCount(need)


def _listed_in_tasks(viewer: Any, worker: Any, description: str) -> None:
    """The job in napari's list of running tasks of the widget's own viewer (its window
    asks before closing over them, and cancels them). napari's ``create_worker`` put it
    in the list of whichever viewer was current: closing a second viewer cancelled a
    Segment running in the first, and the first's close did not ask."""
    window = getattr(viewer, "window", None)
    register = getattr(window, "_register_task_status", None)
    update = getattr(window, "_update_task_status", None)
    if register is None or update is None:  # napari < 0.6 keeps no such list
        return
    from napari.utils.task_status import Status

    ref = weakref.ref(worker)  # napari keeps its task list (and this) for the session
    task = register("napari-medseg", Status.BUSY, description,
                    cancel_callback=lambda: ref() is not None and ref().cancel())
    worker.finished.connect(lambda: update(task, Status.COMPLETED, description))


def said_of(what: str, message: str, refused: bool) -> str:
    """One line on a job that ended in an error: a refused input says why (a job that
    checks its input in the worker, as every model job now does, refused it, it did not
    fail); anything else "failed"."""
    return f"{what}: {message}" if refused else f"{what} failed: {message}"


def error_message(exc: BaseException) -> str:
    """A one-line message for the user; bad input reads as itself, bugs name their type."""
    if isinstance(exc, JobRuntimeError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, MedsegInputError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def start_job(
    job: Callable[..., Any],
    *args: Any,
    description: str,
    on_result: Callable[[Any], None],
    on_finished: Callable[[], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_error: Callable[[str, bool], None] | None = None,
    activity: bool = True,
    viewer: Any = None,
    **kwargs: Any,
) -> GeneratorWorker | FunctionWorker:
    """Start ``job(*args, **kwargs)`` in a worker with a napari progress bar.

    ``on_result`` runs in the GUI thread with the job's return value, and never after a
    cancel. Errors become a notification. ``on_finished`` always runs (success, error or
    cancel), so widgets can re-enable their buttons. ``on_progress`` gets every
    ``Progress`` in the GUI thread (e.g. to plot a live loss curve). ``on_error`` gets
    the one-line message of a failure (e.g. for the widget's status line) and whether
    it was the input refused (said as a refusal, not as "failed").
    ``activity=False``: no napari progress bar, for a job whose widget shows its own
    progress. While any napari progress bar exists, the status bar plays an animated
    "in progress" image; under Xvfb (software OpenGL, as on many remote desktops) each of
    its frames re-composites the canvas: a 10 s Retrain round did 42 training steps with
    it and 98 with its progress in the widget (bench_gui_responsiveness.py --retrain
    --no-scroll, benchmarks/README.md). ``viewer``: the widget's viewer, whose window
    lists the job among its running tasks.
    """
    if threading.current_thread() is not threading.main_thread():
        # napari's GUI thread: from another, the worker's signals (result, finished) would
        # live in a thread that ends, and never arrive
        raise RuntimeError("start_job must be called from the GUI thread")
    is_generator = inspect.isgeneratorfunction(job)
    job = _runtime_errors_raised(job) if is_generator else _base_exceptions_raised(job)
    # errors are ours to report (below); otherwise napari re-raises them in the GUI thread
    worker = create_worker(job, *args, _start_thread=False, _ignore_errors=True,
                           _worker_class=_GeneratorJob if is_generator else _FunctionJob,
                           **kwargs)
    # indeterminate until the first report
    bar = progress(total=0, desc=description) if activity else _NoBar()
    state = {"cancelled": False}
    # the widget's callbacks, looked up at each call and dropped when the job ends: a
    # worker can outlive its job (see _releasable), the worker keeps its signals'
    # connections, and these the input layer (its whole volume)
    callbacks = {"result": on_result, "finished": on_finished, "progress": on_progress,
                 "error": on_error}

    def _on_yield(report: Any) -> None:
        # a job runs on to its next report after Cancel: that one no longer counts (it
        # overwrote the widget's "Cancelled" and grew the loss curve)
        if isinstance(report, Progress) and not state["cancelled"]:
            if bar.total != report.total:
                bar.total = report.total
            bar.n = report.step
            bar.set_description(f"{description}: {report.message}" if report.message else description)
            bar.refresh()
            if callbacks.get("progress") is not None:
                callbacks["progress"](report)

    def _on_returned(value: Any) -> None:
        if not state["cancelled"] and "result" in callbacks:
            callbacks["result"](value)

    def _on_error(exc: BaseException) -> None:
        if state["cancelled"]:  # the user no longer waits for this result
            return
        refused = isinstance(exc, MedsegInputError)
        if refused:  # bad input, said in the notification below
            log.info("napari-medseg job %r refused its input: %s", description, exc)
        else:  # a bug: the traceback goes to the log
            log.exception("napari-medseg job %r failed", description, exc_info=exc)
        show_error(said_of(description, error_message(exc), refused))
        if callbacks.get("error") is not None:
            callbacks["error"](error_message(exc), refused)

    def _on_aborted() -> None:
        state["cancelled"] = True
        show_info(f"{description} cancelled")

    def _on_finished() -> None:
        bar.close()
        finished = callbacks.get("finished")
        callbacks.clear()
        _drop_inputs(worker)
        job.release()
        if finished is not None:
            finished()

    _hand_over_gil_sooner()
    worker.finished.connect(_hand_over_gil_as_before)
    if is_generator:
        worker.yielded.connect(_on_yield)
        worker.aborted.connect(_on_aborted)
        # in the worker thread, as it stops: the job's `with` blocks (thread governor,
        # forked RNG, inference mode) end now and in the thread that entered them, not
        # whenever the garbage collector finds the generator, in another thread, maybe
        # during the next job
        worker.aborted.connect(lambda: _close_generator(worker), Qt.ConnectionType.DirectConnection)
    worker.returned.connect(_on_returned)
    worker.errored.connect(_on_error)
    worker.finished.connect(_on_finished)
    worker.cancel = lambda: _cancel(worker, state)  # type: ignore[attr-defined]
    _listed_in_tasks(viewer, worker, description)
    _room_in_the_pool()
    worker.start()
    return worker


#: Python's GIL hand-over interval while jobs run (its default is 5 ms). A job's thread
#: needs the GIL between torch ops; while napari's thread draws (the user scrolls), each
#: such wait lasted up to the interval. Measured with benchmarks/bench_gui_responsiveness.py
#: --retrain (5 runs each, alternated): 16 → 21 training steps in a 10 s round, the
#: event loop's longest gap unchanged (54–95 ms at 5 ms, 63–81 ms at 0.5–1 ms).
JOB_SWITCH_INTERVAL_S = 0.0005
_jobs_running = 0
_switch_interval_before = 0.005


def _hand_over_gil_sooner() -> None:
    """Called on the GUI thread as a job starts: the first job lowers the interval."""
    global _jobs_running, _switch_interval_before
    if _jobs_running == 0:
        _switch_interval_before = sys.getswitchinterval()
        sys.setswitchinterval(min(_switch_interval_before, JOB_SWITCH_INTERVAL_S))
    _jobs_running += 1


def _hand_over_gil_as_before() -> None:
    """Called on the GUI thread as a job ends (or fails, or is cancelled): the last one
    puts the interval back as it found it."""
    global _jobs_running
    _jobs_running = max(0, _jobs_running - 1)
    if _jobs_running == 0:
        sys.setswitchinterval(_switch_interval_before)


class _NoBar:
    """Stands in for napari's progress bar when the widget shows progress itself."""

    total = n = 0

    def set_description(self, _text: str) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _drop_inputs(worker: Any) -> None:
    """Let go of what a finished worker was started with (a function job and its
    arguments, the input volume among them; a generator job's generator): napari keeps
    the worker."""
    for name, empty in (("_func", None), ("_args", ()), ("_kwargs", {}), ("_gen", None)):
        if hasattr(worker, name):
            setattr(worker, name, empty)


def _close_generator(worker: Any) -> None:
    gen = getattr(worker, "_gen", None)
    if gen is None:
        return
    try:
        gen.close()
    except Exception:  # a job's cleanup failing must not take the GUI down
        log.exception("closing a cancelled napari-medseg job failed")


def _cancel(worker: Any, state: dict) -> None:
    # A generator job stops at its next yield; a plain function runs to its end, and
    # its result is then dropped.
    state["cancelled"] = True
    worker.quit()

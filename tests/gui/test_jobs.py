"""_jobs.start_job: a cancelled job's generator is closed in its own thread, at once."""

import threading
import time

import pytest

from napari_medseg._jobs import start_job
from napari_medseg.core.progress import Progress


def test_cancel_closes_the_job_in_its_worker_thread(qtbot):
    closed = {}

    def job():
        try:
            for step in range(10_000):
                time.sleep(0.005)
                yield Progress(step, 10_000, "working")
        finally:  # a job's `with` blocks (thread governor, forked RNG) end here
            closed["thread"] = threading.get_ident()

    results, finished = [], []
    worker = start_job(job, description="test job", on_result=results.append,
                       on_finished=lambda: finished.append(True))
    qtbot.waitUntil(lambda: worker.abort_requested is False and getattr(worker, "_gen", None) is not None,
                    timeout=5000)
    time.sleep(0.05)
    worker.cancel()
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    assert "thread" in closed, "the generator was left suspended"
    assert closed["thread"] != threading.get_ident()  # its cleanup ran in the worker thread
    assert not results


def test_no_report_reaches_the_widget_after_cancel(qtbot):
    """A job runs on to its next report after Cancel; that report overwrote the
    widget's "Cancelled" status and grew the Retrain loss curve."""
    reports, finished = [], []

    def job():
        for step in range(10_000):
            time.sleep(0.01)
            yield Progress(step, 10_000, "working")

    worker = start_job(job, description="test job", on_result=lambda _: None,
                       on_progress=reports.append, on_finished=lambda: finished.append(True))
    qtbot.waitUntil(lambda: len(reports) >= 3, timeout=10_000)
    worker.cancel()
    seen = len(reports)
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    assert len(reports) == seen


def test_jobs_hand_the_gil_over_sooner_while_they_run_and_restore_it(qtbot):
    """While a job runs, its thread waits for the GIL between torch ops as long as
    Python's switch interval (5 ms) whenever napari's thread draws."""
    import sys

    from napari_medseg import _jobs

    before = sys.getswitchinterval()
    seen, finished = [], []

    def job():
        for step in range(200):
            time.sleep(0.005)
            seen.append(sys.getswitchinterval())
            yield Progress(step, 200, "working")

    workers = [start_job(job, description="test job", on_result=lambda _: None,
                         on_finished=lambda: finished.append(True)) for _ in range(2)]
    qtbot.waitUntil(lambda: len(seen) >= 4, timeout=10_000)
    workers[0].cancel()  # one of two ends: the other still runs with the short interval
    qtbot.waitUntil(lambda: len(finished) == 1, timeout=10_000)
    assert sys.getswitchinterval() == _jobs.JOB_SWITCH_INTERVAL_S
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=20_000)
    assert seen and max(seen) <= _jobs.JOB_SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == before


def test_a_job_started_off_the_gui_thread_is_refused():
    """Its worker's signals would live in a thread that ends: no result, and the GIL
    interval lowered for good."""
    errors = []

    def start():
        try:
            start_job(lambda: 1, description="x", on_result=lambda _: None)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert errors and "GUI thread" in errors[0]


def test_a_runtime_error_in_a_generator_job_is_reported_and_the_job_finishes(qtbot,
                                                                             monkeypatch):
    """superqt's GeneratorWorker returns a RuntimeError (torch's "not enough memory" is
    one) instead of raising it, and then emitted neither `errored` nor `finished`: no
    message, the widget stayed "running", the GIL interval stayed lowered."""
    import sys

    from napari_medseg import _jobs

    shown, errors, finished = [], [], []
    monkeypatch.setattr(_jobs, "show_error", shown.append)
    before = sys.getswitchinterval()

    def job():
        yield Progress(0, 2, "working")
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    start_job(job, description="test job", on_result=lambda _: None,
              on_error=lambda message, _refused: errors.append(message),
              on_finished=lambda: finished.append(True))
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    assert errors == ["RuntimeError: DefaultCPUAllocator: not enough memory"]
    assert shown == ["test job failed: RuntimeError: DefaultCPUAllocator: not enough memory"]
    assert sys.getswitchinterval() == before


def test_an_input_the_worker_refuses_is_said_as_refused_not_failed(qtbot, monkeypatch):
    """The model jobs check their input in the worker: "Segment failed: 'ct' has no
    finite values" read as a crash; a deliberate refusal says why and no more."""
    from napari_medseg import _jobs
    from napari_medseg.core.errors import MedsegInputError

    shown, errors, finished = [], [], []
    monkeypatch.setattr(_jobs, "show_error", shown.append)

    def job():
        yield Progress(0, 1, "reading the image")
        raise MedsegInputError("'ct' has no finite values (all NaN)")

    start_job(job, description="Segment 'ct'", on_result=lambda _: None,
              on_error=lambda message, refused: errors.append((message, refused)),
              on_finished=lambda: finished.append(True))
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    assert shown == ["Segment 'ct': 'ct' has no finite values (all NaN)"]
    assert errors == [("'ct' has no finite values (all NaN)", True)]


class _Panic(BaseException):
    """What pyo3 raises for a panic in Rust code (safetensors): no Exception."""


@pytest.mark.parametrize("generator", [True, False])
@pytest.mark.parametrize("raised", [KeyboardInterrupt("stop"), _Panic("null pointer")])
def test_a_base_exception_in_a_job_is_reported_and_the_job_finishes(qtbot, monkeypatch,
                                                                    generator, raised):
    """superqt's workers catch only Exception: a KeyboardInterrupt or a Rust panic in a
    job emitted neither `errored` nor `finished`, and its widget's Run stayed disabled."""
    import sys

    from napari_medseg import _jobs

    shown, errors, finished = [], [], []
    monkeypatch.setattr(_jobs, "show_error", shown.append)
    before = sys.getswitchinterval()

    def job_gen():
        yield Progress(0, 2, "working")
        raise raised

    def job_fn():
        raise raised

    start_job(job_gen if generator else job_fn, description="test job",
              on_result=lambda _: None, on_error=lambda message, _refused: errors.append(message),
              on_finished=lambda: finished.append(True))
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    said = f"{type(raised).__name__}: {raised}"
    assert errors == [said] and shown == [f"test job failed: {said}"]
    assert sys.getswitchinterval() == before


def _gated(gate, name):
    def job():
        gate.wait(30)
        return name

    job.__name__ = name
    return job


def test_overlapping_jobs_leave_pythons_warning_hooks_as_they_were(qtbot):
    """superqt's worker swapped the process-wide warnings.showwarning for its own signal
    while it ran: a warning on napari's thread meanwhile was lost, and two jobs ending
    in the order they started left the first one's dead hook for the session."""
    import warnings

    shown = []

    def hook(message, category, filename, lineno, file=None, line=None):
        shown.append(str(message))

    before_hook, before_filters = warnings.showwarning, list(warnings.filters)
    warnings.showwarning = hook
    try:
        first_gate, second_gate = threading.Event(), threading.Event()
        done = []
        first = start_job(_gated(first_gate, "first"), description="A", on_result=done.append)
        qtbot.waitUntil(lambda: first.is_running, timeout=5000)
        second = start_job(_gated(second_gate, "second"), description="B",
                           on_result=done.append)
        qtbot.waitUntil(lambda: second.is_running, timeout=5000)
        with warnings.catch_warnings():  # (pytest's -W filters aside)
            warnings.simplefilter("always")
            warnings.warn("said on napari's thread while jobs run")
        first_gate.set()
        qtbot.waitUntil(lambda: done == ["first"], timeout=5000)
        second_gate.set()
        qtbot.waitUntil(lambda: done == ["first", "second"], timeout=5000)
        assert warnings.showwarning is hook
        assert shown == ["said on napari's thread while jobs run"]
    finally:
        warnings.showwarning = before_hook
        warnings.filters[:] = before_filters


def test_a_job_starts_at_once_whatever_else_runs(qtbot):
    """Qt's global pool has one thread per core: on 2 cores a third job waited unseen
    behind two long ones, its widget saying "running" and its Cancel doing nothing."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    before = pool.maxThreadCount()
    pool.setMaxThreadCount(2)
    gates = [threading.Event() for _ in range(3)]
    started, done = [], []
    try:
        workers = []
        for i, gate in enumerate(gates):
            def job(i=i, gate=gate):
                started.append(i)
                gate.wait(30)
                return i
            workers.append(start_job(job, description=f"job {i}", on_result=done.append))
        qtbot.waitUntil(lambda: len(started) == 3, timeout=5000)
    finally:
        for gate in gates:
            gate.set()
        qtbot.waitUntil(lambda: len(done) == len(started), timeout=10_000)
        pool.setMaxThreadCount(max(before, pool.maxThreadCount()))

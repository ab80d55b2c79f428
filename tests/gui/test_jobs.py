"""_jobs.start_job: a cancelled job's generator is closed in its own thread, at once."""

import threading
import time

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

"""Shared fixtures."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@functools.lru_cache(maxsize=None)
def suite_threads() -> int:
    """Torch threads per test process: the CPUs shared out among pytest-xdist's workers.

    Each worker otherwise starts torch on every CPU, so two workers on two cores run
    four OpenMP threads, and every op's barrier waits for a descheduled thread.
    """
    from napari_medseg.core.inference import default_threads

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, default_threads() // max(1, workers))


def pytest_configure(config):
    import torch

    # set on the main thread before any test: OpenMP threads started later (napari's
    # workers) begin from this count too
    torch.set_num_threads(suite_threads())
    _freeze_imported_objects()


def _freeze_imported_objects() -> None:
    """Keep the imported modules' objects out of every later garbage collection.

    napari collects in full on each viewer's close: with torch, Qt and napari loaded that
    walked ~400 000 long-lived objects, 0.3 s of every GUI test. Objects the tests make
    are still collected (the leak tests see them go).
    """
    import gc

    try:  # napari's Qt side loads with the first viewer otherwise
        import napari._qt.qt_main_window  # noqa: F401
        import napari.viewer  # noqa: F401
    except ImportError:  # the core-only install: nothing of napari to freeze
        pass
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _suite_threads():
    """Every test starts from the suite's thread count, whatever the test before it left."""
    import torch

    n = suite_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def benchmark_module():
    """Import a script of benchmarks/ by name (it imports its siblings, e.g. ``_common``)."""
    def load(name: str):
        sys.path.insert(0, str(BENCH))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCH))
    return load

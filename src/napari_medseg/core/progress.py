"""Progress reports for long core operations (docs/architecture.md, Long jobs).

A long operation is a generator that yields :class:`Progress` and returns its result.
The GUI runs it in a thread worker (and cancels it between yields); the CLI and tests
drive it with :func:`run_to_completion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, TypeVar

T = TypeVar("T")
Job = Generator["Progress", None, T]


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    message: str = ""
    partial: Any = None


def run_to_completion(job: Job[T], on_progress: Callable[[Progress], None] | None = None) -> T:
    """Drive a progress generator to the end and return its result."""
    while True:
        try:
            report = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(report)

"""A job's own seeded state of torch's global random generator.

Dropout draws from torch's global generator and takes no ``generator=`` argument. A job
that runs as a generator (progress, cancel) and seeds that global generator for its
whole run would hold the seed across every yield: another job or the user's own torch
calls would draw from it (the job is then not reproducible) and have their draws rewound
when it ends. :class:`PrivateRNG` swaps its state in only while the job's own code runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# re-entrant: a job's step may itself run a step of another seeded job
_LOCK = threading.RLock()


class PrivateRNG:
    """A seeded state of torch's global generator, active only inside :meth:`active`
    (one block) or :meth:`run` (each step of a generator). ``deterministic``: torch's
    deterministic algorithms (warn only) are switched on there too, and the caller's
    setting put back after each step; switched on for a trainer's whole life, the
    process-wide flag stayed on between its steps, and two trainers stepped in turn left
    it on for good."""

    def __init__(self, seed: int, deterministic: bool = False) -> None:
        self.deterministic = deterministic
        with _LOCK:
            saved = torch.get_rng_state()
            try:
                torch.manual_seed(int(seed))
                self._state = torch.get_rng_state()
            finally:
                torch.set_rng_state(saved)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with _LOCK:
            saved = torch.get_rng_state()
            flags = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
            torch.set_rng_state(self._state)
            if self.deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                yield
            finally:
                self._state = torch.get_rng_state()
                torch.set_rng_state(saved)
                if self.deterministic:
                    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])

    def run(self, job: Generator[Any, Any, T]) -> Generator[Any, Any, T]:
        """``job`` with this state active during each of its steps (not between them);
        returns what ``job`` returns."""
        try:
            sent = None
            while True:
                with self.active():
                    try:
                        item = job.send(sent)
                    except StopIteration as stop:
                        return stop.value
                sent = yield item
        finally:
            job.close()  # cancelled or failed: the job's own clean-up runs now

"""Errors the core raises for bad input.

Every message is one line that names the offending file (when there is one) and the
reason, so the CLI can print it to stderr and napari can show it as a notification.
"""

from __future__ import annotations

from pathlib import Path


class MedsegInputError(ValueError):
    """Input the core cannot use: unreadable file, wrong dimensions, RGB, NaN-only, ..."""

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = reason
        self.path = None if path is None else Path(path)
        super().__init__(reason if path is None else f"{Path(path).name}: {reason}")

"""Small helpers for the messages the core, the CLI and the widgets show."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: '1 slice', '0 slices', '3 slices'."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"

"""Small helpers for the messages the core, the CLI and the widgets show."""

from __future__ import annotations

from typing import Any


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: '1 slice', '0 slices', '3 slices'."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def slice_ranges(indices) -> str:
    """[3, 4, 5, 9] → "3–5, 9": slice lists as a radiologist reads them."""
    runs: list[list[int]] = []
    for z in sorted(int(i) for i in indices):
        if runs and z == runs[-1][1] + 1:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)


def brief_numbers(value: Any, longest: int = 8, hint: str = "") -> Any:
    """A long list of numbers (a series' slice spacings or instance numbers: one per
    slice) summed up for a text report, ``value`` itself otherwise: 199 spacings made
    one line of 1,014 characters. Empty entries (None: a gap) are counted apart.
    ``hint``: where the whole list is, e.g. "; --json lists them"."""
    if not isinstance(value, (list, tuple)) or len(value) <= longest:
        return value
    numbers = [v for v in value if v is not None]
    if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                              for v in numbers):
        return value
    gaps = len(value) - len(numbers)
    none = f", {gaps} none" if gaps else ""
    low, high = min(numbers), max(numbers)
    if low == high:
        return f"{low:g} (× {len(numbers)}{none})"
    steps = [b - a for a, b in zip(numbers, numbers[1:])]
    if all(d > 0 for d in steps) or all(d < 0 for d in steps):
        # in order, first to last: which way a series' images are numbered shows
        return f"{numbers[0]:g} → {numbers[-1]:g} ({len(value)} values{none}{hint})"
    return f"{low:g} .. {high:g} ({len(value)} values{none}{hint})"

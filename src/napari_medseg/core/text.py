"""Small helpers for the messages the core, the CLI and the widgets show."""

from __future__ import annotations


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

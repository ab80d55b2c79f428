"""How much memory a process may still take: refuse work that would not fit before
allocating it (a run that swaps the machine to a halt loses the user's session)."""

from __future__ import annotations

from .errors import MedsegInputError


def _read_number(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _reclaimable(stat_path: str, key: str) -> int:
    """Page cache the kernel frees on demand (inactive file pages), from a cgroup's
    memory.stat: a container that has just read a DICOM series is charged for it."""
    try:
        with open(stat_path, encoding="ascii") as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


#: where the kernel says how much memory is free, and a cgroup's limit, use and
#: reclaimable page cache (v2, then v1)
MEMINFO = "/proc/meminfo"
CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
     "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def available_memory_bytes() -> int | None:
    """What the kernel says a process may still allocate (MemAvailable), capped by a
    cgroup memory limit (v2, or v1) less what the group uses beyond reclaimable page
    cache; None where nothing is known (not Linux)."""
    available = None
    try:
        with open(MEMINFO, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    for limit_path, used_path, stat_path, key in CGROUP_MEMORY:
        limit, used = _read_number(limit_path), _read_number(used_path)
        # v1 reports "no limit" as a page-rounded 2**63: anything beyond RAM is none
        if limit is None or used is None or available is None or limit >= 1 << 60:
            continue
        used = max(0, used - _reclaimable(stat_path, key))
        available = min(available, max(0, limit - used))
        break
    return available


def require_memory(need: float, what: str, advice: str) -> None:
    """MedsegInputError when ``need`` bytes exceed what :func:`available_memory_bytes`
    says is free (nothing when that is unknown)."""
    free = available_memory_bytes()
    if free is not None and need > free:
        gb = 1024 ** 3
        raise MedsegInputError(f"{what} needs about {need / gb:.1f} GB of memory and "
                               f"{free / gb:.1f} GB are free: {advice}")

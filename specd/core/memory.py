"""A process's resident memory, for status reports and the benchmark."""

from __future__ import annotations

from pathlib import Path


def resident_mb(pid: int | str = "self") -> float:
    """The process's resident memory (VmRSS), MB; 0 where it cannot be read (not Linux, or gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0

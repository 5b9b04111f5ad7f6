"""A process's resident memory, for status reports and the benchmark."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path


def resident_mb(pid: int | str = "self", peak: bool = False) -> float:
    """The process's resident memory (VmRSS; with `peak`, the most it has held: VmHWM), MB; 0 where it cannot be
    read (not Linux, or gone)."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the system, where the C library can (glibc's malloc_trim).
    Freed blocks otherwise stay in the heap: after a burst of concurrent sessions a worker went on holding
    about 700 MB more than it used (docs/weights.md)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

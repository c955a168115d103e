"""Handing freed heap memory back to the OS in a long-running process (glibc's `malloc_trim`).

A serving process allocates and frees buffers of many sizes (every batch shape differs). glibc keeps
freed memory in its arenas for reuse, so the resident size creeps up over hours although little is
live. `malloc_trim(0)` releases the free pages of every arena. It costs a few milliseconds, so the
batcher calls it only when its queue is empty, at most once per `interval_s`. Elsewhere than glibc
(musl, macOS) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 10.0


def _load_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def trim_due(last: float | None, now: float, interval_s: float, idle: bool) -> bool:
    """Whether to trim now: only when idle, and not more often than every `interval_s`. Pure."""
    return idle and (last is None or now - last >= interval_s)


@dataclass
class HeapTrimmer:
    interval_s: float = TRIM_INTERVAL_S
    last: float | None = None
    trims: int = 0

    def maybe_trim(self, now: float, idle: bool) -> bool:
        if _TRIM is None or not trim_due(self.last, now, self.interval_s, idle):
            return False
        self.last = now
        _TRIM(0)
        self.trims += 1
        return True

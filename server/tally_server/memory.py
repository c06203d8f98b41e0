"""Giving freed memory back to the operating system, in one place.

CPython frees a call's objects as soon as the call ends, but glibc's allocator keeps the
pages it got for them: after hostile callers were cancelled (stalled streams of the largest
events, concurrent batches of the largest message) a server kept 190-210 MB it no longer
used. `malloc_trim` returns the free pages; it costs a few milliseconds on a heap of a few
hundred MB, so the server calls it every TRIM_SECONDS, and only after its memory grew.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import resource
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_SECONDS = 5.0
_PAGE_BYTES = resource.getpagesize()


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim  # glibc only
        return trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


class Trimmer:
    """Trims after the resident memory grew by more than `growth_bytes` since the last trim."""

    def __init__(self, growth_bytes: int = 32 * 1024 * 1024) -> None:
        self.growth_bytes = growth_bytes
        self.baseline = resident_bytes()

    def tick(self) -> None:
        if _TRIM is None:
            return
        current = resident_bytes()
        if current - self.baseline < self.growth_bytes:
            self.baseline = min(self.baseline, current)
            return
        started = time.perf_counter()
        # Refused calls' exceptions hold their frames, and so their requests, in reference
        # cycles, which the tuned collector (app.tune_garbage_collector) reaches rarely.
        gc.collect()
        _TRIM(0)
        self.baseline = resident_bytes()
        log.debug("collected and trimmed in %.1f ms", (time.perf_counter() - started) * 1000)
        log.debug("gave back %.0f MB of freed memory", (current - self.baseline) / 2**20)

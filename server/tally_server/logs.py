"""Logging that stays readable when one fault repeats: the first occurrence of a message is
logged at once, its repeats within the interval are counted and logged as one line when
the interval ends. A five-second database outage during a load is two lines, not one per
event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

REPEAT_INTERVAL_SECONDS = 10.0
_MAX_MESSAGES = 256  # distinct messages counted at once: bounded memory whatever the faults say


class _Counted:
    __slots__ = ("args", "level", "message", "repeats", "since")

    def __init__(self, level: int, message: str, args: tuple[object, ...], since: float) -> None:
        self.level, self.message, self.args, self.since, self.repeats = level, message, args, since, 0


class RepeatedLog:
    """One logger's repeated messages, counted per (level, message and arguments)."""

    def __init__(self, logger: logging.Logger, interval: float = REPEAT_INTERVAL_SECONDS) -> None:
        self.logger = logger
        self.interval = interval
        self._counting: OrderedDict[tuple[int, str], _Counted] = OrderedDict()

    def log(self, level: int, message: str, *args: object) -> None:
        # Keyed by the text as it would be logged: the arguments may be unhashable (an error).
        key = (level, message % args if args else message)
        now = time.monotonic()
        counted = self._counting.get(key)
        if counted is not None and now - counted.since < self.interval:
            counted.repeats += 1
            return
        if counted is not None:
            self._report(key)
        self.logger.log(level, message, *args)
        counted = self._counting[key] = _Counted(level, message, args, now)
        while len(self._counting) > _MAX_MESSAGES:
            self._report(next(iter(self._counting)))
        # Without an event loop the count is said at the next occurrence.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_later(self.interval, self._report, key, counted)

    def error(self, message: str, *args: object) -> None:
        self.log(logging.ERROR, message, *args)

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def _report(self, key: tuple[int, str], only: _Counted | None = None) -> None:
        """Says how often the message repeated since it was logged, and forgets it (`only`:
        if it is still that count, not a newer one of the same message)."""
        counted = self._counting.get(key)
        if counted is None or (only is not None and counted is not only):
            return
        del self._counting[key]
        if counted.repeats:
            seconds = time.monotonic() - counted.since
            self.logger.log(
                counted.level,
                counted.message + " (repeated %d more times in %.1f s)",
                *counted.args,
                counted.repeats,
                seconds,
            )

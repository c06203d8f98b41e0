"""Server-sent events, split as they arrive: an event may come across several reads, and a
read may hold several. Each event keeps its raw bytes, so that what is forwarded is what
the provider sent."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# An event ends at a blank line, whichever line ending the provider uses.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass
class Event:
    raw: bytes  # as received, with its blank line
    name: str  # the `event:` field; "" when absent
    data: str  # the `data:` lines joined; "" for a comment (a heartbeat)

    def json(self) -> Any:
        """The data as JSON; None when it is not (`[DONE]`, a comment, a broken line)."""
        if not self.data or self.data[0] not in "{[":
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None


def parse(raw: bytes) -> Event:
    name, data = "", []
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return Event(raw, name, "\n".join(data))


class Splitter:
    """Takes the bytes of a stream as they come and gives its whole events. `limit` bounds
    the bytes of one event held while incomplete: past it, `overflowed` is set and the
    held bytes are given back raw (the caller forwards them, reading no more of the stream)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = b""
        self.overflowed = False

    def feed(self, data: bytes) -> list[Event]:
        if self.overflowed:
            return [Event(data, "", "")]
        buffer = self._buffer + data if self._buffer else data
        events = []
        start = 0
        # Only the new bytes (and the 3 before them, a separator may straddle reads) are searched.
        for match in _EVENT_END.finditer(buffer, max(0, len(self._buffer) - 3)):
            if match.start() < start:
                continue
            events.append(parse(buffer[start : match.end()]))
            start = match.end()
        self._buffer = buffer[start:]
        if len(self._buffer) > self.limit:
            self.overflowed = True
            events.append(Event(self._buffer, "", ""))
            self._buffer = b""
        return events

    def rest(self) -> bytes:
        """What came after the last whole event (a stream cut mid-event)."""
        rest, self._buffer = self._buffer, b""
        return rest

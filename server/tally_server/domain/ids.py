"""Server-generated ids: UUIDv7 (RFC 9562), time-ordered so that inserts append to the index.

Written here rather than taken from the uuid6 package, whose uuid7() moves its
timestamp one millisecond ahead for every id made within the same millisecond:
at ingest rates that puts ids seconds into the future. Here the 12 bits after the
version count up within a millisecond instead (RFC 9562, method 1), which keeps
ids in order and their time true. Python 3.14's uuid.uuid7() does the same.
"""

from __future__ import annotations

import os
import random
import time
import uuid

_random = random.Random()  # seeded from os.urandom; ids need uniqueness, not secrecy
os.register_at_fork(after_in_child=_random.seed)
_last_ms = 0
_sequence = 0


def uuid7() -> uuid.UUID:
    global _last_ms, _sequence
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _last_ms, _sequence = ms, _random.getrandbits(10)  # room to count up within the ms
    else:
        _sequence += 1
        if _sequence > 0xFFF:  # more than ~3,000 ids in one ms: borrow the next ms
            _last_ms, _sequence = _last_ms + 1, 0
        ms = _last_ms
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | _sequence << 64 | 0b10 << 62 | _random.getrandbits(62)
    return uuid.UUID(int=value)

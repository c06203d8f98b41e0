"""Retention and erasure: deleting raw events while what ingest kept of them stays.

Every statistic, rollup, experience total and limit figure is kept at ingest, in the
transaction that stores the events, so deleting events changes none of them. Deletions
run in batches of BATCH events, each its own short write transaction: on SQLite the
writer waits for one batch at most, never for the whole prune.

On PostgreSQL the events are partitioned by week (migration 0028, storage.partitions): a
prune drops every week wholly before its cutoff first, at once whatever it holds, and then
deletes the rest before the cutoff row by row. The server makes the coming weeks ahead.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..domain.errors import StorageUnavailable, Violations
from ..domain.limits import ScopeKind
from ..domain.models import now_us
from ..domain.rollups import DAY_US, HOUR_US
from ..domain.validation import check_text
from ..storage import (
    events as stored_events,
    limits as stored_limits,
    partitions,
    rollups as stored_rollups,
)
from ..storage.db import Database

log = logging.getLogger("tally.retention")

BATCH = 2_000  # events per transaction
DEFAULT_MAX_EVENTS = 10_000  # events per call, when the caller names none
MAX_EVENTS = 100_000


DROP_ATTEMPTS = 3  # a week's drop waits partitions.LOCK_TIMEOUT for the table, this many times


@dataclass(frozen=True)
class Pruned:
    deleted: int  # whole weeks' events and those deleted row by row
    more: bool  # events before the cutoff remain
    before_us: int  # the cutoff applied (a whole hour)
    weeks_dropped: tuple[str, ...] = ()  # PostgreSQL's partitions dropped whole


@dataclass(frozen=True)
class Erased:
    deleted: int
    more: bool  # events of the user remain
    moved_rows: int
    deleted_limits: tuple[str, ...]


def _max_events(v: Violations, max_events: int) -> int:
    if not 0 <= max_events <= MAX_EVENTS:
        v.add("max_events", f"must be 1 to {MAX_EVENTS:,}, or 0 for {DEFAULT_MAX_EVENTS:,}, got {max_events}")
    return max_events or DEFAULT_MAX_EVENTS


class Retention:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def prune(self, before_us: int | None, max_events: int = 0) -> Pruned:
        """Deletes the events before `before_us` (taken down to a whole hour, so that an
        hour's events are all kept or all gone): on PostgreSQL the weeks wholly before it at
        once, then up to `max_events` more row by row, the oldest first."""
        v = Violations()
        count = _max_events(v, max_events)
        if before_us is None:
            v.add("before_time", "is required: the events before it are deleted")
        v.raise_if_any()
        assert before_us is not None
        before = before_us - before_us % HOUR_US
        in_weeks, dropped = await self._drop_weeks(before)
        deleted = 0
        while deleted < count:
            async with self.db.write() as conn:
                ids = await stored_events.oldest_before(conn, before, min(BATCH, count - deleted))
                deleted += await stored_events.delete_events(conn, ids)
            if not ids:
                return Pruned(in_weeks + deleted, False, before, dropped)
            await asyncio.sleep(0)  # the writer's turn between batches
        async with self.db.read() as conn:
            more = bool(await stored_events.oldest_before(conn, before, 1))
        return Pruned(in_weeks + deleted, more, before, dropped)

    async def _drop_weeks(self, before_us: int) -> tuple[int, tuple[str, ...]]:
        """PostgreSQL: drops the partitions wholly before `before_us`, oldest first; returns
        how many events they held and their names. Each week is detached first (waiting for
        the table's lock at most partitions.LOCK_TIMEOUT, DROP_ATTEMPTS times, before the
        prune answers UNAVAILABLE), then its keys and annotations go with it in a
        transaction of its own. A week detached by a prune that stopped is dropped too."""
        if self.db.is_sqlite:
            return 0, ()
        async with self.db.read() as conn:
            weeks = await partitions.weeks_before(conn, before_us)
        for week in weeks:
            for attempt in range(1, DROP_ATTEMPTS + 1):
                try:
                    async with self.db.write() as conn:
                        await partitions.detach(conn, week)
                    break
                except StorageUnavailable:
                    if attempt == DROP_ATTEMPTS:
                        raise
                    await asyncio.sleep(0.1 * attempt)
        async with self.db.read() as conn:
            names = await partitions.detached(conn)
        held = 0
        for name in names:
            async with self.db.write() as conn:
                count = await partitions.drop_detached(conn, name)
            log.info("retention: dropped the week %s (%d events)", name, count)
            held += count
        return held, tuple(names)

    async def make_weeks(self) -> list[str]:
        """PostgreSQL: makes the partitions of the coming weeks (partitions.WEEKS_AHEAD) and
        of the weeks the default partition holds many events of, each in a transaction of its
        own; returns their names."""
        if self.db.is_sqlite:
            return []
        async with self.db.write() as conn:
            ranges = await partitions.weeks_to_make(conn, now_us())
        made = []
        for start, end in ranges:
            async with self.db.write() as conn:
                week = await partitions.make(conn, start, end)
            if week is not None:
                made.append(week.name)
        return made

    async def prune_older_than(self, days: int) -> int:
        """Deletes every event before the start of the UTC day `days` days ago, in calls of
        DEFAULT_MAX_EVENTS; returns how many. The server's --retention-days runs this."""
        now = now_us()
        before = now - now % DAY_US - days * DAY_US
        deleted = 0
        while True:
            pruned = await self.prune(before)
            deleted += pruned.deleted
            if not pruned.more:
                return deleted

    async def erase_user(self, user_id: str, max_events: int = 0) -> Erased:
        """Deletes up to `max_events` of the user's events; once none is left, moves the
        user's rows of the rollup by user to no user's and deletes the limits scoped to them."""
        v = Violations()
        count = _max_events(v, max_events)
        if not user_id:
            v.add("user_id", "is required")
        check_text(v, "user_id", user_id)
        v.raise_if_any()
        async with self.db.read() as conn:
            ids = await stored_events.of_user(conn, user_id, count + 1)
        more, ids = len(ids) > count, ids[:count]
        deleted = 0
        for start in range(0, len(ids), BATCH):
            async with self.db.write() as conn:
                deleted += await stored_events.delete_events(conn, ids[start : start + BATCH])
            await asyncio.sleep(0)
        if more:
            return Erased(deleted, True, 0, ())
        async with self.db.write() as conn:
            moved = await stored_rollups.anonymize_user(conn, user_id)
            scoped = [
                limit
                for limit in await stored_limits.all_limits(conn)
                if limit.scope.kind == ScopeKind.USER and limit.scope.value == user_id
            ]
            if scoped:
                await stored_limits.bump_revision(conn)
                for limit in scoped:
                    await stored_limits.delete_limit(conn, limit.limit_id)
        return Erased(deleted, False, moved, tuple(sorted(limit.name for limit in scoped)))

"""PostgreSQL's partitions of `events`, one per UTC week (Monday 00:00) of event time
(migration 0028): made ahead by the server, dropped whole by retention. SQLite has none.

A DEFAULT partition takes any event outside the weeks made: an event older than the oldest
week, or newer than the newest if the server has not made its week in time. Making a week
moves the default's events of that week into it (a range partition cannot be attached while
the default holds rows of its range), so no event is ever refused for want of a partition.
The server's hourly pass makes the coming weeks, and a week of its own for each week the
default holds DENSE_WEEK_EVENTS events of (a backfill); sparse old events stay in the
default, and retention deletes them row by row.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain.rollups import DAY_US

WEEK_US = 7 * DAY_US
_MONDAY_US = 4 * DAY_US  # 1970-01-05, the first Monday after the epoch
DEFAULT = "events_default"
WEEKS_AHEAD = 2  # this week's partition and the next two are made ahead
# A week of which the default partition holds this many events (a backfill) gets its own.
DENSE_WEEK_EVENTS = 10_000
# A gap of more weeks than this (a server stopped for months) is made as one partition.
MAX_WEEKS_MADE = 8
# Making or dropping a week waits this long at most for the events table's lock, so that
# calls queued behind it wait no longer; the next hour's pass tries again.
LOCK_TIMEOUT = "1s"
# Any constant: serializes replicas making weeks at once.
_LOCK_ID = 0x7A11F
_BOUND = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")
_NAME = re.compile(r"events_(\d{8}|default)")


@dataclass(frozen=True)
class Week:
    """A partition of events and the event times it holds, [start_us, end_us)."""

    name: str
    start_us: int
    end_us: int


def week_of(time_us: int) -> int:
    """The start of the UTC week (Monday 00:00) holding time_us."""
    return time_us - (time_us - _MONDAY_US) % WEEK_US


def name_of(start_us: int) -> str:
    day = datetime.datetime.fromtimestamp(start_us / 1e6, datetime.UTC)
    return f"events_{day:%Y%m%d}"


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's filter for comparing the schema with tables.metadata: the partitions are
    not in it (they are made as the weeks come)."""
    return not (type_ == "table" and name is not None and _NAME.fullmatch(name))


async def weeks(conn: AsyncConnection) -> list[Week]:
    """The partitions with a range, oldest first (not the default)."""
    rows = await conn.execute(
        sa.text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"
        )
    )
    found = []
    for name, bound in rows:
        if (match := _BOUND.search(bound)) is not None:
            found.append(Week(name, int(match[1]), int(match[2])))
    return sorted(found, key=lambda week: week.start_us)


async def weeks_to_make(conn: AsyncConnection, now_us: int) -> list[tuple[int, int]]:
    """The [start, end) ranges to make, oldest first: from the newest partition to
    WEEKS_AHEAD weeks past now's (a gap of more than MAX_WEEKS_MADE weeks as one range), and
    each week the default partition holds DENSE_WEEK_EVENTS or more events of (a backfill)."""
    existing = await weeks(conn)
    this_week = week_of(now_us)
    end = this_week + (WEEKS_AHEAD + 1) * WEEK_US
    start = existing[-1].end_us if existing else this_week
    ranges = []
    if end - start > MAX_WEEKS_MADE * WEEK_US:
        ranges.append((start, this_week))
        start = this_week
    ranges += [(week, week + WEEK_US) for week in range(start, end, WEEK_US)]
    await conn.execute(sa.text("SET LOCAL statement_timeout = 0"))  # a scan of the default
    dense = await conn.execute(
        sa.text(
            f"SELECT event_time_us - (event_time_us - {_MONDAY_US}) % {WEEK_US} AS week FROM {DEFAULT}"
            " GROUP BY week HAVING COUNT(*) >= :least"
        ),
        {"least": DENSE_WEEK_EVENTS},
    )
    ranges += [(int(week), int(week) + WEEK_US) for (week,) in dense if int(week) < start]
    return sorted(ranges)


async def make(conn: AsyncConnection, start_us: int, end_us: int) -> Week | None:
    """Makes the partition of [start_us, end_us), moving the default's events of it in;
    None if another replica made it first. Replicas take turns (an advisory lock)."""
    await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    await conn.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    await conn.execute(sa.text("SET LOCAL statement_timeout = 0"))  # the move and the attach's scan
    if any(week.start_us < end_us and start_us < week.end_us for week in await weeks(conn)):
        return None
    name = name_of(start_us)
    # With the table's indexes, which the attach adopts: it then holds the default
    # partition's lock (blocking the reads that scan every partition) only while it checks
    # the default, not while it builds the indexes of the events moved in.
    await conn.execute(
        sa.text(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)")
    )
    # The default's events of these weeks move in first: the attach refuses otherwise.
    await conn.execute(
        sa.text(
            f"WITH moved AS (DELETE FROM {DEFAULT} WHERE event_time_us >= :start AND event_time_us < :end"
            f" RETURNING *) INSERT INTO {name} SELECT * FROM moved"
        ),
        {"start": start_us, "end": end_us},
    )
    await conn.execute(
        sa.text(f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ({start_us}) TO ({end_us})")
    )
    return Week(name, start_us, end_us)


async def weeks_before(conn: AsyncConnection, before_us: int) -> list[Week]:
    """The partitions that hold only events before `before_us`, oldest first."""
    return [week for week in await weeks(conn) if week.end_us <= before_us]


async def detach(conn: AsyncConnection, week: Week) -> None:
    """Takes the partition out of `events`, waiting at most LOCK_TIMEOUT for the table's
    lock (a moment: no row is read). From then on its events are gone from every read, and
    an event of its weeks stored after lands in the default partition."""
    await conn.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    await conn.execute(sa.text(f"ALTER TABLE events DETACH PARTITION {week.name}"))


async def detached(conn: AsyncConnection) -> list[str]:
    """Weeks taken out but not yet dropped (a prune stopped between the two)."""
    rows = await conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace"
            " AND NOT c.relispartition AND c.relname ~ '^events_[0-9]{8}$' ORDER BY c.relname"
        )
    )
    return [name for (name,) in rows]


async def drop_detached(conn: AsyncConnection, name: str) -> int:
    """Deletes the idempotency keys and annotations of a detached week's events, then the
    week itself; returns how many events it held. Nothing else reads or writes the table,
    so no lock is waited for but the rows' (no statement timeout: it reads the week)."""
    await conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
    held = int((await conn.execute(sa.text(f"SELECT COUNT(*) FROM {name}"))).scalar_one())
    await conn.execute(
        sa.text(
            f"DELETE FROM event_keys k USING {name} e"
            " WHERE e.idempotency_key IS NOT NULL AND k.idempotency_key = e.idempotency_key AND k.event_id = e.id"
        )
    )
    await conn.execute(sa.text(f"DELETE FROM event_annotations a USING {name} e WHERE a.event_id = e.id"))
    await conn.execute(sa.text(f"DROP TABLE {name}"))
    return held

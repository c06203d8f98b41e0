"""Idempotency keys in a table of their own (event_keys: the key, its event's id and time),
on both engines; on PostgreSQL, events partitioned by week of event time (native declarative
partitioning, no extension), so that retention drops whole weeks instead of deleting rows.

A partitioned table's unique indexes must hold its partition key, so the unique index of the
events' keys (ix_events_idempotency_key) cannot stay on `events`: the writer claims a key in
event_keys first, and inserts the event only if it won it. The events keep their key as a
column (an event is shown with it); event_keys is filled from the events that have one, in
key order, BATCH at a time with progress, before the old index goes.

PostgreSQL: the events table is renamed and attached, as it is, as the partition of the weeks
from its oldest event to the end of this one (no row is copied: attaching reads the table
once to check its times, and its key of (id, event time) is built once); its indexes become
that partition's. A DEFAULT partition takes any event outside the weeks made (an event older
than the oldest week, for one); the server makes each coming week's partition ahead
(storage.partitions). An empty events table (a new database) is dropped instead, and this
week and the next are made.

The downgrade copies the events back into one plain table, BATCH at a time, and the keys'
unique index is rebuilt from them.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None

BATCH = 10_000
DAY_US = 86_400_000_000
WEEK_US = 7 * DAY_US
MONDAY_US = 4 * DAY_US  # 1970-01-05, the first Monday after the epoch
_log = logging.getLogger("tally.migrations")

# The indexes of events besides its primary key and the keys' index (as 0023 and earlier
# left them): each becomes a partitioned index on PostgreSQL.
INDEXES = {
    "ix_events_event_time_us": ("(event_time_us)", ""),
    "ix_events_experience_time": ("(experience_id, event_time_us)", ""),
    "ix_events_not_priced": ("(cost_state, event_time_us, id)", "cost_state != 1"),
    "ix_events_provider_response_id": ("(provider_response_id)", "provider_response_id IS NOT NULL"),
    "ix_events_unpriced_resource": ("(resource, event_time_us)", "price_id IS NULL"),
    "ix_events_user_time": ("(user_id, event_time_us, experience_id, cost_state)", "user_id IS NOT NULL"),
}


def week_of(time_us: int) -> int:
    """The start of the UTC week (Monday 00:00) holding time_us."""
    return time_us - (time_us - MONDAY_US) % WEEK_US


def partition_name(start_us: int) -> str:
    day = datetime.datetime.fromtimestamp(start_us / 1e6, datetime.UTC)
    return f"events_{day:%Y%m%d}"


def _fill_keys(connection: Any) -> None:
    total = int(
        connection.execute(sa.text("SELECT COUNT(*) FROM events WHERE idempotency_key IS NOT NULL")).scalar() or 0
    )
    done, after, started = 0, None, time.monotonic()
    while True:
        since = "" if after is None else " AND idempotency_key > :after"
        batch = (
            "SELECT idempotency_key, id, event_time_us FROM events"
            f" WHERE idempotency_key IS NOT NULL{since} ORDER BY idempotency_key LIMIT {BATCH}"
        )
        rows = connection.execute(sa.text(batch), {} if after is None else {"after": after}).fetchall()
        if not rows:
            return
        connection.execute(
            sa.text("INSERT INTO event_keys (idempotency_key, event_id, event_time_us) VALUES (:k, :i, :t)"),
            [{"k": k, "i": i, "t": t} for k, i, t in rows],
        )
        done, after = done + len(rows), rows[-1][0]
        _log.info("event keys: %d of %d copied, in %.1f s", done, total, time.monotonic() - started)


def _index_sql(name: str, table: str, unique: bool = False) -> str:
    columns, where = INDEXES[name]
    return f"CREATE {'UNIQUE ' if unique else ''}INDEX {name} ON {table} {columns}" + (
        f" WHERE {where}" if where else ""
    )


def _partition_events(connection: Any) -> None:
    now = int(time.time() * 1_000_000)
    oldest, newest = connection.execute(sa.text("SELECT min(event_time_us), max(event_time_us) FROM events")).one()
    this_week = week_of(max(now, newest or now))
    first = week_of(int(oldest)) if oldest is not None else this_week
    stored = partition_name(first)  # the events stored so far, as a partition
    op.execute(f"ALTER TABLE events RENAME TO {stored}")
    op.execute(f"ALTER TABLE {stored} RENAME CONSTRAINT pk_events TO {stored}_id")
    for name in INDEXES:
        op.execute(f"ALTER INDEX {name} RENAME TO {stored}_{name.removeprefix('ix_events_')}")
    op.execute(
        f"CREATE TABLE events (LIKE {stored} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        " PARTITION BY RANGE (event_time_us)"
    )
    op.execute("ALTER TABLE events ADD CONSTRAINT pk_events PRIMARY KEY (id, event_time_us)")
    for name in INDEXES:
        op.execute(_index_sql(name, "events"))
    op.execute("CREATE TABLE events_default PARTITION OF events DEFAULT")
    if oldest is None:
        op.execute(f"DROP TABLE {stored}")
        start = this_week
    else:
        start = this_week + WEEK_US
        _log.info("events: the stored events become the partition %s, to %s", stored, partition_name(start))
        # The partition's key of (id, event time) replaces its key of id before the attach
        # adopts it (a table has one primary key).
        op.execute(f"CREATE UNIQUE INDEX {stored}_pkey ON {stored} (id, event_time_us)")
        op.execute(f"ALTER TABLE {stored} DROP CONSTRAINT {stored}_id")
        op.execute(f"ALTER TABLE events ATTACH PARTITION {stored} FOR VALUES FROM ({first}) TO ({start})")
    for week in range(start, this_week + 2 * WEEK_US, WEEK_US):
        op.execute(
            f"CREATE TABLE {partition_name(week)} PARTITION OF events FOR VALUES FROM ({week}) TO ({week + WEEK_US})"
        )


def upgrade() -> None:
    connection = op.get_bind()
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        op.execute("CLOSE ALL")  # 0013's cursor on events, in an upgrade that ran it (see 0016)
    op.create_table(
        "event_keys",
        sa.Column("idempotency_key", sa.String(300), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("event_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("idempotency_key", name="pk_event_keys"),
        sqlite_with_rowid=False,
    )
    _fill_keys(connection)
    op.drop_index("ix_events_idempotency_key", table_name="events")
    if postgres:
        _partition_events(connection)


def _unpartition_events(connection: Any) -> None:
    op.execute("ALTER TABLE events RENAME TO events_by_week")
    op.execute("ALTER TABLE events_by_week RENAME CONSTRAINT pk_events TO events_by_week_pkey")
    for name in INDEXES:
        op.execute(f"ALTER INDEX {name} RENAME TO {name.replace('ix_events_', 'ix_by_week_')}")
    op.execute("CREATE TABLE events (LIKE events_by_week INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    total = int(connection.execute(sa.text("SELECT COUNT(*) FROM events_by_week")).scalar() or 0)
    done, after, started = 0, None, time.monotonic()
    while True:
        since = "" if after is None else " WHERE event_time_us >= :t AND (event_time_us, id) > (:t, :i)"
        last = connection.execute(
            sa.text(
                f"SELECT event_time_us, id FROM (SELECT event_time_us, id FROM events_by_week{since}"
                f" ORDER BY event_time_us, id LIMIT {BATCH}) b ORDER BY event_time_us DESC, id DESC LIMIT 1"
            ),
            {} if after is None else {"t": after[0], "i": after[1]},
        ).one_or_none()
        if last is None:
            break
        upto = "(event_time_us, id) <= (:lt, :li)" + ("" if after is None else " AND (event_time_us, id) > (:t, :i)")
        connection.execute(
            sa.text(f"INSERT INTO events SELECT * FROM events_by_week WHERE {upto}"),
            {"lt": last[0], "li": last[1], **({} if after is None else {"t": after[0], "i": after[1]})},
        )
        done, after = min(total, done + BATCH), (last[0], last[1])
        _log.info("events: %d of %d copied into one table, in %.1f s", done, total, time.monotonic() - started)
    op.execute("DROP TABLE events_by_week")
    op.execute("ALTER TABLE events ADD CONSTRAINT pk_events PRIMARY KEY (id)")
    for name in INDEXES:
        op.execute(_index_sql(name, "events"))


def downgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":
        _unpartition_events(connection)
    op.create_index(
        "ix_events_idempotency_key",
        "events",
        ["idempotency_key"],
        unique=True,
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_table("event_keys")

"""Rollups kept at ingest: per experience (sums, first and last event, latency histogram)
and per hour, type version and model; built here from the events already stored.

Frozen: this file carries the tables, histogram arithmetic and statements it ran when it
was written, and imports nothing of the server, so that editing today's rollups never
changes what this migration does to a database that upgrades later.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COUNTS = ("event_count", "failed_event_count", "unpriced_event_count")
_MONEY = tuple(
    f"{money}_{part}" for money in ("cost_input", "cost_output", "cost_total") for part in ("dollars", "nanos")
)


def upgrade() -> None:
    with op.batch_alter_table("experiences") as batch:
        for name in (*_COUNTS, *_MONEY, "latency_sum_ms"):
            batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("first_event_time_us", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("last_event_time_us", sa.BigInteger, nullable=True))
    op.create_index(
        "ix_experiences_type_cost", "experiences", ["type_id", "cost_total_dollars", "cost_total_nanos", "id"]
    )
    op.create_index(
        "ix_experiences_type_version_cost",
        "experiences",
        ["type_id", "version", "cost_total_dollars", "cost_total_nanos", "id"],
    )
    op.create_index("ix_experiences_type_events", "experiences", ["type_id", "event_count", "id"])
    op.create_index("ix_experiences_type_first_event", "experiences", ["type_id", "first_event_time_us"])
    op.create_index("ix_events_event_time_us", "events", ["event_time_us"])
    op.create_index("ix_events_experience_time", "events", ["experience_id", "event_time_us", "id"])
    op.drop_index("ix_events_experience_id", table_name="events")
    op.create_table(
        "experience_latencies",
        sa.Column("experience_id", sa.Uuid, nullable=False),
        sa.Column("bucket", sa.SmallInteger, nullable=False),
        sa.Column("event_count", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("experience_id", "bucket", name="pk_experience_latencies"),
    )
    op.create_table(
        "cost_rollups",
        sa.Column("hour_us", sa.BigInteger, nullable=False),
        sa.Column("experience_name", sa.String(64), nullable=False),
        sa.Column("experience_version", sa.Integer, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("resource", sa.String(256), nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in (*_COUNTS, *_MONEY)),
        sa.PrimaryKeyConstraint(
            "hour_us", "experience_name", "experience_version", "category", "resource", name="pk_cost_rollups"
        ),
    )
    key = ("type_id", "version", "day_us")
    op.create_table(
        "type_rollups",
        sa.Column("type_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        *(
            sa.Column(name, sa.BigInteger, nullable=False)
            for name in (
                "experience_count",
                "event_count",
                "unpriced_event_count",
                "cost_total_dollars",
                "cost_total_nanos",
            )
        ),
        sa.PrimaryKeyConstraint(*key, name="pk_type_rollups"),
    )
    op.create_table(
        "type_cost_buckets",
        sa.Column("type_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        sa.Column("bucket", sa.SmallInteger, nullable=False),
        sa.Column("experience_count", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(*key, "bucket", name="pk_type_cost_buckets"),
    )
    _backfill(op.get_bind())


def downgrade() -> None:
    op.drop_table("type_cost_buckets")
    op.drop_table("type_rollups")
    op.create_index("ix_events_experience_id", "events", ["experience_id"])
    op.drop_index("ix_events_experience_time", table_name="events")
    op.drop_table("cost_rollups")
    op.drop_table("experience_latencies")
    op.drop_index("ix_events_event_time_us", table_name="events")
    for name in (
        "ix_experiences_type_first_event",
        "ix_experiences_type_events",
        "ix_experiences_type_version_cost",
        "ix_experiences_type_cost",
    ):
        op.drop_index(name, table_name="experiences")
    with op.batch_alter_table("experiences") as batch:
        for name in (*_COUNTS, *_MONEY, "latency_sum_ms", "first_event_time_us", "last_event_time_us"):
            batch.drop_column(name)


# --- the backfill, as written for 0005 ----------------------------------------------------

_log = logging.getLogger("tally.migrations")

_NANOS_PER_DOLLAR = 1_000_000_000
_HOUR_US = 3600 * 1_000_000
_DAY_US = 24 * _HOUR_US
_PRICED = 1  # tally.v1.CostState.COST_STATE_PRICED
_MONEY_SUMS = ("cost_input", "cost_output", "cost_total")
# Log-scaled histogram buckets, 1% relative error (as DDSketch keeps them).
_LOG_GAMMA = math.log((1 + 0.01) / (1 - 0.01))

_events = sa.table(
    "events",
    sa.column("experience_id", sa.Uuid),
    sa.column("event_time_us", sa.BigInteger),
    sa.column("end_to_end_latency_ms", sa.BigInteger),
    sa.column("http_status_code", sa.Integer),
    sa.column("cost_state", sa.SmallInteger),
    sa.column("category", sa.String),
    sa.column("resource", sa.String),
    *(sa.column(f"{money}_nanos", sa.BigInteger) for money in _MONEY_SUMS),
)
_experiences = sa.table(
    "experiences",
    sa.column("id", sa.Uuid),
    sa.column("type_id", sa.Integer),
    sa.column("version", sa.Integer),
    *(sa.column(name, sa.BigInteger) for name in (*_COUNTS, *_MONEY, "latency_sum_ms")),
    sa.column("first_event_time_us", sa.BigInteger),
    sa.column("last_event_time_us", sa.BigInteger),
)
_experience_types = sa.table("experience_types", sa.column("id", sa.Integer), sa.column("name", sa.String))
_experience_latencies = sa.table(
    "experience_latencies", sa.column("experience_id", sa.Uuid), sa.column("bucket"), sa.column("event_count")
)
_cost_rollups = sa.table(
    "cost_rollups",
    *(sa.column(name) for name in ("hour_us", "experience_name", "experience_version", "category", "resource")),
    *(sa.column(name) for name in (*_COUNTS, *_MONEY)),
)
_type_rollups = sa.table(
    "type_rollups",
    *(sa.column(name) for name in ("type_id", "version", "day_us", "experience_count", "event_count")),
    *(sa.column(name) for name in ("unpriced_event_count", "cost_total_dollars", "cost_total_nanos")),
)
_type_cost_buckets = sa.table(
    "type_cost_buckets", *(sa.column(name) for name in ("type_id", "version", "day_us", "bucket", "experience_count"))
)


def _bucket(value: int) -> int:
    if value <= 0:
        return 0
    return 1 + math.ceil(math.log(value) / _LOG_GAMMA - 1e-9)


def _joined(dollars: Any, nanos: Any) -> int:
    return int(dollars or 0) * _NANOS_PER_DOLLAR + int(nanos or 0)


def _sums_of(row: Any) -> dict[str, int]:
    """The rollup columns of a row of _event_sums, money normalized to dollars and nanos."""
    values = {name: int(getattr(row, name) or 0) for name in _COUNTS}
    for money in _MONEY_SUMS:
        nanos = _joined(getattr(row, f"{money}_dollars"), getattr(row, f"{money}_nanos"))
        values[f"{money}_dollars"], values[f"{money}_nanos"] = divmod(nanos, _NANOS_PER_DOLLAR)
    return values


def _event_sums() -> list[Any]:
    ev = _events
    sums: list[Any] = [
        sa.func.count().label("event_count"),
        sa.func.count().filter(ev.c.http_status_code >= 400).label("failed_event_count"),
        sa.func.count().filter(ev.c.cost_state != _PRICED).label("unpriced_event_count"),
    ]
    for money in _MONEY_SUMS:
        column = ev.c[f"{money}_nanos"]
        sums.append(sa.func.sum(column // _NANOS_PER_DOLLAR).label(f"{money}_dollars"))
        sums.append(sa.func.sum(column % _NANOS_PER_DOLLAR).label(f"{money}_nanos"))
    return sums


def _cost_rollup_rows(conn: sa.Connection) -> Iterable[dict[str, Any]]:
    ev, ex, ty = _events, _experiences, _experience_types
    hour = (ev.c.event_time_us - ev.c.event_time_us % _HOUR_US).label("hour_us")
    name = sa.func.coalesce(ty.c.name, "").label("experience_name")
    version = sa.func.coalesce(ex.c.version, 0).label("experience_version")
    joined = ev.outerjoin(ex, ev.c.experience_id == ex.c.id).outerjoin(ty, ex.c.type_id == ty.c.id)
    select = (
        sa.select(hour, name, version, ev.c.category, ev.c.resource, *_event_sums())
        .select_from(joined)
        .group_by(hour, name, version, ev.c.category, ev.c.resource)
    )
    for row in conn.execute(select):
        keys = {"hour_us": int(row.hour_us), "experience_name": row.experience_name}
        keys.update(experience_version=int(row.experience_version), category=row.category, resource=row.resource)
        yield {**keys, **_sums_of(row)}


def _backfill(conn: sa.Connection) -> None:
    """Builds every rollup from the stored events."""
    started = time.monotonic()
    stored = conn.execute(sa.select(sa.func.count()).select_from(_events)).scalar_one()
    if stored:  # a fresh database has nothing to say
        _log.info("building the rollups from %s stored events (in one transaction)", f"{stored:,}")
    ev, ex = _events, _experiences
    per_experience = [
        {
            "experience": row.experience_id,
            **_sums_of(row),
            "latency_sum_ms": int(row.latency_sum_ms),
            "first_event_time_us": int(row.first_event_time_us),
            "last_event_time_us": int(row.last_event_time_us),
        }
        for row in conn.execute(
            sa.select(
                ev.c.experience_id,
                *_event_sums(),
                sa.func.sum(ev.c.end_to_end_latency_ms).label("latency_sum_ms"),
                sa.func.min(ev.c.event_time_us).label("first_event_time_us"),
                sa.func.max(ev.c.event_time_us).label("last_event_time_us"),
            )
            .where(ev.c.experience_id.is_not(None))
            .group_by(ev.c.experience_id)
        )
    ]
    if per_experience:  # one executemany: a statement per experience took 1.4 ms each on SQLite
        columns = [name for name in per_experience[0] if name != "experience"]
        conn.execute(
            sa.update(ex)
            .where(ex.c.id == sa.bindparam("experience"))
            .values({name: sa.bindparam(name) for name in columns}),
            per_experience,
        )
    buckets: dict[tuple[uuid.UUID, int], int] = {}
    for experience_id, latency, count in conn.execute(
        sa.select(ev.c.experience_id, ev.c.end_to_end_latency_ms, sa.func.count())
        .where(ev.c.experience_id.is_not(None))
        .group_by(ev.c.experience_id, ev.c.end_to_end_latency_ms)
    ):
        key = (experience_id, _bucket(int(latency)))
        buckets[key] = buckets.get(key, 0) + int(count)
    if buckets:
        conn.execute(
            sa.insert(_experience_latencies),
            [{"experience_id": e, "bucket": b, "event_count": n} for (e, b), n in buckets.items()],
        )
    rows = list(_cost_rollup_rows(conn))
    if rows:
        conn.execute(sa.insert(_cost_rollups), rows)
    totals: dict[tuple[int, int, int], list[int]] = {}
    counts: dict[tuple[int, int, int, int], int] = {}
    states = sa.select(
        ex.c.type_id,
        ex.c.version,
        ex.c.event_count,
        ex.c.unpriced_event_count,
        ex.c.cost_total_dollars,
        ex.c.cost_total_nanos,
        ex.c.first_event_time_us,
    ).where(ex.c.event_count > 0)
    for type_id, version, event_count, unpriced, dollars, nanos, first in conn.execute(states):
        cost = _joined(dollars, nanos)
        type_key = (int(type_id), int(version), int(first) - int(first) % _DAY_US)
        sums = totals.setdefault(type_key, [0, 0, 0, 0])
        for i, value in enumerate((1, int(event_count), int(unpriced), cost)):
            sums[i] += value
        bucket_key = (*type_key, _bucket(cost))
        counts[bucket_key] = counts.get(bucket_key, 0) + 1
    if totals:
        conn.execute(
            sa.insert(_type_rollups),
            [
                {
                    "type_id": k[0],
                    "version": k[1],
                    "day_us": k[2],
                    "experience_count": n,
                    "event_count": event_count,
                    "unpriced_event_count": unpriced,
                    "cost_total_dollars": divmod(cost, _NANOS_PER_DOLLAR)[0],
                    "cost_total_nanos": divmod(cost, _NANOS_PER_DOLLAR)[1],
                }
                for k, (n, event_count, unpriced, cost) in totals.items()
            ],
        )
    if counts:
        conn.execute(
            sa.insert(_type_cost_buckets),
            [
                {"type_id": k[0], "version": k[1], "day_us": k[2], "bucket": k[3], "experience_count": n}
                for k, n in counts.items()
            ],
        )
    if stored:
        _log.info("built the rollups of %s events in %.1f s", f"{stored:,}", time.monotonic() - started)

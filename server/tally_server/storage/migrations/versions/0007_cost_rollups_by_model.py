"""The hourly cost rollup keeps the model that priced each event beside the resource sent,
so that a breakdown by model counts a dated snapshot (gpt-4o-2024-08-06) under the price
entry's model (gpt-4o). Rebuilt here from the events already stored. And an index of the
events not fully priced (cost_state != 1, PRICED), newest first, for the dashboard.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_log = logging.getLogger("tally.migrations")

_COUNTS = ("event_count", "failed_event_count", "unpriced_event_count")
_MONEY_SUMS = ("cost_input", "cost_output", "cost_total")
_MONEY = tuple(f"{money}_{part}" for money in _MONEY_SUMS for part in ("dollars", "nanos"))
_KEY = ("hour_us", "experience_name", "experience_version", "category", "resource")
_NANOS_PER_DOLLAR = 1_000_000_000
_HOUR_US = 3600 * 1_000_000
_PRICED = 1  # tally.v1.CostState.COST_STATE_PRICED

_events = sa.table(
    "events",
    sa.column("experience_id", sa.Uuid),
    sa.column("event_time_us", sa.BigInteger),
    sa.column("http_status_code", sa.Integer),
    sa.column("cost_state", sa.SmallInteger),
    sa.column("category", sa.String),
    sa.column("resource", sa.String),
    sa.column("price_resource", sa.String),
    *(sa.column(f"{money}_nanos", sa.BigInteger) for money in _MONEY_SUMS),
)
_experiences = sa.table(
    "experiences", sa.column("id", sa.Uuid), sa.column("type_id", sa.Integer), sa.column("version", sa.Integer)
)
_experience_types = sa.table("experience_types", sa.column("id", sa.Integer), sa.column("name", sa.String))


def _create(with_model: bool) -> None:
    key = (*_KEY, "model") if with_model else _KEY
    op.create_table(
        "cost_rollups",
        sa.Column("hour_us", sa.BigInteger, nullable=False),
        sa.Column("experience_name", sa.String(64), nullable=False),
        sa.Column("experience_version", sa.Integer, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("resource", sa.String(256), nullable=False),
        *([sa.Column("model", sa.String(256), nullable=False)] if with_model else []),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in (*_COUNTS, *_MONEY)),
        sa.PrimaryKeyConstraint(*key, name="pk_cost_rollups"),
    )


def _rows(conn: sa.Connection, with_model: bool) -> Iterable[dict[str, Any]]:
    ev, ex, ty = _events, _experiences, _experience_types
    keys: list[Any] = [
        (ev.c.event_time_us - ev.c.event_time_us % _HOUR_US).label("hour_us"),
        sa.func.coalesce(ty.c.name, "").label("experience_name"),
        sa.func.coalesce(ex.c.version, 0).label("experience_version"),
        ev.c.category,
        ev.c.resource,
    ]
    if with_model:
        keys.append(sa.func.coalesce(ev.c.price_resource, ev.c.resource).label("model"))
    sums: list[Any] = [
        sa.func.count().label("event_count"),
        sa.func.count().filter(ev.c.http_status_code >= 400).label("failed_event_count"),
        sa.func.count().filter(ev.c.cost_state != _PRICED).label("unpriced_event_count"),
    ]
    for money in _MONEY_SUMS:
        column = ev.c[f"{money}_nanos"]
        sums.append(sa.func.sum(column // _NANOS_PER_DOLLAR).label(f"{money}_dollars"))
        sums.append(sa.func.sum(column % _NANOS_PER_DOLLAR).label(f"{money}_nanos"))
    joined = ev.outerjoin(ex, ev.c.experience_id == ex.c.id).outerjoin(ty, ex.c.type_id == ty.c.id)
    for row in conn.execute(sa.select(*keys, *sums).select_from(joined).group_by(*keys)):
        values = {name: getattr(row, name) for name in ("experience_name", "category", "resource")}
        values.update(hour_us=int(row.hour_us), experience_version=int(row.experience_version))
        if with_model:
            values["model"] = row.model
        values.update({name: int(getattr(row, name) or 0) for name in _COUNTS})
        for money in _MONEY_SUMS:
            nanos = int(getattr(row, f"{money}_dollars") or 0) * _NANOS_PER_DOLLAR
            nanos += int(getattr(row, f"{money}_nanos") or 0)
            values[f"{money}_dollars"], values[f"{money}_nanos"] = divmod(nanos, _NANOS_PER_DOLLAR)
        yield values


def _rebuild(with_model: bool) -> None:
    conn = op.get_bind()
    started = time.monotonic()
    op.drop_table("cost_rollups")
    _create(with_model)
    columns = [*_KEY, *(["model"] if with_model else []), *_COUNTS, *_MONEY]
    rows = list(_rows(conn, with_model))
    if rows:
        _log.info("rebuilding the hourly cost rollup by model: %s rows", f"{len(rows):,}")
        conn.execute(sa.insert(sa.table("cost_rollups", *(sa.column(name) for name in columns))), rows)
        _log.info("the hourly cost rollup is rebuilt in %.1f s", time.monotonic() - started)


def upgrade() -> None:
    _rebuild(with_model=True)
    where = sa.text(f"cost_state != {_PRICED}")
    op.create_index(
        "ix_events_not_priced",
        "events",
        ["cost_state", "event_time_us", "id"],
        sqlite_where=where,
        postgresql_where=where,
    )


def downgrade() -> None:
    op.drop_index("ix_events_not_priced", table_name="events")
    _rebuild(with_model=False)

"""Tokens in and out: each event, the experiences and the hourly cost rollup gain the sums
of the events' units, input and output counts over every unit type (the sums kept as whole
billions and the rest: no column overflows however many of the largest events a caller may
send), counted here from the events stored so far and kept by the writer from here on.
Also an index that reads a limit's current periods, the most spent first (a per-experience
limit's busiest runs), and the name of the API key that sent each event from here on (the
cost breakdown by key).

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

HOUR_US = 3_600_000_000
BILLION = 1_000_000_000
COLUMNS = ("input_tokens_billions", "input_tokens_ones", "output_tokens_billions", "output_tokens_ones")
# Events read at a time while counting.
BATCH = 10_000


def _split(tokens_in: int, tokens_out: int) -> dict[str, int]:
    (in_high, in_low), (out_high, out_low) = divmod(tokens_in, BILLION), divmod(tokens_out, BILLION)
    return dict(zip(COLUMNS, (in_high, in_low, out_high, out_low), strict=True))


# Each event's tokens: its units ({unit type: [input, output]}) summed, by each engine's
# JSON functions.
EVENT_TOKENS = {
    "sqlite": "UPDATE events SET"
    " input_tokens = (SELECT COALESCE(SUM(json_extract(value, '$[0]')), 0) FROM json_each(events.units)),"
    " output_tokens = (SELECT COALESCE(SUM(json_extract(value, '$[1]')), 0) FROM json_each(events.units))",
    "postgresql": "UPDATE events SET"
    " input_tokens = (SELECT COALESCE(SUM((value->>0)::bigint), 0) FROM json_each(events.units)),"
    " output_tokens = (SELECT COALESCE(SUM((value->>1)::bigint), 0) FROM json_each(events.units))",
}


def _backfill(connection: sa.Connection) -> None:
    connection.execute(sa.text(EVENT_TOKENS[connection.dialect.name]))
    by_experience: dict[Any, list[int]] = {}
    by_hour: dict[tuple[Any, ...], list[int]] = {}
    rows = connection.execute(
        sa.text(
            "SELECT ev.experience_id, ev.event_time_us, COALESCE(t.name, ''), COALESCE(x.version, 0),"
            " ev.category, ev.resource, COALESCE(ev.price_resource, ev.resource), ev.input_tokens, ev.output_tokens"
            " FROM events ev LEFT JOIN experiences x ON x.id = ev.experience_id"
            " LEFT JOIN experience_types t ON t.id = x.type_id"
            " WHERE ev.input_tokens > 0 OR ev.output_tokens > 0"
        ),
        execution_options={"stream_results": True, "yield_per": BATCH},
    )
    with rows:  # a server-side cursor on PostgreSQL: closed before the tables change
        for experience_id, time_us, name, version, category, resource, model, tokens_in, tokens_out in rows:
            hour = (time_us - time_us % HOUR_US, name, version, category, resource, model)
            for sums in (
                by_hour.setdefault(hour, [0, 0]),
                *([by_experience.setdefault(experience_id, [0, 0])] if experience_id else []),
            ):
                sums[0] += tokens_in
                sums[1] += tokens_out
    setting = ", ".join(f"{column} = :{column}" for column in COLUMNS)
    if by_experience:
        connection.execute(
            sa.text(f"UPDATE experiences SET {setting} WHERE id = :id"),
            [{"id": key, **_split(*sums)} for key, sums in by_experience.items()],
        )
    if by_hour:
        connection.execute(
            sa.text(
                f"UPDATE cost_rollups SET {setting} WHERE hour_us = :hour_us AND experience_name = :name"
                " AND experience_version = :version AND category = :category AND resource = :resource"
                " AND model = :model"
            ),
            [
                {"hour_us": k[0], "name": k[1], "version": k[2], "category": k[3], "resource": k[4], "model": k[5]}
                | _split(*sums)
                for k, sums in by_hour.items()
            ],
        )


def upgrade() -> None:
    for table in ("experiences", "cost_rollups"):
        for column in COLUMNS:
            op.add_column(table, sa.Column(column, sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("events", sa.Column("key_name", sa.String(64), nullable=True))
    for column in ("input_tokens", "output_tokens"):
        op.add_column("events", sa.Column(column, sa.BigInteger, nullable=False, server_default="0"))
    _backfill(op.get_bind())
    op.create_index(
        "ix_limit_spend_busiest", "limit_spend", ["limit_id", "start_us", "spend_dollars", "spend_nanos", "subject"]
    )


def downgrade() -> None:
    op.drop_index("ix_limit_spend_busiest", "limit_spend")
    op.drop_column("events", "key_name")
    op.drop_column("events", "output_tokens")
    op.drop_column("events", "input_tokens")
    for table in ("experiences", "cost_rollups"):
        for column in reversed(COLUMNS):
            op.drop_column(table, column)

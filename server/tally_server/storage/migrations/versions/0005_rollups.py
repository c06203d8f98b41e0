"""Rollups kept at ingest: per experience (sums, first and last event, latency histogram)
and per hour, type version and model; built here from the events already stored.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tally_server.storage import rollups

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
    rollups.backfill(op.get_bind())


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

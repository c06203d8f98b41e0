"""Limits: their definitions and resets, their spend per period, and reservations with
what each holds against which limit.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "limits",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.SmallInteger, nullable=False),
        sa.Column("max_nanos", sa.BigInteger, nullable=False),
        sa.Column("threshold_percent", sa.SmallInteger, nullable=False),
        sa.Column("scope_kind", sa.SmallInteger, nullable=False),
        sa.Column("scope_type", sa.String(64), nullable=False),
        sa.Column("scope_version", sa.Integer, nullable=False),
        sa.Column("per_experience", sa.Boolean, nullable=False),
        sa.Column("scope_value", sa.String(256), nullable=False),
        sa.Column("period", sa.SmallInteger, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limits"),
        sa.UniqueConstraint("name", name="uq_limits_name"),
    )
    op.create_table(
        "limit_resets",
        sa.Column("limit_id", sa.Integer, nullable=False),
        sa.Column("reset_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("limit_id", "reset_time_us", name="pk_limit_resets"),
    )
    revisions = op.create_table(
        "limit_revision",
        sa.Column("id", sa.SmallInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limit_revision"),
    )
    op.bulk_insert(revisions, [{"id": 1, "revision": 0}])
    op.create_table(
        "limit_spend",
        sa.Column("limit_id", sa.Integer, nullable=False),
        sa.Column("subject", sa.String(36), nullable=False),
        sa.Column("start_us", sa.BigInteger, nullable=False),
        sa.Column("spend_dollars", sa.BigInteger, nullable=False),
        sa.Column("spend_nanos", sa.BigInteger, nullable=False),
        sa.Column("event_count", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("limit_id", "subject", "start_us", name="pk_limit_spend"),
    )
    op.create_table(
        "limit_reservations",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("amount_nanos", sa.BigInteger, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("expire_time_us", sa.BigInteger, nullable=False),
        sa.Column("settle_time_us", sa.BigInteger, nullable=True),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limit_reservations"),
    )
    op.create_table(
        "limit_holds",
        sa.Column("reservation_id", sa.Uuid, nullable=False),
        sa.Column("limit_id", sa.Integer, nullable=False),
        sa.Column("subject", sa.String(36), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger, nullable=False),
        sa.Column("expire_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("reservation_id", "limit_id", "subject", name="pk_limit_holds"),
    )
    op.create_index(
        "ix_limit_holds_limit_id_subject_expire_time_us", "limit_holds", ["limit_id", "subject", "expire_time_us"]
    )


def downgrade() -> None:
    op.drop_index("ix_limit_holds_limit_id_subject_expire_time_us", table_name="limit_holds")
    for table in ("limit_holds", "limit_reservations", "limit_spend", "limit_revision", "limit_resets", "limits"):
        op.drop_table(table)

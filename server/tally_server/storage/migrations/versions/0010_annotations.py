"""Annotations of stored events, and the index that finds an event by the provider's
response id.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "event_annotations",
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("event_id", "key", name="pk_event_annotations"),
    )
    op.create_index("ix_events_provider_response_id", "events", ["provider_response_id"])


def downgrade() -> None:
    op.drop_index("ix_events_provider_response_id", "events")
    op.drop_table("event_annotations")

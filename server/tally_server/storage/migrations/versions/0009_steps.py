"""Steps: the step of its run an event names, and what each step of each run cost (kept by
the ingest writer from here on; events stored before name no step).

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: instant on PostgreSQL and SQLite however many events are stored.
    op.add_column("events", sa.Column("step", sa.String(64), nullable=True))
    op.create_table(
        "experience_step_costs",
        sa.Column("experience_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("event_count", sa.BigInteger, nullable=False),
        sa.Column("cost_total_dollars", sa.BigInteger, nullable=False),
        sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("experience_id", "step", name="pk_experience_step_costs"),
        sa.ForeignKeyConstraint(
            ["experience_id"], ["experiences.id"], name="fk_experience_step_costs_experience", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("experience_step_costs")
    op.drop_column("events", "step")

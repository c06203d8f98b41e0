"""Outcomes: what a type's runs are scored on (a JSON list on the type), the latest value
of each outcome per experience, and every change of those values.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: ALTER TABLE ADD COLUMN on both engines (batch mode would rebuild the
    # table on SQLite, which its experiences' foreign keys refuse once runs exist).
    op.add_column("experience_types", sa.Column("outcomes", sa.JSON, nullable=True))
    op.create_table(
        "experience_outcomes",
        sa.Column("experience_id", sa.Uuid, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("record_time_us", sa.BigInteger, nullable=False),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("experience_id", "name", name="pk_experience_outcomes"),
        sa.ForeignKeyConstraint(
            ["experience_id"], ["experiences.id"], name="fk_experience_outcomes_experience", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "experience_outcome_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False, autoincrement=True),
        sa.Column("experience_id", sa.Uuid, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("record_time_us", sa.BigInteger, nullable=False),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_experience_outcome_changes"),
        sa.ForeignKeyConstraint(
            ["experience_id"], ["experiences.id"], name="fk_experience_outcome_changes_experience", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_experience_outcome_changes_experience", "experience_outcome_changes", ["experience_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_experience_outcome_changes_experience", "experience_outcome_changes")
    op.drop_table("experience_outcome_changes")
    op.drop_table("experience_outcomes")
    op.drop_column("experience_types", "outcomes")

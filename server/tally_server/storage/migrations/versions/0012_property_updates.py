"""Who last set each property of an experience and when (kept from here on: properties set
before have no entry).

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experience_property_updates",
        sa.Column("experience_id", sa.Uuid, nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
        sa.Column("key_name", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("experience_id", "key", name="pk_experience_property_updates"),
        sa.ForeignKeyConstraint(
            ["experience_id"], ["experiences.id"], name="fk_experience_property_updates_experience", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("experience_property_updates")

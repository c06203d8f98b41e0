"""Server keys: the key that signs page tokens, shared by every replica of the database.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    keys = op.create_table(
        "server_keys",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_server_keys"),
    )
    # Made here, once per database: every replica reads the same key.
    op.bulk_insert(keys, [{"name": "page_tokens", "value": secrets.token_hex(32)}])


def downgrade() -> None:
    op.drop_table("server_keys")

"""API keys; custom prices record who added and ended them, and can end.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("last_use_time_us", sa.BigInteger, nullable=True),
        sa.Column("revoke_time_us", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("name", name="uq_api_keys_name"),
        sa.UniqueConstraint("secret_hash", name="uq_api_keys_secret_hash"),
    )
    with op.batch_alter_table("custom_prices") as batch:
        # Existing prices: last changed when they were added.
        batch.add_column(sa.Column("update_time_us", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("create_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("end_time_us", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("end_key", sa.String(64), nullable=True))
    op.execute("UPDATE custom_prices SET update_time_us = create_time_us")
    with op.batch_alter_table("custom_prices") as batch:
        batch.alter_column("update_time_us", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("custom_prices") as batch:
        batch.drop_column("end_key")
        batch.drop_column("end_time_us")
        batch.drop_column("create_key")
        batch.drop_column("update_time_us")
    op.drop_table("api_keys")

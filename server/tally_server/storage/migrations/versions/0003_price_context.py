"""Price context: events record theirs and the variant applied; custom prices can be variants.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("price_context", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("price_variant", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("custom_prices") as batch:
        batch.add_column(sa.Column("price_context", sa.JSON(none_as_null=True), nullable=True))
        # Existing prices are no variant: "".
        batch.add_column(sa.Column("price_context_key", sa.String(600), nullable=False, server_default=""))
        batch.drop_constraint("uq_custom_prices_category_resource_effective_time_us", type_="unique")
        batch.create_unique_constraint(
            "uq_custom_prices_resource_time_context",
            ["category", "resource", "effective_time_us", "price_context_key"],
        )
    with op.batch_alter_table("custom_prices") as batch:
        batch.alter_column("price_context_key", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("custom_prices") as batch:
        batch.drop_constraint("uq_custom_prices_resource_time_context", type_="unique")
        batch.create_unique_constraint(
            "uq_custom_prices_category_resource_effective_time_us", ["category", "resource", "effective_time_us"]
        )
        batch.drop_column("price_context_key")
        batch.drop_column("price_context")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("price_variant")
        batch.drop_column("price_context")

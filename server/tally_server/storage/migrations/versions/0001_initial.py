"""Initial schema: experience types and versions, experiences, events, prices.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experience_types",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("update_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_experience_types"),
        sa.UniqueConstraint("name", name="uq_experience_types_name"),
    )
    op.create_table(
        "experience_type_versions",
        sa.Column("type_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("type_id", "version", name="pk_experience_type_versions"),
        sa.ForeignKeyConstraint(
            ["type_id"],
            ["experience_types.id"],
            name="fk_experience_type_versions_type_id_experience_types",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "experiences",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("type_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.Column("properties", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_experiences"),
        sa.ForeignKeyConstraint(["type_id"], ["experience_types.id"], name="fk_experiences_type_id_experience_types"),
    )
    op.create_index("ix_experiences_type_created", "experiences", ["type_id", "create_time_us", "id"])
    op.create_table(
        "events",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("idempotency_key", sa.String(300), nullable=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("experience_id", sa.Uuid, nullable=True),
        sa.Column("experience_created", sa.Boolean, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("resource", sa.String(256), nullable=False),
        sa.Column("units", sa.JSON, nullable=False),
        sa.Column("event_time_us", sa.BigInteger, nullable=False),
        sa.Column("ingest_time_us", sa.BigInteger, nullable=False),
        sa.Column("end_to_end_latency_ms", sa.BigInteger, nullable=False),
        sa.Column("time_to_first_token_ms", sa.BigInteger, nullable=False),
        sa.Column("http_status_code", sa.Integer, nullable=False),
        sa.Column("provider_response_id", sa.String(256), nullable=True),
        sa.Column("user_id", sa.String(256), nullable=True),
        sa.Column("request_tags", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("properties", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("cost_input_nanos", sa.BigInteger, nullable=False),
        sa.Column("cost_output_nanos", sa.BigInteger, nullable=False),
        sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
        sa.Column("cost_state", sa.SmallInteger, nullable=False),
        sa.Column("price_source", sa.SmallInteger, nullable=False),
        sa.Column("price_category", sa.String(128), nullable=True),
        sa.Column("price_resource", sa.String(256), nullable=True),
        sa.Column("price_version", sa.String(128), nullable=True),
        sa.Column("price_effective_time_us", sa.BigInteger, nullable=True),
        sa.Column("unknown_units", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("warnings", sa.JSON(none_as_null=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("idempotency_key", name="uq_events_idempotency_key"),
    )
    op.create_index("ix_events_experience_id", "events", ["experience_id"])
    op.create_table(
        "idempotent_requests",
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("resource_key", sa.String(128), nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("operation", "request_id", name="pk_idempotent_requests"),
    )
    op.create_table(
        "custom_prices",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("resource", sa.String(256), nullable=False),
        sa.Column("effective_time_us", sa.BigInteger, nullable=False),
        sa.Column("unit_prices", sa.JSON, nullable=False),
        sa.Column("create_time_us", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_custom_prices"),
        sa.UniqueConstraint(
            "category", "resource", "effective_time_us", name="uq_custom_prices_category_resource_effective_time_us"
        ),
    )


def downgrade() -> None:
    op.drop_table("custom_prices")
    op.drop_table("idempotent_requests")
    op.drop_index("ix_events_experience_id", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_experiences_type_created", table_name="experiences")
    op.drop_table("experiences")
    op.drop_table("experience_type_versions")
    op.drop_table("experience_types")

"""The price each event was priced with becomes a row of `applied_prices`, which the event
names by id: its source, category, resource, version (a custom price's 36-character id),
effective time and variant were repeated as text in every event row, about 45 bytes each.
Existing events are given the id of their price (on SQLite in batches of rows, with progress
in the log), then the six columns go: on SQLite by copying the events table once (SQLite
cannot drop several columns without rewriting the table for each), on PostgreSQL in place
(the space comes back as rows are rewritten, or at a VACUUM FULL).

The same copy replaces the idempotency keys' unique constraint by a unique index of the
events that have a key: the constraint's index held an entry for every event without one.
The index of provider response ids likewise keeps the events that have one.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_log = logging.getLogger("tally.migrations")

# The events' columns that move, and the applied_prices column each becomes.
MOVED = {
    "price_source": "source",
    "price_category": "category",
    "price_resource": "resource",
    "price_version": "version",
    "price_effective_time_us": "effective_time_us",
    "price_variant": "variant",
}
KEYED: dict[str, Any] = {
    f"{engine}_where": sa.text("idempotency_key IS NOT NULL") for engine in ("sqlite", "postgresql")
}
RESPONDED: dict[str, Any] = {
    f"{engine}_where": sa.text("provider_response_id IS NOT NULL") for engine in ("sqlite", "postgresql")
}
# Rows changed per statement on SQLite.
BATCH = 100_000


def _stored_key(dialect: str, prefix: str = "") -> str:
    """An event's price as the text of its six columns (events of the first schemas may lack
    some: ""), joined by "|": a price of the events, however its variant's JSON was spaced."""
    variant = f"{prefix}price_variant" + ("::text" if dialect == "postgresql" else "")
    return (
        f"CAST({prefix}price_source AS TEXT) || '|' || COALESCE({prefix}price_category, '') || '|'"
        f" || COALESCE({prefix}price_resource, '') || '|' || COALESCE({prefix}price_version, '') || '|'"
        f" || COALESCE(CAST({prefix}price_effective_time_us AS TEXT), '') || '|' || COALESCE({variant}, '')"
    )


def _price_key(source: int, category: str, resource: str, version: str, effective: int | None, variant: str) -> str:
    """What a price is unique by, as storage.applied_prices.key_of writes it: the variant as
    compact JSON of its pairs in key order ("" for none)."""
    pairs = json.dumps(dict(sorted(json.loads(variant).items())), separators=(",", ":")) if variant else ""
    return f"{source}|{category}|{resource}|{version}|{'' if effective is None else effective}|{pairs}"


def upgrade() -> None:
    connection = op.get_bind()
    dialect = connection.dialect.name
    if dialect == "postgresql":
        # 0013 may have left a server-side cursor on events open in this transaction (see 0016).
        op.execute("CLOSE ALL")
    applied = op.create_table(
        "applied_prices",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("price_key", sa.Text, nullable=False),
        sa.Column("source", sa.SmallInteger, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("resource", sa.String(256), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("effective_time_us", sa.BigInteger, nullable=True),
        sa.Column("variant", sa.JSON(none_as_null=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_applied_prices"),
        sa.UniqueConstraint("price_key", name="uq_applied_prices_price_key"),
    )
    started = time.monotonic()
    # The events' distinct prices (a few hundred at most), each made a row once however its
    # variant was spaced, and each one's text as stored mapped to its row for the UPDATE.
    stored = _stored_key(dialect)
    variant_text = "price_variant" if dialect == "sqlite" else "price_variant::text"  # json has no equality
    distinct = connection.exec_driver_sql(
        f"SELECT DISTINCT {stored}, price_source, COALESCE(price_category, ''), COALESCE(price_resource, ''),"
        f" COALESCE(price_version, ''), price_effective_time_us, COALESCE({variant_text}, '')"
        " FROM events WHERE price_source != 0"
    ).all()
    ids: dict[str, int] = {}
    op.create_table(
        "_price_keys_0018",
        sa.Column("stored_key", sa.Text, primary_key=True),
        sa.Column("price_id", sa.Integer, nullable=False),
    )
    mapping = sa.table("_price_keys_0018", sa.column("stored_key", sa.Text), sa.column("price_id", sa.Integer))
    for stored_key, source, category, resource, version, effective, variant in distinct:
        key = _price_key(source, category, resource, version, effective, variant)
        if key not in ids:
            row = {"price_key": key, "source": source, "category": category, "resource": resource}
            row |= {"version": version, "effective_time_us": effective, "variant": json.loads(variant or "null")}
            ids[key] = connection.execute(applied.insert().values(row).returning(applied.c.id)).scalar_one()
        connection.execute(mapping.insert().values(stored_key=stored_key, price_id=ids[key]))
    op.add_column("events", sa.Column("price_id", sa.Integer, nullable=True))
    named = (
        "UPDATE events SET price_id = (SELECT price_id FROM _price_keys_0018"
        f" WHERE stored_key = {_stored_key(dialect, 'events.')}) WHERE price_source != 0"
    )
    if dialect == "sqlite":
        last = connection.exec_driver_sql("SELECT COALESCE(MAX(rowid), 0) FROM events").scalar_one()
        for low in range(0, last, BATCH):
            connection.exec_driver_sql(f"{named} AND rowid > {low} AND rowid <= {low + BATCH}")
            if last > BATCH:
                _log.info("events: %s of %s rows given their price's id", f"{min(low + BATCH, last):,}", f"{last:,}")
    else:
        connection.exec_driver_sql(named)
    op.drop_table("_price_keys_0018")
    with op.batch_alter_table("events") as batch:  # SQLite: one copy of the table; PostgreSQL: in place
        for column in MOVED:
            batch.drop_column(column)
        batch.drop_constraint("uq_events_idempotency_key", type_="unique")
    # The idempotency keys' unique index holds the events that have one: the constraint's
    # index held an entry for each event without a key too (most events).
    op.create_index("ix_events_idempotency_key", "events", ["idempotency_key"], unique=True, **KEYED)
    # Likewise the provider's response ids (annotations find events by them).
    op.drop_index("ix_events_provider_response_id", "events")
    op.create_index("ix_events_provider_response_id", "events", ["provider_response_id"], **RESPONDED)
    _log.info("events named their %s applied prices in %.1f s", len(ids), time.monotonic() - started)


def downgrade() -> None:
    connection = op.get_bind()
    op.drop_index("ix_events_idempotency_key", "events")
    op.drop_index("ix_events_provider_response_id", "events")
    op.create_index("ix_events_provider_response_id", "events", ["provider_response_id"])
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("price_source", sa.SmallInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("price_category", sa.String(128), nullable=True))
        batch.add_column(sa.Column("price_resource", sa.String(256), nullable=True))
        batch.add_column(sa.Column("price_version", sa.String(128), nullable=True))
        batch.add_column(sa.Column("price_effective_time_us", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("price_variant", sa.JSON(none_as_null=True), nullable=True))
    setting = ", ".join(
        f"{old} = (SELECT a.{new} FROM applied_prices a WHERE a.id = events.price_id)" for old, new in MOVED.items()
    )
    connection.exec_driver_sql(f"UPDATE events SET {setting} WHERE price_id IS NOT NULL")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("price_id")
        batch.create_unique_constraint("uq_events_idempotency_key", ["idempotency_key"])
    op.drop_table("applied_prices")

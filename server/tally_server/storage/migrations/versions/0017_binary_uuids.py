"""SQLite: every UUID is stored as its 16 bytes instead of 32 hex characters. The ids were a
fifth of an event's bytes on SQLite (the events' id and experience id, each also in an
index), and every experience's id is copied into four indexes. PostgreSQL already stores
`uuid` in 16 bytes: unchanged.

The values change in place, in batches of rows with progress in the log; the tables keep
their declared CHAR(32) type (SQLite keeps a blob as it is given, and re-typing a column
means copying the table, which for `experiences` would cascade-delete its outcomes and
steps). Foreign keys are checked at the commit, when parents and children both changed.
The file keeps its size until a VACUUM gives the freed pages back.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_log = logging.getLogger("tally.migrations")

# Each table that holds UUIDs, and its UUID columns.
UUID_COLUMNS = {
    "experiences": ("id",),
    "experience_latencies": ("experience_id",),
    "experience_outcomes": ("experience_id",),
    "experience_outcome_changes": ("experience_id",),
    "experience_step_costs": ("experience_id",),
    "experience_property_updates": ("experience_id",),
    "events": ("id", "experience_id"),
    "event_annotations": ("event_id",),
    "custom_prices": ("id",),
    "limit_reservations": ("id",),
    "limit_holds": ("reservation_id",),
}
# Tables kept WITHOUT ROWID (0015): changed in one statement, not in rowid batches.
WITHOUT_ROWID = ("experience_latencies", "experience_step_costs")
# Rows changed per statement.
BATCH = 100_000


def _convert(connection: sa.Connection, to_bytes: bool) -> None:
    # SQLite 3.40 (Debian 12's) has hex() but not unhex(): the driver lends Python's.
    connection.connection.dbapi_connection.create_function(  # type: ignore[union-attr]
        "tally_unhex", 1, lambda text: None if text is None else bytes.fromhex(text), deterministic=True
    )
    # A parent's id and its children's change in separate statements: checked at the commit.
    connection.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
    source, target = ("text", "tally_unhex({})") if to_bytes else ("blob", "lower(hex({}))")
    for table, columns in UUID_COLUMNS.items():
        # Each column only where it holds the old form: hex(NULL) is '', not NULL, and a row
        # may hold an id to change beside a NULL (an event of no run).
        setting = ", ".join(
            f"{c} = CASE WHEN typeof({c}) = '{source}' THEN {target.format(c)} ELSE {c} END" for c in columns
        )
        pending = " OR ".join(f"typeof({c}) = '{source}'" for c in columns)
        if table in WITHOUT_ROWID:
            connection.exec_driver_sql(f"UPDATE {table} SET {setting} WHERE {pending}")
            continue
        last = connection.exec_driver_sql(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}").scalar_one()
        started = time.monotonic()
        for low in range(0, last, BATCH):
            connection.exec_driver_sql(
                f"UPDATE {table} SET {setting} WHERE rowid > {low} AND rowid <= {low + BATCH} AND ({pending})"
            )
            if last > BATCH:
                _log.info("%s: ids of %s of %s rows converted", table, f"{min(low + BATCH, last):,}", f"{last:,}")
        if last > BATCH:
            _log.info("%s: ids converted in %.1f s", table, time.monotonic() - started)


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "sqlite":
        _convert(connection, to_bytes=True)


def downgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "sqlite":
        _convert(connection, to_bytes=False)

"""An event's units of text alone are stored as JSON null from this revision on: they are
the row's input_tokens and output_tokens (0013), which the server reads them back from
(storage.events.units_of), and most events have no other unit. `{"text":[12000,800]}` took
about 22 bytes of every such row; JSON null takes 4 (the column stays NOT NULL: SQLite would
copy the whole table to drop that).

The upgrade changes no row: the events stored before keep their units as they were (the
server reads both), and go as retention prunes them. Rewriting them took 39 s at 1,000,000
events on PostgreSQL (5.9 s on SQLite, with 0026), in the upgrade's one transaction, and
left a dead version of every row for vacuum: an hour and a table's worth of bloat at a
hundred million events, for about 18 bytes an event. The revision marks that rows may hold
JSON null (a server from before it does not start on the database: Alembic knows no such
revision); the downgrade writes those rows' units out again, 10,000 events at a time with
progress.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None

BATCH = 10_000  # events a statement rewrites at most
_log = logging.getLogger("tally.migrations")


def _text(connection: Any, column: str) -> str:
    """A JSON column as text (PostgreSQL's json keeps the text it was given)."""
    return f"{column}::text" if connection.dialect.name == "postgresql" else column


def _json(connection: Any, text: str) -> str:
    return f"CAST({text} AS json)" if connection.dialect.name == "postgresql" else text


def _in_batches(connection: Any, set_to: str, where: str, what: str) -> None:
    """Runs UPDATE events SET units = `set_to` WHERE `where` over BATCH events at a time,
    in id order, with a progress line after each."""
    total = int(connection.execute(sa.text("SELECT COUNT(*) FROM events")).scalar() or 0)
    done, changed, started, after = 0, 0, time.monotonic(), None
    while True:
        since = "" if after is None else " WHERE id > :after"
        parameters: dict[str, Any] = {} if after is None else {"after": after}
        # The batch's last id (PostgreSQL has no max() of uuid).
        ids = f"SELECT id FROM events{since} ORDER BY id LIMIT {BATCH}"
        last = connection.execute(sa.text(f"SELECT id FROM ({ids}) b ORDER BY id DESC LIMIT 1"), parameters).scalar()
        if last is None:
            return
        batch = f"id <= :last{' AND id > :after' if since else ''}"
        result = connection.execute(
            sa.text(f"UPDATE events SET units = {set_to} WHERE {batch} AND {where}"), {**parameters, "last": last}
        )
        changed += int(result.rowcount or 0)
        done, after = min(total, done + BATCH), last
        seconds = time.monotonic() - started
        _log.info("%s: %d of %d events read, %d rewritten, in %.1f s", what, done, total, changed, seconds)


def upgrade() -> None:
    _log.info("text units: events stored from now on hold units of text alone as JSON null")


def downgrade() -> None:
    connection = op.get_bind()
    written = "'{\"text\":[' || input_tokens || ',' || output_tokens || ']}'"
    _in_batches(connection, _json(connection, written), f"{_text(connection, 'units')} = 'null'", "text units back")

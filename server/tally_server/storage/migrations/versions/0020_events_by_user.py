"""The events of a user in time order, of the events that name one: the dashboard's reads of
one user (its request log, its runs, its unpriced reasons, its runs counted in the summary)
and an erasure read that user's events instead of scanning every event of the window (or of
the database). An entry is the user's id, the event time and the row's reference: about 25
bytes per event on SQLite.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

NAME = "ix_events_user_time"
_log = logging.getLogger("tally.migrations")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CLOSE ALL")  # 0013's cursor on events, in an upgrade that ran it (see 0016)
    started = time.monotonic()
    _log.info("events: indexing them by user (one pass over the table)")
    named = sa.text("user_id IS NOT NULL")
    op.create_index(NAME, "events", ["user_id", "event_time_us"], sqlite_where=named, postgresql_where=named)
    _log.info("events: indexed by user in %.1f s", time.monotonic() - started)


def downgrade() -> None:
    op.drop_index(NAME, "events")

"""An experience's events in time order without the event id in the index: ties of event
time (rare) are put in id order by the sort that follows the index scan (SQLite's "temp
b-tree for the right part of ORDER BY", PostgreSQL's incremental sort), and the index no
longer carries a second copy of every id: 33 bytes per event on SQLite (ids are text), 16 on
PostgreSQL.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

NAME = "ix_events_experience_time"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # 0013 reads the events through a server-side cursor (asyncpg keeps its portal open
        # until the transaction ends), and PostgreSQL refuses to index a table that an open
        # cursor of the session reads: close them, in an upgrade that ran 0013 just before.
        op.execute("CLOSE ALL")
    op.drop_index(NAME, "events")
    op.create_index(NAME, "events", ["experience_id", "event_time_us"])


def downgrade() -> None:
    op.drop_index(NAME, "events")
    op.create_index(NAME, "events", ["experience_id", "event_time_us", "id"])

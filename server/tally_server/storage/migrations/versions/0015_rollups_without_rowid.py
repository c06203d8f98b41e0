"""SQLite: the rollup tables that are only ever read by their key keep their rows once, in
key order (WITHOUT ROWID), instead of a table of rows and an index of their keys beside it:
the latency histograms, the hourly cost rollup and the step costs took 87, 29 and 31 bytes
per event at 100,000 events, half of it the index. Each table is copied once (SQLite cannot
change a table in place); PostgreSQL is unchanged.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TABLES = ("experience_latencies", "cost_rollups", "experience_step_costs")


def _rebuild(with_rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_with_rowid": with_rowid}):
            pass


def upgrade() -> None:
    _rebuild(with_rowid=False)


def downgrade() -> None:
    _rebuild(with_rowid=True)

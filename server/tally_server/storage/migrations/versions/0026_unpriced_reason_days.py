"""Why events were not (fully) priced, counted per user, request tag or API key name, UTC day,
category, model, cost state and reason (unpriced_reason_days), as the writer counts them
from now on (the server's domain.rollups.attribute_rollups_of): the dashboard's reasons of a
user or a tag read its rows instead of the user's or tag's newest 1,000 such events, which
were ten times as many at ten times the history.

Counted from the events not priced (ix_events_not_priced), 10,000 at a time in index order,
with progress; the downgrade drops the table.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

BATCH = 10_000  # events a read takes
REASON_CHARS = 300
USER, TAG, KEY = 1, 2, 5
DAY_US = 86_400_000_000
KEY_COLUMNS = ("dimension", "value", "day_us", "category", "model", "cost_state", "reason")
_log = logging.getLogger("tally.migrations")


def _json(value: Any) -> Any:
    """A JSON column read by a text query: text on SQLite, decoded or text on PostgreSQL."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":
        op.execute("CLOSE ALL")  # 0013's cursor on events, in an upgrade that ran it (see 0016)
    op.create_table(
        "unpriced_reason_days",
        sa.Column("dimension", sa.SmallInteger, nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("cost_state", sa.SmallInteger, nullable=False),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.Column("event_count", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(*KEY_COLUMNS, name="pk_unpriced_reason_days"),
        sqlite_with_rowid=False,  # SQLite keeps the rows once, in key order
    )
    columns = ", ".join(KEY_COLUMNS)
    add = sa.text(
        f"INSERT INTO unpriced_reason_days ({columns}, event_count)"
        f" VALUES ({', '.join(':' + c for c in KEY_COLUMNS)}, :event_count)"
        f" ON CONFLICT ({columns}) DO UPDATE"
        " SET event_count = unpriced_reason_days.event_count + excluded.event_count"
    )
    total = int(connection.execute(sa.text("SELECT COUNT(*) FROM events WHERE cost_state != 1")).scalar() or 0)
    read = (
        "SELECT ev.cost_state, ev.event_time_us, ev.id, ev.user_id, ev.request_tags, ev.key_name, ev.category,"
        " COALESCE(ap.resource, ev.resource), ev.unknown_units"
        " FROM events ev LEFT JOIN applied_prices ap ON ap.id = ev.price_id WHERE ev.cost_state != 1{}"
        f" ORDER BY ev.cost_state, ev.event_time_us, ev.id LIMIT {BATCH}"
    )
    after: dict[str, Any] | None = None
    done, started = 0, time.monotonic()
    while True:
        since = "" if after is None else " AND (ev.cost_state, ev.event_time_us, ev.id) > (:state, :time, :id)"
        rows = list(connection.execute(sa.text(read.format(since)), after or {}))
        if not rows:
            break
        counts: dict[tuple[Any, ...], int] = {}
        for state, time_us, _, user_id, tags, key_name, category, model, units in rows:
            day = int(time_us) - int(time_us) % DAY_US
            # Each tag once (the first place it holds), "" for none; as the writer counts.
            values = [(USER, user_id or ""), *((TAG, tag) for tag in dict.fromkeys(_json(tags) or ()) or ("",))]
            values.append((KEY, key_name or ""))
            reasons = dict.fromkeys(str(unit[3])[:REASON_CHARS] for unit in _json(units) or ())
            for reason in reasons:
                for dimension, value in values:
                    key = (dimension, value, day, category, model, int(state), reason)
                    counts[key] = counts.get(key, 0) + 1
        if counts:
            added = [dict(zip(KEY_COLUMNS, key, strict=True), event_count=n) for key, n in sorted(counts.items())]
            connection.execute(add, added)
        last = rows[-1]
        after = {"state": last[0], "time": last[1], "id": last[2]}
        done += len(rows)
        _log.info("unpriced_reason_days: %d of %d events counted in %.1f s", done, total, time.monotonic() - started)


def downgrade() -> None:
    op.drop_table("unpriced_reason_days")

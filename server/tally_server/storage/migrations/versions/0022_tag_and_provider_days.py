"""Two rollups by user, request tag and API key, per UTC day, and an index:

- attribute_provider_days: events summed per day, user (dimension 1), tag (2) or key name (5),
  type version and category; attribute_model_days (0021) without the model, and summed from
  it here (so it holds what that rollup holds, events pruned since included). The breakdown
  of one of them beside a provider, no model named, reads it: a fifth of the rows where a
  provider has five models.
- tag_attribute_days: each request tag's events per day by user (dimension 1) or API key name
  (5) and type version: an event counts once under each of its tags (once under a tag it
  repeats; none without tags), counted from the events stored so far (one INSERT ... SELECT
  of the events per dimension). The breakdown of a tag's events by user or key, or of one
  user's events of a tag, reads it for a window's whole days instead of every event of the
  tag.

The writer keeps both from here on. And an index of the events no price priced, by resource
and time (ix_events_unpriced_resource): the events of a model that no price has (a misspelt
one) are read from it, newest first, instead of from every event of the window.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

COUNTS = ("event_count", "failed_event_count", "unpriced_event_count")
# Each sum as whole billions and the rest, and the event column it sums.
SPLIT = {
    "cost_input": "cost_input_nanos",
    "cost_output": "cost_output_nanos",
    "cost_total": "cost_total_nanos",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
}
HIGH_LOW = {
    name: ((f"{name}_billions", f"{name}_ones") if "tokens" in name else (f"{name}_dollars", f"{name}_nanos"))
    for name in SPLIT
}
B = 1_000_000_000
KEY = ("tag", "dimension", "day_us", "value", "experience_name", "experience_version")
PROVIDER_KEY = ("dimension", "day_us", "value", "experience_name", "experience_version", "category")
_log = logging.getLogger("tally.migrations")


def _carried(high: str, low: str) -> list[str]:
    """A split sum's two columns of a group, with the carry done. Integer arithmetic on both
    engines (SUM of BIGINT is NUMERIC on PostgreSQL: cast back)."""
    high, low = f"CAST(SUM({high}) AS BIGINT)", f"CAST(SUM({low}) AS BIGINT)"
    return [f"{high} + {low} / {B}", f"{low} % {B}"]


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":
        op.execute("CLOSE ALL")  # 0013's cursor on events, in an upgrade that ran it (see 0016)
    op.create_table(
        "attribute_provider_days",
        sa.Column("dimension", sa.SmallInteger, nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("experience_name", sa.String(64), nullable=False),
        sa.Column("experience_version", sa.Integer, nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNTS),
        *(sa.Column(c, sa.BigInteger, nullable=False) for pair in HIGH_LOW.values() for c in pair),
        sa.PrimaryKeyConstraint(*PROVIDER_KEY, name="pk_attribute_provider_days"),
        sqlite_with_rowid=False,  # SQLite keeps the rows once, in key order
    )
    split = [column for pair in HIGH_LOW.values() for column in pair]
    started = time.monotonic()
    summed = [f"SUM({name})" for name in COUNTS]
    for high, low in HIGH_LOW.values():
        summed += _carried(high, low)
    connection.execute(
        sa.text(
            f"INSERT INTO attribute_provider_days ({', '.join([*PROVIDER_KEY, *COUNTS, *split])})"
            f" SELECT {', '.join(PROVIDER_KEY)}, {', '.join(summed)}"
            f" FROM attribute_model_days GROUP BY {', '.join(PROVIDER_KEY)}"
        )
    )
    _log.info("attribute_provider_days: summed from attribute_model_days in %.1f s", time.monotonic() - started)
    op.create_table(
        "tag_attribute_days",
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("dimension", sa.SmallInteger, nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("experience_name", sa.String(64), nullable=False),
        sa.Column("experience_version", sa.Integer, nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNTS),
        *(sa.Column(c, sa.BigInteger, nullable=False) for pair in HIGH_LOW.values() for c in pair),
        sa.PrimaryKeyConstraint(*KEY, name="pk_tag_attribute_days"),
        sqlite_with_rowid=False,  # SQLite keeps the rows once, in key order
    )
    columns = ", ".join([*KEY, *COUNTS, *split])
    event_sums = [
        "COUNT(*)",
        "SUM(CASE WHEN ev.http_status_code >= 400 THEN 1 ELSE 0 END)",
        "SUM(CASE WHEN ev.cost_state != 1 THEN 1 ELSE 0 END)",
    ]
    for column in SPLIT.values():
        event_sums += _carried(f"ev.{column} / {B}", f"ev.{column} % {B}")
    joins = " LEFT JOIN experiences x ON x.id = ev.experience_id LEFT JOIN experience_types t ON t.id = x.type_id"
    # Each event once per tag (a tag repeated in its tags once: the first place it holds);
    # an event without tags not at all.
    if connection.dialect.name == "postgresql":
        tags = "json_array_elements_text(ev.request_tags) WITH ORDINALITY AS {}(value, key)"
        joins += f" JOIN LATERAL {tags.format('tag')} ON true"
    else:
        tags = "json_each(ev.request_tags) AS {}"
        joins += f" JOIN {tags.format('tag')} ON 1"
    first = (
        f"NOT EXISTS (SELECT 1 FROM {tags.format('earlier')} WHERE earlier.value = tag.value AND earlier.key < tag.key)"
    )
    day = "ev.event_time_us - ev.event_time_us % 86400000000"
    name, version = "COALESCE(t.name, '')", "COALESCE(x.version, 0)"
    for dimension, value in ((1, "COALESCE(ev.user_id, '')"), (5, "COALESCE(ev.key_name, '')")):
        started = time.monotonic()
        connection.execute(
            sa.text(
                f"INSERT INTO tag_attribute_days ({columns})"
                f" SELECT tag.value, {dimension}, {day}, {value}, {name}, {version}, {', '.join(event_sums)}"
                f" FROM events ev{joins} WHERE ev.request_tags IS NOT NULL AND {first}"
                f" GROUP BY tag.value, {day}, {value}, {name}, {version}"
            )
        )
        _log.info("tag_attribute_days: dimension %d counted in %.1f s", dimension, time.monotonic() - started)

    # The events no price priced, by resource and time: a model no price has is read from it.
    started = time.monotonic()
    op.create_index(
        "ix_events_unpriced_resource",
        "events",
        ["resource", "event_time_us"],
        sqlite_where=sa.text("price_id IS NULL"),
        postgresql_where=sa.text("price_id IS NULL"),
    )
    _log.info("ix_events_unpriced_resource: built in %.1f s", time.monotonic() - started)


def downgrade() -> None:
    op.drop_index("ix_events_unpriced_resource", table_name="events")
    op.drop_table("tag_attribute_days")
    op.drop_table("attribute_provider_days")

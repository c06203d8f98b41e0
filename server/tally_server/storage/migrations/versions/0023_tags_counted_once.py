"""Request tags counted once per event, and the rollup of each tag's events with its events
of no tag:

- tag_attribute_days gets rows of tag "" (events without tags) per day by user (dimension 1)
  and API key name (5), counted from the events stored so far (one INSERT ... SELECT per
  dimension; events pruned before it count there nowhere). With them, one user's events by
  tag (and the events by tag and key) read that rollup for a window's whole days, through a
  new index of its rows by dimension, value (user or key), tag and day.
- ix_events_user_time (0020) is rebuilt with each event's run and cost state after its user
  and time: a user's runs are counted, and its events of a cost state found, from the index.
- An event that repeats a tag now counts once under it in the breakdown by tag (as the filter
  of a tag, a limit of a tag and tag_attribute_days count it; it counted once per place):
  its repeats are taken out of the rollups by tag (attribute_rollups' dimensions 2 and 4,
  attribute_model_days' and attribute_provider_days' dimension 2), read from the stored
  events that repeat a tag (events pruned before it stay counted as they were).

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
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
DAY_US, HOUR_US = 86_400_000_000, 3_600_000_000
TAG_KEY = ("tag", "dimension", "day_us", "value", "experience_name", "experience_version")
_log = logging.getLogger("tally.migrations")


def _carried(high: str, low: str) -> list[str]:
    """A split sum's two columns of a group, with the carry done. Integer arithmetic on both
    engines (SUM of BIGINT is NUMERIC on PostgreSQL: cast back)."""
    high, low = f"CAST(SUM({high}) AS BIGINT)", f"CAST(SUM({low}) AS BIGINT)"
    return [f"{high} + {low} / {B}", f"{low} % {B}"]


def upgrade() -> None:
    connection = op.get_bind()
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        op.execute("CLOSE ALL")  # 0013's cursor on events, in an upgrade that ran it (see 0016)
    split = [column for pair in HIGH_LOW.values() for column in pair]
    event_sums = [
        "COUNT(*)",
        "SUM(CASE WHEN ev.http_status_code >= 400 THEN 1 ELSE 0 END)",
        "SUM(CASE WHEN ev.cost_state != 1 THEN 1 ELSE 0 END)",
    ]
    for column in SPLIT.values():
        event_sums += _carried(f"ev.{column} / {B}", f"ev.{column} % {B}")
    joins = " LEFT JOIN experiences x ON x.id = ev.experience_id LEFT JOIN experience_types t ON t.id = x.type_id"
    name, version = "COALESCE(t.name, '')", "COALESCE(x.version, 0)"
    day = f"ev.event_time_us - ev.event_time_us % {DAY_US}"
    untagged = "(ev.request_tags IS NULL OR json_array_length(ev.request_tags) = 0)"
    for dimension, value in ((1, "COALESCE(ev.user_id, '')"), (5, "COALESCE(ev.key_name, '')")):
        started = time.monotonic()
        connection.execute(
            sa.text(
                f"INSERT INTO tag_attribute_days ({', '.join([*TAG_KEY, *COUNTS, *split])})"
                f" SELECT '', {dimension}, {day}, {value}, {name}, {version}, {', '.join(event_sums)}"
                f" FROM events ev{joins} WHERE {untagged}"
                f" GROUP BY {day}, {value}, {name}, {version}"
            )
        )
        _log.info(
            "tag_attribute_days: events without tags, dimension %d, in %.1f s", dimension, time.monotonic() - started
        )

    # One user's (or key's) rows of the rollup: its tags were read from every user's rows.
    op.create_index("ix_tag_attribute_days_value", "tag_attribute_days", ["dimension", "value", "tag", "day_us"])

    # The events by user carry their run and cost state: a user's runs are counted, and its
    # events of a state found, from the index alone.
    started = time.monotonic()
    op.drop_index("ix_events_user_time", table_name="events")
    op.create_index(
        "ix_events_user_time",
        "events",
        ["user_id", "event_time_us", "experience_id", "cost_state"],
        sqlite_where=sa.text("user_id IS NOT NULL"),
        postgresql_where=sa.text("user_id IS NOT NULL"),
    )
    _log.info("ix_events_user_time: rebuilt with the run and cost state in %.1f s", time.monotonic() - started)

    # Each place an event repeats a tag (not the first): what the rollups by tag counted again.
    started = time.monotonic()
    if postgres:
        tags = "json_array_elements_text(ev.request_tags) WITH ORDINALITY AS {}(value, key)"
        repeated = f" JOIN LATERAL {tags.format('tag')} ON true"
    else:
        tags = "json_each(ev.request_tags) AS {}"
        repeated = f" JOIN {tags.format('tag')} ON 1"
    again = f"EXISTS (SELECT 1 FROM {tags.format('earlier')} WHERE earlier.value = tag.value AND earlier.key < tag.key)"
    hour = f"ev.event_time_us - ev.event_time_us % {HOUR_US}"
    model = "COALESCE(p.resource, ev.resource)"
    rows = connection.execute(
        sa.text(
            f"SELECT {hour}, tag.value, {name}, {version}, ev.category, {model}, {', '.join(event_sums)}"
            f" FROM events ev LEFT JOIN applied_prices p ON p.id = ev.price_id{joins}{repeated}"
            f" WHERE ev.request_tags IS NOT NULL AND {again}"
            f" GROUP BY {hour}, tag.value, {name}, {version}, ev.category, {model}"
        )
    ).all()
    # The sums to take out of each rollup row: counts, then each split sum as one integer.
    taken: dict[tuple[str, tuple[Any, ...]], list[int]] = {}
    for row in rows:
        hour_us, tag, type_name, type_version, category, priced_model = row[:6]
        sums = [int(row[6]), int(row[7]), int(row[8])]
        sums += [int(row[i]) * B + int(row[i + 1]) for i in range(9, 19, 2)]
        day_us = hour_us - hour_us % DAY_US
        for table, key in (
            ("attribute_rollups", (2, hour_us, tag, type_name, type_version)),
            ("attribute_rollups", (4, day_us, tag, type_name, type_version)),
            ("attribute_provider_days", (2, day_us, tag, type_name, type_version, category)),
            ("attribute_model_days", (2, day_us, tag, type_name, type_version, category, priced_model)),
        ):
            into = taken.setdefault((table, key), [0] * len(sums))
            for i, amount in enumerate(sums):
                into[i] += amount
    keys = {
        "attribute_rollups": ("dimension", "hour_us", "value", "experience_name", "experience_version"),
        "attribute_provider_days": (
            "dimension",
            "day_us",
            "value",
            "experience_name",
            "experience_version",
            "category",
        ),
    }
    keys["attribute_model_days"] = (*keys["attribute_provider_days"], "model")
    for (table, key), sums in taken.items():
        where = " AND ".join(f"{column} = :{column}" for column in keys[table])
        bound = dict(zip(keys[table], key, strict=True))
        current = connection.execute(
            sa.text(f"SELECT {', '.join([*COUNTS, *split])} FROM {table} WHERE {where}"), bound
        )
        found = current.one_or_none()
        if found is None:  # no such row: nothing was counted there
            continue
        values = {column: int(found[i]) - sums[i] for i, column in enumerate(COUNTS)}
        for i, (high, low) in enumerate(HIGH_LOW.values()):
            whole = int(found[3 + 2 * i]) * B + int(found[4 + 2 * i]) - sums[3 + i]
            values[high], values[low] = divmod(whole, B)
        assignments = ", ".join(f"{column} = :new_{column}" for column in values)
        connection.execute(
            sa.text(f"UPDATE {table} SET {assignments} WHERE {where}"),
            {**bound, **{f"new_{column}": value for column, value in values.items()}},
        )
    _log.info("rollups by tag: %d rows counted once per tag in %.1f s", len(taken), time.monotonic() - started)


def downgrade() -> None:
    op.drop_index("ix_events_user_time", table_name="events")
    op.create_index(
        "ix_events_user_time",
        "events",
        ["user_id", "event_time_us"],
        sqlite_where=sa.text("user_id IS NOT NULL"),
        postgresql_where=sa.text("user_id IS NOT NULL"),
    )
    # The rows of no tag go; the repeated tags stay counted once (what they counted again is
    # not kept).
    op.drop_index("ix_tag_attribute_days_value", table_name="tag_attribute_days")
    op.execute("DELETE FROM tag_attribute_days WHERE tag = ''")

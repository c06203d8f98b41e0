"""The rollup by user and tag also keeps the events per API key: rows per hour (dimension 5)
and per UTC day (dimension 7) of the name of the key that sent them ("" with keys off, and
for the events stored before 0013 named them), counted here from the events stored so far
(one INSERT ... SELECT of the events by hour, one of those rows by day) and kept by the
writer from here on. The cost breakdown by API key reads them instead of the events.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

KEY_HOURS, KEY_DAYS = 5, 7
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


def _carried(high: str, low: str) -> list[str]:
    """A split sum's two columns of a group, with the carry done. Integer arithmetic on both
    engines (SUM of BIGINT is NUMERIC on PostgreSQL: cast back)."""
    high, low = f"CAST(SUM({high}) AS BIGINT)", f"CAST(SUM({low}) AS BIGINT)"
    return [f"{high} + {low} / {B}", f"{low} % {B}"]


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":
        op.execute("CLOSE ALL")  # 0013's cursor on events, in an upgrade that ran it (see 0016)
    split = [column for pair in HIGH_LOW.values() for column in pair]
    columns = ", ".join(["dimension", "hour_us", "value", "experience_name", "experience_version", *COUNTS, *split])
    event_sums = [
        "COUNT(*)",
        "SUM(CASE WHEN ev.http_status_code >= 400 THEN 1 ELSE 0 END)",
        "SUM(CASE WHEN ev.cost_state != 1 THEN 1 ELSE 0 END)",
    ]
    for column in SPLIT.values():
        event_sums += _carried(f"ev.{column} / {B}", f"ev.{column} % {B}")
    row_sums = [f"CAST(SUM({count}) AS BIGINT)" for count in COUNTS]
    for high, low in HIGH_LOW.values():
        row_sums += _carried(high, low)
    name, version, value = "COALESCE(t.name, '')", "COALESCE(x.version, 0)", "COALESCE(ev.key_name, '')"
    hour = "ev.event_time_us - ev.event_time_us % 3600000000"
    connection.execute(
        sa.text(
            f"INSERT INTO attribute_rollups ({columns})"
            f" SELECT {KEY_HOURS}, {hour}, {value}, {name}, {version}, {', '.join(event_sums)}"
            " FROM events ev LEFT JOIN experiences x ON x.id = ev.experience_id"
            " LEFT JOIN experience_types t ON t.id = x.type_id"
            f" GROUP BY {hour}, {value}, {name}, {version}"
        )
    )
    day = "hour_us - hour_us % 86400000000"
    connection.execute(
        sa.text(
            f"INSERT INTO attribute_rollups ({columns})"
            f" SELECT {KEY_DAYS}, {day}, value, experience_name, experience_version, {', '.join(row_sums)}"
            f" FROM attribute_rollups WHERE dimension = {KEY_HOURS}"
            f" GROUP BY {day}, value, experience_name, experience_version"
        )
    )


def downgrade() -> None:
    op.execute(f"DELETE FROM attribute_rollups WHERE dimension IN ({KEY_HOURS}, {KEY_DAYS})")

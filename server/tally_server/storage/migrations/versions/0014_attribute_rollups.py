"""The rollup by user and by request tag: events summed per hour, user (dimension 1) or
request tag (dimension 2) and type version, and per UTC day (dimensions 3 and 4), counted
here from the events stored so far (two INSERT ... SELECT of the events, by hour, and one
of those hour rows, by day) and kept by the writer from here on. The cost breakdown by
user or tag reads it instead of the events.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
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


def _carried(high: str, low: str) -> list[str]:
    """A split sum's two columns of a group, with the carry done (the rest's sum over many
    rows may pass a billion). Integer arithmetic on both engines (SUM of BIGINT is NUMERIC on
    PostgreSQL: cast back)."""
    high, low = f"CAST(SUM({high}) AS BIGINT)", f"CAST(SUM({low}) AS BIGINT)"
    return [f"{high} + {low} / {B}", f"{low} % {B}"]


def _event_sums() -> str:
    parts = [
        "COUNT(*)",
        "SUM(CASE WHEN ev.http_status_code >= 400 THEN 1 ELSE 0 END)",
        "SUM(CASE WHEN ev.cost_state != 1 THEN 1 ELSE 0 END)",
    ]
    for column in SPLIT.values():
        parts += _carried(f"ev.{column} / {B}", f"ev.{column} % {B}")
    return ", ".join(parts)


def _row_sums() -> str:
    parts = [f"CAST(SUM({count}) AS BIGINT)" for count in COUNTS]
    for high, low in HIGH_LOW.values():
        parts += _carried(high, low)
    return ", ".join(parts)


def _backfill(connection: sa.Connection) -> None:
    split = [column for pair in HIGH_LOW.values() for column in pair]
    key = ("dimension", "hour_us", "value", "experience_name", "experience_version")
    columns = ", ".join([*key, *COUNTS, *split])
    attributed = " LEFT JOIN experiences x ON x.id = ev.experience_id LEFT JOIN experience_types t ON t.id = x.type_id"
    name, version = "COALESCE(t.name, '')", "COALESCE(x.version, 0)"
    if connection.dialect.name == "postgresql":
        tags = " LEFT JOIN LATERAL json_array_elements_text(ev.request_tags) AS tag(value) ON true"
    else:
        tags = " LEFT JOIN json_each(ev.request_tags) AS tag ON 1"
    hour = "ev.event_time_us - ev.event_time_us % 3600000000"
    for dimension, value, joins in ((1, "COALESCE(ev.user_id, '')", ""), (2, "COALESCE(tag.value, '')", tags)):
        connection.execute(
            sa.text(
                f"INSERT INTO attribute_rollups ({columns})"
                f" SELECT {dimension}, {hour}, {value}, {name}, {version}, {_event_sums()}"
                f" FROM events ev{attributed}{joins}"
                f" GROUP BY {hour}, {value}, {name}, {version}"
            )
        )
    # The rows per UTC day (dimensions 3 and 4) sum the hour rows.
    day = "hour_us - hour_us % 86400000000"
    connection.execute(
        sa.text(
            f"INSERT INTO attribute_rollups ({columns})"
            f" SELECT dimension + 2, {day}, value, experience_name, experience_version, {_row_sums()}"
            f" FROM attribute_rollups GROUP BY dimension, {day}, value, experience_name, experience_version"
        )
    )


def upgrade() -> None:
    op.create_table(
        "attribute_rollups",
        sa.Column("dimension", sa.SmallInteger, nullable=False),
        sa.Column("hour_us", sa.BigInteger, nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("experience_name", sa.String(64), nullable=False),
        sa.Column("experience_version", sa.Integer, nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNTS),
        *(sa.Column(c, sa.BigInteger, nullable=False) for pair in HIGH_LOW.values() for c in pair),
        sa.PrimaryKeyConstraint(
            "dimension", "hour_us", "value", "experience_name", "experience_version", name="pk_attribute_rollups"
        ),
        sqlite_with_rowid=False,  # SQLite keeps the rows once, in key order
    )
    _backfill(op.get_bind())


def downgrade() -> None:
    op.drop_table("attribute_rollups")

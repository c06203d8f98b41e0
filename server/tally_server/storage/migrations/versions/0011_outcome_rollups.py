"""Outcome and step rollups: the type rollups gain failed events, and two new rollups count
a type's runs per version, day of the first event, outcome and verdict (with their cost
histogram) and per step, built here from the runs stored so far and kept by the writer and
by scoring from here on.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server (so it keeps its own copy of the verdict rule and of the cost histogram's buckets,
as they were when it was written).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import json
import math
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

DAY_US = 86_400_000_000
NANOS_PER_DOLLAR = 1_000_000_000
_GAMMA = 1.01 / 0.99  # domain.rollups: RELATIVE_ERROR 0.01
SUCCEEDED, FAILED, NO_GOAL = 1, 0, -1


def _cost_bucket(nanos: int) -> int:
    if nanos <= 0:
        return 0
    return 1 + math.ceil(math.log(nanos) / math.log(_GAMMA) - 1e-9)


def _verdict(definition: dict[str, Any], value: float) -> int:
    goal = definition.get("goal")
    if not goal:
        if definition["kind"] == "BOOLEAN":
            return SUCCEEDED if value == 1.0 else FAILED
        return NO_GOAL
    ((comparison, target),) = goal.items()
    target = float(target)
    ok = value == target if comparison == "equals" else value >= target if comparison == "at_least" else value <= target
    return SUCCEEDED if ok else FAILED


def _money(nanos: int) -> dict[str, int]:
    dollars, rest = divmod(nanos, NANOS_PER_DOLLAR)
    return {"cost_total_dollars": dollars, "cost_total_nanos": rest}


def _backfill(connection: sa.Connection) -> None:
    connection.execute(
        sa.text(
            "UPDATE type_rollups SET failed_event_count = COALESCE(("
            " SELECT SUM(e.failed_event_count) FROM experiences e"
            " WHERE e.type_id = type_rollups.type_id AND e.version = type_rollups.version"
            " AND e.event_count > 0 AND e.first_event_time_us IS NOT NULL"
            " AND e.first_event_time_us - (e.first_event_time_us % :day) = type_rollups.day_us), 0)"
        ),
        {"day": DAY_US},
    )
    steps: dict[tuple[int, int, int, str], list[int]] = {}
    for row in connection.execute(
        sa.text(
            "SELECT e.type_id, e.version, e.first_event_time_us, s.step, s.event_count,"
            " s.cost_total_dollars, s.cost_total_nanos"
            " FROM experience_step_costs s JOIN experiences e ON e.id = s.experience_id"
            " WHERE e.event_count > 0 AND e.first_event_time_us IS NOT NULL"
        )
    ):
        key = (row[0], row[1], row[2] - row[2] % DAY_US, row[3])
        sums = steps.setdefault(key, [0, 0, 0])
        sums[0] += 1
        sums[1] += row[4]
        sums[2] += row[5] * NANOS_PER_DOLLAR + row[6]
    if steps:
        connection.execute(
            sa.text(
                "INSERT INTO type_step_rollups (type_id, version, day_us, step, run_count, event_count,"
                " cost_total_dollars, cost_total_nanos) VALUES (:type_id, :version, :day_us, :step, :runs,"
                " :events, :cost_total_dollars, :cost_total_nanos)"
            ),
            [
                {"type_id": k[0], "version": k[1], "day_us": k[2], "step": k[3], "runs": runs, "events": events}
                | _money(cost)
                for k, (runs, events, cost) in sorted(steps.items())
            ],
        )
    declared: dict[int, dict[str, dict[str, Any]]] = {}
    for type_id, stored in connection.execute(sa.text("SELECT id, outcomes FROM experience_types")):
        if isinstance(stored, str):
            stored = json.loads(stored)
        if stored:
            declared[type_id] = {item["name"]: item for item in stored}
    outcomes: dict[tuple[int, int, int, str, int], list[Any]] = {}
    buckets: dict[tuple[int, int, int, str, int, int], int] = {}
    for row in connection.execute(
        sa.text(
            "SELECT e.type_id, e.version, e.first_event_time_us, e.cost_total_dollars, e.cost_total_nanos,"
            " o.name, o.value FROM experience_outcomes o JOIN experiences e ON e.id = o.experience_id"
            " WHERE e.event_count > 0 AND e.first_event_time_us IS NOT NULL"
        )
    ):
        definition = declared.get(row[0], {}).get(row[5])
        if definition is None:  # no longer declared: counted nowhere
            continue
        cost = row[3] * NANOS_PER_DOLLAR + row[4]
        outcome_key = (row[0], row[1], row[2] - row[2] % DAY_US, row[5], _verdict(definition, float(row[6])))
        outcome_sums = outcomes.setdefault(outcome_key, [0, 0.0, 0])
        outcome_sums[0] += 1
        outcome_sums[1] += float(row[6])
        outcome_sums[2] += cost
        bucket = (*outcome_key, _cost_bucket(cost))
        buckets[bucket] = buckets.get(bucket, 0) + 1
    if outcomes:
        connection.execute(
            sa.text(
                "INSERT INTO type_outcome_rollups (type_id, version, day_us, name, verdict, run_count, value_sum,"
                " cost_total_dollars, cost_total_nanos) VALUES (:type_id, :version, :day_us, :name, :verdict,"
                " :runs, :value_sum, :cost_total_dollars, :cost_total_nanos)"
            ),
            [
                {"type_id": k[0], "version": k[1], "day_us": k[2], "name": k[3], "verdict": k[4]}
                | {"runs": runs, "value_sum": value_sum}
                | _money(cost)
                for k, (runs, value_sum, cost) in sorted(outcomes.items())
            ],
        )
        connection.execute(
            sa.text(
                "INSERT INTO type_outcome_cost_buckets (type_id, version, day_us, name, verdict, bucket, run_count)"
                " VALUES (:type_id, :version, :day_us, :name, :verdict, :bucket, :runs)"
            ),
            [
                {"type_id": k[0], "version": k[1], "day_us": k[2], "name": k[3], "verdict": k[4], "bucket": k[5]}
                | {"runs": runs}
                for k, runs in sorted(buckets.items())
            ],
        )


def upgrade() -> None:
    op.add_column("type_rollups", sa.Column("failed_event_count", sa.BigInteger, nullable=False, server_default="0"))
    op.create_table(
        "type_outcome_rollups",
        sa.Column("type_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("verdict", sa.SmallInteger, nullable=False),
        sa.Column("run_count", sa.BigInteger, nullable=False),
        sa.Column("value_sum", sa.Float, nullable=False),
        sa.Column("cost_total_dollars", sa.BigInteger, nullable=False),
        sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("type_id", "version", "day_us", "name", "verdict", name="pk_type_outcome_rollups"),
    )
    op.create_table(
        "type_outcome_cost_buckets",
        sa.Column("type_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("verdict", sa.SmallInteger, nullable=False),
        sa.Column("bucket", sa.SmallInteger, nullable=False),
        sa.Column("run_count", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "type_id", "version", "day_us", "name", "verdict", "bucket", name="pk_type_outcome_cost_buckets"
        ),
    )
    op.create_table(
        "type_step_rollups",
        sa.Column("type_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("day_us", sa.BigInteger, nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("run_count", sa.BigInteger, nullable=False),
        sa.Column("event_count", sa.BigInteger, nullable=False),
        sa.Column("cost_total_dollars", sa.BigInteger, nullable=False),
        sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("type_id", "version", "day_us", "step", name="pk_type_step_rollups"),
    )
    _backfill(op.get_bind())


def downgrade() -> None:
    op.drop_table("type_step_rollups")
    op.drop_table("type_outcome_cost_buckets")
    op.drop_table("type_outcome_rollups")
    with op.batch_alter_table("type_rollups") as batch:
        batch.drop_column("failed_event_count")

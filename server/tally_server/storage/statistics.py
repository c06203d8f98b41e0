"""GetExperienceTypeStats' and CompareVersions' reads: the type rollups by day (sums,
outcomes, steps), the experiences at a window's edges, and the walks of the cost index
that make percentiles exact."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain.outcomes import GoalComparison, OutcomeDefinition
from ..domain.rollups import SUCCEEDED, ExperienceState, OutcomeTotals, StepTotals, TypeDeltas, TypeTotals
from . import rollups
from .experiences import experience_filters
from .rollups import joined
from .tables import (
    experience_outcomes,
    experiences,
    type_cost_buckets,
    type_outcome_cost_buckets,
    type_outcome_rollups,
    type_rollups,
    type_step_rollups,
)


async def day_extent(conn: AsyncConnection, type_id: int, version: int) -> tuple[int, int] | None:
    """The first and last UTC day of the type's runs' first events (None: no run has events)."""
    t = type_rollups
    query = sa.select(sa.func.min(t.c.day_us), sa.func.max(t.c.day_us)).where(
        t.c.type_id == type_id, t.c.experience_count > 0
    )
    if version:
        query = query.where(t.c.version == version)
    first, last = (await conn.execute(query)).one()
    return None if first is None else (int(first), int(last))


def _with_events(type_id: int, version: int, start_us: int | None, end_us: int | None) -> list[Any]:
    """GetExperienceTypeStats' experiences: with events, the first of them in the window."""
    e = experiences
    return [*experience_filters(type_id, version, start_us, end_us, e.c.first_event_time_us), e.c.event_count > 0]


def _walked(type_id: int, version: int, start_us: int | None, end_us: int | None) -> list[Any]:
    """_with_events' experiences as a walk of the cost index within a range selects them:
    without `event_count > 0`, which is not in the index (SQLite read each row walked past:
    4.9 ms against 0.26 ms for a walk of 2,000 runs). A run without events costs 0, outside
    every range but bucket 0's, where every run walked past costs 0 too: the answer is the
    same."""
    return experience_filters(type_id, version, start_us, end_us, experiences.c.first_event_time_us)


def _cost_in_range(
    query: sa.Select[Any], where: list[Any], low_nanos: int, high_nanos: int, rank: int
) -> sa.Select[Any]:
    """The rank-th cheapest (from 1) of the experiences the query selects whose cost is in
    [low_nanos, high_nanos]: a walk of the cost index within that range only."""
    e = experiences
    cost = sa.tuple_(e.c.cost_total_dollars, e.c.cost_total_nanos)
    low, high = rollups.split(low_nanos), rollups.split(high_nanos)
    return (
        query.where(*where, cost >= sa.tuple_(*low), cost <= sa.tuple_(*high))
        .order_by(e.c.cost_total_dollars, e.c.cost_total_nanos)
        .offset(rank - 1)
        .limit(1)
    )


async def experience_cost_in_range(
    conn: AsyncConnection,
    type_id: int,
    version: int,
    start_us: int | None,
    end_us: int | None,
    low_nanos: int,
    high_nanos: int,
    rank: int,
) -> int | None:
    """The total cost of the rank-th cheapest (from 1) of the experiences stats select whose
    cost is in [low_nanos, high_nanos]."""
    e = experiences
    query = _cost_in_range(
        sa.select(e.c.cost_total_dollars, e.c.cost_total_nanos),
        _walked(type_id, version, start_us, end_us),
        low_nanos,
        high_nanos,
        rank,
    )
    row = (await conn.execute(query)).first()
    return None if row is None else rollups.joined(*row)


async def max_experience_cost(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> int:
    """The highest total cost of one experience, exact: the top of the cost index. (Without
    `event_count > 0`, which made SQLite scan the type's experiences instead: an experience
    without events costs 0, so it never changes a maximum; a window only selects
    experiences with a first event anyway.)"""
    e = experiences
    query = (
        sa.select(e.c.cost_total_dollars, e.c.cost_total_nanos)
        .where(*experience_filters(type_id, version, start_us, end_us, e.c.first_event_time_us))
        .order_by(e.c.cost_total_dollars.desc(), e.c.cost_total_nanos.desc())
        .limit(1)
    )
    row = (await conn.execute(query)).first()
    return 0 if row is None else rollups.joined(*row)


async def type_sums(
    conn: AsyncConnection, type_id: int, version: int, start_day: int | None, end_day: int | None
) -> TypeDeltas:
    """The type rollups' rows of the days of first events in [start_day, end_day), summed
    per version (day 0 in the keys): a few rows per day, whatever the number of runs."""
    sums = TypeDeltas()
    t = type_rollups

    def where(table: sa.Table) -> list[sa.ColumnElement[bool]]:
        conditions = [table.c.type_id == type_id]
        if version:
            conditions.append(table.c.version == version)
        if start_day is not None:
            conditions.append(table.c.day_us >= start_day)
        if end_day is not None:
            conditions.append(table.c.day_us < end_day)
        return conditions

    def summed(table: sa.Table, *names: str) -> list[sa.Label[Any]]:
        return [sa.func.sum(table.c[name]).label(name) for name in names]

    counts = ("experience_count", "event_count", "failed_event_count", "unpriced_event_count")
    money = ("cost_total_dollars", "cost_total_nanos")
    for row in await conn.execute(
        sa.select(t.c.version, *summed(t, *counts, *money)).where(*where(t)).group_by(t.c.version)
    ):
        sums.totals[(type_id, int(row.version), 0)] = TypeTotals(
            experience_count=int(row.experience_count or 0),
            event_count=int(row.event_count or 0),
            failed_event_count=int(row.failed_event_count or 0),
            unpriced_event_count=int(row.unpriced_event_count or 0),
            cost_total_nanos=joined(row.cost_total_dollars, row.cost_total_nanos),
        )
    b = type_cost_buckets
    for row in await conn.execute(
        sa.select(b.c.version, b.c.bucket, *summed(b, "experience_count"))
        .where(*where(b))
        .group_by(b.c.version, b.c.bucket)
    ):
        sums.buckets[(type_id, int(row.version), 0, int(row.bucket))] = int(row.experience_count)
    o = type_outcome_rollups
    for row in await conn.execute(
        sa.select(o.c.version, o.c.name, o.c.verdict, *summed(o, "run_count", "value_sum", *money))
        .where(*where(o))
        .group_by(o.c.version, o.c.name, o.c.verdict)
    ):
        sums.outcomes[(type_id, int(row.version), 0, row.name, int(row.verdict))] = OutcomeTotals(
            int(row.run_count), float(row.value_sum), joined(row.cost_total_dollars, row.cost_total_nanos)
        )
    ob = type_outcome_cost_buckets
    for row in await conn.execute(
        sa.select(ob.c.version, ob.c.name, ob.c.verdict, ob.c.bucket, *summed(ob, "run_count"))
        .where(*where(ob))
        .group_by(ob.c.version, ob.c.name, ob.c.verdict, ob.c.bucket)
    ):
        key = (type_id, int(row.version), 0, row.name, int(row.verdict), int(row.bucket))
        sums.outcome_buckets[key] = int(row.run_count)
    st = type_step_rollups
    for row in await conn.execute(
        sa.select(st.c.version, st.c.step, *summed(st, "run_count", "event_count", *money))
        .where(*where(st))
        .group_by(st.c.version, st.c.step)
    ):
        sums.steps[(type_id, int(row.version), 0, row.step)] = StepTotals(
            int(row.run_count), int(row.event_count), joined(row.cost_total_dollars, row.cost_total_nanos)
        )
    return sums


async def edge_states(
    conn: AsyncConnection, type_id: int, version: int, start_us: int, end_us: int
) -> list[ExperienceState]:
    """The experiences whose first event is in [start_us, end_us) (a window's partial day),
    as the type rollups count them: with their outcomes' verdicts and their steps."""
    query = sa.select(*rollups.STATE_COLUMNS).where(*_with_events(type_id, version, start_us, end_us))
    states = {rollups.as_uuid(row.id): rollups.state(row) for row in await conn.execute(query)}
    counted = await rollups.with_steps(conn, await rollups.with_verdicts(conn, states), list(states))
    return list(counted.values())


def verdict_condition(definition: OutcomeDefinition, verdict: int) -> sa.ColumnElement[bool]:
    """Which of an outcome's recorded values have the verdict (domain.outcomes.succeeded, in SQL)."""
    value = experience_outcomes.c.value
    goal = definition.goal
    if goal is None:  # a BOOLEAN: true is success (outcomes without goals have no verdict)
        met = value == 1.0
    elif goal.comparison == GoalComparison.EQUALS:
        met = value == goal.value
    elif goal.comparison == GoalComparison.AT_LEAST:
        met = value >= goal.value
    else:
        met = value <= goal.value
    return met if verdict == SUCCEEDED else sa.not_(met)


async def scored_cost_in_range(
    conn: AsyncConnection,
    type_id: int,
    version: int,
    start_us: int | None,
    end_us: int | None,
    definition: OutcomeDefinition,
    verdict: int,
    low_nanos: int,
    high_nanos: int,
    rank: int,
) -> int | None:
    """experience_cost_in_range among the runs whose value of an outcome has the verdict."""
    e, o = experiences, experience_outcomes
    query = _cost_in_range(
        sa.select(e.c.cost_total_dollars, e.c.cost_total_nanos).join(
            o, sa.and_(o.c.experience_id == e.c.id, o.c.name == definition.name)
        ),
        [*_walked(type_id, version, start_us, end_us), verdict_condition(definition, verdict)],
        low_nanos,
        high_nanos,
        rank,
    )
    row = (await conn.execute(query)).first()
    return None if row is None else rollups.joined(*row)

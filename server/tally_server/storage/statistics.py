"""GetExperienceTypeStats' reads: the type rollups by day, and the experiences at a window's edges."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from ..domain.compare import Run
from ..domain.rollups import ExperienceState
from . import rollups
from .experiences import experience_filters
from .tables import (
    experience_outcomes,
    experience_step_costs,
    experiences,
    type_cost_buckets,
    type_rollups,
)


async def type_costs(
    conn: AsyncConnection, type_id: int, version: int, start_day: int | None, end_day: int | None
) -> dict[int, m.VersionCosts]:
    """Per version: the type rollup's sums and cost histogram over the days of first events
    in [start_day, end_day): a few rows per day, whatever the number of experiences."""
    t, b = type_rollups, type_cost_buckets
    by_version: dict[int, m.VersionCosts] = {}
    where = [t.c.type_id == type_id]
    bucket_where = [b.c.type_id == type_id]
    for table, conditions in ((t, where), (b, bucket_where)):
        if version:
            conditions.append(table.c.version == version)
        if start_day is not None:
            conditions.append(table.c.day_us >= start_day)
        if end_day is not None:
            conditions.append(table.c.day_us < end_day)
    sums = (
        sa.select(
            t.c.version,
            *(
                sa.func.sum(t.c[name]).label(name)
                for name in ("experience_count", "event_count", "unpriced_event_count")
            ),
            sa.func.sum(t.c.cost_total_dollars).label("dollars"),
            sa.func.sum(t.c.cost_total_nanos).label("nanos"),
        )
        .where(*where)
        .group_by(t.c.version)
    )
    for row in await conn.execute(sums):
        if row.experience_count:
            by_version[int(row.version)] = m.VersionCosts(
                int(row.version),
                int(row.experience_count),
                int(row.event_count),
                int(row.unpriced_event_count),
                rollups.joined(row.dollars, row.nanos),
            )
    histogram = (
        sa.select(b.c.version, b.c.bucket, sa.func.sum(b.c.experience_count).label("n"))
        .where(*bucket_where)
        .group_by(b.c.version, b.c.bucket)
    )
    for entry in await conn.execute(histogram):
        if entry.n and int(entry.version) in by_version:
            by_version[int(entry.version)].buckets[int(entry.bucket)] = int(entry.n)
    return by_version


def _with_events(type_id: int, version: int, start_us: int | None, end_us: int | None) -> list[Any]:
    """GetExperienceTypeStats' experiences: with events, the first of them in the window."""
    e = experiences
    return [*experience_filters(type_id, version, start_us, end_us, e.c.first_event_time_us), e.c.event_count > 0]


async def experience_costs(
    conn: AsyncConnection, type_id: int, version: int, start_us: int, end_us: int
) -> list[ExperienceState]:
    """The experiences whose first event is in [start_us, end_us) (a window's partial day)."""
    query = sa.select(*rollups.STATE_COLUMNS).where(*_with_events(type_id, version, start_us, end_us))
    return [rollups.state(row) for row in await conn.execute(query)]


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
    cost is in [low_nanos, high_nanos]: a walk of the cost index within that range only."""
    e = experiences
    low, high = rollups.split(low_nanos), rollups.split(high_nanos)
    cost = sa.tuple_(e.c.cost_total_dollars, e.c.cost_total_nanos)
    query = (
        sa.select(e.c.cost_total_dollars, e.c.cost_total_nanos)
        .where(*_with_events(type_id, version, start_us, end_us), cost >= sa.tuple_(*low), cost <= sa.tuple_(*high))
        .order_by(e.c.cost_total_dollars, e.c.cost_total_nanos)
        .offset(rank - 1)
        .limit(1)
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


async def version_runs(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> list[Run]:
    """Each run of one version with events, its first event in the window: its cost, events,
    failed events (the experience's rollup), latest outcome values and step costs. Three
    queries."""
    e, o = experiences, experience_outcomes
    where = _with_events(type_id, version, start_us, end_us)
    costs = await conn.execute(
        sa.select(e.c.id, e.c.cost_total_dollars, e.c.cost_total_nanos, e.c.event_count, e.c.failed_event_count)
        .where(*where)
        .order_by(e.c.id)
    )
    rows = {
        row.id: (
            rollups.joined(row.cost_total_dollars, row.cost_total_nanos),
            int(row.event_count),
            int(row.failed_event_count),
        )
        for row in costs
    }
    scored: dict[Any, dict[str, float]] = {}
    for row in await conn.execute(
        sa.select(o.c.experience_id, o.c.name, o.c.value).join(e, e.c.id == o.c.experience_id).where(*where)
    ):
        scored.setdefault(row.experience_id, {})[row.name] = float(row.value)
    s = experience_step_costs
    steps: dict[Any, dict[str, int]] = {}
    step_rows = await conn.execute(
        sa.select(s.c.experience_id, s.c.step, s.c.cost_total_dollars, s.c.cost_total_nanos)
        .join(e, e.c.id == s.c.experience_id)
        .where(*where)
    )
    for step_row in step_rows:
        cost = rollups.joined(step_row.cost_total_dollars, step_row.cost_total_nanos)
        steps.setdefault(step_row.experience_id, {})[step_row.step] = cost
    return [
        Run(cost, events, failed, scored.get(run_id, {}), steps.get(run_id, {}))
        for run_id, (cost, events, failed) in rows.items()
    ]

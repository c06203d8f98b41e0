"""What each step of each run cost: kept by the ingest writer, read with the run and with
its type's statistics."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import rollups
from .experiences import experience_filters
from .sql import insert_or_ignore
from .tables import experience_step_costs, experiences


async def add(conn: AsyncConnection, sums: Mapping[tuple[uuid.UUID, str], tuple[int, int]]) -> None:
    """Adds (events, cost in nanos) to each run's step, in key order (rows are locked in one
    order by every writer)."""
    s = experience_step_costs
    for (experience_id, step), (count, nanos) in sorted(sums.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        dollars, leftover = rollups.split(nanos)
        insert = insert_or_ignore(conn, s).values(
            experience_id=experience_id,
            step=step,
            event_count=count,
            cost_total_dollars=dollars,
            cost_total_nanos=leftover,
        )
        await conn.execute(
            insert.on_conflict_do_update(
                index_elements=["experience_id", "step"],
                set_={
                    "event_count": s.c.event_count + insert.excluded.event_count,
                    "cost_total_dollars": s.c.cost_total_dollars + insert.excluded.cost_total_dollars,
                    "cost_total_nanos": s.c.cost_total_nanos + insert.excluded.cost_total_nanos,
                },
            )
        )


async def of_experience(conn: AsyncConnection, experience_id: uuid.UUID) -> list[tuple[str, int, int]]:
    """The run's steps: (step, events, cost in nanos), by step."""
    s = experience_step_costs
    rows = await conn.execute(sa.select(s).where(s.c.experience_id == experience_id).order_by(s.c.step))
    return [
        (row.step, int(row.event_count), rollups.joined(row.cost_total_dollars, row.cost_total_nanos)) for row in rows
    ]


async def any_recorded(conn: AsyncConnection) -> bool:
    """Whether any run has a step: the per-version sums (of_type) read every run of the type,
    so a house that names no steps does not pay for them."""
    return (
        await conn.execute(sa.select(sa.literal(1)).select_from(experience_step_costs).limit(1))
    ).first() is not None


async def of_type(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> list[tuple[int, str, int, int, int]]:
    """Per version and step, over the type's experiences with events (the first in the
    window): (version, step, experiences, events, cost in nanos)."""
    s, e = experience_step_costs, experiences
    query = (
        sa.select(
            e.c.version,
            s.c.step,
            sa.func.count().label("runs"),
            sa.func.sum(s.c.event_count).label("events"),
            sa.func.sum(s.c.cost_total_dollars).label("dollars"),
            sa.func.sum(s.c.cost_total_nanos).label("nanos"),
        )
        .join(e, e.c.id == s.c.experience_id)
        .where(*experience_filters(type_id, version, start_us, end_us, e.c.first_event_time_us), e.c.event_count > 0)
        .group_by(e.c.version, s.c.step)
        .order_by(e.c.version, s.c.step)
    )
    return [
        (int(row.version), row.step, int(row.runs), int(row.events), rollups.joined(row.dollars, row.nanos))
        for row in await conn.execute(query)
    ]

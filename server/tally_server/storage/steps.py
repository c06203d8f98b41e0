"""What each step of each run cost: kept by the ingest writer, read with the run and with
its type's statistics."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import rollups
from .tables import experience_step_costs


async def add(conn: AsyncConnection, sums: Mapping[tuple[uuid.UUID, str], tuple[int, int]]) -> None:
    """Adds (events, cost in nanos) to each run's step, in key order (rows are locked in one
    order by every writer), in one executemany."""
    rows = []
    for (experience_id, step), (count, nanos) in sorted(sums.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        dollars, leftover = rollups.split(nanos)
        rows.append(
            {
                "experience_id": experience_id,
                "step": step,
                "event_count": count,
                "cost_total_dollars": dollars,
                "cost_total_nanos": leftover,
            }
        )
    await rollups.add_rows(conn, "experience_step_costs", rows)


async def of_experience(conn: AsyncConnection, experience_id: uuid.UUID) -> list[tuple[str, int, int]]:
    """The run's steps: (step, events, cost in nanos), by step."""
    s = experience_step_costs
    rows = await conn.execute(sa.select(s).where(s.c.experience_id == experience_id).order_by(s.c.step))
    return [
        (row.step, int(row.event_count), rollups.joined(row.cost_total_dollars, row.cost_total_nanos)) for row in rows
    ]

"""Outcomes recorded for runs: the latest value of each outcome per experience, and every
change of those values."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain.outcomes import OutcomeValue, RecordedOutcome
from .sql import insert_or_ignore
from .tables import experience_outcome_changes, experience_outcomes


async def record(
    conn: AsyncConnection,
    experience_id: uuid.UUID,
    values: Sequence[OutcomeValue],
    now_us: int,
    key_name: str,
    current: Mapping[str, float],
) -> None:
    """Sets each value as the outcome's latest and keeps the change; a value equal to the
    latest one (`current`: the run's latest values, read in this transaction) changes
    nothing, so a retry adds no change."""
    o = experience_outcomes
    changed = [v for v in values if current.get(v.name) != v.value]
    if not changed:
        return
    rows = [
        {
            "experience_id": experience_id,
            "name": v.name,
            "value": v.value,
            "record_time_us": now_us,
            "key_name": key_name,
        }
        for v in changed
    ]
    for row in rows:
        insert = insert_or_ignore(conn, o).values(**row)
        await conn.execute(
            insert.on_conflict_do_update(
                index_elements=["experience_id", "name"],
                set_={"value": insert.excluded.value, "record_time_us": now_us, "key_name": key_name},
            )
        )
    await conn.execute(sa.insert(experience_outcome_changes), rows)


async def latest(conn: AsyncConnection, experience_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[RecordedOutcome]]:
    """The outcomes of each experience, by name."""
    o = experience_outcomes
    found: dict[uuid.UUID, list[RecordedOutcome]] = {}
    rows = await conn.execute(
        sa.select(o).where(o.c.experience_id.in_(list(experience_ids))).order_by(o.c.experience_id, o.c.name)
    )
    for row in rows:
        found.setdefault(row.experience_id, []).append(
            RecordedOutcome(row.name, float(row.value), int(row.record_time_us), row.key_name)
        )
    return found


async def changes(
    conn: AsyncConnection, experience_id: uuid.UUID, after_id: int | None, count: int
) -> list[tuple[int, RecordedOutcome]]:
    """The run's changes after `after_id`, the oldest first: (their id, the value)."""
    c = experience_outcome_changes
    query = sa.select(c).where(c.c.experience_id == experience_id)
    if after_id is not None:
        query = query.where(c.c.id > after_id)
    rows = await conn.execute(query.order_by(c.c.id).limit(count))
    return [
        (int(row.id), RecordedOutcome(row.name, float(row.value), int(row.record_time_us), row.key_name))
        for row in rows
    ]

"""Experiences, with the rollup columns kept on their rows, their latency histograms among them."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from ..domain.rollups import ExperienceState, removal, unpacked_histogram
from . import hot_path, rollups
from .sql import insert_or_ignore
from .tables import (
    ROLLUP_COUNT_COLUMNS,
    ROLLUP_SPLIT_COLUMNS,
    events,
    experience_property_updates,
    experience_types,
    experiences,
)


async def get_experiences(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, m.Experience]:
    """The experiences with these ids that exist. The ingest writer asks this in every commit."""
    ids = list(ids)
    return await hot_path.get_experiences(conn, ids) if ids else {}


async def get_experience(conn: AsyncConnection, experience_id: uuid.UUID) -> m.Experience | None:
    return (await get_experiences(conn, [experience_id])).get(experience_id)


async def insert_experiences(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> set[uuid.UUID]:
    """Inserts experiences whose id is free; returns the ids this call inserted.

    Rows: id, type_id, version, create_time_us, properties. A concurrent insert
    of the same id (another replica) makes this one a no-op, never a second row.
    """
    if not rows:
        return set()
    stmt = insert_or_ignore(conn, experiences).on_conflict_do_nothing(index_elements=["id"]).returning(experiences.c.id)
    result = await conn.execute(stmt, list(rows))
    return {row.id for row in result}


async def delete_experience(conn: AsyncConnection, experience_id: uuid.UUID) -> int | None:
    """Deletes it and unattributes its events (moving them to the unattributed rows of the
    hourly rollups); None if it did not exist, else the event count."""
    name = (
        await conn.execute(
            sa.select(experience_types.c.name)
            .select_from(hot_path.EXPERIENCES_JOIN)
            .where(experiences.c.id == experience_id)
        )
    ).scalar()
    if name is None:
        return None
    states = await counted(conn, await rollups.experience_states(conn, [experience_id], lock=True), [experience_id])
    if experience_id in states:
        await rollups.add_type_deltas(conn, removal(states[experience_id]))
    await rollups.unattribute(conn, events.c.experience_id == experience_id)  # while it is there to join
    await conn.execute(sa.delete(experiences).where(experiences.c.id == experience_id))
    result = await conn.execute(
        sa.update(events).where(events.c.experience_id == experience_id).values(experience_id=None)
    )
    return result.rowcount


async def set_properties(conn: AsyncConnection, experience_id: uuid.UUID, properties: dict[str, str]) -> None:
    await conn.execute(sa.update(experiences).where(experiences.c.id == experience_id).values(properties=properties))


async def note_property_updates(
    conn: AsyncConnection,
    experience_id: uuid.UUID,
    set_keys: Iterable[str],
    remove_keys: Iterable[str],
    now_us: int,
    key_name: str,
) -> None:
    """Keeps who set these properties and when; forgets it for those removed."""
    u = experience_property_updates
    removed = list(remove_keys)
    if removed:
        await conn.execute(sa.delete(u).where(u.c.experience_id == experience_id, u.c.key.in_(removed)))
    for key in sorted(set_keys):
        insert = insert_or_ignore(conn, u).values(
            experience_id=experience_id, key=key, update_time_us=now_us, key_name=key_name
        )
        await conn.execute(
            insert.on_conflict_do_update(
                index_elements=["experience_id", "key"], set_={"update_time_us": now_us, "key_name": key_name}
            )
        )


async def property_updates(conn: AsyncConnection, experience_id: uuid.UUID) -> tuple[m.PropertyUpdate, ...]:
    u = experience_property_updates
    rows = await conn.execute(sa.select(u).where(u.c.experience_id == experience_id).order_by(u.c.key))
    return tuple(m.PropertyUpdate(row.key, int(row.update_time_us), row.key_name) for row in rows)


_ROLLUP_COLUMNS = (
    experiences.c.id,  # first, as list_experiences relies on
    *(experiences.c[name] for name in (*ROLLUP_COUNT_COLUMNS, *ROLLUP_SPLIT_COLUMNS)),
    experiences.c.latency_sum_ms,
    experiences.c.first_event_time_us,
    experiences.c.last_event_time_us,
)


def _rollup(row: Any, latencies: bool = True) -> m.ExperienceRollup:
    """An experience's rollup from its row (the _ROLLUP_COLUMNS, and with `latencies` its
    latency histogram; else left empty)."""
    return m.ExperienceRollup(
        rollups.totals_from_row(row),
        int(row.latency_sum_ms),
        row.first_event_time_us,
        row.last_event_time_us,
        unpacked_histogram(row.latency_buckets) if latencies else {},
    )


async def experiences_with_rollups(
    conn: AsyncConnection,
    experience_ids: Sequence[uuid.UUID],
    *,
    latencies: bool = True,
    ranked: tuple[str, int] | None = None,
) -> list[tuple[m.Experience, m.ExperienceRollup]]:
    """Several experiences with their rollups, in one read: those that exist, in no order,
    or `ranked` (an order, a key of EXPERIENCE_ORDERS, and a limit) the first of them, most
    first, the id breaking ties. Without `latencies`, their latency histograms are left
    empty (not read)."""
    if not experience_ids:
        return []
    e = experiences
    packed = [e.c.latency_buckets] if latencies else []
    query = (
        sa.select(*hot_path.EXPERIENCE_COLUMNS, *_ROLLUP_COLUMNS[1:], *packed)
        .select_from(hot_path.EXPERIENCES_JOIN)
        .where(e.c.id.in_(list(experience_ids)))
    )
    if ranked is not None:
        order, limit = ranked
        query = query.order_by(*(column.desc() for column in EXPERIENCE_ORDERS[order]), e.c.id).limit(limit)
    return [(hot_path.experience_from_row(row), _rollup(row, latencies)) for row in await conn.execute(query)]


async def experience_with_rollup(
    conn: AsyncConnection, experience_id: uuid.UUID
) -> tuple[m.Experience, m.ExperienceRollup] | None:
    """One experience with its rollup (GetExperience): one read of its row, its latency
    histogram packed in it, whatever its event count."""
    found = await experiences_with_rollups(conn, [experience_id])
    return found[0] if found else None


# ListExperiences orderings: the sort key of each, ascending; the id breaks ties.
EXPERIENCE_ORDERS: dict[str, tuple[sa.Column[Any], ...]] = {
    "create_time": (experiences.c.create_time_us,),
    "cost_total": (experiences.c.cost_total_dollars, experiences.c.cost_total_nanos),
    "event_count": (experiences.c.event_count,),
}


def experience_filters(
    type_id: int, version: int, start_us: int | None, end_us: int | None, column: sa.Column[Any]
) -> list[sa.ColumnElement[bool]]:
    where = [experiences.c.type_id == type_id]
    if version:
        where.append(experiences.c.version == version)
    if start_us is not None:
        where.append(column >= start_us)
    if end_us is not None:
        where.append(column < end_us)
    return where


async def list_experiences(
    conn: AsyncConnection,
    type_id: int,
    version: int,
    start_us: int | None,
    end_us: int | None,
    order: str,
    descending: bool,
    after: Sequence[Any] | None,
    limit: int,
) -> list[tuple[m.Experience, m.ExperienceRollup, list[Any]]]:
    """A page of experiences in the order named (a key of EXPERIENCE_ORDERS), each with its
    rollup and its position (the sort key and id) for the next page's `after`."""
    e = experiences
    if (start_us is not None or end_us is not None) and await _created_within(conn, type_id, start_us, end_us):
        # The same runs without the bound, which keeps an order's index from answering: the
        # dashboard's 90-day runs by cost at 1,000,000 events read the type's runs by
        # creation time and sorted them all.
        start_us = end_us = None
    key = (*EXPERIENCE_ORDERS[order], e.c.id)
    # Every sort key is among these columns: create time, or a rollup column.
    query = (
        sa.select(*hot_path.EXPERIENCE_COLUMNS, *_ROLLUP_COLUMNS[1:], e.c.latency_buckets)
        .select_from(hot_path.EXPERIENCES_JOIN)
        .where(*experience_filters(type_id, version, start_us, end_us, e.c.create_time_us))
        .order_by(*(column.desc() if descending else column for column in key))
        .limit(limit)
    )
    if after is not None:
        # Typed as the columns: an untyped UUID would bind as sa.Uuid's hex, not as tables.Uuid.
        position = sa.tuple_(*after[:-1], uuid.UUID(after[-1]), types=[column.type for column in key])
        query = query.where(sa.tuple_(*key) < position if descending else sa.tuple_(*key) > position)
    return [
        (
            hot_path.experience_from_row(row),
            _rollup(row),
            [*(row._mapping[c] for c in key[:-1]), str(row.id)],
        )
        for row in await conn.execute(query)
    ]


async def _created_within(conn: AsyncConnection, type_id: int, start_us: int | None, end_us: int | None) -> bool:
    """Whether every run of the type was created in [start_us, end_us): its first and its
    last by creation, two probes of ix_experiences_type_created."""
    e = experiences
    created = sa.select(e.c.create_time_us).where(e.c.type_id == type_id).limit(1)
    first = created.order_by(e.c.create_time_us).scalar_subquery()
    last = created.order_by(e.c.create_time_us.desc()).scalar_subquery()
    earliest, latest = (await conn.execute(sa.select(first, last))).one()
    if earliest is None:
        return True  # no runs: no bound changes the answer
    return (start_us is None or start_us <= earliest) and (end_us is None or latest < end_us)


async def experience_states(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, ExperienceState]:
    """What the type rollups count of these experiences, their rows locked for this transaction."""
    return await rollups.experience_states(conn, list(ids), lock=True)


async def counted(
    conn: AsyncConnection, states: dict[uuid.UUID, ExperienceState], step_ids: Collection[uuid.UUID] = ()
) -> dict[uuid.UUID, ExperienceState]:
    """The states as the type rollups count them: with their outcomes' verdicts, and those of
    `step_ids` with their step costs."""
    return await rollups.with_steps(conn, await rollups.with_verdicts(conn, states), step_ids)


async def delete_experiences(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> None:
    """Deletes experiences that have no events (the writer's own, created in this transaction)."""
    await conn.execute(sa.delete(experiences).where(experiences.c.id.in_(list(ids))))

"""Queries, as functions of an open connection so that callers compose transactions."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from ..domain.rollups import DAY_US, HOUR_US, ExperienceState, removal
from . import hot_path, rollups
from .tables import (
    ROLLUP_COUNT_COLUMNS,
    ROLLUP_MONEY_COLUMNS,
    api_keys,
    cost_rollups,
    custom_prices,
    events,
    experience_latencies,
    experience_type_versions,
    experience_types,
    experiences,
    idempotent_requests,
    server_keys,
    type_cost_buckets,
    type_rollups,
)


def _insert(conn: AsyncConnection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say ON CONFLICT DO NOTHING on either engine."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


# --- experience types -------------------------------------------------------------

_type_columns = (
    experience_types.c.id,
    experience_types.c.name,
    experience_types.c.description,
    experience_types.c.settings,
    experience_types.c.version,
    experience_types.c.create_time_us,
    experience_types.c.update_time_us,
)


def _type(row: Any) -> m.ExperienceType:
    return m.ExperienceType(
        name=row.name,
        description=row.description,
        settings=dict(row.settings),
        version=row.version,
        create_time_us=row.create_time_us,
        update_time_us=row.update_time_us,
    )


async def get_type(conn: AsyncConnection, name: str) -> tuple[int, m.ExperienceType] | None:
    row = (await conn.execute(sa.select(*_type_columns).where(experience_types.c.name == name))).first()
    return None if row is None else (row.id, _type(row))


async def get_types(conn: AsyncConnection, names: Iterable[str]) -> dict[str, tuple[int, m.ExperienceType]]:
    rows = await conn.execute(sa.select(*_type_columns).where(experience_types.c.name.in_(list(names))))
    return {row.name: (row.id, _type(row)) for row in rows}


async def insert_type(conn: AsyncConnection, t: m.ExperienceType) -> int | None:
    """Inserts the type and its version-1 snapshot; None if the name is taken."""
    stmt = (
        _insert(conn, experience_types)
        .values(
            name=t.name,
            description=t.description,
            settings=t.settings,
            version=t.version,
            create_time_us=t.create_time_us,
            update_time_us=t.update_time_us,
        )
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(experience_types.c.id)
    )
    type_id = (await conn.execute(stmt)).scalar()
    if type_id is not None:
        await insert_type_version(conn, type_id, t.version, t.description, t.settings, t.create_time_us)
    return None if type_id is None else int(type_id)


async def insert_type_version(
    conn: AsyncConnection, type_id: int, version: int, description: str, settings: dict[str, str], now_us: int
) -> None:
    await conn.execute(
        sa.insert(experience_type_versions).values(
            type_id=type_id, version=version, description=description, settings=settings, create_time_us=now_us
        )
    )


async def list_types(conn: AsyncConnection, after_name: str | None, limit: int) -> list[m.ExperienceType]:
    query = sa.select(*_type_columns).order_by(experience_types.c.name).limit(limit)
    if after_name is not None:
        query = query.where(experience_types.c.name > after_name)
    return [_type(row) for row in await conn.execute(query)]


async def update_type(conn: AsyncConnection, type_id: int, version: int, values: dict[str, Any], now_us: int) -> None:
    """Updates the type and the snapshot of its current version alike."""
    await conn.execute(
        sa.update(experience_types).where(experience_types.c.id == type_id).values(**values, update_time_us=now_us)
    )
    await conn.execute(
        sa.update(experience_type_versions)
        .where(experience_type_versions.c.type_id == type_id, experience_type_versions.c.version == version)
        .values(**values)
    )


async def increment_version(conn: AsyncConnection, type_id: int, now_us: int) -> int:
    """Adds 1 atomically (safe against concurrent increments) and returns the new version."""
    stmt = (
        sa.update(experience_types)
        .where(experience_types.c.id == type_id)
        .values(version=experience_types.c.version + 1, update_time_us=now_us)
        .returning(experience_types.c.version)
    )
    return int((await conn.execute(stmt)).scalar_one())


async def list_versions(
    conn: AsyncConnection, type_id: int, name: str, before_version: int | None, limit: int
) -> list[m.ExperienceTypeVersion]:
    v = experience_type_versions
    query = sa.select(v).where(v.c.type_id == type_id).order_by(v.c.version.desc()).limit(limit)
    if before_version is not None:
        query = query.where(v.c.version < before_version)
    return [
        m.ExperienceTypeVersion(name, row.version, row.description, dict(row.settings), row.create_time_us)
        for row in await conn.execute(query)
    ]


async def get_version(conn: AsyncConnection, type_id: int, name: str, version: int) -> m.ExperienceTypeVersion:
    v = experience_type_versions
    row = (await conn.execute(sa.select(v).where(v.c.type_id == type_id, v.c.version == version))).one()
    return m.ExperienceTypeVersion(name, row.version, row.description, dict(row.settings), row.create_time_us)


async def count_experiences_of_type(conn: AsyncConnection, type_id: int) -> int:
    stmt = sa.select(sa.func.count()).select_from(experiences).where(experiences.c.type_id == type_id)
    return (await conn.execute(stmt)).scalar_one()


async def _type_name(conn: AsyncConnection, type_id: int) -> str:
    query = sa.select(experience_types.c.name).where(experience_types.c.id == type_id)
    return str((await conn.execute(query)).scalar_one())


async def lock_type(conn: AsyncConnection, type_id: int) -> None:
    """Locks the type's row and its experiences' rows for this transaction (PostgreSQL; a
    SQLite writer holds the whole file), so that a writer adding an experience or events to
    the type commits before it, or waits and finds them gone."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.select(experience_types.c.id).where(experience_types.c.id == type_id).with_for_update())
        of_type = sa.select(experiences.c.id).where(experiences.c.type_id == type_id).order_by(experiences.c.id)
        await conn.execute(of_type.with_for_update())


async def delete_type(conn: AsyncConnection, type_id: int) -> int:
    """Deletes the type, its versions and its experiences; their events become unattributed
    (and move to the unattributed rows of the hourly cost rollup). Call lock_type first."""
    of_type = sa.select(experiences.c.id).where(experiences.c.type_id == type_id)
    hours = await rollups.hours_of_events(conn, events.c.experience_id.in_(of_type))
    name = await _type_name(conn, type_id)
    await conn.execute(sa.update(events).where(events.c.experience_id.in_(of_type)).values(experience_id=None))
    await conn.execute(sa.delete(experience_latencies).where(experience_latencies.c.experience_id.in_(of_type)))
    await rollups.rebuild_cost_rollups(conn, hours, {name, ""})
    await rollups.drop_type(conn, type_id)
    deleted = (await conn.execute(sa.delete(experiences).where(experiences.c.type_id == type_id))).rowcount
    await conn.execute(sa.delete(experience_type_versions).where(experience_type_versions.c.type_id == type_id))
    await conn.execute(sa.delete(experience_types).where(experience_types.c.id == type_id))
    return deleted


# --- request_id idempotency -------------------------------------------------------------


async def get_idempotent_request(conn: AsyncConnection, operation: str, request_id: str) -> tuple[str, str] | None:
    """(fingerprint, resource_key) recorded for the request id, if any."""
    t = idempotent_requests
    row = (
        await conn.execute(
            sa.select(t.c.fingerprint, t.c.resource_key).where(t.c.operation == operation, t.c.request_id == request_id)
        )
    ).first()
    return None if row is None else (row.fingerprint, row.resource_key)


async def put_idempotent_request(
    conn: AsyncConnection, operation: str, request_id: str, fingerprint: str, resource_key: str, now_us: int
) -> None:
    await conn.execute(
        sa.insert(idempotent_requests).values(
            operation=operation,
            request_id=request_id,
            fingerprint=fingerprint,
            resource_key=resource_key,
            create_time_us=now_us,
        )
    )


# --- experiences -------------------------------------------------------------------


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
    stmt = _insert(conn, experiences).on_conflict_do_nothing(index_elements=["id"]).returning(experiences.c.id)
    result = await conn.execute(stmt, list(rows))
    return {row.id for row in result}


async def delete_experience(conn: AsyncConnection, experience_id: uuid.UUID) -> int | None:
    """Deletes it and unattributes its events (moving them to the unattributed rows of the
    hourly cost rollup); None if it did not exist, else the event count."""
    name = (
        await conn.execute(
            sa.select(experience_types.c.name)
            .select_from(hot_path.EXPERIENCES_JOIN)
            .where(experiences.c.id == experience_id)
        )
    ).scalar()
    if name is None:
        return None
    states = await rollups.experience_states(conn, [experience_id], lock=True)
    if experience_id in states:
        await rollups.add_type_deltas(conn, removal(states[experience_id]))
    await conn.execute(sa.delete(experiences).where(experiences.c.id == experience_id))
    await conn.execute(sa.delete(experience_latencies).where(experience_latencies.c.experience_id == experience_id))
    hours = await rollups.hours_of_events(conn, events.c.experience_id == experience_id)
    result = await conn.execute(
        sa.update(events).where(events.c.experience_id == experience_id).values(experience_id=None)
    )
    await rollups.rebuild_cost_rollups(conn, hours, {name, ""})
    return result.rowcount


async def set_properties(conn: AsyncConnection, experience_id: uuid.UUID, properties: dict[str, str]) -> None:
    await conn.execute(sa.update(experiences).where(experiences.c.id == experience_id).values(properties=properties))


@dataclasses.dataclass(frozen=True)
class ExperienceRollup:
    """An experience's rollup as stored: its sums and its latency histogram."""

    totals: m.CostTotals
    latency_sum_ms: int
    first_event_time_us: int | None
    last_event_time_us: int | None
    latency_buckets: dict[int, int]


_ROLLUP_COLUMNS = (
    experiences.c.id,  # first, as list_experiences relies on
    *(experiences.c[name] for name in (*ROLLUP_COUNT_COLUMNS, *ROLLUP_MONEY_COLUMNS)),
    experiences.c.latency_sum_ms,
    experiences.c.first_event_time_us,
    experiences.c.last_event_time_us,
)


async def _latency_histograms(conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[int, int]]:
    lat = experience_latencies
    if len(ids) == 1:
        # One experience (GetExperience): its id is not read back, as making a UUID of each
        # of a heavy run's ~300 rows took a fifth of the call.
        one = sa.select(lat.c.bucket, lat.c.event_count).where(lat.c.experience_id == ids[0])
        return {ids[0]: {int(bucket): int(count) for bucket, count in (await conn.execute(one)).all()}}
    buckets: dict[uuid.UUID, dict[int, int]] = {experience_id: {} for experience_id in ids}
    query = sa.select(lat.c.experience_id, lat.c.bucket, lat.c.event_count).where(lat.c.experience_id.in_(ids))
    for experience_id, bucket, count in await conn.execute(query):
        buckets[experience_id][int(bucket)] = int(count)
    return buckets


def _rollup(row: Any, buckets: dict[int, int]) -> ExperienceRollup:
    """An experience's rollup from its row (the _ROLLUP_COLUMNS) and its latency histogram."""
    return ExperienceRollup(
        rollups.totals_from_row(row),
        int(row.latency_sum_ms),
        row.first_event_time_us,
        row.last_event_time_us,
        buckets,
    )


async def experience_with_rollup(
    conn: AsyncConnection, experience_id: uuid.UUID
) -> tuple[m.Experience, ExperienceRollup] | None:
    """One experience with its rollup (GetExperience): two indexed reads, its row and its
    latency histogram, whatever its event count."""
    query = (
        sa.select(*hot_path.EXPERIENCE_COLUMNS, *_ROLLUP_COLUMNS[1:])  # the id is in both
        .select_from(hot_path.EXPERIENCES_JOIN)
        .where(experiences.c.id == experience_id)
    )
    row = (await conn.execute(query)).first()
    if row is None:
        return None
    buckets = await _latency_histograms(conn, [experience_id])
    return hot_path.experience_from_row(row), _rollup(row, buckets[experience_id])


# ListExperiences orderings: the sort key of each, ascending; the id breaks ties.
EXPERIENCE_ORDERS: dict[str, tuple[sa.Column[Any], ...]] = {
    "create_time": (experiences.c.create_time_us,),
    "cost_total": (experiences.c.cost_total_dollars, experiences.c.cost_total_nanos),
    "event_count": (experiences.c.event_count,),
}


def _experience_filters(
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
) -> list[tuple[m.Experience, ExperienceRollup, list[Any]]]:
    """A page of experiences in the order named (a key of EXPERIENCE_ORDERS), each with its
    rollup and its position (the sort key and id) for the next page's `after`."""
    e = experiences
    key = (*EXPERIENCE_ORDERS[order], e.c.id)
    # Every sort key is among these columns: create time, or a rollup column.
    query = (
        sa.select(*hot_path.EXPERIENCE_COLUMNS, *_ROLLUP_COLUMNS[1:])
        .select_from(hot_path.EXPERIENCES_JOIN)
        .where(*_experience_filters(type_id, version, start_us, end_us, e.c.create_time_us))
        .order_by(*(column.desc() if descending else column for column in key))
        .limit(limit)
    )
    if after is not None:
        position = sa.tuple_(*after[:-1], uuid.UUID(after[-1]))
        query = query.where(sa.tuple_(*key) < position if descending else sa.tuple_(*key) > position)
    rows = list(await conn.execute(query))
    buckets = await _latency_histograms(conn, [row.id for row in rows]) if rows else {}
    return [
        (
            hot_path.experience_from_row(row),
            _rollup(row, buckets[row.id]),
            [*(row._mapping[c] for c in key[:-1]), str(row.id)],
        )
        for row in rows
    ]


@dataclasses.dataclass
class VersionCosts:
    """GetExperienceTypeStats' sums over one version's experiences, and their cost histogram."""

    version: int
    experience_count: int = 0
    event_count: int = 0
    unpriced_event_count: int = 0
    total_nanos: int = 0
    buckets: dict[int, int] = dataclasses.field(default_factory=dict)


async def type_costs(
    conn: AsyncConnection, type_id: int, version: int, start_day: int | None, end_day: int | None
) -> dict[int, VersionCosts]:
    """Per version: the type rollup's sums and cost histogram over the days of first events
    in [start_day, end_day): a few rows per day, whatever the number of experiences."""
    t, b = type_rollups, type_cost_buckets
    by_version: dict[int, VersionCosts] = {}
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
            by_version[int(row.version)] = VersionCosts(
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
    return [*_experience_filters(type_id, version, start_us, end_us, e.c.first_event_time_us), e.c.event_count > 0]


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
        .where(*_experience_filters(type_id, version, start_us, end_us, e.c.first_event_time_us))
        .order_by(e.c.cost_total_dollars.desc(), e.c.cost_total_nanos.desc())
        .limit(1)
    )
    row = (await conn.execute(query)).first()
    return 0 if row is None else rollups.joined(*row)


async def experience_states(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, ExperienceState]:
    """What the type rollups count of these experiences, their rows locked for this transaction."""
    return await rollups.experience_states(conn, list(ids), lock=True)


# Adds a commit's stored events to the rollups (domain.rollups made what it adds).
add_rollups = rollups.add


async def insert_events(conn: AsyncConnection, stored: hot_path.Stored) -> set[uuid.UUID]:
    """Inserts (event, result) pairs in one transaction; returns the ids NOT inserted
    (usually none): events whose idempotency key another transaction committed
    first are skipped, not failed."""
    return await hot_path.insert_events(conn, stored) if stored else set()


_EVENTS_WITH_EXPERIENCE = rollups.EVENTS_WITH_TYPE
_EVENT_WITH_EXPERIENCE_COLUMNS = (
    events,
    experience_types.c.name.label("experience_name"),
    experiences.c.version.label("experience_version"),
)


async def events_by_key(conn: AsyncConnection, keys: Iterable[str]) -> dict[str, Any]:
    """Stored events by idempotency key, with their experience's name and version."""
    keys = list(keys)
    if not keys:
        return {}
    query = (
        sa.select(*_EVENT_WITH_EXPERIENCE_COLUMNS)
        .select_from(_EVENTS_WITH_EXPERIENCE)
        .where(events.c.idempotency_key.in_(keys))
    )
    return {row.idempotency_key: row for row in await conn.execute(query)}


async def event_by_id(conn: AsyncConnection, request_id: uuid.UUID) -> Any:
    query = (
        sa.select(*_EVENT_WITH_EXPERIENCE_COLUMNS).select_from(_EVENTS_WITH_EXPERIENCE).where(events.c.id == request_id)
    )
    return (await conn.execute(query)).first()


def _has_tag(conn: AsyncConnection, tag: str) -> sa.ColumnElement[bool]:
    """The event's request_tags (a JSON array) hold `tag`."""
    elements = "json_array_elements_text" if conn.dialect.name == "postgresql" else "json_each"
    values = getattr(sa.func, elements)(events.c.request_tags).table_valued("value").alias("tag")
    return sa.exists(sa.select(sa.literal(1)).select_from(values).where(values.c.value == tag))


@dataclasses.dataclass(frozen=True)
class EventFilter:
    experience_id: uuid.UUID | None = None
    type_id: int | None = None
    version: int = 0
    user_id: str = ""
    request_tag: str = ""
    category: str = ""
    resource: str = ""
    cost_state: int = 0
    start_us: int | None = None
    end_us: int | None = None


def _event_conditions(conn: AsyncConnection, f: EventFilter) -> list[sa.ColumnElement[bool]]:
    ev = events
    where: list[sa.ColumnElement[bool]] = []
    if f.experience_id is not None:
        where.append(ev.c.experience_id == f.experience_id)
    if f.type_id is not None:
        where.append(experiences.c.type_id == f.type_id)
        if f.version:
            where.append(experiences.c.version == f.version)
    for column, value in ((ev.c.user_id, f.user_id), (ev.c.category, f.category), (ev.c.resource, f.resource)):
        if value:
            where.append(column == value)
    if f.cost_state:
        where.append(ev.c.cost_state == f.cost_state)
    if f.start_us is not None:
        where.append(ev.c.event_time_us >= f.start_us)
    if f.end_us is not None:
        where.append(ev.c.event_time_us < f.end_us)
    if f.request_tag:
        where.append(_has_tag(conn, f.request_tag))
    return where


async def list_events(
    conn: AsyncConnection, f: EventFilter, before: tuple[int, uuid.UUID] | None, limit: int
) -> list[Any]:
    """Stored events matching the filter, newest first (event time, then id)."""
    ev = events
    query = (
        sa.select(*_EVENT_WITH_EXPERIENCE_COLUMNS)
        .select_from(_EVENTS_WITH_EXPERIENCE)
        .where(*_event_conditions(conn, f))
        .order_by(ev.c.event_time_us.desc(), ev.c.id.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(sa.tuple_(ev.c.event_time_us, ev.c.id) < sa.tuple_(*before))
    return list(await conn.execute(query))


# --- the cost breakdown ---------------------------------------------------------------------

# Dimensions the hourly rollup keeps; the others (user id, request tag) are read from events.
ROLLUP_DIMENSIONS = frozenset({"experience_name", "experience_version", "category", "resource", "day", "hour"})


def _rollup_keys(dimension: str) -> list[sa.ColumnElement[Any]]:
    r = cost_rollups
    keys: dict[str, list[sa.ColumnElement[Any]]] = {
        "experience_name": [r.c.experience_name],
        "experience_version": [r.c.experience_name, r.c.experience_version],
        "category": [r.c.category],
        "resource": [r.c.resource],
        "day": [r.c.hour_us - r.c.hour_us % DAY_US],
        "hour": [r.c.hour_us],
    }
    return keys[dimension]


def _event_keys(dimension: str, tag: Any) -> list[sa.ColumnElement[Any]]:
    ev, time = events, events.c.event_time_us
    name = sa.func.coalesce(experience_types.c.name, "")
    keys: dict[str, list[sa.ColumnElement[Any]]] = {
        "experience_name": [name],
        "experience_version": [name, sa.func.coalesce(experiences.c.version, 0)],
        "category": [ev.c.category],
        "resource": [ev.c.resource],
        "user_id": [sa.func.coalesce(ev.c.user_id, "")],
        "request_tag": [sa.func.coalesce(tag.c.value, "") if tag is not None else sa.literal("")],
        "day": [time - time % DAY_US],
        "hour": [time - time % HOUR_US],
    }
    return keys[dimension]


def _rollup_sums() -> list[sa.Label[Any]]:
    """The sums of cost_rollups rows, labelled as their columns (as rollups.event_sums does
    for events)."""
    r = cost_rollups
    return [sa.func.sum(r.c[name]).label(name) for name in (*ROLLUP_COUNT_COLUMNS, *ROLLUP_MONEY_COLUMNS)]


def _grouped(
    query: sa.Select[Any],
    keys: list[sa.ColumnElement[Any]],
    time: sa.ColumnElement[int],
    start_us: int | None,
    end_us: int | None,
    type_name: sa.ColumnElement[str],
    only_type: str,
) -> sa.Select[Any]:
    """The breakdown's query grouped by `keys`, over [start_us, end_us) of `time`, and only
    of the type `only_type` when one is given."""
    if keys:
        query = query.group_by(*keys)
    if start_us is not None:
        query = query.where(time >= start_us)
    if end_us is not None:
        query = query.where(time < end_us)
    if only_type:
        query = query.where(type_name == only_type)
    return query


Groups = dict[tuple[Any, ...], m.CostTotals]


def _merge(groups: Groups, rows: Iterable[Any], width: int) -> None:
    for row in rows:
        if not row.event_count:  # an aggregate over no rows
            continue
        key = tuple(row[:width])
        totals = rollups.totals_from_row(row)
        if key in groups:
            groups[key].add(totals)
        else:
            groups[key] = totals


async def _breakdown_from_rollup(
    conn: AsyncConnection, dimensions: Sequence[str], start_us: int | None, end_us: int | None, type_name: str
) -> Groups:
    r = cost_rollups
    keys = [key for d in dimensions for key in _rollup_keys(d)]
    query = _grouped(
        sa.select(*keys, *_rollup_sums()), keys, r.c.hour_us, start_us, end_us, r.c.experience_name, type_name
    )
    groups: Groups = {}
    _merge(groups, await conn.execute(query), len(keys))
    return groups


async def _breakdown_from_events(
    conn: AsyncConnection,
    dimensions: Sequence[str],
    start_us: int | None,
    end_us: int | None,
    type_name: str,
    into: Groups,
) -> None:
    ev = events
    # The experience and its type are joined only where a dimension or the filter needs them.
    needs_type = bool(type_name) or {"experience_name", "experience_version"} & set(dimensions)
    source: Any = _EVENTS_WITH_EXPERIENCE if needs_type else events
    tag = None
    if "request_tag" in dimensions:
        if conn.dialect.name == "postgresql":
            tag = sa.func.json_array_elements_text(ev.c.request_tags).table_valued("value").lateral("tag")
        else:  # SQLite's table-valued functions see the columns to their left without LATERAL
            tag = sa.func.json_each(ev.c.request_tags).table_valued("value").alias("tag")
        source = source.outerjoin(tag, sa.true())
    keys = [key for d in dimensions for key in _event_keys(d, tag)]
    query = _grouped(
        sa.select(*keys, *rollups.event_sums()).select_from(source),
        keys,
        ev.c.event_time_us,
        start_us,
        end_us,
        experience_types.c.name,
        type_name,
    )
    _merge(into, await conn.execute(query), len(keys))


async def cost_breakdown(
    conn: AsyncConnection, dimensions: Sequence[str], start_us: int | None, end_us: int | None, type_name: str
) -> Groups:
    """Sums of the events in [start_us, end_us) per group of the dimensions (none: one
    group, the total). From the hourly rollup for the window's whole hours and the events
    of its partial hours; from the events alone for user id and request tag."""
    if not set(dimensions) <= ROLLUP_DIMENSIONS:
        groups: Groups = {}
        await _breakdown_from_events(conn, dimensions, start_us, end_us, type_name, groups)
        return groups
    first_hour = None if start_us is None else -(-start_us // HOUR_US) * HOUR_US
    end_hour = None if end_us is None else end_us - end_us % HOUR_US
    if first_hour is not None and end_hour is not None and end_hour <= first_hour:
        groups = {}
        await _breakdown_from_events(conn, dimensions, start_us, end_us, type_name, groups)
        return groups
    groups = await _breakdown_from_rollup(conn, dimensions, first_hour, end_hour, type_name)
    if start_us is not None and first_hour is not None and start_us < first_hour:
        await _breakdown_from_events(conn, dimensions, start_us, first_hour, type_name, groups)
    if end_us is not None and end_hour is not None and end_hour < end_us:
        await _breakdown_from_events(conn, dimensions, end_hour, end_us, type_name, groups)
    return groups


# --- custom prices ---------------------------------------------------------------


def _price(row: Any) -> m.CustomPrice:
    return m.CustomPrice(
        price_id=row.id,
        category=row.category,
        resource=row.resource,
        effective_time_us=row.effective_time_us,
        unit_prices={unit: m.UnitPrice(*pair) for unit, pair in row.unit_prices.items()},
        create_time_us=row.create_time_us,
        create_key=row.create_key or "",
        end_time_us=row.end_time_us,
        end_key=row.end_key or "",
        price_context=dict(row.price_context or {}),
    )


async def insert_price(conn: AsyncConnection, price: m.CustomPrice) -> bool:
    stmt = (
        _insert(conn, custom_prices)
        .values(
            id=price.price_id,
            category=price.category,
            resource=price.resource,
            effective_time_us=price.effective_time_us,
            unit_prices={u: [p.input_per_million, p.output_per_million] for u, p in price.unit_prices.items()},
            create_time_us=price.create_time_us,
            update_time_us=price.create_time_us,
            create_key=price.create_key or None,
            price_context=price.price_context or None,
            price_context_key=price_context_key(price.price_context),
        )
        .on_conflict_do_nothing()
        .returning(custom_prices.c.id)
    )
    return (await conn.execute(stmt)).scalar() is not None


async def get_price(conn: AsyncConnection, price_id: uuid.UUID) -> m.CustomPrice | None:
    row = (await conn.execute(sa.select(custom_prices).where(custom_prices.c.id == price_id))).first()
    return None if row is None else _price(row)


def price_context_key(context: dict[str, str]) -> str:
    """A variant's price context as the text its uniqueness is kept by: "k=v,k=v", sorted."""
    return ",".join(f"{k}={v}" for k, v in sorted(context.items()))


async def list_prices(
    conn: AsyncConnection, category: str, resource: str, after: tuple[str, str, int, str] | None, limit: int
) -> list[m.CustomPrice]:
    """By category, resource, effective time (newest first) and variant."""
    p = custom_prices
    order = (p.c.category, p.c.resource, p.c.effective_time_us.desc(), p.c.price_context_key)
    query = sa.select(p).order_by(*order).limit(limit)
    if category:
        query = query.where(p.c.category == category)
    if resource:
        query = query.where(p.c.resource == resource)
    if after is not None:
        cat, res, eff, variant = after
        same_time = sa.and_(p.c.category == cat, p.c.resource == res, p.c.effective_time_us == eff)
        query = query.where(
            sa.or_(
                p.c.category > cat,
                sa.and_(p.c.category == cat, p.c.resource > res),
                sa.and_(p.c.category == cat, p.c.resource == res, p.c.effective_time_us < eff),
                sa.and_(same_time, p.c.price_context_key > variant),
            )
        )
    return [_price(row) for row in await conn.execute(query)]


async def all_prices(conn: AsyncConnection) -> list[m.CustomPrice]:
    return [_price(row) for row in await conn.execute(sa.select(custom_prices))]


async def price_catalog_revision(conn: AsyncConnection) -> tuple[int, int]:
    """Changes whenever a custom price is added or ended: (count, latest change)."""
    p = custom_prices
    row = (await conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(p.c.update_time_us), 0)))).one()
    return int(row[0]), int(row[1])


async def end_price(conn: AsyncConnection, price_id: uuid.UUID, end_time_us: int, key: str, now_us: int) -> bool:
    """Sets the end of a price that has none; False if it already had one."""
    p = custom_prices
    stmt = (
        sa.update(p)
        .where(p.c.id == price_id, p.c.end_time_us.is_(None))
        .values(end_time_us=end_time_us, end_key=key or None, update_time_us=now_us)
    )
    return bool((await conn.execute(stmt)).rowcount)


# --- API keys -------------------------------------------------------------------------


def _api_key(row: Any) -> m.ApiKey:
    return m.ApiKey(row.name, tuple(row.scopes), row.create_time_us, row.last_use_time_us, row.revoke_time_us)


async def insert_api_key(conn: AsyncConnection, key: m.ApiKey, secret_hash: str) -> bool:
    """Inserts the key; False if its name is taken."""
    stmt = (
        _insert(conn, api_keys)
        .values(name=key.name, scopes=list(key.scopes), secret_hash=secret_hash, create_time_us=key.create_time_us)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(api_keys.c.id)
    )
    return (await conn.execute(stmt)).scalar() is not None


async def api_key_by_hash(conn: AsyncConnection, secret_hash: str) -> m.ApiKey | None:
    row = (await conn.execute(sa.select(api_keys).where(api_keys.c.secret_hash == secret_hash))).first()
    return None if row is None else _api_key(row)


async def list_api_keys(conn: AsyncConnection, after_name: str | None, limit: int) -> list[m.ApiKey]:
    query = sa.select(api_keys).order_by(api_keys.c.name).limit(limit)
    if after_name is not None:
        query = query.where(api_keys.c.name > after_name)
    return [_api_key(row) for row in await conn.execute(query)]


async def revoke_api_key(conn: AsyncConnection, name: str, now_us: int) -> m.ApiKey | None:
    """Revokes the key (a revoked key stays revoked at its first time); None if there is none."""
    await conn.execute(
        sa.update(api_keys)
        .where(api_keys.c.name == name, api_keys.c.revoke_time_us.is_(None))
        .values(revoke_time_us=now_us)
    )
    row = (await conn.execute(sa.select(api_keys).where(api_keys.c.name == name))).first()
    return None if row is None else _api_key(row)


async def touch_api_key(conn: AsyncConnection, secret_hash: str, now_us: int) -> None:
    await conn.execute(sa.update(api_keys).where(api_keys.c.secret_hash == secret_hash).values(last_use_time_us=now_us))


async def server_key(conn: AsyncConnection, name: str) -> bytes:
    """A key the replicas of this database share (made by migration 0004)."""
    value = (await conn.execute(sa.select(server_keys.c.value).where(server_keys.c.name == name))).scalar_one()
    return bytes.fromhex(value)


async def delete_experiences(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> None:
    """Deletes experiences that have no events (the writer's own, created in this transaction)."""
    await conn.execute(sa.delete(experiences).where(experiences.c.id.in_(list(ids))))

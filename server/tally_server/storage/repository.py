"""Queries, as functions of an open connection so that callers compose transactions."""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from .tables import custom_prices, events, experience_type_versions, experience_types, experiences, idempotent_requests


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


async def delete_type(conn: AsyncConnection, type_id: int) -> int:
    """Deletes the type, its versions and its experiences; their events become unattributed."""
    of_type = sa.select(experiences.c.id).where(experiences.c.type_id == type_id)
    await conn.execute(sa.update(events).where(events.c.experience_id.in_(of_type)).values(experience_id=None))
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

_experience_columns = (
    experiences.c.id,
    experience_types.c.name,
    experiences.c.version,
    experiences.c.create_time_us,
    experiences.c.properties,
)
_experiences_join = experiences.join(experience_types, experiences.c.type_id == experience_types.c.id)


async def _sqlite_driver(conn: AsyncConnection) -> Any:
    """The aiosqlite connection under `conn`, inside its open transaction. The ingest
    writer's statements go to it directly: one trip to its thread per statement, where
    SQLAlchemy's adapted cursor takes three or four."""
    return (await conn.get_raw_connection()).driver_connection


def _experience(row: Any) -> m.Experience:
    return m.Experience(row.id, row.name, row.version, row.create_time_us, dict(row.properties))


def _experiences_by_id(ids: Sequence[uuid.UUID]) -> sa.Select[Any]:
    return sa.select(*_experience_columns).select_from(_experiences_join).where(experiences.c.id.in_(ids))


@functools.lru_cache(maxsize=32)
def _sqlite_experiences_by_id(count: int) -> str:
    """The same query as SQLite text, for count ids."""
    query = _experiences_by_id([uuid.UUID(int=i) for i in range(count)])
    return str(query.compile(dialect=sqlite.dialect(), compile_kwargs={"render_postcompile": True}))


async def get_experiences(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, m.Experience]:
    ids = list(ids)
    if not ids:
        return {}
    if conn.dialect.name == "sqlite":
        # The ingest writer asks this in every commit. Ids are stored as hex and
        # properties as JSON text, as sa.Uuid and sa.JSON do on SQLite.
        driver = await _sqlite_driver(conn)
        rows = await driver.execute_fetchall(_sqlite_experiences_by_id(len(ids)), [i.hex for i in ids])
        found = (m.Experience(uuid.UUID(hex=r[0]), r[1], r[2], r[3], json.loads(r[4])) for r in rows)
        return {experience.experience_id: experience for experience in found}
    return {row.id: _experience(row) for row in await conn.execute(_experiences_by_id(ids))}


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


async def list_experiences(
    conn: AsyncConnection,
    type_id: int,
    version: int,
    start_us: int | None,
    end_us: int | None,
    before: tuple[int, uuid.UUID] | None,
    limit: int,
) -> list[m.Experience]:
    e = experiences
    query = (
        sa.select(*_experience_columns)
        .select_from(_experiences_join)
        .where(e.c.type_id == type_id)
        .order_by(e.c.create_time_us.desc(), e.c.id.desc())
        .limit(limit)
    )
    if version:
        query = query.where(e.c.version == version)
    if start_us is not None:
        query = query.where(e.c.create_time_us >= start_us)
    if end_us is not None:
        query = query.where(e.c.create_time_us < end_us)
    if before is not None:
        query = query.where(sa.tuple_(e.c.create_time_us, e.c.id) < sa.tuple_(*before))
    return [_experience(row) for row in await conn.execute(query)]


async def delete_experience(conn: AsyncConnection, experience_id: uuid.UUID) -> int | None:
    """Deletes it and unattributes its events; None if it did not exist, else the event count."""
    deleted = (await conn.execute(sa.delete(experiences).where(experiences.c.id == experience_id))).rowcount
    if not deleted:
        return None
    result = await conn.execute(
        sa.update(events).where(events.c.experience_id == experience_id).values(experience_id=None)
    )
    return result.rowcount


async def set_properties(conn: AsyncConnection, experience_id: uuid.UUID, properties: dict[str, str]) -> None:
    await conn.execute(sa.update(experiences).where(experiences.c.id == experience_id).values(properties=properties))


async def experience_event_summary(conn: AsyncConnection, experience_id: uuid.UUID) -> tuple[Any, list[int]]:
    """Aggregates of the experience's events, and their latencies in ascending order."""
    ev = events
    aggregate = sa.select(
        sa.func.count().label("event_count"),
        sa.func.coalesce(sa.func.sum(ev.c.cost_input_nanos), 0).label("cost_input"),
        sa.func.coalesce(sa.func.sum(ev.c.cost_output_nanos), 0).label("cost_output"),
        sa.func.coalesce(sa.func.sum(ev.c.cost_total_nanos), 0).label("cost_total"),
        sa.func.count().filter(ev.c.http_status_code >= 400).label("failed"),
        sa.func.count().filter(ev.c.cost_state != int(m.CostState.PRICED)).label("unpriced"),
        sa.func.min(ev.c.event_time_us).label("first_us"),
        sa.func.max(ev.c.event_time_us).label("last_us"),
    ).where(ev.c.experience_id == experience_id)
    summary = (await conn.execute(aggregate)).one()
    latencies = await conn.execute(
        sa.select(ev.c.end_to_end_latency_ms)
        .where(ev.c.experience_id == experience_id)
        .order_by(ev.c.end_to_end_latency_ms)
    )
    return summary, [row[0] for row in latencies]


async def cost_per_experience(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> list[Any]:
    """One row per experience of the type with events in the window:
    (version, experience_id, total_nanos, event_count, unpriced_count)."""
    ev, e = events, experiences
    query = (
        sa.select(
            e.c.version,
            e.c.id,
            sa.func.sum(ev.c.cost_total_nanos).label("total"),
            sa.func.count().label("events"),
            sa.func.count().filter(ev.c.cost_state != int(m.CostState.PRICED)).label("unpriced"),
        )
        .select_from(ev.join(e, ev.c.experience_id == e.c.id))
        .where(e.c.type_id == type_id)
        .group_by(e.c.version, e.c.id)
    )
    if version:
        query = query.where(e.c.version == version)
    if start_us is not None:
        query = query.where(ev.c.event_time_us >= start_us)
    if end_us is not None:
        query = query.where(ev.c.event_time_us < end_us)
    return list(await conn.execute(query))


# --- events ----------------------------------------------------------------------------


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


_EVENT_COLUMNS = tuple(column.name for column in events.columns)
# SQLite inserts a batch as few multi-row INSERTs: one of exactly n rows for a small
# batch, else rows in chunks of 2**k (at most 1,024, within SQLite's 32,766 bound
# parameters), so that the statements are few and each is prepared once per
# connection. executemany would step once per row, releasing and retaking the GIL
# each time: beside a busy event loop, each retake waits for the loop's thread.
_SQLITE_MAX_ROWS = 1024 if sqlite3.sqlite_version_info >= (3, 32) else 32
_SQLITE_EXACT_ROWS = 32  # up to this many rows, one statement of exactly that many


@functools.lru_cache(maxsize=64)
def _sqlite_insert_events(rows: int) -> str:
    placeholders = "(" + ", ".join("?" * len(_EVENT_COLUMNS)) + ")"
    return (
        f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) VALUES {', '.join([placeholders] * rows)} "
        "ON CONFLICT (idempotency_key) DO NOTHING"
    )


def _sqlite_chunks(count: int) -> list[int]:
    """Statement sizes for count rows, largest first."""
    chunks = [_SQLITE_MAX_ROWS] * (count // _SQLITE_MAX_ROWS)
    rest = count % _SQLITE_MAX_ROWS
    while rest > _SQLITE_EXACT_ROWS:
        chunks.append(1 << (rest.bit_length() - 1))
        rest -= chunks[-1]
    return [*chunks, rest] if rest else chunks


def _units_json(units: dict[str, tuple[int, int]]) -> str:
    """json.dumps of an event's units as {type: [input, output]}, written out directly
    (this runs once per event): unit types are validated as [a-z0-9_]+, so they
    need no escaping."""
    if any(not unit.isascii() or not unit.replace("_", "").isalnum() for unit in units):
        return _compact_json({unit: list(counts) for unit, counts in units.items()})
    return "{" + ",".join(f'"{unit}":[{i},{o}]' for unit, (i, o) in units.items()) + "}"


def _json_or_null(value: Any) -> str | None:
    return _compact_json(value) if value else None


def _event_row(event: m.UsageEvent, result: m.IngestResult) -> list[Any]:
    """The events row of a priced, attributed event, in column order, with JSON
    columns as text (what SQLAlchemy's JSON type would bind, without its per-value
    overhead). Built directly from the records: this runs once per ingested event."""
    cost, price, context = result.cost, result.cost.price, event.context
    return [
        result.request_id,
        result.idempotency_key or None,
        event.content_hash,
        result.experience_id,
        result.experience_created,
        event.category,
        event.resource,
        _units_json(event.units),
        event.event_time_us,
        result.ingest_time_us,
        event.end_to_end_latency_ms,
        event.time_to_first_token_ms,
        event.http_status_code,
        event.provider_response_id or None,
        context.user_id or None,
        _json_or_null(list(context.request_tags)),
        _json_or_null(event.properties),
        cost.input_nanos,
        cost.output_nanos,
        cost.total_nanos,
        int(cost.state),
        int(price.source) if price else 0,
        price.category if price else None,
        price.resource if price else None,
        price.version if price else None,
        price.effective_time_us if price else None,
        _json_or_null([[u.unit_type, u.input, u.output, u.reason] for u in cost.unknown_units]),
        _json_or_null(list(result.warnings)),
    ]


# _event_row writes the columns in this order; a new column must be added to both.
if _EVENT_COLUMNS != (
    "id",
    "idempotency_key",
    "content_hash",
    "experience_id",
    "experience_created",
    "category",
    "resource",
    "units",
    "event_time_us",
    "ingest_time_us",
    "end_to_end_latency_ms",
    "time_to_first_token_ms",
    "http_status_code",
    "provider_response_id",
    "user_id",
    "request_tags",
    "properties",
    "cost_input_nanos",
    "cost_output_nanos",
    "cost_total_nanos",
    "cost_state",
    "price_source",
    "price_category",
    "price_resource",
    "price_version",
    "price_effective_time_us",
    "unknown_units",
    "warnings",
):
    raise RuntimeError(f"_event_row does not match the events table's columns {_EVENT_COLUMNS}")


def _postgres_array_type(column: sa.Column[Any]) -> str:
    if isinstance(column.type, sa.Uuid):
        return "uuid"
    if isinstance(column.type, sa.JSON):
        return "json"
    if isinstance(column.type, sa.Boolean):
        return "boolean"
    if isinstance(column.type, sa.BigInteger | sa.SmallInteger | sa.Integer):
        return "bigint"
    return "text"


# One statement for a whole batch: each column travels as one array and unnest()
# turns them back into rows (asyncpg encodes arrays in C).
_POSTGRES_INSERT_EVENTS = (
    f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) SELECT "
    + ", ".join(f"batch.{c.name}::{_postgres_array_type(c)}" for c in events.columns)
    + " FROM unnest("
    + ", ".join(
        f"${i}::{'text' if _postgres_array_type(c) == 'json' else _postgres_array_type(c)}[]"
        for i, c in enumerate(events.columns, 1)
    )
    + f") AS batch ({', '.join(_EVENT_COLUMNS)}) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
)


async def insert_events(conn: AsyncConnection, stored: Sequence[tuple[m.UsageEvent, m.IngestResult]]) -> set[uuid.UUID]:
    """Inserts (event, result) pairs in one transaction; returns the ids NOT inserted
    (usually none): events whose idempotency key another transaction committed
    first are skipped, not failed."""
    if not stored:
        return set()
    rows = [_event_row(event, result) for event, result in stored]
    if conn.dialect.name == "sqlite":
        for row in rows:
            row[0] = row[0].hex  # UUIDs as hex, as sa.Uuid stores them on SQLite
            if row[3] is not None:
                row[3] = row[3].hex
        # SQLAlchemy's parameter handling would also cost more than the insert itself
        # for statements this wide.
        driver = await _sqlite_driver(conn)
        changes_before, start = driver.total_changes, 0
        for size in _sqlite_chunks(len(rows)):
            values = tuple(itertools.chain.from_iterable(rows[start : start + size]))
            await driver.execute_fetchall(_sqlite_insert_events(size), values)
            start += size
        inserted = driver.total_changes - changes_before
        if inserted == len(rows):
            return set()
        ids = [result.request_id for _, result in stored]
        found = await conn.execute(sa.select(events.c.id).where(events.c.id.in_(ids)))
        return set(ids) - {row.id for row in found}
    result = await conn.exec_driver_sql(_POSTGRES_INSERT_EVENTS, tuple(map(list, zip(*rows, strict=True))))
    inserted_ids = [row[0] for row in result]
    if len(inserted_ids) == len(rows):
        return set()
    return {result.request_id for _, result in stored} - set(inserted_ids)


async def events_by_key(conn: AsyncConnection, keys: Iterable[str]) -> dict[str, Any]:
    """Stored events by idempotency key, with their experience's name and version."""
    keys = list(keys)
    if not keys:
        return {}
    ev = events
    query = (
        sa.select(
            ev, experience_types.c.name.label("experience_name"), experiences.c.version.label("experience_version")
        )
        .select_from(
            ev.outerjoin(experiences, ev.c.experience_id == experiences.c.id).outerjoin(
                experience_types, experiences.c.type_id == experience_types.c.id
            )
        )
        .where(ev.c.idempotency_key.in_(keys))
    )
    return {row.idempotency_key: row for row in await conn.execute(query)}


# --- custom prices ---------------------------------------------------------------


def _price(row: Any) -> m.CustomPrice:
    return m.CustomPrice(
        price_id=row.id,
        category=row.category,
        resource=row.resource,
        effective_time_us=row.effective_time_us,
        unit_prices={unit: m.UnitPrice(*pair) for unit, pair in row.unit_prices.items()},
        create_time_us=row.create_time_us,
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
        )
        .on_conflict_do_nothing()
        .returning(custom_prices.c.id)
    )
    return (await conn.execute(stmt)).scalar() is not None


async def get_price(conn: AsyncConnection, price_id: uuid.UUID) -> m.CustomPrice | None:
    row = (await conn.execute(sa.select(custom_prices).where(custom_prices.c.id == price_id))).first()
    return None if row is None else _price(row)


async def list_prices(
    conn: AsyncConnection, category: str, resource: str, after: tuple[str, str, int] | None, limit: int
) -> list[m.CustomPrice]:
    p = custom_prices
    query = sa.select(p).order_by(p.c.category, p.c.resource, p.c.effective_time_us.desc()).limit(limit)
    if category:
        query = query.where(p.c.category == category)
    if resource:
        query = query.where(p.c.resource == resource)
    if after is not None:
        cat, res, eff = after
        query = query.where(
            sa.or_(
                p.c.category > cat,
                sa.and_(p.c.category == cat, p.c.resource > res),
                sa.and_(p.c.category == cat, p.c.resource == res, p.c.effective_time_us < eff),
            )
        )
    return [_price(row) for row in await conn.execute(query)]


async def all_prices(conn: AsyncConnection) -> list[m.CustomPrice]:
    return [_price(row) for row in await conn.execute(sa.select(custom_prices))]


async def price_catalog_revision(conn: AsyncConnection) -> tuple[int, int]:
    """Changes whenever a custom price is added: (count, newest create time)."""
    p = custom_prices
    row = (await conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(p.c.create_time_us), 0)))).one()
    return int(row[0]), int(row[1])

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
from . import hot_path
from .tables import (
    api_keys,
    custom_prices,
    events,
    experience_type_versions,
    experience_types,
    experiences,
    idempotent_requests,
    server_keys,
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
        sa.select(*hot_path.EXPERIENCE_COLUMNS)
        .select_from(hot_path.EXPERIENCES_JOIN)
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
    return [hot_path.experience_from_row(row) for row in await conn.execute(query)]


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


_NANOS_PER_DOLLAR = 1_000_000_000


def _exact_sum(column: sa.Column[Any], label: str) -> tuple[sa.Label[Any], sa.Label[Any]]:
    """SUM(column) as whole dollars and leftover nanos, summed apart: 64-bit sums (SQLite's
    SUM raises past 2^63) cannot overflow below 9 trillion events of $1,000,000."""
    return (
        sa.func.coalesce(sa.func.sum(column // _NANOS_PER_DOLLAR), 0).label(f"{label}_dollars"),
        sa.func.coalesce(sa.func.sum(column % _NANOS_PER_DOLLAR), 0).label(f"{label}_nanos"),
    )


def _nanos(row: Any, label: str) -> int:
    """The exact sum that _exact_sum took apart."""
    return int(getattr(row, f"{label}_dollars")) * _NANOS_PER_DOLLAR + int(getattr(row, f"{label}_nanos"))


@dataclasses.dataclass(frozen=True)
class EventSummary:
    event_count: int
    cost_input: int
    cost_output: int
    cost_total: int
    failed: int
    unpriced: int
    first_us: int | None
    last_us: int | None


@dataclasses.dataclass(frozen=True)
class ExperienceCost:
    version: int
    id: uuid.UUID
    total: int
    events: int
    unpriced: int


async def experience_event_summary(conn: AsyncConnection, experience_id: uuid.UUID) -> tuple[EventSummary, list[int]]:
    """Aggregates of the experience's events, and their latencies in ascending order."""
    ev = events
    aggregate = sa.select(
        sa.func.count().label("event_count"),
        *_exact_sum(ev.c.cost_input_nanos, "cost_input"),
        *_exact_sum(ev.c.cost_output_nanos, "cost_output"),
        *_exact_sum(ev.c.cost_total_nanos, "cost_total"),
        sa.func.count().filter(ev.c.http_status_code >= 400).label("failed"),
        sa.func.count().filter(ev.c.cost_state != int(m.CostState.PRICED)).label("unpriced"),
        sa.func.min(ev.c.event_time_us).label("first_us"),
        sa.func.max(ev.c.event_time_us).label("last_us"),
    ).where(ev.c.experience_id == experience_id)
    row = (await conn.execute(aggregate)).one()
    summary = EventSummary(
        int(row.event_count),
        _nanos(row, "cost_input"),
        _nanos(row, "cost_output"),
        _nanos(row, "cost_total"),
        int(row.failed),
        int(row.unpriced),
        None if row.first_us is None else int(row.first_us),
        None if row.last_us is None else int(row.last_us),
    )
    latencies = await conn.execute(
        sa.select(ev.c.end_to_end_latency_ms)
        .where(ev.c.experience_id == experience_id)
        .order_by(ev.c.end_to_end_latency_ms)
    )
    return summary, [row[0] for row in latencies]


async def cost_per_experience(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> list[ExperienceCost]:
    """One row per experience of the type with events in the window."""
    ev, e = events, experiences
    query = (
        sa.select(
            e.c.version,
            e.c.id,
            *_exact_sum(ev.c.cost_total_nanos, "total"),
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
    return [
        ExperienceCost(int(r.version), r.id, _nanos(r, "total"), int(r.events), int(r.unpriced))
        for r in await conn.execute(query)
    ]


# --- events ----------------------------------------------------------------------------


async def insert_events(conn: AsyncConnection, stored: hot_path.Stored) -> set[uuid.UUID]:
    """Inserts (event, result) pairs in one transaction; returns the ids NOT inserted
    (usually none): events whose idempotency key another transaction committed
    first are skipped, not failed."""
    return await hot_path.insert_events(conn, stored) if stored else set()


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

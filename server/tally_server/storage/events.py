"""Events: stored by the ingest writer, read back by id, key or filter, and decoded into domain records."""

from __future__ import annotations

import collections
import dataclasses
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from . import applied_prices, hot_path, rollups, tables
from .tables import (
    event_annotations,
    event_keys,
    events,
    experience_types,
    experiences,
)


async def insert_events(conn: AsyncConnection, stored: hot_path.Stored) -> set[uuid.UUID]:
    """Inserts (event, result) pairs in one transaction; returns the ids NOT inserted
    (usually none): events whose idempotency key another transaction committed
    first are skipped, not failed."""
    if not stored:
        return set()
    price_ids = await applied_prices.ids_of(conn, {result.cost.price for _, result in stored if result.cost.price})
    return await hot_path.insert_events(conn, stored, price_ids)


# An event with its experience's name and version and its applied price's columns (as
# price_source, price_category, ...: _price_reference reads them so).
_EVENT_WITH_EXPERIENCE_COLUMNS: tuple[Any, ...] = (
    events,
    experience_types.c.name.label("experience_name"),
    experiences.c.version.label("experience_version"),
    *(
        applied.label(f"price_{applied.name}")
        for applied in tables.applied_prices.c
        if applied.name not in ("id", "price_key")
    ),
)


async def events_by_key(conn: AsyncConnection, keys: Iterable[str]) -> dict[str, m.StoredEvent]:
    """Stored events by idempotency key, with their experience's name and version."""
    keys = list(keys)
    if not keys:
        return {}
    # Through event_keys (0028): its key names one event, with the time that says which of
    # PostgreSQL's weekly partitions holds it.
    by_key = rollups.EVENTS_WITH_TYPE.join(
        event_keys,
        sa.and_(event_keys.c.event_id == events.c.id, event_keys.c.event_time_us == events.c.event_time_us),
    )
    query = sa.select(*_EVENT_WITH_EXPERIENCE_COLUMNS).select_from(by_key).where(event_keys.c.idempotency_key.in_(keys))
    return {row.idempotency_key: stored_event(row) for row in await conn.execute(query)}


async def events_by_response_id(conn: AsyncConnection, response_id: str, limit: int) -> list[m.StoredEvent]:
    """Stored events carrying a provider response id (ix_events_provider_response_id)."""
    query = (
        sa.select(*_EVENT_WITH_EXPERIENCE_COLUMNS)
        .select_from(rollups.EVENTS_WITH_TYPE)
        .where(events.c.provider_response_id == response_id)
        .limit(limit)
    )
    return [stored_event(row) for row in await conn.execute(query)]


async def event_by_id(conn: AsyncConnection, request_id: uuid.UUID) -> m.StoredEvent | None:
    query = (
        sa.select(*_EVENT_WITH_EXPERIENCE_COLUMNS)
        .select_from(rollups.EVENTS_WITH_TYPE)
        .where(events.c.id == request_id)
    )
    row = (await conn.execute(query)).first()
    return None if row is None else stored_event(row)


async def oldest_event_time(conn: AsyncConnection) -> int | None:
    """The event time of the oldest stored event (ix_events_event_time_us), None for none."""
    found = (await conn.execute(sa.select(sa.func.min(events.c.event_time_us)))).scalar()
    return None if found is None else int(found)


def has_tag(conn: AsyncConnection, tag: str) -> sa.ColumnElement[bool]:
    """The event's request_tags (a JSON array) hold `tag`."""
    elements = "json_array_elements_text" if conn.dialect.name == "postgresql" else "json_each"
    values = getattr(sa.func, elements)(events.c.request_tags).table_valued("value").alias("tag")
    return sa.exists(sa.select(sa.literal(1)).select_from(values).where(values.c.value == tag))


def has_property(conn: AsyncConnection, key: str, value: str) -> sa.ColumnElement[bool]:
    """The event's properties hold `value` under `key`, or under any key when `key` is ""."""
    elements = "json_each_text" if conn.dialect.name == "postgresql" else "json_each"
    pairs = getattr(sa.func, elements)(events.c.properties).table_valued("key", "value").alias("property")
    match = pairs.c.value == value if not key else sa.and_(pairs.c.key == key, pairs.c.value == value)
    return sa.exists(sa.select(sa.literal(1)).select_from(pairs).where(match))


@dataclasses.dataclass(frozen=True)
class EventFilter:
    experience_id: uuid.UUID | None = None
    type_id: int | None = None
    version: int = 0
    user_id: str = ""
    request_tag: str = ""
    category: str = ""
    resource: str = ""
    model: str = ""
    provider_response_id: str = ""
    cost_state: int = 0
    start_us: int | None = None
    end_us: int | None = None
    # No price has the model: its events are those of its resource that no price priced
    # (ix_events_unpriced_resource), newest first, however few (applied_prices.priced_as).
    model_never_priced: bool = False


def event_conditions(conn: AsyncConnection, f: EventFilter) -> list[sa.ColumnElement[bool]]:
    ev = events
    where: list[sa.ColumnElement[bool]] = []
    if f.experience_id is not None:
        where.append(ev.c.experience_id == f.experience_id)
    if f.type_id is not None:
        where.append(experiences.c.type_id == f.type_id)
        if f.version:
            where.append(experiences.c.version == f.version)
    for column, value in (
        (ev.c.user_id, f.user_id),
        (ev.c.category, f.category),
        (ev.c.resource, f.resource),
        (ev.c.provider_response_id, f.provider_response_id),
    ):
        if value:
            where.append(column == value)
    if f.model and f.model_never_priced:
        where += [ev.c.resource == f.model, ev.c.price_id.is_(None)]
    elif f.model:
        model = rollups.MODEL_OF_EVENT
        where.append(model == f.model)
    if f.cost_state and f.user_id and conn.dialect.name == "sqlite":
        # "+ 0": the user's events answer (ix_events_user_time). With the state as the index
        # of not-priced events says it, SQLite took that index and read every not-priced
        # event of the window for the user's (664 ms at 1,000,000 events).
        where.append(ev.c.cost_state + 0 == f.cost_state)
    elif f.cost_state:
        # Written into the statement, not bound: PostgreSQL plans a prepared statement for any
        # value from its sixth call on, and a plan for any state cannot use the index of the
        # events not priced (measured: the unpriced reasons of a tag 25-40 ms, then 85-130).
        where.append(ev.c.cost_state == sa.literal(f.cost_state, literal_execute=True))
        if f.cost_state != m.CostState.PRICED:  # as ix_events_not_priced says it, so that it is used
            where.append(ev.c.cost_state != sa.literal(int(m.CostState.PRICED), literal_execute=True))
    if f.start_us is not None:
        where.append(ev.c.event_time_us >= f.start_us)
    if f.end_us is not None:
        where.append(ev.c.event_time_us < f.end_us)
    if f.request_tag:
        where.append(has_tag(conn, f.request_tag))
    return where


# On SQLite, a type's (or a version's) newest events are first looked for among the newest
# TYPE_SCAN events of the rest of the filter, in time order: events have no type column, and
# SQLite read every event of the type in the window through its experiences, then sorted
# them (350-470 ms at 1,000,000 events for a type holding most of them). A rare type, of
# which the scan finds too few, is read that way still. PostgreSQL, with its statistics,
# scans the time index itself (3 ms at 300,000 events; this form cost it 346 ms).
TYPE_SCAN = 2000


async def list_events(
    conn: AsyncConnection, f: EventFilter, before: tuple[int, uuid.UUID] | None, limit: int
) -> list[m.StoredEvent]:
    """Stored events matching the filter, newest first (event time, then id)."""
    return [stored_event(row) for row in await _listed_rows(conn, f, before, limit)]


async def run_ids(
    conn: AsyncConnection, f: EventFilter, before: tuple[int, uuid.UUID] | None, limit: int
) -> list[uuid.UUID | None]:
    """The experience id of each of the events list_events finds (None: unattributed): of a
    user's, from ix_events_user_time alone."""
    # Ties of time in any order: by id too, each event's row was read (the id is not in the index).
    rows = await _listed_rows(conn, f, before, limit, (events.c.experience_id,), _joined_for(f), ties_by_id=False)
    return [row[0] for row in rows]


def _joined_for(f: EventFilter) -> Any:
    """The events with the joins the filter's conditions need (rollups.events_joined)."""
    return rollups.events_joined(f.type_id is not None, bool(f.model) and not f.model_never_priced)


async def _listed_rows(
    conn: AsyncConnection,
    f: EventFilter,
    before: tuple[int, uuid.UUID] | None,
    limit: int,
    columns: Sequence[Any] = _EVENT_WITH_EXPERIENCE_COLUMNS,
    source: Any = rollups.EVENTS_WITH_TYPE,
    ties_by_id: bool = True,
) -> list[Any]:
    """list_events' rows, of these columns (from `source`: the events and what they join),
    events of the same time by id (or, not `ties_by_id` and before no position, in any order)."""
    if f.type_id is not None and f.experience_id is None and conn.dialect.name == "sqlite":
        found = await _of_type_in_time_order(conn, f, before, limit, columns)
        if found is not None:
            return found
    ev = events
    query = (
        sa.select(*columns)
        .select_from(source)
        .where(*event_conditions(conn, f))
        .order_by(ev.c.event_time_us.desc(), *((ev.c.id.desc(),) if ties_by_id or before else ()))
        .limit(limit)
    )
    if before is not None:
        query = query.where(sa.tuple_(ev.c.event_time_us, ev.c.id) < _position(before))
    return list(await conn.execute(query))


async def _of_type_in_time_order(
    conn: AsyncConnection,
    f: EventFilter,
    before: tuple[int, uuid.UUID] | None,
    limit: int,
    columns: Sequence[Any],
) -> list[Any] | None:
    """The rows of the filter's newest `limit` events if they are among the newest TYPE_SCAN
    events of the filter without its type (or those are every such event); None if not."""
    scan = _newest(conn, dataclasses.replace(f, type_id=None, version=0), TYPE_SCAN, before)
    of_type = EventFilter(type_id=f.type_id, version=f.version)  # the rest, the scan applied
    found = list(await conn.execute(_of_scan(conn, scan, of_type, limit, columns)))
    if len(found) == limit:
        return found
    return found if await _count(conn, scan) < TYPE_SCAN else None


def _of_scan(
    conn: AsyncConnection, scan: sa.Subquery, f: EventFilter, limit: int, columns: Sequence[Any]
) -> sa.Select[Any]:
    """The events of `scan` (a subquery of ids, of the filter's window and cost state) that
    the rest of the filter selects, newest first, at most `limit`. No condition here may be
    answered by an index, so that both planners start from the scan and find its events by
    id: the type's is written "+ 0" (else SQLite starts from the type's experiences, reading
    every event of the type again), and the window and state are left to the scan (repeated
    here, PostgreSQL without statistics read the window's events again for each of the
    scan's: 63 s for 21,000)."""
    ev = events
    rest = dataclasses.replace(f, type_id=None, version=0, cost_state=0, start_us=None, end_us=None)
    where = event_conditions(conn, rest)
    if f.type_id is not None:
        where.append(experiences.c.type_id + 0 == f.type_id)
        if f.version:
            where.append(experiences.c.version == f.version)
    return (
        sa.select(*columns)
        .select_from(
            scan.join(ev, _same_event(scan))
            .outerjoin(tables.applied_prices, ev.c.price_id == tables.applied_prices.c.id)
            .outerjoin(experiences, ev.c.experience_id == experiences.c.id)
            .outerjoin(experience_types, experiences.c.type_id == experience_types.c.id)
        )
        .where(*where)
        .order_by(ev.c.event_time_us.desc(), ev.c.id.desc())
        .limit(limit)
    )


async def newest_among(
    conn: AsyncConnection, f: EventFilter, among: int, limit: int
) -> tuple[list[m.StoredEvent], bool]:
    """The filter's newest `limit` events and whether a bound applied (_newest_rows)."""
    rows, bounded = await _newest_rows(conn, f, among, limit, _EVENT_WITH_EXPERIENCE_COLUMNS)
    return [stored_event(row) for row in rows], bounded


async def reasons_among(
    conn: AsyncConnection, f: EventFilter, among: int, limit: int
) -> tuple[list[tuple[tuple[str, ...], int]], bool]:
    """Why the filter's newest `limit` events were not (fully) priced: each distinct list of
    reasons, with how many of those events have it; and whether a bound applied
    (_newest_rows). One column is read, not the whole event. On SQLite the database takes
    each event's reasons out of its units (a JSON array of them, as text) and each distinct
    array is decoded once: decoding 1,000 events' units, whose counts differ where their
    reasons do not, was most of the call. On PostgreSQL the same subquery made a call take
    1.8 s (the sixth of the statement on a connection, where it plans it anew; measured
    in-process at 1,000,000 events): there the units are read and their reasons taken out
    here."""
    if conn.dialect.name == "postgresql":
        rows, bounded = await _newest_rows(conn, f, among, limit, (events.c.unknown_units,), _joined_for(f))
        of_events = collections.Counter(tuple(m.UnknownUnit(*u).reason for u in row[0] or ()) for row in rows)
        return list(of_events.items()), bounded
    rows, bounded = await _newest_rows(conn, f, among, limit, (_reasons_of_event(),), _joined_for(f))
    counted = collections.Counter(row[0] for row in rows)
    return [(tuple(json.loads(text)) if text else (), count) for text, count in counted.items()], bounded


def _reasons_of_event() -> sa.ScalarSelect[str]:
    """SQLite: the reasons of an event's units not priced (m.UnknownUnit.reason, the fourth
    of each stored unit), as the text of a JSON array, in the units' order."""
    each = sa.func.json_each(events.c.unknown_units).table_valued("value", "key")
    of_unit = sa.func.json_extract(each.c.value, "$[3]")
    return sa.select(sa.func.json_group_array(of_unit)).select_from(each).scalar_subquery()


async def _newest_rows(
    conn: AsyncConnection,
    f: EventFilter,
    among: int,
    limit: int,
    columns: Sequence[Any],
    source: Any = rollups.EVENTS_WITH_TYPE,
) -> tuple[list[Any], bool]:
    """The rows of the filter's newest `limit` events and whether a bound applied: a filter
    with a tag, model or provider (which no index answers: a rare one read every event of
    the window) is looked for among the newest `among` events of its window and cost state
    (ix_events_event_time_us, or ix_events_not_priced for a state not priced). A filter
    naming a user reads the user's events (ix_events_user_time); any other, as ListEvents."""
    if f.user_id or f.experience_id is not None or not (f.request_tag or f.model or f.category):
        return await _listed_rows(conn, f, None, limit, columns, source), False
    scan = _newest(conn, EventFilter(cost_state=f.cost_state, start_us=f.start_us, end_us=f.end_us), among)
    return list(await conn.execute(_of_scan(conn, scan, f, limit, columns))), True


def _newest(
    conn: AsyncConnection, f: EventFilter, count: int, before: tuple[int, uuid.UUID] | None = None
) -> sa.Subquery:
    """The ids and times of the filter's newest `count` events (before `before`), in time
    order."""
    ev = events
    source = rollups.EVENTS_WITH_TYPE if f.type_id is not None else rollups.EVENTS_WITH_PRICE
    query = sa.select(ev.c.id, ev.c.event_time_us).select_from(source).where(*event_conditions(conn, f))
    if before is not None:
        query = query.where(sa.tuple_(ev.c.event_time_us, ev.c.id) < _position(before))
    return query.order_by(ev.c.event_time_us.desc(), ev.c.id.desc()).limit(count).subquery("newest")


def _same_event(found: sa.Subquery) -> sa.ColumnElement[bool]:
    """Joins events found by _newest back to their rows by id and time: PostgreSQL's events
    are partitioned by week of event time (0028), and by id alone each row is looked for in
    every week (the property search over the newest 5,000 events at 1,000,000: 518 ms)."""
    return sa.and_(events.c.id == found.c.id, events.c.event_time_us == found.c.event_time_us)


def _position(before: tuple[int, uuid.UUID]) -> sa.Tuple:
    """A page's (event time, id) position, typed as the columns (an untyped UUID would bind
    as sa.Uuid's hex text, not as tables.Uuid's bytes on SQLite)."""
    return sa.tuple_(*before, types=[events.c.event_time_us.type, events.c.id.type])


async def _count(conn: AsyncConnection, rows: sa.Subquery) -> int:
    return int((await conn.execute(sa.select(sa.func.count()).select_from(rows))).scalar_one())


async def events_with_property(
    conn: AsyncConnection, f: EventFilter, key: str, value: str, among: int, limit: int
) -> tuple[list[m.StoredEvent], int]:
    """The filter's events, among its newest `among`, whose property `key` (any, for "") is
    `value`, newest first, at most `limit`; and how many events were searched. Properties
    have no index: the newest `among` bound the search."""
    ev = events
    newest = _newest(conn, f, among)
    searched = await _count(conn, newest)
    query = (
        sa.select(*_EVENT_WITH_EXPERIENCE_COLUMNS)
        .select_from(rollups.EVENTS_WITH_TYPE.join(newest, _same_event(newest)))
        .where(has_property(conn, key, value))
        .order_by(ev.c.event_time_us.desc(), ev.c.id.desc())
        .limit(limit)
    )
    return [stored_event(row) for row in await conn.execute(query)], searched


async def first_users(conn: AsyncConnection, experience_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The user id of each experience's first event ("" for none): one index lookup each."""
    ev = events
    first_user = (
        sa.select(ev.c.user_id)
        .where(ev.c.experience_id == experiences.c.id)
        .order_by(ev.c.event_time_us, ev.c.id)
        .limit(1)
        .scalar_subquery()
    )
    rows = await conn.execute(sa.select(experiences.c.id, first_user).where(experiences.c.id.in_(list(experience_ids))))
    return {row[0]: row[1] or "" for row in rows}


# --- rows as domain records -----------------------------------------------------------


# --- retention and erasure -------------------------------------------------------------------


async def oldest_before(conn: AsyncConnection, before_us: int, count: int) -> list[uuid.UUID]:
    """The ids of up to `count` events before `before_us`, the oldest first (the event time index)."""
    query = (
        sa.select(events.c.id)
        .where(events.c.event_time_us < before_us)
        .order_by(events.c.event_time_us, events.c.id)
        .limit(count)
    )
    return [rollups.as_uuid(row[0]) for row in await conn.execute(query)]


async def of_user(conn: AsyncConnection, user_id: str, count: int) -> list[uuid.UUID]:
    """The ids of up to `count` events of the user (ix_events_user_time)."""
    query = sa.select(events.c.id).where(events.c.user_id == user_id).limit(count)
    return [rollups.as_uuid(row[0]) for row in await conn.execute(query)]


# Ids per DELETE statement: below SQLite's limit of bound parameters.
_DELETE_CHUNK = 500


async def delete_events(conn: AsyncConnection, ids: list[uuid.UUID]) -> int:
    """Deletes these events, their idempotency keys and their annotations; the rollups keep
    what they added."""
    deleted = 0
    for start in range(0, len(ids), _DELETE_CHUNK):
        chunk = ids[start : start + _DELETE_CHUNK]
        await conn.execute(sa.delete(event_annotations).where(event_annotations.c.event_id.in_(chunk)))
        keys = sa.select(events.c.idempotency_key).where(events.c.id.in_(chunk), events.c.idempotency_key.isnot(None))
        await conn.execute(sa.delete(event_keys).where(event_keys.c.idempotency_key.in_(keys)))
        deleted += (await conn.execute(sa.delete(events).where(events.c.id.in_(chunk)))).rowcount
    return deleted


def _price_reference(row: Any) -> m.PriceReference | None:
    if not row.price_source:
        return None
    return m.PriceReference(
        m.PriceSource(row.price_source),
        row.price_category,
        row.price_resource,
        row.price_version,
        row.price_effective_time_us,
        tuple(sorted((row.price_variant or {}).items())),
    )


def _result(row: Any) -> m.IngestResult:
    """The result an events row was acknowledged with (with its experience's name and version)."""
    cost = m.Cost(
        row.cost_input_nanos,
        row.cost_output_nanos,
        row.cost_total_nanos,
        m.CostState(row.cost_state),
        _price_reference(row),
        tuple(m.UnknownUnit(*u) for u in row.unknown_units or ()),
    )
    return m.IngestResult(
        request_id=row.id,
        event_time_us=row.event_time_us,
        ingest_time_us=row.ingest_time_us,
        cost=cost,
        experience_id=row.experience_id,
        experience_name=row.experience_name or "",
        experience_version=row.experience_version or 0,
        experience_created=False,
        user_id=row.user_id or "",
        request_tags=tuple(row.request_tags or ()),
        warnings=tuple(row.warnings or ()),
        idempotency_key=row.idempotency_key or "",
    )


def units_of(row: Any) -> dict[str, tuple[int, int]]:
    """An events row's units: JSON null for text alone, whose counts are the row's input and
    output tokens (migration 0027), else {type: [input, output]}."""
    # The JSON column comes back decoded through SQLAlchemy, as text from a raw SQLite read.
    units = json.loads(row.units) if isinstance(row.units, str) else row.units
    if units is None:
        return {"text": (int(row.input_tokens), int(row.output_tokens))}
    return {unit: (int(counts[0]), int(counts[1])) for unit, counts in units.items()}


def stored_event(row: Any) -> m.StoredEvent:
    """An events row (with its experience's name and version) as the event and its result."""
    event = m.UsageEvent(
        category=row.category,
        resource=row.resource,
        units=units_of(row),
        event_time_us=row.event_time_us,
        end_to_end_latency_ms=row.end_to_end_latency_ms,
        time_to_first_token_ms=row.time_to_first_token_ms,
        http_status_code=row.http_status_code,
        provider_response_id=row.provider_response_id or "",
        idempotency_key=row.idempotency_key or "",
        properties=dict(row.properties or {}),
        context=m.EventContext(
            experience_id=str(row.experience_id) if row.experience_id and row.experience_name else "",
            experience_name=row.experience_name or "",
            experience_version=row.experience_version or 0,
            user_id=row.user_id or "",
            request_tags=tuple(row.request_tags or ()),
            step=row.step or "",
        ),
        content_hash=row.content_hash,
        price_context=dict(row.price_context or {}),
    )
    return m.StoredEvent(event, _result(row))

"""The ingest writer's statements: the one place where storage bypasses SQLAlchemy.

Every commit of the group-commit writer looks up the experiences it names and
inserts its events. Each trick here earned its place by `python -m bench.budget`,
which measures it beside the plain SQLAlchemy statement kept next to it
(`PLAIN`): a trick whose gain falls within 10% of the plain statement goes.

- SQLite, the event insert: multi-row INSERTs straight to aiosqlite. SQLAlchemy's
  bulk insert binds every parameter through its type processors, and executemany
  steps once per row, releasing and retaking the GIL beside a busy event loop.
- SQLite, the experience lookup: one trip to aiosqlite's thread, where SQLAlchemy's
  adapted cursor takes three or four.
- PostgreSQL, the event insert: one statement per batch, each column one array that
  unnest() turns back into rows (asyncpg encodes arrays in C).
- Both engines, the keys' claim (migration 0028): the commit's idempotency keys go into
  event_keys first, as one statement like the events' (ON CONFLICT DO NOTHING), and only
  the events that won their key are inserted.

- Both engines, the rollups' statements (storage/rollups.py builds them once with
  SQLAlchemy): compiled once per engine and run on the driver with rows bound by
  position, one executemany per statement. A commit runs six of them, and through
  SQLAlchemy's execution each cost 0.3 ms on SQLite, as much as the rest of a unary
  call's commit. (On PostgreSQL it gains 7-16% in commits of 32 and nothing in commits
  of 1,000, 0.91-0.97x: kept for SQLite and for the unary commits.) The rollups by user,
  tag and key, about 14 rows an event where a commit's events fall in different hours, are
  made as tuples in column order and put in the statement's order in C (`execute_rows`):
  bench.reads' load, 100,000 events, 2,078 -> 2,394 events/s with its events in random hours
  (`--shuffled`), 3,950-4,003 -> 4,072-4,326 in time order.

(The third, BEGIN IMMEDIATE straight to aiosqlite, lives in db.py's "begin" listener,
where SQLAlchemy starts transactions.)
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from ..domain.rollups import tokens_of
from .tables import Uuid, event_keys, events, experience_types, experiences

EVENT_COLUMNS = tuple(column.name for column in events.columns)
KEY_COLUMNS = tuple(column.name for column in event_keys.columns)
Stored = Sequence[tuple[m.UsageEvent, m.IngestResult]]
# The id of each price's applied_prices row (storage.applied_prices.ids_of).
PriceIds = Mapping[m.PriceReference, int]
# A row by name as values in column order, in C: the driver statements bind positionally.
_in_column_order = operator.itemgetter(*EVENT_COLUMNS)


async def sqlite_driver(conn: AsyncConnection) -> Any:
    """The aiosqlite connection under `conn`, inside its open transaction."""
    return (await conn.get_raw_connection()).driver_connection


# --- the rows -------------------------------------------------------------------------


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _units_json(units: dict[str, tuple[int, int]]) -> str:
    """json.dumps of an event's units as {type: [input, output]}, written out directly
    (this runs once per event): unit types are validated as [a-z0-9_]+, so they
    need no escaping. Units of text alone are JSON null (migration 0027): they are the
    row's input and output tokens (storage.events.units_of), and most events have no other."""
    if len(units) == 1 and "text" in units:
        return "null"
    if any(not unit.isascii() or not unit.replace("_", "").isalnum() for unit in units):
        return _compact_json({unit: list(counts) for unit, counts in units.items()})
    return "{" + ",".join(f'"{unit}":[{i},{o}]' for unit, (i, o) in units.items()) + "}"


def _json_or_null(value: Any) -> str | None:
    return _compact_json(value) if value else None


def event_row(event: m.UsageEvent, result: m.IngestResult, price_ids: PriceIds) -> dict[str, Any]:
    """The events row of a priced, attributed event, by column name, with JSON columns as
    text (what SQLAlchemy's JSON type would bind, without its per-value overhead), and its
    price as the id of its applied_prices row."""
    cost, price, context = result.cost, result.cost.price, event.context
    tokens = tokens_of(event)
    return {
        "id": result.request_id,
        "idempotency_key": result.idempotency_key or None,
        # Compared only with a repeat of its idempotency key: an event without one keeps
        # none (64 bytes of every such row).
        "content_hash": event.content_hash if result.idempotency_key else "",
        "experience_id": result.experience_id,
        "experience_created": result.experience_created,
        "category": event.category,
        "resource": event.resource,
        "units": _units_json(event.units),
        "input_tokens": tokens[0],
        "output_tokens": tokens[1],
        "event_time_us": event.event_time_us,
        "ingest_time_us": result.ingest_time_us,
        "end_to_end_latency_ms": event.end_to_end_latency_ms,
        "time_to_first_token_ms": event.time_to_first_token_ms,
        "http_status_code": event.http_status_code,
        "provider_response_id": event.provider_response_id or None,
        "user_id": context.user_id or None,
        "request_tags": _json_or_null(list(context.request_tags)),
        "step": context.step or None,
        "key_name": event.key_name or None,
        "properties": _json_or_null(event.properties),
        "cost_input_nanos": cost.input_nanos,
        "cost_output_nanos": cost.output_nanos,
        "cost_total_nanos": cost.total_nanos,
        "cost_state": int(cost.state),
        "price_id": price_ids[price] if price else None,
        "unknown_units": _json_or_null([[u.unit_type, u.input, u.output, u.reason] for u in cost.unknown_units]),
        "warnings": _json_or_null(list(result.warnings)),
        "price_context": _json_or_null(event.price_context),
    }


# --- SQLite -----------------------------------------------------------------------------

# A batch goes as few multi-row INSERTs: one of exactly n rows for a small batch, else
# rows in chunks of 2**k (at most 1,024, within SQLite's 32,766 bound parameters), so
# that the statements are few and each is prepared once per connection.
_SQLITE_MAX_ROWS = 1024 if sqlite3.sqlite_version_info >= (3, 32) else 32
_SQLITE_EXACT_ROWS = 32  # up to this many rows, one statement of exactly that many


@functools.lru_cache(maxsize=64)
def _sqlite_insert_events(rows: int) -> str:
    placeholders = "(" + ", ".join("?" * len(EVENT_COLUMNS)) + ")"
    return f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES {', '.join([placeholders] * rows)}"


@functools.lru_cache(maxsize=64)
def _sqlite_claim_keys(rows: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * rows)
    return f"INSERT INTO event_keys ({', '.join(KEY_COLUMNS)}) VALUES {values} ON CONFLICT DO NOTHING"


def _sqlite_chunks(count: int) -> list[int]:
    """Statement sizes for count rows, largest first."""
    chunks = [_SQLITE_MAX_ROWS] * (count // _SQLITE_MAX_ROWS)
    rest = count % _SQLITE_MAX_ROWS
    while rest > _SQLITE_EXACT_ROWS:
        chunks.append(1 << (rest.bit_length() - 1))
        rest -= chunks[-1]
    return [*chunks, rest] if rest else chunks


def _sqlite_values(row: dict[str, Any]) -> tuple[Any, ...]:
    """A row in column order, UUIDs as their 16 bytes as tables.Uuid stores them on SQLite
    (the row is changed so: it is made for this insert alone)."""
    row["id"] = row["id"].bytes
    if row["experience_id"] is not None:
        row["experience_id"] = row["experience_id"].bytes
    return tuple(_in_column_order(row))


async def _sqlite_insert(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    driver = await sqlite_driver(conn)
    await _sqlite_in_chunks(driver, _sqlite_insert_events, [_sqlite_values(row) for row in rows])


async def _sqlite_in_chunks(driver: Any, statement: Any, ordered: Sequence[tuple[Any, ...]]) -> None:
    start = 0
    for size in _sqlite_chunks(len(ordered)):
        values = tuple(itertools.chain.from_iterable(ordered[start : start + size]))
        await driver.execute_fetchall(statement(size), values)
        start += size


async def _sqlite_claim(conn: AsyncConnection, keyed: Sequence[tuple[str, uuid.UUID, int]]) -> set[uuid.UUID]:
    driver = await sqlite_driver(conn)
    changes_before = driver.total_changes
    await _sqlite_in_chunks(driver, _sqlite_claim_keys, [(key, i.bytes, t) for key, i, t in keyed])
    if driver.total_changes - changes_before == len(keyed):
        return set()
    held = await conn.execute(
        sa.select(event_keys.c.idempotency_key, event_keys.c.event_id).where(
            event_keys.c.idempotency_key.in_([key for key, _, _ in keyed])
        )
    )
    holders = {row[0]: row[1] for row in held}
    return {event_id for key, event_id, _ in keyed if holders.get(key) != event_id}


# An experience as the domain knows it: its row and its type's name.
EXPERIENCE_COLUMNS = (
    experiences.c.id,
    experience_types.c.name,
    experiences.c.version,
    experiences.c.create_time_us,
    experiences.c.properties,
)
EXPERIENCES_JOIN = experiences.join(experience_types, experiences.c.type_id == experience_types.c.id)


def experience_from_row(row: Any) -> m.Experience:
    return m.Experience(row.id, row.name, row.version, row.create_time_us, dict(row.properties))


def experiences_by_id(ids: Sequence[uuid.UUID]) -> sa.Select[Any]:
    return sa.select(*EXPERIENCE_COLUMNS).select_from(EXPERIENCES_JOIN).where(experiences.c.id.in_(ids))


@functools.lru_cache(maxsize=32)
def _sqlite_experiences_by_id(count: int) -> str:
    """experiences_by_id as SQLite text, for count ids."""
    query = experiences_by_id([uuid.UUID(int=i) for i in range(count)])
    return str(query.compile(dialect=sqlite.dialect(), compile_kwargs={"render_postcompile": True}))


async def _sqlite_get_experiences(conn: AsyncConnection, ids: list[uuid.UUID]) -> dict[uuid.UUID, m.Experience]:
    # Ids are stored as 16 bytes and properties as JSON text, as tables.Uuid and sa.JSON do
    # on SQLite.
    driver = await sqlite_driver(conn)
    rows = await driver.execute_fetchall(_sqlite_experiences_by_id(len(ids)), [i.bytes for i in ids])
    found = (m.Experience(uuid.UUID(bytes=r[0]), r[1], r[2], r[3], json.loads(r[4])) for r in rows)
    return {experience.experience_id: experience for experience in found}


# --- PostgreSQL -------------------------------------------------------------------------


def _postgres_array_type(column: sa.Column[Any]) -> str:
    if isinstance(column.type, Uuid | sa.Uuid):
        return "uuid"
    if isinstance(column.type, sa.JSON):
        return "json"
    if isinstance(column.type, sa.Boolean):
        return "boolean"
    if isinstance(column.type, sa.BigInteger | sa.SmallInteger | sa.Integer):
        return "bigint"
    return "text"


_POSTGRES_INSERT_EVENTS = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) SELECT "
    + ", ".join(f"batch.{c.name}::{_postgres_array_type(c)}" for c in events.columns)
    + " FROM unnest("
    + ", ".join(
        f"${i}::{'text' if _postgres_array_type(c) == 'json' else _postgres_array_type(c)}[]"
        for i, c in enumerate(events.columns, 1)
    )
    + f") AS batch ({', '.join(EVENT_COLUMNS)})"
)
_POSTGRES_CLAIM_KEYS = (
    f"INSERT INTO event_keys ({', '.join(KEY_COLUMNS)}) SELECT * FROM unnest($1::text[], $2::uuid[], $3::bigint[])"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)


async def _postgres_insert(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    arrays = tuple(map(list, zip(*map(_in_column_order, rows), strict=True)))
    await conn.exec_driver_sql(_POSTGRES_INSERT_EVENTS, arrays)


async def _postgres_claim(conn: AsyncConnection, keyed: Sequence[tuple[str, uuid.UUID, int]]) -> set[uuid.UUID]:
    arrays = tuple(map(list, zip(*keyed, strict=True)))
    claimed = {row[0] for row in await conn.exec_driver_sql(_POSTGRES_CLAIM_KEYS, arrays)}
    return {event_id for _, event_id, _ in keyed} - claimed


# --- the rollups' statements, on the driver ----------------------------------------------------


@functools.lru_cache(maxsize=64)
def _compiled(dialect: Any, statement: sa.ClauseElement) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """The statement's SQL for this engine, its parameters in order, and the values of its
    constants (bound parameters SQLAlchemy made of literals). An expanding IN parameter
    is rendered with the values the statement holds (see _with_length)."""
    expanding = any(
        getattr(p, "expanding", False) for p in sa.sql.visitors.iterate(statement) if isinstance(p, sa.BindParameter)
    )
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": expanding})
    positions = tuple(compiled.positiontup or ())  # type: ignore[attr-defined]
    return str(compiled), positions, {} if expanding else dict(compiled.params)


def _positional(
    dialect: Any, statement: sa.ClauseElement, rows: Sequence[dict[str, Any]]
) -> tuple[str, list[tuple[Any, ...]]]:
    sql, names, constants = _compiled(dialect, statement)
    sqlite_uuids = dialect.name == "sqlite"  # tables.Uuid stores 16 bytes on SQLite
    values = []
    for row in rows:
        bound = []
        for name in names:
            value = row[name] if name in row else constants[name]
            bound.append(value.bytes if sqlite_uuids and isinstance(value, uuid.UUID) else value)
        values.append(tuple(bound))
    return sql, values


async def execute_many(conn: AsyncConnection, statement: sa.ClauseElement, rows: Sequence[dict[str, Any]]) -> None:
    """`statement` once per row (named parameters), in one executemany on the driver."""
    if not rows:
        return
    sql, values = _positional(conn.dialect, statement, rows)
    await _driver_executemany(conn, sql, values)


@functools.lru_cache(maxsize=64)
def _in_parameter_order(
    dialect: Any, statement: sa.ClauseElement, columns: tuple[str, ...]
) -> tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
    """The statement's SQL and what puts a row of `columns` in its parameters' order, with
    the values of its constants (the rollups' carry divisor) after the row's."""
    sql, names, constants = _compiled(dialect, statement)
    extra = tuple(name for name in names if name not in columns)
    constant_values = tuple(constants[name] for name in extra)
    # An upsert binds many parameters, so the itemgetter gives a tuple.
    pick = operator.itemgetter(*((*columns, *extra).index(name) for name in names))
    return sql, lambda row: pick(row + constant_values)


async def execute_rows(
    conn: AsyncConnection, statement: sa.ClauseElement, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
) -> None:
    """As execute_many, with each row a tuple of `columns` (values the driver takes as they
    are: no UUIDs) rather than a dict: the rollups by user, tag and key upsert about 14 rows
    an event, and a dict per row, then a tuple made of it in Python, was a fifth of a
    backfill's time (bench.reads' load, whose events each fall in their own hour)."""
    if not rows:
        return
    sql, in_order = _in_parameter_order(conn.dialect, statement, columns)
    await _driver_executemany(conn, sql, list(map(in_order, rows)))


async def _driver_executemany(conn: AsyncConnection, sql: str, values: list[tuple[Any, ...]]) -> None:
    if conn.dialect.name == "sqlite":
        await (await sqlite_driver(conn)).executemany(sql, values)
    else:
        await conn.exec_driver_sql(sql, values)


async def fetch_in(
    conn: AsyncConnection, statement: sa.Select[Any], name: str, values: Sequence[uuid.UUID]
) -> list[tuple[Any, ...]]:
    """The rows of a query whose one expanding IN parameter `name` takes these UUIDs, as
    tuples in column order (UUIDs as the driver returns them: 16 bytes on SQLite)."""
    sized = _with_length(statement, name, len(values))
    sql, bound = _positional(conn.dialect, sized, [{f"{name}_{i}": v for i, v in enumerate(values, 1)}])
    if conn.dialect.name == "sqlite":
        return [tuple(row) for row in await (await sqlite_driver(conn)).execute_fetchall(sql, bound[0])]
    return [tuple(row) for row in await conn.exec_driver_sql(sql, bound[0])]


@functools.lru_cache(maxsize=128)
def _with_length(statement: sa.Select[Any], name: str, length: int) -> sa.Select[Any]:
    """The statement with its expanding parameter bound to `length` placeholders."""
    return statement.params({name: [uuid.UUID(int=i) for i in range(length)]})


# --- what the repository calls ------------------------------------------------------------


async def insert_events(conn: AsyncConnection, stored: Stored, price_ids: PriceIds) -> set[uuid.UUID]:
    """Inserts (event, result) pairs; returns the ids NOT inserted because their
    idempotency key was committed first by another transaction. Each key is claimed in
    event_keys first (migration 0028), and only the events that won theirs are inserted."""
    rows = [event_row(event, result, price_ids) for event, result in stored]
    sqlite_engine = conn.dialect.name == "sqlite"
    lost: set[uuid.UUID] = set()
    keyed = [(row["idempotency_key"], row["id"], row["event_time_us"]) for row in rows if row["idempotency_key"]]
    if keyed:
        lost = await (_sqlite_claim if sqlite_engine else _postgres_claim)(conn, keyed)
        if lost:
            rows = [row for row in rows if row["id"] not in lost]
    if rows:
        await (_sqlite_insert if sqlite_engine else _postgres_insert)(conn, rows)
    return lost


async def get_experiences(conn: AsyncConnection, ids: list[uuid.UUID]) -> dict[uuid.UUID, m.Experience]:
    if conn.dialect.name == "sqlite":
        return await _sqlite_get_experiences(conn, ids)
    return await plain_get_experiences(conn, ids)


# --- the plain SQLAlchemy statements, the measure of the tricks above ----------------------


class _JsonTextForPostgres(sa.types.TypeDecorator[str]):
    """JSON already serialized, bound as text and cast to json by PostgreSQL (asyncpg will
    not pass text for a json column)."""

    impl = sa.Text
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> Any:
        return sa.cast(bindvalue, postgresql.JSON)


def _events_as_text(json_text: Any) -> sa.Table:
    return sa.Table(
        "events",
        sa.MetaData(),
        *(sa.Column(c.name, json_text if isinstance(c.type, sa.JSON) else c.type) for c in events.columns),
    )


# The events table with its JSON columns as text, per engine: the plain insert binds the
# same JSON text the tricks do, through SQLAlchemy's own parameter handling.
_EVENTS_AS_TEXT = {"sqlite": _events_as_text(sa.Text), "postgresql": _events_as_text(_JsonTextForPostgres)}


async def plain_insert_events(conn: AsyncConnection, stored: Stored, price_ids: PriceIds) -> set[uuid.UUID]:
    """SQLAlchemy's own bulk inserts (insertmanyvalues, the keys' with RETURNING) of the same rows."""
    rows = [event_row(event, result, price_ids) for event, result in stored]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    keyed = [
        {"idempotency_key": row["idempotency_key"], "event_id": row["id"], "event_time_us": row["event_time_us"]}
        for row in rows
        if row["idempotency_key"]
    ]
    lost: set[uuid.UUID] = set()
    if keyed:
        claim = dialect.insert(event_keys).on_conflict_do_nothing().returning(event_keys.c.event_id)
        claimed = {row.event_id for row in await conn.execute(claim, keyed)}
        lost = {row["event_id"] for row in keyed} - claimed
        rows = [row for row in rows if row["id"] not in lost]
    if rows:
        await conn.execute(sa.insert(_EVENTS_AS_TEXT[conn.dialect.name]), rows)
    return lost


async def plain_get_experiences(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, m.Experience]:
    return {row.id: experience_from_row(row) for row in await conn.execute(experiences_by_id(list(ids)))}


async def plain_execute_many(
    conn: AsyncConnection, statement: sa.ClauseElement, rows: Sequence[dict[str, Any]]
) -> None:
    if rows:
        await conn.execute(cast(sa.Executable, statement), list(rows))


async def plain_execute_rows(
    conn: AsyncConnection, statement: sa.ClauseElement, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
) -> None:
    await plain_execute_many(conn, statement, [dict(zip(columns, row, strict=True)) for row in rows])


async def plain_fetch_in(
    conn: AsyncConnection, statement: sa.Select[Any], name: str, values: Sequence[uuid.UUID]
) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in await conn.execute(statement, {name: list(values)})]


# The plain statement of each trick, by the name of the trick's function.
PLAIN = {
    "insert_events": plain_insert_events,
    "get_experiences": plain_get_experiences,
    "execute_many": plain_execute_many,
    "execute_rows": plain_execute_rows,
    "fetch_in": plain_fetch_in,
}

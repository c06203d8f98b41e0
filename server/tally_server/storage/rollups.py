"""The rollups' statements: the writer's upserts, and rebuilding rollups from events
(deletions, which move events out of a type).

Money in a rollup is whole dollars plus nanos in 0..999,999,999 (both BIGINT): sums stay
exact and no column overflows below 9 trillion events of the largest cost an event may
have ($1,000,000). The upserts carry the nanos over into dollars in SQL.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from ..domain.outcomes import OutcomeDefinition, from_json as outcomes_from_json
from ..domain.rollups import (
    DAY_US,
    DAYS,
    HOUR_US,
    KEY_DIMENSION,
    TAG_DIMENSION,
    USER_DIMENSION,
    AttributeKey,
    AttributeRollups,
    ExperienceState,
    ModelDayKey,
    ProviderDayKey,
    ReasonDayKey,
    Sums,
    TagDayKey,
    TypeDeltas,
    merged_histogram,
    rescored,
    sums_of,
    verdicts_of,
)
from . import hot_path
from .tables import (
    ROLLUP_COUNT_COLUMNS,
    ROLLUP_SPLIT,
    ROLLUP_SPLIT_COLUMNS,
    Uuid,
    applied_prices,
    attribute_model_days,
    attribute_provider_days,
    attribute_rollups,
    cost_rollups,
    events,
    experience_outcomes,
    experience_step_costs,
    experience_types,
    experiences,
    tag_attribute_days,
    type_cost_buckets,
    type_outcome_cost_buckets,
    type_outcome_rollups,
    type_rollups,
    type_step_rollups,
    unpriced_reason_days,
)

NANOS_PER_DOLLAR = 1_000_000_000


def split(nanos: int) -> tuple[int, int]:
    """Exact nano-dollars as (dollars, nanos in 0..999,999,999)."""
    return divmod(nanos, NANOS_PER_DOLLAR)


def joined(dollars: Any, nanos: Any) -> int:
    return int(dollars or 0) * NANOS_PER_DOLLAR + int(nanos or 0)


# The CostTotals field of each sum kept split in two columns (tables.ROLLUP_SPLIT).
_SPLIT_FIELDS = {
    "cost_input": "cost_input_nanos",
    "cost_output": "cost_output_nanos",
    "cost_total": "cost_total_nanos",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
}


def totals_from_row(row: Any) -> m.CostTotals:
    """CostTotals of a row with the rollup columns (or labels) by name."""
    return m.CostTotals(
        int(row.event_count or 0),
        int(row.failed_event_count or 0),
        int(row.unpriced_event_count or 0),
        **{
            _SPLIT_FIELDS[name]: joined(getattr(row, high), getattr(row, low))
            for name, (high, low) in ROLLUP_SPLIT.items()
        },
    )


def _totals_values(totals: m.CostTotals) -> dict[str, int]:
    return _sums_values(sums_of(totals))


# A rollup row's columns of sums, in the order of _split_sums' values.
SUM_COLUMNS = (*ROLLUP_COUNT_COLUMNS, *ROLLUP_SPLIT_COLUMNS)


def _split_sums(sums: Sums) -> tuple[int, ...]:
    """A rollup row's values of SUM_COLUMNS from sums in CostTotals' order (domain.rollups.Sums):
    the counts, then each sum split in two (ROLLUP_SPLIT's order is the sums')."""
    events, failed, unpriced, cost_input, cost_output, cost_total, tokens_in, tokens_out = sums
    return (
        *(events, failed, unpriced),
        *divmod(cost_input, NANOS_PER_DOLLAR),
        *divmod(cost_output, NANOS_PER_DOLLAR),
        *divmod(cost_total, NANOS_PER_DOLLAR),
        *divmod(tokens_in, NANOS_PER_DOLLAR),
        *divmod(tokens_out, NANOS_PER_DOLLAR),
    )


def _sums_values(sums: Sums) -> dict[str, int]:
    """A rollup row's columns of sums by name."""
    return dict(zip(SUM_COLUMNS, _split_sums(sums), strict=True))


def _added(
    table: sa.Table,
    new: Any,
    counts: Iterable[str] = ROLLUP_COUNT_COLUMNS,
    sums: Iterable[str] = tuple(ROLLUP_SPLIT),
) -> dict[str, Any]:
    """SET clauses that add `new` (a namespace of the same columns) to a row's sums. The
    low part added is in 0..999,999,999 (the high part may be negative, for a change that
    takes away), so the carry is 0 or 1 and integer division means the same on both engines."""
    c = table.c
    values: dict[str, Any] = {name: c[name] + new[name] for name in counts}
    for name in sums:
        high, low = (c[column] for column in ROLLUP_SPLIT[name])
        carried = low + new[low.name]
        values[high.name] = high + new[high.name] + sa.cast(carried // NANOS_PER_DOLLAR, sa.BigInteger)
        values[low.name] = carried % NANOS_PER_DOLLAR
    return values


@functools.cache
def _upsert(dialect: str, table_name: str) -> postgresql.Insert | sqlite.Insert:
    """The INSERT ... ON CONFLICT DO UPDATE that adds a row to a rollup table, built once per
    engine: building it per commit cost 0.7 ms of SQLAlchemy's time each (measured)."""
    tables = (
        cost_rollups,
        attribute_rollups,
        attribute_model_days,
        attribute_provider_days,
        tag_attribute_days,
        type_rollups,
        type_cost_buckets,
        type_outcome_rollups,
        type_outcome_cost_buckets,
        type_step_rollups,
        experience_step_costs,
        unpriced_reason_days,
    )
    table = {t.name: t for t in tables}[table_name]
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    key = [c.name for c in table.primary_key.columns]
    if table in (cost_rollups, attribute_rollups, attribute_model_days, attribute_provider_days, tag_attribute_days):
        added = _added(table, insert.excluded)
    elif table is type_rollups:
        added = _added(table, insert.excluded, _TYPE_COUNTS, ("cost_total",))
    elif table is type_outcome_rollups:
        added = _added(table, insert.excluded, ("run_count", "value_sum"), ("cost_total",))
    elif table is type_step_rollups:
        added = _added(table, insert.excluded, ("run_count", "event_count"), ("cost_total",))
    elif table is experience_step_costs:
        added = _added(table, insert.excluded, ("event_count",), ("cost_total",))
    elif table is unpriced_reason_days:
        added = _added(table, insert.excluded, ("event_count",), ())
    else:  # a histogram: its count
        count = {"type_cost_buckets": "experience_count"}.get(table.name, "run_count")
        added = {count: table.c[count] + insert.excluded[count]}
    return insert.on_conflict_do_update(index_elements=key, set_=added)


# --- what each commit of the writer adds --------------------------------------------------


def _experience_update() -> sa.Update:
    e = experiences
    params = {
        name: sa.bindparam(f"p_{name}", type_=sa.BigInteger) for name in (*ROLLUP_COUNT_COLUMNS, *ROLLUP_SPLIT_COLUMNS)
    }
    first, last = sa.bindparam("p_first", type_=sa.BigInteger), sa.bindparam("p_last", type_=sa.BigInteger)
    return (
        sa.update(e)
        .where(e.c.id == sa.bindparam("p_id", type_=Uuid))
        .values(
            **_added(e, params),
            latency_sum_ms=e.c.latency_sum_ms + sa.bindparam("p_latency", type_=sa.BigInteger),
            latency_buckets=sa.bindparam("p_latency_buckets", type_=sa.LargeBinary),
            first_event_time_us=sa.case(
                (sa.or_(e.c.first_event_time_us.is_(None), e.c.first_event_time_us > first), first),
                else_=e.c.first_event_time_us,
            ),
            last_event_time_us=sa.case(
                (sa.or_(e.c.last_event_time_us.is_(None), e.c.last_event_time_us < last), last),
                else_=e.c.last_event_time_us,
            ),
        )
    )


_EXPERIENCE_UPDATE = _experience_update()
# The experiences' packed latency histograms, which a commit adds to (rows it has locked).
_LATENCY_BUCKETS = sa.select(experiences.c.id, experiences.c.latency_buckets).where(
    experiences.c.id.in_(sa.bindparam("ids", expanding=True))
)


async def add(
    conn: AsyncConnection,
    by_experience: Mapping[uuid.UUID, m.ExperienceAddition],
    by_hour: Mapping[m.CostRollupKey, m.CostTotals],
    by_type: TypeDeltas,
    by_attribute: AttributeRollups,
) -> None:
    """Adds a commit's events to the rollups, in the commit's transaction (the experiences
    were locked by experience_states)."""
    if by_experience:
        ids = sorted(by_experience)
        # Read, added to and written back: the rows are this transaction's (locked by
        # experience_states on PostgreSQL; SQLite has one writer at a time).
        stored = {as_uuid(row[0]): row[1] for row in await hot_path.fetch_in(conn, _LATENCY_BUCKETS, "ids", ids)}
        rows = []
        for experience_id in ids:
            rollup = by_experience[experience_id]
            rows.append(
                {
                    "p_id": experience_id,
                    **{f"p_{name}": value for name, value in _totals_values(rollup.totals).items()},
                    "p_latency": rollup.latency_sum_ms,
                    "p_latency_buckets": merged_histogram(stored.get(experience_id), rollup.latency_buckets),
                    "p_first": rollup.first_event_time_us,
                    "p_last": rollup.last_event_time_us,
                }
            )
        await hot_path.execute_many(conn, _EXPERIENCE_UPDATE, rows)
    if by_hour:
        # In key order, as every writer does, so that concurrent writers never deadlock.
        rows = [{**_key_values(key), **_totals_values(by_hour[key])} for key in sorted(by_hour, key=_sort_key)]
        await _add_cost_rows(conn, rows)
    await add_attribute_rows(conn, by_attribute)
    await add_type_deltas(conn, by_type)


async def add_attribute_rows(conn: AsyncConnection, sums: AttributeRollups) -> None:
    """Adds to the rollups by user, request tag and API key, each in key order (no deadlock,
    as above)."""
    await _add_keyed(conn, attribute_rollups, sums.by_hour_and_day)
    await _add_keyed(conn, attribute_model_days, sums.by_model_day)
    await _add_keyed(conn, attribute_provider_days, sums.by_provider_day)
    await _add_keyed(conn, tag_attribute_days, sums.by_tag_day)
    await _add_reasons(conn, sums.by_reason_day)


async def _add_reasons(conn: AsyncConnection, counts: Mapping[ReasonDayKey, int]) -> None:
    """Adds to the rollup of why events were not priced, in key order (as above)."""
    if counts:
        key_columns = [column.name for column in unpriced_reason_days.primary_key.columns]
        rows = [{**dict(zip(key_columns, key, strict=True)), "event_count": counts[key]} for key in sorted(counts)]
        await hot_path.execute_many(conn, _upsert(conn.dialect.name, unpriced_reason_days.name), rows)


# The columns of the rollup per day and model in its domain key's order (ModelDayKey: the
# model last; the table's primary key has it after the day since 0024).
_MODEL_DAY_KEY = ("dimension", "day_us", "value", "experience_name", "experience_version", "category", "model")


def _key_columns(table: sa.Table) -> Sequence[str]:
    """The columns of a rollup keyed by its primary key, in its domain key's order."""
    if table is attribute_model_days:
        return _MODEL_DAY_KEY
    return [column.name for column in table.primary_key.columns]


async def _add_keyed(conn: AsyncConnection, table: sa.Table, sums: Mapping[tuple[Any, ...], Sums]) -> None:
    """Upserts `sums` into a rollup whose keys are its primary key's columns, in key order
    (the domain key's: every writer of a table adds in the same order)."""
    columns = (*_key_columns(table), *SUM_COLUMNS)
    rows = [(*key, *_split_sums(sums[key])) for key in sorted(sums)]
    await hot_path.execute_rows(conn, _upsert(conn.dialect.name, table.name), columns, rows)


def _sort_key(key: m.CostRollupKey) -> tuple[Any, ...]:
    return (key.hour_us, key.experience_name, key.experience_version, key.category, key.resource, key.model)


# --- the type rollups ------------------------------------------------------------------------

_TYPE_COUNTS = ("experience_count", "event_count", "failed_event_count", "unpriced_event_count")
STATE_COLUMNS = (
    experiences.c.id,
    experiences.c.type_id,
    experiences.c.version,
    experiences.c.event_count,
    experiences.c.unpriced_event_count,
    experiences.c.cost_total_dollars,
    experiences.c.cost_total_nanos,
    experiences.c.first_event_time_us,
    experiences.c.failed_event_count,
)


# Built once: experience_states runs in every commit.
_STATES = (
    sa.select(*STATE_COLUMNS)
    .where(experiences.c.id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(experiences.c.id)
)
_STATES_LOCKED = _STATES.with_for_update()


def state(row: Any) -> ExperienceState:
    return ExperienceState(
        int(row.type_id),
        int(row.version),
        int(row.event_count),
        int(row.unpriced_event_count),
        joined(row.cost_total_dollars, row.cost_total_nanos),
        row.first_event_time_us,
        int(row.failed_event_count),
    )


async def experience_states(
    conn: AsyncConnection, ids: Collection[uuid.UUID], lock: bool
) -> dict[uuid.UUID, ExperienceState]:
    """What the type rollups count of these experiences; with `lock`, their rows stay locked
    (in id order) until the transaction ends, so that concurrent writers add in turn."""
    if not ids:
        return {}
    query = _STATES_LOCKED if lock and conn.dialect.name == "postgresql" else _STATES
    rows = await hot_path.fetch_in(conn, query, "ids", sorted(ids))
    return {as_uuid(row[0]): _state_of(row) for row in rows}


def as_uuid(value: Any) -> uuid.UUID:
    """A UUID as a query returns it: a uuid.UUID, or on SQLite through the driver its 16 bytes."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(bytes=bytes(value))


def _state_of(row: tuple[Any, ...]) -> ExperienceState:
    """An experience_states row (STATE_COLUMNS, in order)."""
    _, type_id, version, events, unpriced, dollars, nanos, first, failed = row
    return ExperienceState(
        int(type_id), int(version), int(events), int(unpriced), joined(dollars, nanos), first, int(failed)
    )


# Built once: with_verdicts runs in every commit (a lookup by primary key that finds nothing
# until runs are scored).
_OUTCOMES = sa.select(
    experience_outcomes.c.experience_id, experience_outcomes.c.name, experience_outcomes.c.value
).where(experience_outcomes.c.experience_id.in_(sa.bindparam("ids", expanding=True)))
_STEPS = sa.select(
    experience_step_costs.c.experience_id,
    experience_step_costs.c.step,
    experience_step_costs.c.event_count,
    experience_step_costs.c.cost_total_dollars,
    experience_step_costs.c.cost_total_nanos,
).where(experience_step_costs.c.experience_id.in_(sa.bindparam("ids", expanding=True)))


async def declared_outcomes(
    conn: AsyncConnection, type_ids: Collection[int]
) -> dict[int, tuple[OutcomeDefinition, ...]]:
    t = experience_types
    rows = await conn.execute(sa.select(t.c.id, t.c.outcomes).where(t.c.id.in_(sorted(type_ids))))
    return {int(row.id): outcomes_from_json(row.outcomes) for row in rows}


async def with_verdicts(
    conn: AsyncConnection, states: dict[uuid.UUID, ExperienceState]
) -> dict[uuid.UUID, ExperienceState]:
    """The states with the verdicts of their runs' outcomes, by their types' goals now."""
    if not states:
        return states
    values: dict[uuid.UUID, dict[str, float]] = {}
    for experience_id, name, value in await hot_path.fetch_in(conn, _OUTCOMES, "ids", sorted(states)):
        values.setdefault(as_uuid(experience_id), {})[name] = float(value)
    if not values:
        return states
    declared = await declared_outcomes(conn, {states[experience_id].type_id for experience_id in values})
    found = dict(states)
    for experience_id, scored in values.items():
        state = states[experience_id]
        found[experience_id] = replace(state, verdicts=verdicts_of(scored, declared.get(state.type_id, ())))
    return found


async def with_steps(
    conn: AsyncConnection, states: dict[uuid.UUID, ExperienceState], ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, ExperienceState]:
    """The states, those of `ids` with their step costs."""
    wanted = sorted(i for i in ids if i in states)
    if not wanted:
        return states
    steps: dict[uuid.UUID, dict[str, tuple[int, int]]] = {i: {} for i in wanted}
    for experience_id, step, event_count, dollars, nanos in await hot_path.fetch_in(conn, _STEPS, "ids", wanted):
        steps[as_uuid(experience_id)][step] = (int(event_count), joined(dollars, nanos))
    found = dict(states)
    for experience_id, of_run in steps.items():
        found[experience_id] = replace(states[experience_id], steps=of_run)
    return found


async def add_type_deltas(conn: AsyncConnection, deltas: TypeDeltas) -> None:
    """Adds the changes to the type rollups, each table's rows in key order (as every writer
    does, so that concurrent writers never deadlock); rows whose change is zero are skipped."""
    dialect = conn.dialect.name
    rows = [
        {
            "type_id": key[0],
            "version": key[1],
            "day_us": key[2],
            "experience_count": t.experience_count,
            "event_count": t.event_count,
            "failed_event_count": t.failed_event_count,
            "unpriced_event_count": t.unpriced_event_count,
            **_money(t.cost_total_nanos),
        }
        for key, t in sorted(deltas.totals.items())
        if t.experience_count or t.event_count or t.failed_event_count or t.unpriced_event_count or t.cost_total_nanos
    ]
    await hot_path.execute_many(conn, _upsert(dialect, "type_rollups"), rows)
    bucket_rows = [
        {"type_id": k[0], "version": k[1], "day_us": k[2], "bucket": k[3], "experience_count": n}
        for k, n in sorted(deltas.buckets.items())
        if n
    ]
    await hot_path.execute_many(conn, _upsert(dialect, "type_cost_buckets"), bucket_rows)
    outcome_rows = [
        {
            "type_id": k[0],
            "version": k[1],
            "day_us": k[2],
            "name": k[3],
            "verdict": k[4],
            "run_count": o.run_count,
            "value_sum": o.value_sum,
            **_money(o.cost_total_nanos),
        }
        for k, o in sorted(deltas.outcomes.items())
        if o.run_count or o.value_sum or o.cost_total_nanos
    ]
    await hot_path.execute_many(conn, _upsert(dialect, "type_outcome_rollups"), outcome_rows)
    outcome_buckets = [
        {"type_id": k[0], "version": k[1], "day_us": k[2], "name": k[3], "verdict": k[4], "bucket": k[5]}
        | {"run_count": n}
        for k, n in sorted(deltas.outcome_buckets.items())
        if n
    ]
    await hot_path.execute_many(conn, _upsert(dialect, "type_outcome_cost_buckets"), outcome_buckets)
    step_rows = [
        {
            "type_id": k[0],
            "version": k[1],
            "day_us": k[2],
            "step": k[3],
            "run_count": t.run_count,
            "event_count": t.event_count,
            **_money(t.cost_total_nanos),
        }
        for k, t in sorted(deltas.steps.items())
        if t.run_count or t.event_count or t.cost_total_nanos
    ]
    await hot_path.execute_many(conn, _upsert(dialect, "type_step_rollups"), step_rows)


async def add_rows(conn: AsyncConnection, table_name: str, rows: Sequence[dict[str, Any]]) -> None:
    """Adds rows (in the order given) to a table of sums, in one executemany."""
    await hot_path.execute_many(conn, _upsert(conn.dialect.name, table_name), rows)


def _money(nanos: int) -> dict[str, int]:
    dollars, rest = split(nanos)
    return {"cost_total_dollars": dollars, "cost_total_nanos": rest}


async def recount_outcomes(conn: AsyncConnection, type_id: int) -> None:
    """Counts the type's scored runs into its outcome rollups again, under the goals it
    declares now (its experiences locked by the caller: storage.types.lock_type)."""
    for table in (type_outcome_rollups, type_outcome_cost_buckets):
        await conn.execute(sa.delete(table).where(table.c.type_id == type_id))
    e, o = experiences, experience_outcomes
    scored = (
        sa.select(e.c.id)
        .where(e.c.type_id == type_id, e.c.event_count > 0, sa.exists().where(o.c.experience_id == e.c.id))
        .order_by(e.c.id)
    )
    ids = [as_uuid(row[0]) for row in await conn.execute(scored)]
    deltas = TypeDeltas()
    for start in range(0, len(ids), 1000):
        states = await with_verdicts(conn, await experience_states(conn, ids[start : start + 1000], lock=False))
        for state in states.values():
            rescored(replace(state, verdicts=()), state.verdicts, into=deltas)
    await add_type_deltas(conn, deltas)


async def drop_type(conn: AsyncConnection, type_id: int) -> None:
    for table in (type_rollups, type_cost_buckets, type_outcome_rollups, type_outcome_cost_buckets, type_step_rollups):
        await conn.execute(sa.delete(table).where(table.c.type_id == type_id))


def _key_values(key: m.CostRollupKey) -> dict[str, Any]:
    return {
        "hour_us": key.hour_us,
        "experience_name": key.experience_name,
        "experience_version": key.experience_version,
        "category": key.category,
        "resource": key.resource,
        "model": key.model,
    }


async def _add_cost_rows(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    await hot_path.execute_many(conn, _upsert(conn.dialect.name, "cost_rollups"), rows)


# --- rebuilding from events ------------------------------------------------------------------


def event_sums() -> list[sa.Label[Any]]:
    """The rollup sums of a group of events, labelled as the rollup columns; money as the sum
    of whole dollars and the sum of leftover nanos, tokens alike in billions and ones
    (normalized by `_normalized`)."""
    ev = events
    sums = [
        sa.func.count().label("event_count"),
        sa.func.count().filter(ev.c.http_status_code >= 400).label("failed_event_count"),
        sa.func.count().filter(ev.c.cost_state != int(m.CostState.PRICED)).label("unpriced_event_count"),
    ]
    for name, (high, low) in ROLLUP_SPLIT.items():
        column = ev.c[_SPLIT_FIELDS[name]]  # an event's column is named as the CostTotals field
        sums.append(sa.func.sum(column // NANOS_PER_DOLLAR).label(high))
        sums.append(sa.func.sum(column % NANOS_PER_DOLLAR).label(low))
    return sums


def _normalized(row: Any) -> dict[str, int]:
    return _totals_values(totals_from_row(row))


def hour_expression(time_us: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
    return time_us - time_us % HOUR_US


# An event with the price that priced it (none for an unpriced event): the engines leave the
# join out of a query that reads nothing of the price.
EVENTS_WITH_PRICE = events.outerjoin(applied_prices, events.c.price_id == applied_prices.c.id)
# ... and with its experience and that experience's type (none for unattributed events).
EVENTS_WITH_TYPE = EVENTS_WITH_PRICE.outerjoin(experiences, events.c.experience_id == experiences.c.id).outerjoin(
    experience_types, experiences.c.type_id == experience_types.c.id
)


def events_joined(needs_type: bool, needs_price: bool) -> Any:
    """The events with only the joins a query's conditions need, for columns of the events
    alone: SQLite made three lookups an event for joins nothing read."""
    if needs_type:
        return EVENTS_WITH_TYPE
    return EVENTS_WITH_PRICE if needs_price else events


# The model an event counts under (domain.rollups.priced_model, in SQL), of EVENTS_WITH_PRICE.
MODEL_OF_EVENT = sa.func.coalesce(applied_prices.c.resource, events.c.resource)


def _cost_rollup_select(where: Iterable[sa.ColumnElement[bool]]) -> sa.Select[Any]:
    hour = hour_expression(events.c.event_time_us).label("hour_us")
    name = sa.func.coalesce(experience_types.c.name, "").label("experience_name")
    version = sa.func.coalesce(experiences.c.version, 0).label("experience_version")
    model = MODEL_OF_EVENT.label("model")
    return (
        sa.select(hour, name, version, events.c.category, events.c.resource, model, *event_sums())
        .select_from(EVENTS_WITH_TYPE)
        .where(*where)
        .group_by(hour, name, version, events.c.category, events.c.resource, model)
    )


async def unattribute(conn: AsyncConnection, where: sa.ColumnElement[bool]) -> None:
    """Moves the sums of the events `where` selects, as they are attributed now, from their
    type version's rows of the hourly rollups to the unattributed ones ("" and version 0).
    Run before a deletion unattributes them. It adds, as the writer does (the same tables,
    each in key order), so it takes no lock, and what events pruned before added stays."""
    moved: dict[m.CostRollupKey, m.CostTotals] = {}
    for row in await conn.execute(_cost_rollup_select([where, experiences.c.id.is_not(None)])):
        totals = totals_from_row(row)
        key = m.CostRollupKey(**_key_values_of(row))
        _move(moved, key, replace(key, experience_name="", experience_version=0), totals)
    rows = [{**_key_values(key), **_totals_values(moved[key])} for key in sorted(moved, key=_sort_key)]
    await _add_cost_rows(conn, rows)
    by_hour: dict[AttributeKey, m.CostTotals] = {}
    by_model: dict[ModelDayKey, m.CostTotals] = {}
    by_provider: dict[ProviderDayKey, m.CostTotals] = {}
    by_tag: dict[TagDayKey, m.CostTotals] = {}
    for dimension in (USER_DIMENSION, TAG_DIMENSION, KEY_DIMENSION):
        for row in await conn.execute(_attribute_select(conn, dimension, [where, experiences.c.id.is_not(None)])):
            hour, value, totals = int(row.hour_us), row.value, totals_from_row(row)
            day, name, version = hour - hour % DAY_US, row.experience_name, int(row.experience_version)
            # Each hour's sums move in its hour's rows and in its day's, and in its day's by
            # provider and by model.
            for kept, start in ((dimension, hour), (dimension + DAYS, day)):
                _move(by_hour, (kept, start, value, name, version), (kept, start, value, "", 0), totals)
            of_provider: ProviderDayKey = (dimension, day, value, name, version, row.category)
            _move(by_provider, of_provider, (dimension, day, value, "", 0, row.category), totals)
            of_model: ModelDayKey = (*of_provider, row.model)
            _move(by_model, of_model, (dimension, day, value, "", 0, row.category, row.model), totals)
    for dimension in (USER_DIMENSION, KEY_DIMENSION):
        for row in await conn.execute(_tag_attribute_select(conn, dimension, [where, experiences.c.id.is_not(None)])):
            tag, day, value = row.tag, int(row.day_us), row.value
            of_tag: TagDayKey = (tag, dimension, day, value, row.experience_name, int(row.experience_version))
            _move(by_tag, of_tag, (tag, dimension, day, value, "", 0), totals_from_row(row))
    # The rollup of reasons keeps no type: nothing of it moves.
    attributes = AttributeRollups(_as_sums(by_hour), _as_sums(by_model), _as_sums(by_provider), _as_sums(by_tag), {})
    await add_attribute_rows(conn, attributes)


async def anonymize_user(conn: AsyncConnection, user_id: str) -> int:
    """Moves the user's rows of the rollups by user to the rows of no user (""), so that no
    row names the user and every total stays; returns how many rows moved."""
    a = attribute_rollups
    moved = await _anonymized(conn, a, a.c.dimension.in_([USER_DIMENSION, USER_DIMENSION + DAYS]), a.c.value == user_id)
    for t in (attribute_model_days, attribute_provider_days, tag_attribute_days):
        moved += await _anonymized(conn, t, t.c.dimension == USER_DIMENSION, t.c.value == user_id)
    r = unpriced_reason_days
    of_user = (r.c.dimension == USER_DIMENSION, r.c.value == user_id)
    counts: dict[ReasonDayKey, int] = {}
    for row in await conn.execute(sa.select(r).where(*of_user)):
        key = (USER_DIMENSION, "", int(row.day_us), row.category, row.model, int(row.cost_state), row.reason)
        counts[key] = counts.get(key, 0) + int(row.event_count)
    await _add_reasons(conn, counts)
    return moved + int((await conn.execute(sa.delete(r).where(*of_user))).rowcount)


async def _anonymized(conn: AsyncConnection, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    """Adds the rows `where` selects of a rollup keyed by its primary key to the same keys
    with value "", then deletes them; returns how many."""
    key_columns = _key_columns(table)
    moved: dict[tuple[Any, ...], m.CostTotals] = {}
    for row in await conn.execute(sa.select(table).where(*where)):
        key = tuple("" if name == "value" else row._mapping[name] for name in key_columns)
        moved.setdefault(key, m.CostTotals()).add(totals_from_row(row))
    await _add_keyed(conn, table, _as_sums(moved))
    return int((await conn.execute(sa.delete(table).where(*where))).rowcount)


_K = TypeVar("_K")


def _as_sums(groups: Mapping[_K, m.CostTotals]) -> dict[_K, Sums]:
    return {key: sums_of(totals) for key, totals in groups.items()}


def _move(into: dict[Any, m.CostTotals], source: Any, target: Any, totals: m.CostTotals) -> None:
    into.setdefault(source, m.CostTotals()).subtract(totals)
    into.setdefault(target, m.CostTotals()).add(totals)


def event_tags(conn: AsyncConnection, name: str = "tag") -> Any:
    """Each event's request tags as rows (columns `value`, and `key`: its place in the event's
    tags), to join to the events beside it."""
    if conn.dialect.name == "postgresql":
        tags = sa.func.json_array_elements_text(events.c.request_tags).table_valued("value", with_ordinality="key")
        # A function in FROM sees the items to its left (LATERAL is implied); the columns named.
        return tags.render_derived(name=name)
    # SQLite's table-valued functions see the columns to their left without LATERAL.
    return sa.func.json_each(events.c.request_tags).table_valued("value", "key").alias(name)


def first_of_its_tag(conn: AsyncConnection, tag: Any) -> sa.ColumnElement[bool]:
    """Whether a row of event_tags is the first of its value in its event's tags: an event
    whose tags repeat one counts once among the events of that tag."""
    earlier = event_tags(conn, "earlier")
    return ~sa.exists().select_from(earlier).where(earlier.c.value == tag.c.value, earlier.c.key < tag.c.key)


def _attribute_select(conn: AsyncConnection, dimension: int, where: Iterable[sa.ColumnElement[bool]]) -> sa.Select[Any]:
    """The events' sums per hour row of the rollup by user (or tag, or key), and per provider
    and model (so that each also keys a row by day and model), as the writer keys them."""
    hour = hour_expression(events.c.event_time_us).label("hour_us")
    name = sa.func.coalesce(experience_types.c.name, "").label("experience_name")
    version = sa.func.coalesce(experiences.c.version, 0).label("experience_version")
    source: Any = EVENTS_WITH_TYPE
    where = list(where)
    if dimension in (USER_DIMENSION, KEY_DIMENSION):
        column = events.c.user_id if dimension == USER_DIMENSION else events.c.key_name
        value = sa.func.coalesce(column, "").label("value")
    else:
        tag = event_tags(conn)
        source = source.outerjoin(tag, sa.true())
        value = sa.func.coalesce(tag.c.value, "").label("value")
        where.append(first_of_its_tag(conn, tag))
    category, model = events.c.category.label("category"), MODEL_OF_EVENT.label("model")
    return (
        sa.select(hour, value, name, version, category, model, *event_sums())
        .select_from(source)
        .where(*where)
        .group_by(hour, value, name, version, category, model)
    )


def _tag_attribute_select(
    conn: AsyncConnection, dimension: int, where: Iterable[sa.ColumnElement[bool]]
) -> sa.Select[Any]:
    """The events' sums per row of the rollup of each tag's events per day by user (or key),
    as the writer keys them: an event without tags under "", one that repeats a tag one row."""
    day = (events.c.event_time_us - events.c.event_time_us % DAY_US).label("day_us")
    name = sa.func.coalesce(experience_types.c.name, "").label("experience_name")
    version = sa.func.coalesce(experiences.c.version, 0).label("experience_version")
    column = events.c.user_id if dimension == USER_DIMENSION else events.c.key_name
    value = sa.func.coalesce(column, "").label("value")
    tag = event_tags(conn)
    of_tag = sa.func.coalesce(tag.c.value, "")
    return (
        sa.select(of_tag.label("tag"), day, value, name, version, *event_sums())
        .select_from(EVENTS_WITH_TYPE.outerjoin(tag, sa.true()))
        .where(*where, first_of_its_tag(conn, tag))
        .group_by(of_tag, day, value, name, version)
    )


def _key_values_of(row: Any) -> dict[str, Any]:
    return {
        "hour_us": int(row.hour_us),
        "experience_name": row.experience_name,
        "experience_version": int(row.experience_version),
        "category": row.category,
        "resource": row.resource,
        "model": row.model,
    }

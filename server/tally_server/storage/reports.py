"""The cost breakdown: whole hours from the hourly rollups (by type version and model, or
by user, request tag or API key), or whole days from the rollups of those per day and
provider or model or from the rollup of each tag's events by user or key, the rest from
the events; and, from the same rollups, the hours that hold a filter's newest events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from ..domain.rollups import DAY_US, DAYS, HOUR_US, KEY_DIMENSION, TAG_DIMENSION, USER_DIMENSION
from . import rollups
from .events import EventFilter, event_conditions
from .tables import (
    ROLLUP_COUNT_COLUMNS,
    ROLLUP_SPLIT_COLUMNS,
    attribute_model_days,
    attribute_provider_days,
    attribute_rollups,
    cost_rollups,
    events,
    experience_types,
    experiences,
    tag_attribute_days,
    type_rollups,
    unpriced_reason_days,
)

# Dimensions the hourly cost rollup keeps; those of the rollup by user or request tag (with
# one of them, as a dimension or a filter, or the API key as a dimension, and no other); the
# others (step, two of user, tag and key, or any with a resource) are read from events, as
# are the partial days of one of user, tag and key with a category or model.
ROLLUP_DIMENSIONS = frozenset({"experience_name", "experience_version", "category", "resource", "model", "day", "hour"})
_ATTRIBUTES = {"user_id": USER_DIMENSION, "request_tag": TAG_DIMENSION, "api_key_name": KEY_DIMENSION}
_WITH_ATTRIBUTE = frozenset({"experience_name", "experience_version", "day", "hour"})


def _attribute_of(dimensions: Sequence[str], f: m.CostFilter) -> int | None:
    """The attribute rollup's dimension that answers this breakdown, if one does."""
    named = _attributes_named(dimensions, f)
    if named is None or len(named) != 1 or f.category or f.model or not set(dimensions) <= _WITH_ATTRIBUTE | named:
        return None
    return _ATTRIBUTES[named.pop()]


# What the rollup per day and model keeps beside its user, tag or key (per day and provider:
# all but the model).
_WITH_MODEL_DAYS = frozenset({"experience_name", "experience_version", "day", "category", "model"})


def _model_days_of(dimensions: Sequence[str], f: m.CostFilter) -> int | None:
    """The dimension of the rollups per day and provider or model (attribute_provider_days,
    attribute_model_days) that answers this breakdown's whole days, if one does: one of
    user, tag and key beside a provider or model, as dimensions or filters (the attribute
    rollup answers those without)."""
    named = _attributes_named(dimensions, f)
    with_model = bool(f.category or f.model or {"category", "model"} & set(dimensions))
    if named is None or len(named) != 1 or not with_model or not set(dimensions) <= _WITH_MODEL_DAYS | named:
        return None
    return _ATTRIBUTES[named.pop()]


def _days_rollup_of(dimensions: Sequence[str], f: m.CostFilter) -> tuple[int, sa.Table] | None:
    """The rollup per day that answers this breakdown's whole days, and its dimension: the
    one per day and provider (no model named), per day and model, or of each tag's events."""
    by_model = _model_days_of(dimensions, f)
    if by_model is not None:
        with_model = f.model or "model" in dimensions
        return by_model, attribute_model_days if with_model else attribute_provider_days
    of_tag = _tag_days_of(dimensions, f)
    return None if of_tag is None else (of_tag, tag_attribute_days)


# What the rollup of each tag's events per day keeps beside its user or key.
_WITH_TAG_DAYS = frozenset({"experience_name", "experience_version", "day"})


def _tag_days_of(dimensions: Sequence[str], f: m.CostFilter) -> int | None:
    """The dimension of the rollup of each tag's events per day (tag_attribute_days) that
    answers this breakdown's whole days, if one does: kept to a tag or grouped by tag, and
    by user or key, or kept to a user (the attribute rollup answers a tag alone)."""
    by_tag = "request_tag" in dimensions
    if by_tag == bool(f.request_tag) or f.category or f.model:
        return None
    named = [d for d in dimensions if d in ("user_id", "api_key_name")]
    attribute = named[0] if len(named) == 1 else "user_id" if not named and f.user_id else None
    if attribute is None or (f.user_id and attribute != "user_id"):
        return None
    if not set(dimensions) <= _WITH_TAG_DAYS | {attribute, "request_tag"}:
        return None
    return _ATTRIBUTES[attribute]


def _attributes_named(dimensions: Sequence[str], f: m.CostFilter) -> set[str] | None:
    """The attributes the breakdown groups by or keeps to; None when grouped by tag and kept
    to one: an event of the tag counts under each of its tags, which no rollup row knows."""
    if "request_tag" in dimensions and f.request_tag:
        return None
    named = {d for d in dimensions if d in _ATTRIBUTES}
    return named | {name for name, value in (("user_id", f.user_id), ("request_tag", f.request_tag)) if value}


def _rollup_keys(dimension: str, table: sa.Table = cost_rollups) -> list[sa.ColumnElement[Any]]:
    r = table
    if table is tag_attribute_days and dimension == "request_tag":
        return [r.c.tag]
    if dimension in _ATTRIBUTES:
        return [r.c.value]
    keys: dict[str, list[sa.ColumnElement[Any]]] = {
        "experience_name": [r.c.experience_name],
        "experience_version": [r.c.experience_name, r.c.experience_version],
    }
    if table is attribute_model_days:
        keys |= {"day": [r.c.day_us], "category": [r.c.category], "model": [r.c.model]}
        return keys[dimension]
    if table is attribute_provider_days:
        keys |= {"day": [r.c.day_us], "category": [r.c.category]}
        return keys[dimension]
    if table is tag_attribute_days:
        keys["day"] = [r.c.day_us]
        return keys[dimension]
    keys |= {"day": [r.c.hour_us - r.c.hour_us % DAY_US], "hour": [r.c.hour_us]}
    if table is cost_rollups:
        keys |= {"category": [r.c.category], "resource": [r.c.resource], "model": [r.c.model]}
    return keys[dimension]


def _event_keys(dimension: str, tag: Any) -> list[sa.ColumnElement[Any]]:
    ev, time = events, events.c.event_time_us
    name = sa.func.coalesce(experience_types.c.name, "")
    keys: dict[str, list[sa.ColumnElement[Any]]] = {
        "experience_name": [name],
        "experience_version": [name, sa.func.coalesce(experiences.c.version, 0)],
        "category": [ev.c.category],
        "resource": [ev.c.resource],
        "model": [rollups.MODEL_OF_EVENT],
        "user_id": [sa.func.coalesce(ev.c.user_id, "")],
        "api_key_name": [sa.func.coalesce(ev.c.key_name, "")],
        "step": [sa.func.coalesce(ev.c.step, "")],
        "request_tag": [sa.func.coalesce(tag.c.value, "") if tag is not None else sa.literal("")],
        "day": [time - time % DAY_US],
        "hour": [time - time % HOUR_US],
    }
    return keys[dimension]


def _rollup_sums(r: sa.Table) -> list[sa.Label[Any]]:
    """The sums of a rollup's rows, labelled as their columns (as rollups.event_sums does
    for events)."""
    return [sa.func.sum(r.c[name]).label(name) for name in (*ROLLUP_COUNT_COLUMNS, *ROLLUP_SPLIT_COLUMNS)]


# Groups the breakdown is kept to: the values of the first dimension's key columns.
Only = Sequence[tuple[Any, ...]] | None


def _rollup_filter(
    f: m.CostFilter, attribute: int | None = None, table: sa.Table | None = None
) -> list[sa.ColumnElement[bool]]:
    """The filter on a rollup's keys: the cost rollup's, or with `attribute` the rollup by
    user or tag (rows of that dimension, hours or days; the filter names no category or
    model) or, as `table`, the one per day and provider or model, or of each tag's events."""
    r = _table_of(attribute, table)
    pairs = [(r.c.experience_name, f.experience_name)]
    if r is tag_attribute_days:
        pairs.append((r.c.tag, f.request_tag))
    elif r is attribute_provider_days:
        pairs.append((r.c.category, f.category))
    elif r is not attribute_rollups:
        pairs += [(r.c.category, f.category), (r.c.model, f.model)]
    where = []
    if attribute is not None:
        hourly = attribute if attribute in _ATTRIBUTES.values() else attribute - DAYS
        # The filter's value of the dimension (no filter names an API key).
        value = {USER_DIMENSION: f.user_id, TAG_DIMENSION: f.request_tag}.get(hourly, "")
        pairs.append((r.c.value, value))
        where.append(r.c.dimension == attribute)
    where += [column == wanted for column, wanted in pairs if wanted]
    if f.experience_version:
        where.append(r.c.experience_version == f.experience_version)
    return where


def _table_of(attribute: int | None, table: sa.Table | None) -> sa.Table:
    """The rollup a breakdown reads: `table` when named, else the cost rollup, or with an
    attribute the rollup by user, tag and key."""
    if table is not None:
        return table
    return cost_rollups if attribute is None else attribute_rollups


def _time_of(r: sa.Table) -> sa.ColumnElement[int]:
    """A rollup's time column: the start of its row's hour, or of its day."""
    return r.c.hour_us if r in (cost_rollups, attribute_rollups) else r.c.day_us


def _event_filter(conn: AsyncConnection, f: m.CostFilter) -> list[sa.ColumnElement[bool]]:
    """The filter on events (joined with their experience and type: EVENTS_WITH_TYPE)."""
    fields = EventFilter(user_id=f.user_id, request_tag=f.request_tag, category=f.category, model=f.model)
    where = event_conditions(conn, fields)
    if f.experience_name:
        where.append(experience_types.c.name == f.experience_name)
    if f.experience_version:
        where.append(experiences.c.version == f.experience_version)
    return where


# A window of at most SEEKED_DAYS whole days of the rollup per day and model, kept to a
# model, is read as the list of its days: its key has the model after the day (0024), so
# each day is one seek to the model's rows, where a range of days reads every model's rows
# (SQLite at 100,000 events, a model's 200 users over 90 days: 4.7 ms against 10.2).
SEEKED_DAYS = 366


def _days_listed(r: sa.Table, start_us: int | None, end_us: int | None, f: m.CostFilter) -> list[int] | None:
    """The days of [start_us, end_us) to read one by one (_grouped), if they are to be."""
    if r is not attribute_model_days or not f.model or start_us is None or end_us is None:
        return None
    if start_us % DAY_US or end_us % DAY_US or (end_us - start_us) // DAY_US > SEEKED_DAYS:
        return None
    return list(range(start_us, end_us, DAY_US))


def _grouped(
    query: sa.Select[Any],
    keys: list[sa.ColumnElement[Any]],
    time: sa.ColumnElement[int],
    start_us: int | None,
    end_us: int | None,
    where: list[sa.ColumnElement[bool]],
    only: tuple[list[sa.ColumnElement[Any]], Only] = ([], None),
    days: list[int] | None = None,
) -> sa.Select[Any]:
    """The breakdown's query grouped by `keys`, over [start_us, end_us) of `time` (or its
    `days` listed), with the filter's conditions, and only of the groups `only` names."""
    columns, values = only
    if values is not None:
        query = query.where(sa.tuple_(*columns).in_([tuple(v) for v in values]) if values else sa.false())
    if keys:
        query = query.group_by(*keys)
    if days is not None:
        query = query.where(time.in_(days))
    else:
        if start_us is not None:
            query = query.where(time >= start_us)
        if end_us is not None:
            query = query.where(time < end_us)
    if where:
        query = query.where(*where)
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
    conn: AsyncConnection,
    dimensions: Sequence[str],
    start_us: int | None,
    end_us: int | None,
    f: m.CostFilter,
    into: Groups,
    only: Only = None,
    attribute: int | None = None,
    table: sa.Table | None = None,
) -> None:
    r = _table_of(attribute, table)
    keys = [key for d in dimensions for key in _rollup_keys(d, r)]
    first = _rollup_keys(dimensions[0], r) if dimensions else []
    query = _grouped(
        sa.select(*keys, *_rollup_sums(r)),
        keys,
        _time_of(r),
        start_us,
        end_us,
        _rollup_filter(f, attribute, r),
        (first, only),
        _days_listed(r, start_us, end_us, f),
    )
    _merge(into, await conn.execute(query), len(keys))


Span = tuple[int | None, int | None]  # [start, end) in µs; None: unbounded


def _whole(start_us: int | None, end_us: int | None, unit: int) -> tuple[Span, list[tuple[int, int]]] | None:
    """[start_us, end_us) as its whole units (hours, days) and the spans left at either edge;
    None when no whole unit fits in it."""
    first = None if start_us is None else -(-start_us // unit) * unit
    end = None if end_us is None else end_us - end_us % unit
    if first is not None and end is not None and end <= first:
        return None
    edges = [(s, e) for s, e in ((start_us, first), (end, end_us)) if s is not None and e is not None and s < e]
    return (first, end), edges


async def _from_days_and_hours(
    conn: AsyncConnection,
    dimensions: Sequence[str],
    hours: Span,
    f: m.CostFilter,
    into: Groups,
    only: Only,
    attribute: int,
) -> None:
    """The whole hours of the rollup by user or tag: their whole UTC days from the rows per
    day, the hours at either edge from the rows per hour, so that a month reads a row per day
    and user, not per hour."""
    days = _whole(*hours, DAY_US)
    if days is None:
        await _breakdown_from_rollup(conn, dimensions, *hours, f, into, only, attribute)
        return
    whole_days, edges = days
    await _breakdown_from_rollup(conn, dimensions, *whole_days, f, into, only, attribute + DAYS)
    for start, end in edges:
        await _breakdown_from_rollup(conn, dimensions, start, end, f, into, only, attribute)


async def _breakdown_from_events(
    conn: AsyncConnection,
    dimensions: Sequence[str],
    start_us: int | None,
    end_us: int | None,
    f: m.CostFilter,
    into: Groups,
    only: Only = None,
) -> None:
    ev = events
    # The experience and its type are joined only where a dimension or the filter needs them.
    needs_type = bool(f.experience_name or f.experience_version) or {"experience_name", "experience_version"} & set(
        dimensions
    )
    source: Any = rollups.EVENTS_WITH_TYPE if needs_type else rollups.EVENTS_WITH_PRICE
    tag = None
    where = _event_filter(conn, f)
    if "request_tag" in dimensions:
        tag = rollups.event_tags(conn)
        source = source.outerjoin(tag, sa.true())
        where.append(rollups.first_of_its_tag(conn, tag))  # a tag it repeats, once
    keys = [key for d in dimensions for key in _event_keys(d, tag)]
    first = _event_keys(dimensions[0], tag) if dimensions else []
    query = _grouped(
        sa.select(*keys, *rollups.event_sums()).select_from(source),
        keys,
        ev.c.event_time_us,
        start_us,
        end_us,
        where,
        (first, only),
    )
    _merge(into, await conn.execute(query), len(keys))


async def cost_breakdown(
    conn: AsyncConnection,
    dimensions: Sequence[str],
    start_us: int | None,
    end_us: int | None,
    f: m.CostFilter,
    only: Only = None,
) -> Groups:
    """Sums of the events in [start_us, end_us) that the filter selects, per group of the
    dimensions (none: one group, the total), kept to the groups of the first dimension that
    `only` names when given. From a rollup for the window's whole hours (by user or tag, its
    whole days from the rows per day) and the events of its partial hours; from the events
    alone where no rollup keeps the groups. One of user, tag and key beside a provider or
    model, or a tag's events by user or key (or of one user): the window's whole days from
    a rollup per day, the rest from the events."""
    attribute = _attribute_of(dimensions, f)
    by_days = _days_rollup_of(dimensions, f)
    days = _whole(start_us, end_us, DAY_US)
    if by_days is not None and days is not None:
        # The whole days from a rollup per day, the rest (at most a day at either edge) from
        # the events.
        groups: Groups = {}
        whole_days, edges = days
        await _breakdown_from_rollup(conn, dimensions, *whole_days, f, groups, only, *by_days)
        for start, end in edges:
            await _breakdown_from_events(conn, dimensions, start, end, f, groups, only)
        return groups
    if not _from_hourly_rollup(dimensions, f):
        groups = {}
        await _breakdown_from_events(conn, dimensions, start_us, end_us, f, groups, only)
        return groups
    hours = _whole(start_us, end_us, HOUR_US)
    groups = {}
    if hours is None:
        await _breakdown_from_events(conn, dimensions, start_us, end_us, f, groups, only)
        return groups
    whole_hours, edges = hours
    if attribute is not None and "hour" not in dimensions:
        await _from_days_and_hours(conn, dimensions, whole_hours, f, groups, only, attribute)
    else:
        await _breakdown_from_rollup(conn, dimensions, *whole_hours, f, groups, only, attribute)
    for start, end in edges:
        await _breakdown_from_events(conn, dimensions, start, end, f, groups, only)
    return groups


def _from_hourly_rollup(dimensions: Sequence[str], f: m.CostFilter) -> bool:
    """Whether an hourly rollup (the cost rollup, or the one by user, tag or key) keeps these
    groups of the filter's events."""
    if _attribute_of(dimensions, f) is not None:
        return True
    return set(dimensions) <= ROLLUP_DIMENSIONS and not f.of_events_only


def _answered_by_rollup(dimensions: Sequence[str], f: m.CostFilter) -> bool:
    """Whether cost_breakdown reads these groups of the filter's events from a rollup (for
    the window's whole hours or days), not from every event of the window."""
    return _days_rollup_of(dimensions, f) is not None or _from_hourly_rollup(dimensions, f)


def _back_from(start_us: int | None, end_us: int | None, unit: int) -> list[tuple[int | None, int | None]]:
    """[start_us, end_us) in parts from its end back: a day, a week, eight weeks, the rest
    (cut at whole units), so that a common filter's newest events are counted from a day's
    rows, not from the whole window's (unbounded at the end: one part)."""
    if end_us is None:
        return [(start_us, end_us)]
    parts: list[tuple[int | None, int | None]] = []
    end = end_us
    for days in (1, 7, 56):
        cut = end_us - days * DAY_US
        cut -= cut % unit
        if start_us is not None and cut <= start_us:
            break
        parts.append((cut, end))
        end = cut
    parts.append((start_us, end))
    return parts


class Held(NamedTuple):
    """Where the rollups say a filter's newest events are (spans_holding)."""

    spans: list[tuple[int, int]]  # [start, end) of event time, newest first
    every: bool  # they hold every event of the filter in the window


async def spans_holding(
    conn: AsyncConnection, f: m.CostFilter, start_us: int | None, end_us: int | None, count: int, unpriced: bool
) -> Held | None:
    """The newest hours (or days) of [start_us, end_us) that hold, by the rollups, `count` of
    the filter's events (only those not priced, if `unpriced`), or all of them, as spans of
    event time newest first (adjacent ones merged); None when no rollup counts the filter's
    events by hour or day. The rollups count every stored event (and pruned or erased ones,
    so that the spans may hold fewer than they count)."""
    dimension = next((d for d in ("hour", "day") if _answered_by_rollup([d], f)), None)
    if dimension is None:
        return None
    unit = HOUR_US if dimension == "hour" else DAY_US
    spans: list[tuple[int, int]] = []
    held = 0
    for part_start, part_end in _back_from(start_us, end_us, unit):
        groups = await cost_breakdown(conn, [dimension], part_start, part_end, f)
        for (first,), totals in sorted(groups.items(), reverse=True):
            found = totals.unpriced_event_count if unpriced else totals.event_count
            if not found:
                continue
            first = int(first)
            span = (
                first if part_start is None else max(first, part_start),
                first + unit if part_end is None else min(first + unit, part_end),
            )
            if spans and spans[-1][0] == span[1]:
                spans[-1] = (span[0], spans[-1][1])
            else:
                spans.append(span)
            held += found
            if held >= count:
                break
        if held >= count:
            break
    return Held(spans, held < count)


async def costliest_groups(
    conn: AsyncConnection, dimension: str, start_us: int, end_us: int, count: int, f: m.CostFilter = m.ALL_EVENTS
) -> list[tuple[Any, ...]]:
    """The `count` groups of a rollup dimension that cost the most over the window's whole
    hours (of the filter's events; a filter of user or tag with a category or model ranks
    the rollup per day and model over a window of whole days, else its events), ranked in
    the database: however many groups there are, `count` rows come back."""
    attribute = _attribute_of([dimension], f)
    by_days = _days_rollup_of([dimension], f)
    if by_days is not None and start_us % DAY_US == 0 and end_us % DAY_US == 0:
        (attribute, r), first = by_days, start_us
    elif f.of_events_only and attribute is None:
        ev = events
        keys = _event_keys(dimension, None)
        cost = sa.func.sum(ev.c.cost_total_nanos)
        query = (
            _grouped(
                sa.select(*keys).select_from(rollups.EVENTS_WITH_TYPE),
                keys,
                ev.c.event_time_us,
                start_us,
                end_us,
                _event_filter(conn, f),
            )
            .order_by(cost.desc(), sa.func.count().desc(), *keys)
            .limit(count)
        )
        return [tuple(row) for row in await conn.execute(query)]
    else:
        r, first = _table_of(attribute, None), -(-start_us // HOUR_US) * HOUR_US
        if attribute is not None and start_us % DAY_US == 0 and end_us % DAY_US == 0:
            # Whole days: the rows per day of the user (tag, key), not its hours (a busy
            # user's 90 days were 5,000 hourly rows at 1,000,000 events, and grew with them).
            attribute += DAYS
    keys = _rollup_keys(dimension, r)
    cost = sa.func.sum(r.c.cost_total_dollars * 1_000_000_000 + r.c.cost_total_nanos)
    query = (
        _grouped(
            sa.select(*keys),
            keys,
            _time_of(r),
            first,
            end_us,
            _rollup_filter(f, attribute, r),
            days=_days_listed(r, first, end_us, f),
        )
        .order_by(cost.desc(), sa.func.sum(r.c.event_count).desc(), *keys)
        .limit(count)
    )
    return [tuple(row) for row in await conn.execute(query)]


async def runs_started(conn: AsyncConnection, start_day: int, end_day: int, f: m.CostFilter) -> tuple[int, int]:
    """Runs whose first event falls in the whole UTC days [start_day, end_day), of the
    filter's type and version (it names no other key), and what they cost in all: from the
    type rollup, a few rows per day."""
    t = type_rollups
    query = sa.select(
        sa.func.sum(t.c.experience_count), sa.func.sum(t.c.cost_total_dollars), sa.func.sum(t.c.cost_total_nanos)
    ).where(t.c.day_us >= start_day, t.c.day_us < end_day)
    if f.experience_name:
        query = query.join(experience_types, experience_types.c.id == t.c.type_id).where(
            experience_types.c.name == f.experience_name
        )
    if f.experience_version:
        query = query.where(t.c.version == f.experience_version)
    runs, dollars, nanos = (await conn.execute(query)).one()
    return int(runs or 0), rollups.joined(dollars, nanos)


async def runs_touched(conn: AsyncConnection, start_us: int, end_us: int, f: m.CostFilter) -> int:
    """Runs with at least one of the filter's events in [start_us, end_us): read from the
    window's events of the filter (a user's from ix_events_user_time alone, which holds each
    event's run, when nothing else is asked of them)."""
    ev = events
    source = rollups.events_joined(bool(f.experience_name or f.experience_version), bool(f.model))
    query = (
        sa.select(sa.func.count(sa.distinct(ev.c.experience_id)))
        .select_from(source)
        .where(ev.c.event_time_us >= start_us, ev.c.event_time_us < end_us, ev.c.experience_id.is_not(None))
        .where(*_event_filter(conn, f))
    )
    return int((await conn.execute(query)).scalar_one() or 0)


async def reasons_counted(
    conn: AsyncConnection, start_day: int, end_day: int, f: m.CostFilter, max_rows: int
) -> list[tuple[str, int]] | None:
    """Why the filter's events of the whole UTC days [start_day, end_day) were not (fully)
    priced: each reason with how many of them have it, from the rollup of reasons (the rows of
    the filter's user or tag, else every key's). None when the filter names a type, a version,
    or both a user and a tag (which the rollup does not keep together), or when more than
    `max_rows` rows hold them: at most that many rows are read."""
    if f.experience_name or f.experience_version or (f.user_id and f.request_tag):
        return None
    r = unpriced_reason_days
    where = [r.c.day_us >= start_day, r.c.day_us < end_day]
    if f.user_id or f.request_tag:
        dimension, value = (USER_DIMENSION, f.user_id) if f.user_id else (TAG_DIMENSION, f.request_tag)
        where += [r.c.dimension == dimension, r.c.value == value]
    else:  # every event counts once under its key ("" for none)
        where.append(r.c.dimension == KEY_DIMENSION)
    where += [column == wanted for column, wanted in ((r.c.category, f.category), (r.c.model, f.model)) if wanted]
    rows = sa.select(r.c.reason, r.c.event_count).where(*where).limit(max_rows + 1).subquery("held")
    query = sa.select(rows.c.reason, sa.func.sum(rows.c.event_count), sa.func.count()).group_by(rows.c.reason)
    counted = [(str(reason), int(events_of), int(held)) for reason, events_of, held in await conn.execute(query)]
    if sum(held for _, _, held in counted) > max_rows:
        return None
    return [(reason, events_of) for reason, events_of, _ in counted]

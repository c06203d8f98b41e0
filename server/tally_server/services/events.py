"""Events read back: listed with filters, or looked up by request id or idempotency key."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import annotations as notes_rules, paging
from ..domain.errors import TallyError, Violations, failed_precondition, not_found
from ..domain.models import CostFilter, CostState, Page, StoredEvent, now_us
from ..domain.rollups import DAY_US
from ..domain.validation import MAP_VALUE_MAX, NAME_PATTERN, check_name, check_text, parse_uuid, utf8_length
from ..storage import (
    annotations as stored_annotations,
    applied_prices as stored_applied_prices,
    events as stored_events,
    reports as stored_reports,
    types as stored_types,
)
from ..storage.db import Database
from .reports import check_filter


def event_not_found(how: str, value: str) -> TallyError:
    return not_found("EVENT_NOT_FOUND", "tally.v1.StoredEvent", value, f"no event with {how} {value!r}")


class Events:
    def __init__(self, db: Database, pages: paging.PageTokens | None = None) -> None:
        self.db = db
        self.pages = pages or paging.PageTokens()

    async def get(self, request_id: str = "", idempotency_key: str = "") -> StoredEvent:
        v = Violations()
        if bool(request_id) == bool(idempotency_key):
            v.add("lookup", "set exactly one of request_id and idempotency_key")
        parsed = parse_uuid(request_id) if request_id else None
        if request_id and parsed is None:
            v.add("request_id", f"not a UUID: {request_id[:80]!r}")
        check_text(v, "idempotency_key", idempotency_key, 300)
        v.raise_if_any()
        async with self.db.read() as conn:
            if parsed is not None:
                found = await stored_events.event_by_id(conn, parsed)
            else:
                found = (await stored_events.events_by_key(conn, [idempotency_key])).get(idempotency_key)
            if found is None:
                raise event_not_found(
                    *(("request id", request_id) if request_id else ("idempotency key", idempotency_key))
                )
            return (await _annotated(conn, [found]))[0]

    async def annotate(
        self,
        request_id: str,
        provider_response_id: str,
        set_annotations: dict[str, str],
        remove_keys: Sequence[str],
        key_name: str,
    ) -> StoredEvent:
        """Sets and removes annotations of a stored event; its content and cost never change."""
        v = Violations()
        if bool(request_id) == bool(provider_response_id):
            v.add("lookup", "set exactly one of request_id and provider_response_id")
        parsed = parse_uuid(request_id) if request_id else None
        if request_id and parsed is None:
            v.add("request_id", f"not a UUID: {request_id[:80]!r}")
        check_text(v, "provider_response_id", provider_response_id, 256)
        notes_rules.check_annotations(v, set_annotations, remove_keys)
        v.raise_if_any()
        async with self.db.write() as conn:
            if parsed is not None:
                found = await stored_events.event_by_id(conn, parsed)
            else:
                carrying = await stored_events.events_by_response_id(conn, provider_response_id, 2)
                if len(carrying) > 1:
                    raise failed_precondition(
                        "EVENT_AMBIGUOUS",
                        f"several events carry provider response id {provider_response_id[:80]!r}; use request_id",
                    )
                found = carrying[0] if carrying else None
            if found is None:
                how = ("request id", request_id) if request_id else ("provider response id", provider_response_id)
                raise event_not_found(*how)
            event_id = found.result.request_id
            current = {a.key for a in (await stored_annotations.of_events(conn, [event_id])).get(event_id, ())}
            if len((current - set(remove_keys)) | set(set_annotations)) > notes_rules.MAX_ANNOTATIONS:
                v.add("set_annotations", f"an event holds at most {notes_rules.MAX_ANNOTATIONS} annotations")
                v.raise_if_any()
            await stored_annotations.change(conn, event_id, set_annotations, remove_keys, now_us(), key_name)
            return (await _annotated(conn, [found]))[0]

    async def list(
        self,
        *,
        experience_id: str = "",
        experience_name: str = "",
        experience_version: int = 0,
        user_id: str = "",
        request_tag: str = "",
        category: str = "",
        resource: str = "",
        cost_state: int = 0,
        start_us: int | None = None,
        end_us: int | None = None,
        page_size: int = 0,
        page_token: str = "",
        model: str = "",
        provider_response_id: str = "",
    ) -> Page:
        v = Violations()
        parsed = parse_uuid(experience_id) if experience_id else None
        if experience_id and parsed is None:
            v.add("experience_id", f"not a UUID: {experience_id[:80]!r}")
        if experience_name:
            check_name(v, "experience_name", experience_name, what="experience type name")
        if experience_version < 0:
            v.add("experience_version", "must be 0 (all versions) or a version number")
        elif experience_version and not experience_name:
            v.add("experience_version", "needs experience_name")
        if cost_state and cost_state not in {int(state) for state in CostState}:
            v.add("cost_state", f"not a cost state: {cost_state}")
        if start_us is not None and end_us is not None and end_us <= start_us:
            v.add("end_time", "must be after start_time")
        for field, value in (
            ("user_id", user_id),
            ("request_tag", request_tag),
            ("category", category),
            ("resource", resource),
            ("model", model),
            ("provider_response_id", provider_response_id),
        ):
            check_text(v, field, value, 256)
        v.raise_if_any()
        size = paging.page_size(page_size)
        filters = [experience_id, experience_name, experience_version, user_id, request_tag, category, resource]
        filters += [cost_state, start_us, end_us, model, provider_response_id]
        position = self.pages.decode(
            page_token,
            "events",
            filters,
            lambda p: isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and parse_uuid(p[1]) is not None,
        )
        before = None if position is None else (position[0], uuid.UUID(position[1]))
        only = CostFilter(experience_name, experience_version, category, model, user_id, request_tag)
        async with self.db.read() as conn:
            event_filter = dataclasses.replace(
                await _view_filter(conn, only, start_us, end_us, cost_state),
                experience_id=parsed,
                resource=resource,
                provider_response_id=provider_response_id,
            )
            found = await _annotated(
                conn, await _newest(conn, event_filter, only, before, size + 1, stored_events.list_events)
            )

        def token_after(count: int) -> str:
            last = found[count - 1].result
            return self.pages.encode("events", filters, [last.event_time_us, str(last.request_id)])

        return Page(found[:size], token_after(size) if len(found) > size else "", token_after)

    async def newest_runs(
        self, only: CostFilter, start_us: int, end_us: int, *, among: int
    ) -> tuple[tuple[uuid.UUID, ...], int]:
        """The runs of the filter's newest `among` events in [start_us, end_us), newest first
        (by their newest event among them), and how many events those were: only the events'
        run ids are read (1,000 whole events were most of the runs panel's 100 ms)."""
        v = Violations()
        _check_view(v, only, 0)
        v.raise_if_any()
        async with self.db.read() as conn:
            event_filter = await _view_filter(conn, only, start_us, end_us, 0)
            runs = await _newest(conn, event_filter, only, None, among, stored_events.run_ids)
        return tuple(dict.fromkeys(run for run in runs if run is not None)), len(runs)

    async def with_property(
        self, key: str, value: str, only: CostFilter, start_us: int, end_us: int, *, among: int, limit: int
    ) -> tuple[Sequence[StoredEvent], int]:
        """The events of the filter in [start_us, end_us), among their newest `among`, with the
        property `key` (any key, for "") of this value, newest first (at most `limit`); and
        how many events were searched."""
        v = Violations()
        if key and not NAME_PATTERN.fullmatch(key):
            v.add("key", "a property key matches [A-Za-z0-9._-]{1,64}")
        if utf8_length(value) > MAP_VALUE_MAX or "\x00" in value:
            v.add("value", f"a property value is at most {MAP_VALUE_MAX} bytes of UTF-8, without NUL")
        _check_view(v, only, 0)
        v.raise_if_any()
        async with self.db.read() as conn:
            event_filter = await _view_filter(conn, only, start_us, end_us, 0)
            found, searched = await stored_events.events_with_property(conn, event_filter, key, value, among, limit)
            return await _annotated(conn, found), searched

    async def newest_among(
        self, only: CostFilter, start_us: int, end_us: int, cost_state: int, *, among: int, limit: int
    ) -> tuple[Sequence[StoredEvent], bool]:
        """The newest `limit` events of the filter and cost state (0: any) in [start_us,
        end_us), those of a tag, model or provider looked for among the newest `among` events
        of the window and state; and whether that bound applied."""
        v = Violations()
        _check_view(v, only, cost_state)
        v.raise_if_any()
        async with self.db.read() as conn:
            event_filter = await _view_filter(conn, only, start_us, end_us, cost_state)
            found, bounded = await stored_events.newest_among(conn, event_filter, among, limit)
            return await _annotated(conn, found), bounded

    async def unpriced_reasons(
        self, only: CostFilter, start_us: int, end_us: int, cost_state: int, *, among: int, limit: int
    ) -> tuple[Sequence[tuple[tuple[str, ...], int]], bool]:
        """The reasons of the events newest_among finds (a state not priced), each distinct
        list of them with how many of those events have it: only the reasons are read."""
        v = Violations()
        _check_view(v, only, cost_state)
        v.raise_if_any()
        async with self.db.read() as conn:
            event_filter = await _view_filter(conn, only, start_us, end_us, cost_state)
            return await stored_events.reasons_among(conn, event_filter, among, limit)

    async def reasons_counted(
        self, only: CostFilter, start_day: int, end_day: int, *, max_rows: int
    ) -> Sequence[tuple[str, int]] | None:
        """Why the filter's events of the whole UTC days [start_day, end_day) were not (fully)
        priced, each reason with how many of them have it, counted at ingest (every such
        event, not the newest); None where the rollup does not answer the filter, or holds
        them in more than `max_rows` rows."""
        v = Violations()
        _check_view(v, only, 0)
        if start_day % DAY_US or end_day % DAY_US:
            v.add("start_day", "whole UTC days are counted")
        v.raise_if_any()
        async with self.db.read() as conn:
            return await stored_reports.reasons_counted(conn, start_day, end_day, only, max_rows)


# Times _newest narrows a page to the hours the rollups name before reading the rest; and
# the spans of those hours it reads one by one at most, before one read of what is left.
NARROWED_TRIES = 4
SPAN_READS = 128


_Row = TypeVar("_Row")
# What _newest reads of the events: list_events (the events), or run_ids (their runs' ids).
Reader = Callable[
    [AsyncConnection, stored_events.EventFilter, tuple[int, uuid.UUID] | None, int], Awaitable[list[_Row]]
]


async def _newest(
    conn: AsyncConnection,
    f: stored_events.EventFilter,
    only: CostFilter,
    before: tuple[int, uuid.UUID] | None,
    limit: int,
    read: Reader[_Row],
) -> list[_Row]:
    """The filter's newest `limit` events, as `read` reads them (list_events, run_ids). With
    a model, provider or tag (which no index finds; a model that no price has is its
    unpriced events of its resource: ix_events_unpriced_resource) and nothing an index
    finds, only the newest hours the rollups say hold `limit` of the filter's events are
    read (reports.spans_holding), span by span, newest first (past SPAN_READS spans, the
    rest as one). A page of a rare model read every event of the window (2.2 s at 1,000,000
    events), and PostgreSQL, misjudging a common one as rare, sorted the window's. Where
    those hours hold fewer (the event the page starts after, events pruned or erased since
    counted), the hours before them are looked for the same way, NARROWED_TRIES times, then
    the rest of the window is read."""
    indexed = f.experience_id or f.user_id or f.provider_response_id or f.model_never_priced
    if indexed or not (f.model or f.category or f.request_tag):
        return await read(conn, f, before, limit)
    end = f.end_us if before is None else before[0] + 1 if f.end_us is None else min(f.end_us, before[0] + 1)
    # Pruned hours hold no event, however many the rollups count there.
    oldest = await stored_events.oldest_event_time(conn)
    start = oldest if f.start_us is None or (oldest is not None and oldest > f.start_us) else f.start_us
    unpriced = f.cost_state not in (0, int(CostState.PRICED))
    found: list[_Row] = []
    for _ in range(NARROWED_TRIES):
        held = await stored_reports.spans_holding(conn, only, start, end, limit - len(found) + 1, unpriced)
        if held is None:
            break
        # Each span a read of its own: a time range the planners read in order (an OR of
        # ranges, SQLite read the time index from the window's end in order instead).
        spans = held.spans[:SPAN_READS]
        if len(held.spans) > SPAN_READS:
            spans.append((held.spans[-1][0], held.spans[SPAN_READS][1]))
        for span_start, span_end in spans:
            narrowed = dataclasses.replace(f, start_us=span_start, end_us=span_end)
            found += await read(conn, narrowed, before, limit - len(found))
            if len(found) >= limit:
                return found
        if held.every or not held.spans:
            return found
        end = held.spans[-1][0]
    rest = dataclasses.replace(f, end_us=end)
    return found + await read(conn, rest, before, limit - len(found))


def _check_view(v: Violations, only: CostFilter, cost_state: int) -> None:
    """Adds a violation for each field of a dashboard view's filter and cost state refused."""
    check_filter(v, only)
    if cost_state and cost_state not in {int(state) for state in CostState}:
        v.add("cost_state", f"not a cost state: {cost_state}")


async def _view_filter(
    conn: AsyncConnection, only: CostFilter, start_us: int | None, end_us: int | None, cost_state: int
) -> stored_events.EventFilter:
    """The events filter of a view (checked by _check_view, or by ListEvents' checks) and a
    cost state, with what the database says of its type and model."""
    return stored_events.EventFilter(
        type_id=await _type_id(conn, only.experience_name),
        version=only.experience_version,
        user_id=only.user_id,
        request_tag=only.request_tag,
        category=only.category,
        model=only.model,
        model_never_priced=bool(only.model) and not await stored_applied_prices.priced_as(conn, only.model),
        cost_state=cost_state,
        start_us=start_us,
        end_us=end_us,
    )


async def _type_id(conn: AsyncConnection, experience_name: str) -> int | None:
    """The id of the type named, None when none is; a type that does not exist is id 0, which
    no experience has, so that the filter finds no event."""
    if not experience_name:
        return None
    found = await stored_types.get_type(conn, experience_name)
    return 0 if found is None else int(found[0])


async def _annotated(conn: AsyncConnection, found: Sequence[StoredEvent]) -> list[StoredEvent]:
    """The events with their annotations: one query for all of them."""
    notes = await stored_annotations.of_events(conn, [e.result.request_id for e in found])
    if not notes:
        return list(found)
    return [dataclasses.replace(e, annotations=notes.get(e.result.request_id, ())) for e in found]

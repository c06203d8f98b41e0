"""Ingest: validates events, and a group-commit writer that resolves, prices and
stores many events per transaction, answering each caller only after commit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from tally_client.metadata import CONTEXT_KEYS, PRICE_CONTEXT

from .. import metrics
from ..storage import repository as repo
from ..storage.db import Database
from .errors import Code, TallyError, Violation, Violations, invalid, overloaded
from .ids import uuid7
from .models import (
    Cost,
    CostState,
    EventContext,
    IngestResult,
    PriceReference,
    PriceSource,
    Resolution,
    UnknownUnit,
    UsageEvent,
    now_us,
)
from .pricing import PriceCatalog
from .resolution import resolve_experiences
from .rollups import rollups_of, type_deltas
from .validation import (
    CATEGORY_PATTERN,
    LATENCY_MAX_MS,
    NAME_PATTERN,
    PROPERTIES_MAX_ENTRIES,
    UNIT_COUNT_MAX,
    UNIT_TYPE_PATTERN,
    check_price_context,
    check_string_map,
    check_text,
)

log = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1000
MAX_FUTURE_SKEW_US = 5 * 60 * 1_000_000
MAX_UNIT_TYPES = 32
MAX_TAGS = 32


_NO_CONTEXT = EventContext()


def merge_context(call: EventContext, event: EventContext, v: Violations) -> EventContext:
    """The call's metadata and the event's own context as one; a contradiction is a violation.
    (The event's own context has no price context or warnings: those come from metadata.)"""
    if event == _NO_CONTEXT:
        return call
    if call == _NO_CONTEXT:
        return event
    merged: dict[str, Any] = {"price_context": call.price_context, "warnings": call.warnings}
    for name, key in CONTEXT_KEYS.items():
        from_call, from_event = getattr(call, name), getattr(event, name)
        if from_call and from_event and from_call != from_event:
            v.add(f"context.{name}", f"{from_event!r} contradicts metadata {key}={from_call!r}")
        merged[name] = from_event or from_call
    return EventContext(**merged)


def merge_price_context(call: EventContext, event: UsageEvent, v: Violations) -> dict[str, str]:
    """The call's xproxy-price-context and the event's own price_context as one."""
    if not call.price_context:
        return event.price_context
    merged = dict(call.price_context)
    for key, value in event.price_context.items():
        if merged.get(key, value) != value:
            v.add(f"price_context[{key[:64]!r}]", f"{value[:64]!r} contradicts metadata {PRICE_CONTEXT}")
        merged[key] = value
    return merged


def prepare_event(event: UsageEvent, call: EventContext, now: int, prefix: str = "") -> UsageEvent | TallyError:
    """An event as converted from the wire, with its own context, made ready to store:
    merged with the call's context (metadata) and validated. Returns the event, or the
    INVALID_ARGUMENT that refuses it, with field paths under `prefix`."""
    v = Violations(prefix)
    event.context = merge_context(call, event.context, v)
    event.price_context = merge_price_context(call, event, v)
    validate_event(event, now, v)
    return invalid(v.items, "INVALID_EVENT") if v else event


def validate_event(event: UsageEvent, now: int | None, v: Violations) -> None:
    """Adds a violation for each invalid field; paths are relative to the event.
    `now` None skips the future check (a quote may price a planned call)."""
    if not event.category:
        v.add("category", "category is required, e.g. 'system.openai'")
    elif not CATEGORY_PATTERN.fullmatch(event.category):
        v.add("category", "must match [A-Za-z0-9._-]{1,128}")
    if not event.resource:
        v.add("resource", "resource is required, e.g. 'gpt-4o'")
    elif len(event.resource) > 256 or not event.resource.isprintable():
        v.add("resource", "must be 1 to 256 printable characters")
    if len(event.units) > MAX_UNIT_TYPES:
        v.add("units", f"at most {MAX_UNIT_TYPES} unit types, got {len(event.units)}")
    for unit_type, (input_count, output_count) in event.units.items():
        if not UNIT_TYPE_PATTERN.fullmatch(unit_type):
            v.add(f"units[{unit_type[:64]!r}]", "unit type must match [a-z0-9_]{1,64}")
        if not (0 <= input_count <= UNIT_COUNT_MAX and 0 <= output_count <= UNIT_COUNT_MAX):
            for direction, count in (("input", input_count), ("output", output_count)):
                if not 0 <= count <= UNIT_COUNT_MAX:
                    v.add(f"units[{unit_type[:64]!r}].{direction}", f"must be 0 to {UNIT_COUNT_MAX:,}, got {count}")
    if now is not None and event.event_time_us > now + MAX_FUTURE_SKEW_US:
        v.add("event_timestamp", "is more than 5 minutes in the future")
    elif event.event_time_us < 0:
        v.add("event_timestamp", "must not be before 1970-01-01")
    latency, first_token = event.end_to_end_latency_ms, event.time_to_first_token_ms
    if not (0 <= latency <= LATENCY_MAX_MS and 0 <= first_token <= LATENCY_MAX_MS):
        for name, value in (("end_to_end_latency_ms", latency), ("time_to_first_token_ms", first_token)):
            if not 0 <= value <= LATENCY_MAX_MS:
                v.add(name, f"must be 0 to {LATENCY_MAX_MS:,} (a week), got {value}")
    if event.http_status_code and not 100 <= event.http_status_code <= 599:
        v.add("http_status_code", f"must be 0 (unknown) or 100..599, got {event.http_status_code}")
    check_text(v, "provider_response_id", event.provider_response_id)
    check_text(v, "idempotency_key", event.idempotency_key)
    check_string_map(v, "properties", event.properties, PROPERTIES_MAX_ENTRIES)
    context = event.context
    check_text(v, "context.experience_id", context.experience_id)
    if context.experience_name and not NAME_PATTERN.fullmatch(context.experience_name):
        v.add("context.experience_name", "experience type name must match [A-Za-z0-9._-]{1,64}")
    if context.experience_version < 0:
        v.add("context.experience_version", "must be 0 (current) or a version number")
    check_text(v, "context.user_id", context.user_id)
    if event.price_context:
        check_price_context(v, "price_context", event.price_context)
    if len(context.request_tags) > MAX_TAGS:
        v.add("context.request_tags", f"at most {MAX_TAGS} tags")
    for tag in context.request_tags:
        if not tag or len(tag) > 128 or "," in tag or "\x00" in tag:
            v.add("context.request_tags", f"each tag is 1 to 128 characters without commas, got {tag[:80]!r}")


# At most $1,000,000 an event. With it, an event's costs fit in 64-bit nano-dollars with
# room to spare, and sums (taken as whole dollars and nanos apart, storage/repository.py)
# cannot overflow below 9 trillion events.
MAX_EVENT_COST_NANOS = 10**15


def cost_out_of_range(cost: Cost) -> TallyError:
    return invalid(
        [Violation("units", f"the event would cost ${cost.total_nanos / 1e9:,.0f}; at most $1,000,000 an event")],
        "COST_OUT_OF_RANGE",
    )


def idempotency_key(event: UsageEvent) -> str:
    return event.idempotency_key or event.provider_response_id


def key_reused(key: str) -> TallyError:
    return TallyError(
        Code.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        f"idempotency key {key[:80]!r} was already used by an event with different content",
        resource=("tally.v1.UsageEvent", key[:256]),
    )


class _Request:
    """Events that one caller waits for together (one unary event, or a whole batch),
    answered through one future once all of them are settled: a batch costs one
    future and one wake-up, not one per event."""

    __slots__ = ("events", "future", "outcomes", "single", "unsettled")

    def __init__(self, events: Sequence[UsageEvent], future: asyncio.Future[Any], single: bool) -> None:
        self.events = events
        self.future = future
        self.outcomes: list[Any] = [None] * len(events)
        self.unsettled = len(events)
        self.single = single


class _Pending:
    """One event of a request, as the writer handles it."""

    __slots__ = ("event", "index", "request", "settled")

    def __init__(self, request: _Request, index: int) -> None:
        self.request = request
        self.index = index
        self.event = request.events[index]
        self.settled = False


class Ingestor:
    """Group commit: one writer task drains the queue into one transaction per batch.

    Callers are answered only after their batch committed, so an acknowledged
    event is durable; many events share one commit, so it is also fast.
    """

    def __init__(
        self,
        db: Database,
        catalog: PriceCatalog | None = None,
        max_batch: int = 4096,
        max_queued_events: int = 50_000,
    ) -> None:
        """`max_queued_events`: events waiting for the writer at most; past it, new events are
        refused with RESOURCE_EXHAUSTED rather than held in memory."""
        self.db = db
        self.catalog = catalog or PriceCatalog()
        self.max_batch = max_batch
        self.max_queued_events = max_queued_events
        self._queued_events = 0
        metrics.WRITER_QUEUE.set_function(lambda: self._queued_events)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tally-group-commit")

    async def stop(self) -> None:
        """Finishes what is queued, then stops the writer."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def enqueue(self, event: UsageEvent) -> asyncio.Future[IngestResult | TallyError]:
        """Queues a validated event; the future gives its IngestResult or TallyError after
        commit, or raises what kept it from being stored."""
        self._admit(1)
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request((event,), future, single=True))
        return future

    def _admit(self, count: int) -> None:
        """Counts `count` more events waiting; RESOURCE_EXHAUSTED past the bound."""
        if self._queued_events + count > self.max_queued_events:
            metrics.SHED.labels("queued_events").inc(count)
            raise overloaded(f"{self.max_queued_events:,} events waiting to be stored")
        self._queued_events += count

    async def submit(self, events: Sequence[UsageEvent]) -> list[IngestResult | TallyError | Exception]:
        """Stores validated events; per event, its result, the error that refused it, or
        the exception that kept it from being stored (the database was unreachable)."""
        if not events:
            return []
        try:
            self._admit(len(events))
        except TallyError as refused:
            return [dataclasses.replace(refused) for _ in events]
        future: asyncio.Future[list[IngestResult | TallyError | Exception]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(events, future, single=False))
        return await future

    async def _run(self) -> None:
        while True:
            requests = [await self._queue.get()]
            size = len(requests[0].events)
            while size < self.max_batch and not self._queue.empty():
                requests.append(self._queue.get_nowait())
                size += len(requests[-1].events)
            requests = [request for request in requests if not self._gone(request)]
            batch = [_Pending(request, index) for request in requests for index in range(len(request.events))]
            current: list[_Pending] = []
            try:
                # Events repeating a key of this batch go in a later transaction, where
                # they meet the first one as stored.
                while batch:
                    current, batch = _first_of_each_key(batch)
                    await self._commit(current)
            except Exception as error:  # a bug: answer the callers rather than leave them waiting
                log.exception("the group-commit writer failed")
                for item in (*current, *batch):
                    if not item.settled:
                        self._settle(item, error)

    def _gone(self, request: _Request) -> bool:
        """A caller that went away before its events' commit began (its deadline passed, it
        cancelled): its events are not stored, so that a call answered DEADLINE_EXCEEDED or
        CANCELLED is never committed afterwards. (Events already in a commit when their
        caller gives up are stored; a retry with the same idempotency key is answered as
        their duplicate.)"""
        if not request.future.cancelled():
            return False
        self._queued_events -= len(request.events)
        self._queue.task_done()
        metrics.ABANDONED.inc(len(request.events))
        return True

    async def _commit(self, current: list[_Pending]) -> None:
        """Stores events with distinct keys in one transaction and answers them."""
        keys = {key for item in current if (key := idempotency_key(item.event))}
        started = time.perf_counter()
        try:
            outcomes, raced = await self._store(current, keys)
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.COMMIT_EVENTS.observe(len(current))
        # Deliberately any exception: whatever failed, every caller waiting on this batch gets an answer.
        except Exception as error:  # noqa: BLE001 - rolled back: nothing of this transaction is stored
            if len(current) > 1:
                log.warning("a batch of %d events failed (%r); storing them one by one", len(current), error)
                for item in current:
                    await self._commit([item])
                return
            log.error("storing an event failed: %r", error)
            self._settle(current[0], error)
            return
        try:
            if raced:
                await self._resolve_raced(raced, outcomes)
        except Exception as error:  # noqa: BLE001 - committed, but the duplicate could not be read back
            log.error("reading back raced events failed: %r", error)
            for item, _ in raced:
                outcomes.setdefault(id(item), error)
        stored = Counter(
            o.cost.state.name for o in outcomes.values() if isinstance(o, IngestResult) and not o.duplicate
        )
        for state, count in stored.items():
            metrics.EVENTS.labels(state).inc(count)
        for item in current:
            self._settle(item, outcomes[id(item)])

    def _settle(self, item: _Pending, outcome: Any) -> None:
        item.settled = True
        self._queued_events -= 1
        request = item.request
        request.outcomes[item.index] = outcome
        request.unsettled -= 1
        if request.unsettled:
            return
        if not request.future.done():  # a caller that went away has cancelled it
            if not request.single:
                request.future.set_result(request.outcomes)
            elif isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)
        self._queue.task_done()

    async def _store(
        self, current: list[_Pending], keys: set[str]
    ) -> tuple[dict[int, Any], list[tuple[_Pending, IngestResult]]]:
        """One transaction: duplicates, resolution, pricing, insert. Returns the outcome
        per item, and the items another replica stored first under the same key."""
        now = now_us()
        outcomes: dict[int, Any] = {}
        async with self.db.write() as conn:
            await self._refresh_prices(conn)
            # Keys are looked up first only where a duplicate would otherwise create an
            # experience (an event that names its type). Any other duplicate is caught by
            # the insert itself (ON CONFLICT DO NOTHING) and answered after the commit.
            may_create = any(item.event.context.experience_name for item in current if idempotency_key(item.event))
            stored = await repo.events_by_key(conn, keys) if may_create else {}
            fresh: list[_Pending] = []
            for item in current:
                key = idempotency_key(item.event)
                row = stored.get(key) if key else None
                if row is None:
                    fresh.append(item)
                elif row.content_hash == item.event.content_hash:
                    outcomes[id(item)] = result_from_row(row)
                else:
                    outcomes[id(item)] = key_reused(key)
            # Priced before resolution, so that an event refused for its cost creates no experience.
            costs: list[Cost] = []
            priced: list[_Pending] = []
            for item in fresh:
                cost = self._price(item.event)
                if cost.total_nanos > MAX_EVENT_COST_NANOS:
                    outcomes[id(item)] = cost_out_of_range(cost)
                else:
                    costs.append(cost)
                    priced.append(item)
            resolutions = await resolve_experiences(conn, [item.event.context for item in priced], now)
            # The experiences are locked before the insert (the rollups read their state):
            # one deleted since it was resolved is gone now, and its events are stored
            # unattributed, as its deletion left the others.
            before = await repo.experience_states(conn, _experience_ids(resolutions))
            stored_pairs: list[tuple[UsageEvent, IngestResult]] = []
            results: list[tuple[_Pending, IngestResult]] = []
            for item, cost, resolution in zip(priced, costs, resolutions, strict=True):
                if isinstance(resolution, TallyError):
                    outcomes[id(item)] = resolution
                    continue
                if resolution.experience and resolution.experience.experience_id not in before:
                    resolution = _deleted_meanwhile(resolution)
                result = self._result(item.event, resolution, now, cost)
                stored_pairs.append((item.event, result))
                results.append((item, result))
            skipped = await repo.insert_events(conn, stored_pairs)
            if skipped:
                await _drop_experiences_of_raced(conn, results, skipped)
                stored_pairs = [pair for pair in stored_pairs if pair[1].request_id not in skipped]
            by_experience, by_hour = rollups_of(stored_pairs)
            await repo.add_rollups(conn, by_experience, by_hour, type_deltas(before, by_experience))
        raced = []
        for item, result in results:
            if skipped and result.request_id in skipped:
                raced.append((item, result))
            else:
                outcomes[id(item)] = result
        return outcomes, raced

    def _price(self, event: UsageEvent) -> Cost:
        return self.catalog.price(event.category, event.resource, event.units, event.event_time_us, event.price_context)

    def _result(self, event: UsageEvent, resolution: Any, now: int, cost: Cost) -> IngestResult:
        experience = resolution.experience
        warnings = resolution.warnings
        if event.context.warnings or cost.warnings:
            warnings = (*warnings, *event.context.warnings, *cost.warnings)
        return IngestResult(
            request_id=uuid7(),
            event_time_us=event.event_time_us,
            ingest_time_us=now,
            cost=cost,
            experience_id=experience.experience_id if experience else None,
            experience_name=experience.experience_name if experience else "",
            experience_version=experience.experience_version if experience else 0,
            experience_created=resolution.created,
            user_id=event.context.user_id,
            request_tags=event.context.request_tags,
            warnings=warnings,
            idempotency_key=idempotency_key(event),
        )

    async def _resolve_raced(self, raced: list[tuple[_Pending, IngestResult]], outcomes: dict[int, Any]) -> None:
        async with self.db.read() as conn:
            winners = await repo.events_by_key(conn, [result.idempotency_key for _, result in raced])
        for item, result in raced:
            row = winners[result.idempotency_key]
            same = row.content_hash == item.event.content_hash
            outcomes[id(item)] = result_from_row(row) if same else key_reused(result.idempotency_key)

    async def refresh_prices(self) -> None:
        async with self.db.read() as conn:
            await self._refresh_prices(conn)

    async def _refresh_prices(self, conn: AsyncConnection) -> None:
        """Reloads custom prices when any replica added one (checked at most once a second)."""
        if not self.catalog.due():
            return
        revision = await repo.price_catalog_revision(conn)
        if revision != self.catalog.revision:
            self.catalog.load_custom(await repo.all_prices(conn), revision)
        self.catalog.checked()


def _experience_ids(resolutions: Iterable[Resolution | TallyError]) -> set[uuid.UUID]:
    return {r.experience.experience_id for r in resolutions if isinstance(r, Resolution) and r.experience}


def _deleted_meanwhile(resolution: Resolution) -> Resolution:
    """An event whose experience was deleted by a transaction that committed after this one
    resolved it: stored unattributed, and the caller told why."""
    assert resolution.experience is not None
    said = f"experience {resolution.experience.experience_id} was deleted as this event was stored; it is unattributed"
    return Resolution(None, False, (*resolution.warnings, said))


async def _drop_experiences_of_raced(
    conn: AsyncConnection, results: list[tuple[_Pending, IngestResult]], skipped: set[uuid.UUID]
) -> None:
    """An event another replica stored first under the same key is answered as that one's
    duplicate; an experience this transaction created for it alone would be left empty, so
    it is deleted before the commit."""
    created = {r.experience_id for _, r in results if r.request_id in skipped and r.experience_created}
    kept = {r.experience_id for _, r in results if r.request_id not in skipped}
    empty = {experience_id for experience_id in created - kept if experience_id is not None}
    if empty:
        await repo.delete_experiences(conn, empty)


def _first_of_each_key(batch: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
    """Splits a batch into the first event of each idempotency key (and every event
    without one) and the rest, in order."""
    seen: set[str] = set()
    first: list[_Pending] = []
    rest: list[_Pending] = []
    for item in batch:
        key = idempotency_key(item.event)
        if key and key in seen:
            rest.append(item)
        else:
            seen.add(key)
            first.append(item)
    return first, rest


def result_from_row(row: Any) -> IngestResult:
    """The original result of a stored event, marked as a duplicate."""
    price = None
    if row.price_source:
        price = PriceReference(
            PriceSource(row.price_source),
            row.price_category,
            row.price_resource,
            row.price_version,
            row.price_effective_time_us,
            tuple(sorted((row.price_variant or {}).items())),
        )
    cost = Cost(
        row.cost_input_nanos,
        row.cost_output_nanos,
        row.cost_total_nanos,
        CostState(row.cost_state),
        price,
        tuple(UnknownUnit(*u) for u in row.unknown_units or ()),
    )
    return IngestResult(
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
        duplicate=True,
        idempotency_key=row.idempotency_key or "",
    )


def quote(
    catalog: PriceCatalog,
    category: str,
    resource: str,
    units: dict[str, tuple[int, int]],
    time_us: int,
    price_context: dict[str, str] | None = None,
) -> Cost:
    v = Violations()
    context = price_context or {}
    probe = UsageEvent(category, resource, units, time_us, 0, 0, 0, "", "", {}, EventContext(), "", context)
    validate_event(probe, None, v)
    v.raise_if_any()
    return catalog.price(category, resource, units, time_us, context)

"""Ingest: a group-commit writer that resolves, prices and stores many events per
transaction, answering each caller only after commit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from .. import metrics
from ..domain.errors import StorageUnavailable, TallyError, overloaded
from ..domain.events import MAX_EVENT_COST_NANOS, cost_out_of_range, idempotency_key, key_reused
from ..domain.ids import uuid7
from ..domain.models import (
    Cost,
    CostState,
    IngestResult,
    Resolution,
    StoredEvent,
    UnknownUnit,
    UsageEvent,
    now_us,
)
from ..domain.rollups import attribute_rollups_of, priced_model, rollups_of, step_costs, steps_to_read, type_deltas
from ..logs import RepeatedLog
from ..storage import (
    events as stored_events,
    experiences as stored_experiences,
    rollups as stored_rollups,
    steps as stored_steps,
)
from ..storage.db import Database
from .catalog import LiveCatalog
from .limits import LiveLimits, count_against_limits, settle_named
from .resolution import resolve_experiences

log = logging.getLogger(__name__)
repeated = RepeatedLog(log)


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
        catalog: LiveCatalog | None = None,
        limits: LiveLimits | None = None,
        max_batch: int = 4096,
        max_queued_events: int = 50_000,
    ) -> None:
        """`max_queued_events`: events waiting for the writer at most; past it, new events are
        refused with RESOURCE_EXHAUSTED rather than held in memory."""
        self.db = db
        self.catalog = catalog or LiveCatalog()
        self.limits = limits or LiveLimits()
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
            except StorageUnavailable as error:  # answered now, not after one more timeout each
                for item in (*current, *batch):
                    if not item.settled:
                        self._settle(item, StorageUnavailable(error.detail))
                self._refuse_queued(error)
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

    def _refuse_queued(self, error: StorageUnavailable) -> None:
        """A commit waited at least half the database timeout and failed (a lock held, the
        database unreachable): the events queued meanwhile are answered UNAVAILABLE now, rather
        than each commit after it waiting one more timeout. Their callers retry with the same
        keys, so each waits at most about one timeout for its answer."""
        refused = 0
        while not self._queue.empty():
            request = self._queue.get_nowait()
            if self._gone(request):
                continue
            for index in range(len(request.events)):
                self._settle(_Pending(request, index), StorageUnavailable(error.detail))
            refused += len(request.events)
        if refused:
            repeated.warning("the database is unavailable: %d queued events refused at once, retryable", refused)

    async def _commit(self, current: list[_Pending]) -> None:
        """Stores events with distinct keys in one transaction and answers them. Raises
        StorageUnavailable, answering no one, when the database is unavailable or busy."""
        keys = {key for item in current if (key := idempotency_key(item.event))}
        started = time.perf_counter()
        try:
            outcomes, raced, notes = await self._store(current, keys)
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.COMMIT_EVENTS.observe(len(current))
        # Deliberately any exception: whatever failed, every caller waiting on this batch gets an answer.
        except Exception as error:
            if isinstance(error, StorageUnavailable) and time.perf_counter() - started >= self.db.timeout / 2:
                # Stuck (a lock held, the database unreachable): storing one by one would wait
                # out the same lock once per event. Everyone waiting is answered now instead (_run).
                repeated.error("storing events failed, the database is unavailable: %s", error.detail)
                raise
            if len(current) > 1:  # a quick refusal (a deadlock, one bad row): isolate it
                repeated.warning("a batch of events failed (%r); storing them one by one", error)
                for item in current:
                    await self._commit([item])
                return
            repeated.error("storing an event failed: %r", error)
            self._settle(current[0], error)
            return
        try:
            if raced:
                await self._resolve_raced(raced, outcomes)
        except Exception as error:  # noqa: BLE001 - committed, but the duplicate could not be read back
            repeated.error("reading back raced events failed: %r", error)
            for item, _ in raced:
                outcomes.setdefault(id(item), error)
        _count_stored(current, outcomes)
        for item_id, said in notes.items():
            if isinstance(outcome := outcomes.get(item_id), IngestResult):
                outcome.warnings = (*outcome.warnings, said)
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
    ) -> tuple[dict[int, Any], list[tuple[_Pending, IngestResult]], dict[int, str]]:
        """One transaction: duplicates, resolution, pricing, insert. Returns the outcome
        per item, the items another replica stored first under the same key, and a warning
        for each duplicate that named a limit reservation (released, as nothing is counted)."""
        now = now_us()
        outcomes: dict[int, Any] = {}
        async with self.db.write() as conn:
            await self.catalog.refresh(conn)
            # Keys are looked up first only where a duplicate would otherwise create an
            # experience (an event that names its type). Any other duplicate is caught by
            # the insert itself (ON CONFLICT DO NOTHING) and answered after the commit.
            may_create = any(item.event.context.experience_name for item in current if idempotency_key(item.event))
            stored = await stored_events.events_by_key(conn, keys) if may_create else {}
            fresh: list[_Pending] = []
            for item in current:
                key = idempotency_key(item.event)
                original = stored.get(key) if key else None
                if original is None:
                    fresh.append(item)
                else:
                    outcomes[id(item)] = _answer_to_repeat(item.event, original, key)
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
            before = await stored_experiences.experience_states(conn, _experience_ids(resolutions))
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
            skipped = await stored_events.insert_events(conn, stored_pairs)
            if skipped:
                await _drop_experiences_of_raced(conn, results, skipped)
                stored_pairs = [pair for pair in stored_pairs if pair[1].request_id not in skipped]
            repeats = [item for item in current if isinstance(outcomes.get(id(item)), IngestResult)]
            repeats += [item for item, result in results if skipped and result.request_id in skipped]
            notes = await _release_for_repeats(conn, repeats, now)
            by_experience, by_hour = rollups_of(stored_pairs)
            steps = step_costs(stored_pairs)
            before = await stored_experiences.counted(conn, before, steps_to_read(before, by_experience, steps))
            await stored_rollups.add(
                conn,
                by_experience,
                by_hour,
                type_deltas(before, by_experience, steps),
                attribute_rollups_of(stored_pairs),
            )
            if steps:
                await stored_steps.add(conn, steps)
            # Limits count in the same transaction: their spend is the sum of their events.
            book = await self.limits.refresh(conn)
            if book or any(event.context.limit_reservation for event, _ in stored_pairs):
                await count_against_limits(conn, book, stored_pairs, now)
        raced = []
        for item, result in results:
            if skipped and result.request_id in skipped:
                raced.append((item, result))
            else:
                outcomes[id(item)] = result
        return outcomes, raced, notes

    def _price(self, event: UsageEvent) -> Cost:
        if event.unread_usage:
            return Cost(0, 0, 0, CostState.UNPRICED, None, (UnknownUnit("usage", 0, 0, event.unread_usage),))
        return self.catalog.prices.price(
            event.category, event.resource, event.units, event.event_time_us, event.price_context
        )

    def _result(self, event: UsageEvent, resolution: Any, now: int, cost: Cost) -> IngestResult:
        experience = resolution.experience
        warnings = resolution.warnings
        if event.context.warnings or cost.warnings:
            warnings = (*warnings, *event.context.warnings, *cost.warnings)
        return IngestResult(
            request_id=event.request_id or uuid7(),
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
            winners = await stored_events.events_by_key(conn, [result.idempotency_key for _, result in raced])
        for item, result in raced:
            original = winners.get(result.idempotency_key)
            # A key whose event is gone: a prune took its week out, and deletes the key next.
            outcomes[id(item)] = (
                _answer_to_repeat(item.event, original, result.idempotency_key)
                if original is not None
                else StorageUnavailable(f"the event of idempotency key {result.idempotency_key!r} is being pruned")
            )


def _count_stored(current: list[_Pending], outcomes: dict[int, Any]) -> None:
    """Adds the commit's stored events to the metrics (events by cost state, spend by label
    set), summed per label set first: one pass, a few increments per commit."""
    sums: dict[tuple[str, str, str, str, str], list[int]] = {}
    for item in current:
        result = outcomes[id(item)]
        if not isinstance(result, IngestResult) or result.duplicate:
            continue
        event, cost = item.event, result.cost
        version = str(result.experience_version) if result.experience_name else ""
        labels = (result.experience_name, version, event.category, priced_model(event, cost), cost.state.name)
        total = sums.setdefault(labels, [0, 0])
        total[0] += cost.total_nanos
        total[1] += 1
    for labels, (nanos, events) in sums.items():
        metrics.EVENTS.labels(labels[4]).inc(events)
        metrics.count_spend(labels, nanos, events)


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
        await stored_experiences.delete_experiences(conn, empty)


async def _release_for_repeats(conn: AsyncConnection, repeats: Sequence[_Pending], now: int) -> dict[int, str]:
    """A duplicate event counts nothing; a limit reservation it names (a retry of the call may
    hold a new one) is released rather than left held until it expires, and the caller told."""
    named: dict[uuid.UUID, list[tuple[str, int]]] = {}
    for item in repeats:
        if reservation := item.event.context.limit_reservation:
            named.setdefault(uuid.UUID(reservation), []).append((item.event.key_name, id(item)))
    if not named:
        return {}
    return dict(await settle_named(conn, named, now, repeats=True))


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


def _answer_to_repeat(event: UsageEvent, original: StoredEvent, key: str) -> IngestResult | TallyError:
    """An event whose idempotency key is stored already: the original result, marked as a
    duplicate, if the content is the same; ALREADY_EXISTS if not."""
    if original.event.content_hash != event.content_hash:
        return key_reused(key)
    return dataclasses.replace(original.result, duplicate=True)

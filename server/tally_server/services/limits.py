"""Limits: create, read, reset and delete them; reserve and release before a model call;
and the book of limits the ingest writer counts each event against."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import limits as rules, paging
from ..domain.errors import Violations, already_exists, failed_precondition, not_found
from ..domain.events import quote
from ..domain.models import EventContext, IngestResult, UsageEvent, now_us
from ..domain.resolution import derive_experience_id
from ..domain.validation import check_name, check_request_id, parse_uuid
from ..storage import (
    idempotency as stored_idempotency,
    limits as stored_limits,
)
from ..storage.db import Database
from .catalog import LiveCatalog
from .reservations import (
    FORGET_EVERY_US,
    KEEP_RESERVATIONS_US,
    Granted,
    LiveLimits,
    ReservationWriter,
)
from .resolution import limit_subject

__all__ = ["Granted", "Limits", "LiveLimits", "count_against_limits", "settle_named"]

# A limit created on another replica binds this one's proxied calls within this many seconds.
BOOK_SECONDS = 1.0
# How often WatchLimits' shared feed reads every limit.
WATCH_INTERVAL_SECONDS = 1.0


async def count_against_limits(
    conn: AsyncConnection, book: rules.LimitBook, stored: Sequence[tuple[UsageEvent, IngestResult]], now: int
) -> None:
    """In the writer's transaction: settles the reservations the events name, adds each
    event's cost to every limit that applies to it (in its event time's period), and leaves
    on each result the states it left those limits in, in the order the events came."""
    named: dict[uuid.UUID, list[tuple[str, IngestResult]]] = {}
    for event, result in stored:
        if event.context.limit_reservation:
            named.setdefault(uuid.UUID(event.context.limit_reservation), []).append((event.key_name, result))
    if named:
        for result, said in await settle_named(conn, named, now):
            result.warnings = (*result.warnings, said)
    if not book:
        return
    counted: list[list[tuple[rules.Limit, rules.PeriodKey]]] = []
    added: dict[rules.PeriodKey, tuple[int, int]] = {}
    # The events of a commit mostly share a context and fall in the current period: both are
    # worked out once per commit (measured: 28 -> 9 µs per event with 100 limits, one applying).
    applying: dict[rules.Subject, list[tuple[rules.Limit, str]]] = {}
    current: dict[int, tuple[int, int | None]] = {}
    for event, result in stored:
        context = rules.Subject(
            result.experience_id, result.experience_name, result.experience_version, result.user_id, result.request_tags
        )
        limits = applying.get(context)
        if limits is None:
            limits = applying[context] = book.applicable(context)
        keys = []
        time_us = event.event_time_us
        for limit, subject in limits:
            window = current.get(limit.limit_id)
            if window is None:
                window = current[limit.limit_id] = rules.period_of(limit, now)
            start, end = window
            if not (start <= time_us and (end is None or time_us < end)):
                start = rules.period_start(limit, time_us)
            key = rules.PeriodKey(limit.limit_id, subject, start)
            keys.append((limit, key))
            nanos, count = added.get(key, (0, 0))
            added[key] = (nanos + result.cost.total_nanos, count + 1)
        counted.append(keys)
    if not added:
        return
    after = await stored_limits.add_spend(conn, added)
    running = {key: after[key] - added[key][0] for key in added}
    for (_, result), keys in zip(stored, counted, strict=True):
        if keys:
            states = []
            for limit, key in keys:
                before = running[key]
                running[key] = before + result.cost.total_nanos
                states.append(rules.applied(limit, key.subject, before, running[key]))
            result.limits = tuple(states)


T = TypeVar("T")


async def settle_named(
    conn: AsyncConnection, named: Mapping[uuid.UUID, Sequence[tuple[str, T]]], now: int, repeats: bool = False
) -> list[tuple[T, str]]:
    """Settles each reservation named by events (their key name and a tag of the caller's),
    the first event of the reserving key settling it. Returns a warning per event that did
    not settle its reservation, saying why (`repeats`: the events are duplicates of events
    stored before, and the one that settled is told so too)."""
    keys = {key for events in named.values() for key, _ in events}
    if len(keys) == 1:  # the usual commit: one key's events; the key is checked in the update
        settled = await stored_limits.settle(conn, named, now, next(iter(keys)))
        unsettled = [reservation_id for reservation_id in named if reservation_id not in settled]
        owners = await stored_limits.reservation_keys(conn, unsettled) if unsettled else {}
    else:
        owners = await stored_limits.reservation_keys(conn, list(named))
        mine = {
            reservation_id
            for reservation_id, events in named.items()
            if reservation_id in owners and any(rules.may_settle(owners[reservation_id], key) for key, _ in events)
        }
        settled = await stored_limits.settle(conn, mine, now)
    warnings: list[tuple[T, str]] = []
    for reservation_id, events in named.items():
        first = reservation_id in settled
        for key_name, tag in events:
            if reservation_id in owners and not rules.may_settle(owners[reservation_id], key_name):
                said = f"limit reservation {reservation_id} was made with another API key; this event did not settle it"
            elif first:
                first = False
                if not repeats:
                    continue
                said = f"a duplicate of an event stored before: limit reservation {reservation_id} was released"
            else:
                said = f"limit reservation {reservation_id} was not outstanding (settled, released or expired)"
            warnings.append((tag, said))
    return warnings


# ListLimitPeriods' one order besides the newest first (AIP-132).
PERIODS_BY_SPEND = "spend desc"


@dataclasses.dataclass(frozen=True)
class PeriodView:
    """A period of a limit, for reading: its spend, reservations, bounds and state."""

    limit: rules.Limit
    spend: rules.PeriodSpend
    end_us: int | None
    state: rules.LimitState


def _view(limit: rules.Limit, spend: rules.PeriodSpend) -> PeriodView:
    return PeriodView(
        limit, spend, rules.period_end(limit, spend.key.start_us), rules.state_of(limit, spend.spend_nanos)
    )


class Limits:
    def __init__(
        self,
        db: Database,
        catalog: LiveCatalog,
        pages: paging.PageTokens | None = None,
        reservation_seconds: int = rules.DEFAULT_RESERVATION_SECONDS,
        live: LiveLimits | None = None,
    ) -> None:
        self.db = db
        self.catalog = catalog
        # The writer's book, shared: reloaded in a transaction only when a limit changed.
        self.live = live or LiveLimits()
        self.pages = pages or paging.PageTokens()
        self.reservation_seconds = reservation_seconds
        self.feed = LimitFeed(self._snapshot)
        self.writer = ReservationWriter(db, self.live)
        self._book_read = -BOOK_SECONDS
        self._book_reading: asyncio.Future[None] | None = None

    async def may_block(self, context: EventContext) -> bool:
        """Whether a BLOCK limit may apply to a call of this context, as this replica's book
        says: the book the writer reloads in each commit, read again here when this replica
        changed a limit or the last read is older than BOOK_SECONDS (calls meanwhile wait for
        that one read). The proxy reserves before a call only then, so that calls no BLOCK
        limit applies to pay nothing for the limits of others."""
        if time.monotonic() - self._book_read >= BOOK_SECONDS:
            if self._book_reading is None:
                self._book_reading = asyncio.ensure_future(self._read_book())
            await asyncio.shield(self._book_reading)
        experience_id = ""
        if context.experience_id:
            parsed = parse_uuid(context.experience_id)
            experience_id = str(parsed or derive_experience_id(context.experience_id))
        return self.live.book.may_block(experience_id, context.experience_name, context.user_id, context.request_tags)

    async def _read_book(self) -> None:
        try:
            started = time.monotonic()
            async with self.db.read() as conn:
                await self.live.refresh(conn)
            self._book_read = started
        finally:
            self._book_reading = None

    async def _snapshot(self) -> Snapshot:
        async with self.db.read() as conn:
            limits = await stored_limits.all_limits(conn)
            current = await _current_views(conn, limits, await stored_limits.clock_us(conn))
        return Snapshot(frozenset(limit.name for limit in limits), current)

    async def create(self, limit: rules.Limit) -> rules.Limit:
        if not limit.threshold_percent:
            limit = dataclasses.replace(limit, threshold_percent=rules.DEFAULT_THRESHOLD_PERCENT)
        rules.check_limit(limit)
        limit = dataclasses.replace(limit, create_time_us=now_us())
        async with self.db.write() as conn:
            await stored_limits.bump_revision(conn)
            limit_id = await stored_limits.insert_limit(conn, limit)
        self._book_read = -BOOK_SECONDS  # binds this replica's next proxied call
        if limit_id is None:
            raise already_exists("LIMIT_EXISTS", "tally.v1.Limit", limit.name, f"a limit named {limit.name!r} exists")
        return dataclasses.replace(limit, limit_id=limit_id)

    async def _require(self, conn: AsyncConnection, name: str) -> rules.Limit:
        v = Violations()
        check_name(v, "name", name, what="limit name")
        v.raise_if_any()
        limit = await stored_limits.get_limit(conn, name)
        if limit is None:
            raise rules.limit_not_found(name)
        return limit

    async def _current(self, conn: AsyncConnection, limit: rules.Limit, subject: str) -> PeriodView:
        now = await stored_limits.clock_us(conn)
        key = rules.PeriodKey(limit.limit_id, subject, rules.period_start(limit, now))
        return _view(limit, await stored_limits.spend_of(conn, key, now))

    async def get(self, name: str, experience_id: str = "") -> tuple[rules.Limit, PeriodView | None]:
        subject = _subject(experience_id)
        async with self.db.read() as conn:
            limit = await self._require(conn, name)
            if limit.scope.per_experience and not subject:
                return limit, None
            return limit, await self._current(conn, limit, subject if limit.scope.per_experience else "")

    async def list(
        self, page_size: int, page_token: str
    ) -> tuple[Sequence[tuple[rules.Limit, PeriodView | None]], str]:
        size = paging.page_size(page_size)
        after = self.pages.decode(page_token, "limits", None, lambda p: isinstance(p, str))
        async with self.db.read() as conn:
            found = await stored_limits.list_limits(conn, after, size + 1)
            views = await _current_views(conn, found[:size], await stored_limits.clock_us(conn))
        token = self.pages.encode("limits", None, found[size - 1].name) if len(found) > size else ""
        return [(limit, views.get(limit.name)) for limit in found[:size]], token

    async def periods(
        self, name: str, experience_id: str, page_size: int, page_token: str, order_by: str = ""
    ) -> tuple[Sequence[PeriodView], str]:
        """A limit's periods, the newest first; or with order_by "spend desc" its periods
        current now, the most spent first (a per-experience limit's busiest runs)."""
        by_spend = order_by.strip().lower() == PERIODS_BY_SPEND
        if order_by.strip() and not by_spend:
            v = Violations()
            v.add("order_by", f'must be empty (newest first) or "{PERIODS_BY_SPEND}", got {order_by[:40]!r}')
            v.raise_if_any()
        subject = _subject(experience_id) if experience_id else None
        size = paging.page_size(page_size)
        # A page's position: (start, subject) newest first; (dollars, nanos, subject) by spend.
        kind, width = ("limit_periods_by_spend", 3) if by_spend else ("limit_periods", 2)
        position = self.pages.decode(
            page_token,
            kind,
            [name, experience_id],
            lambda p: isinstance(p, list) and len(p) == width and isinstance(p[0], int) and isinstance(p[-1], str),
        )
        after = None if position is None else tuple(position)
        async with self.db.read() as conn:
            limit = await self._require(conn, name)
            if by_spend:
                start = rules.period_start(limit, await stored_limits.clock_us(conn))
                found = await stored_limits.busiest(conn, limit.limit_id, start, subject, after, size + 1)
            else:
                found = await stored_limits.periods(conn, limit.limit_id, subject, after, size + 1)
        token = ""
        if len(found) > size:
            last = found[size - 1]
            if by_spend:
                position = [*divmod(last.spend_nanos, 1_000_000_000), last.key.subject]
            else:
                position = [last.key.start_us, last.key.subject]
            token = self.pages.encode(kind, [name, experience_id], position)
        return [_view(limit, spend) for spend in found[:size]], token

    async def reset(self, name: str) -> tuple[rules.Limit, PeriodView | None]:
        async with self.db.write() as conn:
            await stored_limits.bump_revision(conn)
            limit = await self._require(conn, name)
            now = await stored_limits.clock_us(conn)
            if limit.resets_us and limit.resets_us[-1] >= now:
                now = limit.resets_us[-1] + 1  # two resets in one microsecond stay two periods
            await stored_limits.add_reset(conn, limit.limit_id, now)
            limit = dataclasses.replace(limit, resets_us=(*limit.resets_us, now))
            current = None if limit.scope.per_experience else await self._current(conn, limit, "")
        return limit, current

    async def delete(self, name: str) -> None:
        async with self.db.write() as conn:
            await stored_limits.bump_revision(conn)
            limit = await self._require(conn, name)
            await stored_limits.delete_limit(conn, limit.limit_id)

    async def reserve(
        self,
        context: EventContext,
        amount_nanos: int | None,
        usage: tuple[str, str, dict[str, tuple[int, int]]] | None,
        request_id: str,
        ttl_seconds: int,
        key_name: str,
    ) -> Granted:
        """Grants a reservation of the estimate if every BLOCK limit that applies has room for
        it; LIMIT_EXCEEDED (RESOURCE_EXHAUSTED) naming those that have not. The context is
        resolved as ingest resolves an event's, without creating anything."""
        v = Violations()
        check_request_id(v, "request_id", request_id)
        if not 0 <= ttl_seconds <= rules.MAX_RESERVATION_SECONDS:
            v.add("ttl_seconds", f"must be 1 to {rules.MAX_RESERVATION_SECONDS:,} seconds, or 0 for the default")
        if (amount_nanos is None) == (usage is None):
            v.add("estimate", "set either amount, or category, resource and units")
        elif amount_nanos is not None and not 0 <= amount_nanos <= rules.MAX_LIMIT_NANOS:
            v.add("estimate.amount", "must be $0 to $1,000,000,000")
        v.raise_if_any()
        if usage is not None:
            category, resource, units = usage
            catalog = await self.catalog.refreshed(self.db)
            amount_nanos = quote(catalog, category, resource, units, now_us(), {}).total_nanos
        assert amount_nanos is not None
        seconds = ttl_seconds or self.reservation_seconds
        if not request_id:  # the usual Reserve, and the proxy's: decided in batches
            return await self.writer.reserve(context, amount_nanos, seconds, key_name)
        fingerprint = f"{context}|{amount_nanos}|{ttl_seconds}"
        # Request ids are the reserving key's own: another key's id is another reservation.
        operation = "Reserve" if not key_name else f"Reserve/{_hash(key_name)[:16]}"
        async with self.db.write() as conn:
            if request_id:
                seen = await stored_idempotency.get_idempotent_request(conn, operation, request_id)
                if seen is not None:
                    return await self._granted_again(conn, seen, fingerprint, request_id)
            revision, now = await stored_limits.begin_reservation(conn)
            if now - self.writer.forgotten_us >= FORGET_EVERY_US:  # not on every call: two deletes each
                await stored_limits.forget_expired(conn, now, now - KEEP_RESERVATIONS_US)
                self.writer.forgotten_us = now
            subject = await limit_subject(conn, context)
            book = await self.live.refresh(conn, revision)
            blocking = [
                (limit, rules.PeriodKey(limit.limit_id, subj, rules.period_start(limit, now)))
                for limit, subj in book.applicable(subject)
                if limit.kind == rules.LimitKind.BLOCK
            ]
            await stored_limits.lock_holders(conn, [(key.limit_id, key.subject) for _, key in blocking])
            spends = await stored_limits.locked_spend(conn, [key for _, key in blocking], now)
            refused = [
                (limit, spends[key]) for limit, key in blocking if not rules.room_for(limit, spends[key], amount_nanos)
            ]
            if refused:
                raise rules.limit_exceeded(refused, amount_nanos, now)
            reservation_id = uuid.uuid4()
            expire = now + seconds * 1_000_000
            await stored_limits.insert_reservation(
                conn, reservation_id, amount_nanos, [key for _, key in blocking], now, expire, key_name
            )
            if request_id:
                await stored_idempotency.put_idempotent_request(
                    conn, operation, request_id, _hash(fingerprint), str(reservation_id), now
                )
        return Granted(reservation_id, amount_nanos, expire, tuple(dict.fromkeys(limit.name for limit, _ in blocking)))

    async def _granted_again(
        self, conn: AsyncConnection, seen: tuple[str, str], fingerprint: str, request_id: str
    ) -> Granted:
        """The reservation a request id made, while it is outstanding; once it is not, the
        truth (FAILED_PRECONDITION), not a grant of what no longer holds."""
        if seen[0] != _hash(fingerprint):
            raise already_exists(
                "REQUEST_ID_REUSED", "tally.v1.Reservation", request_id, "request_id was used for another reservation"
            )
        reservation_id = uuid.UUID(seen[1])
        row = await stored_limits.get_reservation(conn, reservation_id)
        if row is None or row.settle_time_us is not None or row.expire_time_us <= await stored_limits.clock_us(conn):
            raise failed_precondition(
                "RESERVATION_NOT_OUTSTANDING",
                f"request_id {request_id[:80]!r} made reservation {reservation_id}, which was settled, released or "
                "expired; a new reservation needs a new request_id",
            )
        names = await self._names(
            conn, [limit_id for limit_id, _ in await stored_limits.holds_of(conn, reservation_id)]
        )
        return Granted(reservation_id, int(row.amount_nanos), int(row.expire_time_us), names)

    async def _names(self, conn: AsyncConnection, ids: Sequence[int]) -> tuple[str, ...]:
        by_id = {limit.limit_id: limit.name for limit in await stored_limits.all_limits(conn)}
        return tuple(dict.fromkeys(by_id[i] for i in ids if i in by_id))

    async def release(self, reservation_id: str, key_name: str) -> None:
        parsed = parse_uuid(reservation_id)
        if parsed is None:
            v = Violations()
            v.add("reservation_id", f"not a UUID: {reservation_id[:80]!r}" if reservation_id else "required")
            v.raise_if_any()
        assert parsed is not None
        async with self.db.write() as conn:
            row = await stored_limits.get_reservation(conn, parsed)
            if row is None:
                raise not_found(
                    "RESERVATION_NOT_FOUND", "tally.v1.Reservation", str(parsed), f"no reservation {parsed}"
                )
            if not rules.may_settle(row.key_name, key_name):
                raise failed_precondition(
                    "RESERVATION_OF_ANOTHER_KEY", f"reservation {parsed} was made with another API key"
                )
            if not await stored_limits.settle(conn, [parsed], await stored_limits.clock_us(conn)):
                raise failed_precondition(
                    "RESERVATION_NOT_OUTSTANDING", f"reservation {parsed} was settled, released or expired already"
                )

    async def current(self) -> Sequence[PeriodView]:
        """The current period of every limit shared by its events (not per experience): four
        queries however many limits."""
        return list((await self._snapshot()).current.values())

    async def watch(self, names: Sequence[str]) -> AsyncIterator[tuple[PeriodView, str]]:
        """Each watched limit's current period once, then on each change of state or period
        (as the shared feed sees them: at most one change per limit per read)."""
        if len(names) > MAX_WATCHED_NAMES:
            v = Violations()
            v.add("names", f"at most {MAX_WATCHED_NAMES:,} limit names, got {len(names):,}")
            v.raise_if_any()
        wanted = sorted(set(names))
        seen: dict[str, tuple[int, rules.LimitState]] = {}
        async for views in self.feed.snapshots():
            missing = [name for name in wanted if name not in views.names]
            if missing:
                raise rules.limit_not_found(missing[0])
            for name in wanted or views.current:
                view = views.current.get(name)
                if view is None:  # per experience: no period shared by its events
                    continue
                before = seen.get(name)
                now = (view.spend.key.start_us, view.state)
                if before == now:
                    continue
                if before is None:
                    reason = "initial"
                elif before[0] != now[0]:
                    reason = "reset"
                else:
                    reason = view.state.name.lower()
                seen[name] = now
                yield view, reason


# A watch names at most this many limits (the request is bounded by the message size too).
MAX_WATCHED_NAMES = 1000


async def _current_views(conn: AsyncConnection, limits: Sequence[rules.Limit], now: int) -> dict[str, PeriodView]:
    """The current period of each limit not per experience, by name, in a constant number of queries."""
    keys = {
        limit.name: rules.PeriodKey(limit.limit_id, "", rules.period_start(limit, now))
        for limit in limits
        if not limit.scope.per_experience
    }
    spends = await stored_limits.spends_of(conn, list(keys.values()), now)
    return {limit.name: _view(limit, spends[keys[limit.name]]) for limit in limits if limit.name in keys}


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One read of every limit: the names that exist and the current period of each limit
    that is not per experience."""

    names: frozenset[str]
    current: dict[str, PeriodView]


class LimitFeed:
    """Every limit's current period, read once per interval however many watch: one reader
    task runs while anyone watches, and each watcher is handed the newest snapshot. A
    watcher that is slow to take them skips to the newest (changes in between coalesce)."""

    def __init__(self, read: Callable[[], Awaitable[Snapshot]], interval: float = WATCH_INTERVAL_SECONDS) -> None:
        self._read = read
        self.interval = interval
        self._latest: tuple[int, Snapshot | BaseException] | None = None
        self._changed = asyncio.Event()
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # how many reads were made (the tests count them)

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        self._watchers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tally-limit-feed")
        taken = -1
        try:
            while True:
                while self._latest is None or self._latest[0] == taken:
                    await self._changed.wait()
                taken, latest = self._latest
                if isinstance(latest, BaseException):
                    raise latest
                yield latest
        finally:
            self._watchers -= 1
            if not self._watchers and self._task is not None:
                self._task.cancel()
                self._task = None
                self._latest = None

    async def _run(self) -> None:
        generation = 0
        while True:
            started = time.monotonic()
            try:
                result: Snapshot | BaseException = await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - each watcher ends with it (UNAVAILABLE for the database)
                result = error
            self.reads += 1
            generation += 1
            self._latest = (generation, result)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))


def _subject(experience_id: str) -> str:
    if not experience_id:
        return ""
    parsed = parse_uuid(experience_id)
    if parsed is None:
        v = Violations()
        v.add("experience_id", f"not a UUID: {experience_id[:80]!r}")
        v.raise_if_any()
    return str(parsed)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()

"""Limits: create, read, reset and delete them; reserve and release before a model call;
and the book of limits the ingest writer counts each event against."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import limits as rules, paging
from ..domain.errors import Violations, already_exists, failed_precondition, not_found
from ..domain.events import quote
from ..domain.models import EventContext, IngestResult, UsageEvent, now_us
from ..domain.validation import check_name, check_request_id, parse_uuid
from ..storage import (
    experiences as stored_experiences,
    idempotency as stored_idempotency,
    limits as stored_limits,
)
from ..storage.db import Database
from .catalog import LiveCatalog

# Settled and expired reservations are kept this long (a Release of one says
# "no longer outstanding" rather than "never existed"), then forgotten.
KEEP_RESERVATIONS_US = 24 * 3600 * 1_000_000
FORGET_EVERY_US = 60 * 1_000_000


async def count_against_limits(
    conn: AsyncConnection, book: rules.LimitBook, stored: Sequence[tuple[UsageEvent, IngestResult]], now: int
) -> None:
    """In the writer's transaction: settles the reservations the events name, adds each
    event's cost to every limit that applies to it (in its event time's period), and leaves
    on each result the states it left those limits in, in the order the events came."""
    named: dict[uuid.UUID, list[IngestResult]] = {}
    for event, result in stored:
        if event.context.limit_reservation:
            named.setdefault(uuid.UUID(event.context.limit_reservation), []).append(result)
    if named:
        settled = await stored_limits.settle(conn, named, now)
        for reservation_id, results in named.items():
            for result in results if reservation_id not in settled else results[1:]:
                said = f"limit reservation {reservation_id} was not outstanding (settled, released or expired)"
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


class LiveLimits:
    """The book of limits as the database has it, reloaded in the writer's transaction when
    any replica changed a limit: a limit counts every event committed after its creation."""

    def __init__(self) -> None:
        self.book = rules.LimitBook()
        self._revision = -1

    async def refresh(self, conn: AsyncConnection) -> rules.LimitBook:
        current = await stored_limits.revision(conn)
        if current != self._revision:
            self.book = rules.LimitBook.of(await stored_limits.all_limits(conn))
            self._revision = current
        return self.book


@dataclasses.dataclass(frozen=True)
class Granted:
    reservation_id: uuid.UUID
    amount_nanos: int
    expire_time_us: int
    limits: tuple[str, ...]


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
        self._forgotten_us = 0
        self.pages = pages or paging.PageTokens()
        self.reservation_seconds = reservation_seconds

    async def create(self, limit: rules.Limit) -> rules.Limit:
        if not limit.threshold_percent:
            limit = dataclasses.replace(limit, threshold_percent=rules.DEFAULT_THRESHOLD_PERCENT)
        rules.check_limit(limit)
        limit = dataclasses.replace(limit, create_time_us=now_us())
        async with self.db.write() as conn:
            await stored_limits.bump_revision(conn)
            limit_id = await stored_limits.insert_limit(conn, limit)
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
        now = now_us()
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
            items = [
                (limit, None if limit.scope.per_experience else await self._current(conn, limit, ""))
                for limit in found[:size]
            ]
        token = self.pages.encode("limits", None, found[size - 1].name) if len(found) > size else ""
        return items, token

    async def periods(
        self, name: str, experience_id: str, page_size: int, page_token: str
    ) -> tuple[Sequence[PeriodView], str]:
        subject = _subject(experience_id) if experience_id else None
        size = paging.page_size(page_size)
        position = self.pages.decode(
            page_token,
            "limit_periods",
            [name, experience_id],
            lambda p: isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], str),
        )
        async with self.db.read() as conn:
            limit = await self._require(conn, name)
            found = await stored_limits.periods(
                conn, limit.limit_id, subject, None if position is None else (position[0], position[1]), size + 1
            )
        token = ""
        if len(found) > size:
            last = found[size - 1].key
            token = self.pages.encode("limit_periods", [name, experience_id], [last.start_us, last.subject])
        return [_view(limit, spend) for spend in found[:size]], token

    async def reset(self, name: str) -> tuple[rules.Limit, PeriodView | None]:
        async with self.db.write() as conn:
            await stored_limits.bump_revision(conn)
            limit = await self._require(conn, name)
            now = now_us()
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
        it; LIMIT_EXCEEDED (RESOURCE_EXHAUSTED) naming those that have not."""
        v = Violations()
        check_request_id(v, "request_id", request_id)
        if not 0 <= ttl_seconds <= rules.MAX_RESERVATION_SECONDS:
            v.add("ttl_seconds", f"must be 1 to {rules.MAX_RESERVATION_SECONDS:,} seconds, or 0 for the default")
        experience_id = parse_uuid(context.experience_id) if context.experience_id else None
        if context.experience_id and experience_id is None:
            v.add("context.experience_id", f"not a UUID: {context.experience_id[:80]!r}")
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
        fingerprint = f"{context}|{amount_nanos}|{ttl_seconds}"
        seconds = ttl_seconds or self.reservation_seconds
        async with self.db.write() as conn:
            if request_id:
                seen = await stored_idempotency.get_idempotent_request(conn, "Reserve", request_id)
                if seen is not None:
                    return await self._granted_again(conn, seen, fingerprint, request_id)
            now = now_us()
            if now - self._forgotten_us >= FORGET_EVERY_US:  # not on every call: two deletes each
                await stored_limits.forget_expired(conn, now, now - KEEP_RESERVATIONS_US)
                self._forgotten_us = now
            subject = await self._subject_of(conn, context, experience_id)
            book = await self.live.refresh(conn)
            blocking = [
                (limit, rules.PeriodKey(limit.limit_id, subj, rules.period_start(limit, now)))
                for limit, subj in book.applicable(subject)
                if limit.kind == rules.LimitKind.BLOCK
            ]
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
                    conn, "Reserve", request_id, _hash(fingerprint), str(reservation_id), now
                )
        return Granted(reservation_id, amount_nanos, expire, tuple(dict.fromkeys(limit.name for limit, _ in blocking)))

    async def _granted_again(
        self, conn: AsyncConnection, seen: tuple[str, str], fingerprint: str, request_id: str
    ) -> Granted:
        if seen[0] != _hash(fingerprint):
            raise already_exists(
                "REQUEST_ID_REUSED", "tally.v1.Reservation", request_id, "request_id was used for another reservation"
            )
        reservation_id = uuid.UUID(seen[1])
        row = await stored_limits.get_reservation(conn, reservation_id)
        if row is None:
            raise failed_precondition("RESERVATION_NOT_OUTSTANDING", f"reservation {reservation_id} was forgotten")
        names = await self._names(
            conn, [limit_id for limit_id, _ in await stored_limits.holds_of(conn, reservation_id)]
        )
        return Granted(reservation_id, int(row.amount_nanos), int(row.expire_time_us), names)

    async def _names(self, conn: AsyncConnection, ids: Sequence[int]) -> tuple[str, ...]:
        by_id = {limit.limit_id: limit.name for limit in await stored_limits.all_limits(conn)}
        return tuple(dict.fromkeys(by_id[i] for i in ids if i in by_id))

    async def _subject_of(
        self, conn: AsyncConnection, context: EventContext, experience_id: uuid.UUID | None
    ) -> rules.Subject:
        """What decides which limits apply: an existing experience's type and version, else
        the context's own name and version."""
        name, version = context.experience_name, context.experience_version
        if experience_id is not None:
            found = await stored_experiences.get_experience(conn, experience_id)
            if found is not None:
                name, version = found.experience_name, found.experience_version
        return rules.Subject(experience_id, name, version, context.user_id, context.request_tags)

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
            if key_name and row.key_name and row.key_name != key_name:
                raise failed_precondition(
                    "RESERVATION_OF_ANOTHER_KEY", f"reservation {parsed} was made with another API key"
                )
            if not await stored_limits.settle(conn, [parsed], now_us()):
                raise failed_precondition(
                    "RESERVATION_NOT_OUTSTANDING", f"reservation {parsed} was settled, released or expired already"
                )

    async def current(self) -> Sequence[PeriodView]:
        """The current period of every limit shared by its events (not per experience)."""
        async with self.db.read() as conn:
            limits = await stored_limits.all_limits(conn)
            return [await self._current(conn, limit, "") for limit in limits if not limit.scope.per_experience]

    async def watch(self, names: Sequence[str], interval: float = 1.0) -> AsyncIterator[tuple[PeriodView, str]]:
        """Each watched limit's current period once, then on each change of state or period."""
        seen: dict[str, tuple[int, rules.LimitState]] = {}
        while True:
            started = time.monotonic()
            async with self.db.read() as conn:
                limits = await stored_limits.all_limits(conn)
                wanted = [limit for limit in limits if not names or limit.name in names]
                if names and len(wanted) < len(set(names)):
                    missing = sorted(set(names) - {limit.name for limit in wanted})
                    raise rules.limit_not_found(missing[0])
                views = [await self._current(conn, limit, "") for limit in wanted if not limit.scope.per_experience]
            for view in views:
                before = seen.get(view.limit.name)
                now = (view.spend.key.start_us, view.state)
                if before == now:
                    continue
                if before is None:
                    reason = "initial"
                elif before[0] != now[0]:
                    reason = "reset"
                else:
                    reason = view.state.name.lower()
                seen[view.limit.name] = now
                yield view, reason
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


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

"""Limits' rules: which limits apply to an event or a reservation, the period an instant
falls in, the state a spend leaves a limit in, and whether a reservation fits. No I/O."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from .errors import Code, TallyError, Violations, not_found
from .validation import NAME_PATTERN, check_name, check_text, parse_uuid

# At most $1,000,000,000: with the $1,000,000 bound of one event, no spend can overflow.
MAX_LIMIT_NANOS = 10**18
DEFAULT_THRESHOLD_PERCENT = 80
DEFAULT_RESERVATION_SECONDS = 600
MAX_RESERVATION_SECONDS = 24 * 3600


class LimitKind(enum.IntEnum):
    """Values match tally.v1.LimitKind."""

    BLOCK = 1
    ALLOW = 2


class LimitPeriod(enum.IntEnum):
    """Values match tally.v1.LimitPeriod."""

    LIFETIME = 1
    DAY = 2
    WEEK = 3
    MONTH = 4


class LimitState(enum.IntEnum):
    """Values match tally.v1.LimitState."""

    OK = 1
    THRESHOLD = 2
    EXCEEDED = 3


class ScopeKind(enum.IntEnum):
    EVERYTHING = 1
    EXPERIENCE_TYPE = 2
    EXPERIENCE = 3
    USER = 4
    REQUEST_TAG = 5


@dataclass(frozen=True)
class LimitScope:
    kind: ScopeKind
    experience_type: str = ""
    experience_version: int = 0
    per_experience: bool = False
    value: str = ""  # the experience id, user id or request tag


@dataclass(frozen=True)
class Limit:
    name: str
    max_nanos: int
    kind: LimitKind
    threshold_percent: int
    scope: LimitScope
    period: LimitPeriod
    create_time_us: int = 0
    limit_id: int = 0
    resets_us: tuple[int, ...] = ()  # when it was reset, ascending


class PeriodKey(NamedTuple):
    """One spend counter: a limit's period, for one experience of a per-experience limit.
    (A tuple, not a dataclass: the writer makes and hashes one per event and limit.)"""

    limit_id: int
    subject: str  # the experience id of a per-experience limit; "" otherwise
    start_us: int


@dataclass
class PeriodSpend:
    """A period as stored: what it counted and what is reserved against it."""

    key: PeriodKey
    spend_nanos: int = 0
    event_count: int = 0
    reserved_nanos: int = 0


class Subject(NamedTuple):
    """What a limit's applicability is decided by: an event's or a reservation's context."""

    experience_id: uuid.UUID | None
    experience_name: str
    experience_version: int
    user_id: str
    request_tags: tuple[str, ...]


class Applied(NamedTuple):
    """A limit as one event left it."""

    limit: Limit
    subject: str
    state: LimitState
    crossed: bool
    spend_nanos: int


@dataclass
class LimitBook:
    """Every limit, indexed by what its scope names, so that finding those of an event costs
    a few dictionary lookups however many limits there are."""

    everything: list[Limit] = field(default_factory=list)
    by_type: dict[str, list[Limit]] = field(default_factory=dict)
    by_experience: dict[str, list[Limit]] = field(default_factory=dict)
    by_user: dict[str, list[Limit]] = field(default_factory=dict)
    by_tag: dict[str, list[Limit]] = field(default_factory=dict)
    by_name: dict[str, Limit] = field(default_factory=dict)

    @classmethod
    def of(cls, limits: Iterable[Limit]) -> LimitBook:
        book = cls()
        for limit in limits:
            book.by_name[limit.name] = limit
            scope = limit.scope
            if scope.kind == ScopeKind.EVERYTHING:
                book.everything.append(limit)
            elif scope.kind == ScopeKind.EXPERIENCE_TYPE:
                book.by_type.setdefault(scope.experience_type, []).append(limit)
            elif scope.kind == ScopeKind.EXPERIENCE:
                book.by_experience.setdefault(scope.value, []).append(limit)
            elif scope.kind == ScopeKind.USER:
                book.by_user.setdefault(scope.value, []).append(limit)
            else:
                book.by_tag.setdefault(scope.value, []).append(limit)
        return book

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def may_block(self, experience_id: str, experience_name: str, user_id: str, tags: Sequence[str]) -> bool:
        """Whether a BLOCK limit may apply to a call of this context, from the context alone
        (no lookup): an experience named by id only may be of any type, so a BLOCK limit on a
        type may apply to it. `experience_id` is the id as a UUID string (derived if need be)."""

        def blocking(limits: Iterable[Limit]) -> bool:
            return any(limit.kind == LimitKind.BLOCK for limit in limits)

        if blocking(self.everything):
            return True
        if experience_name and blocking(self.by_type.get(experience_name, ())):
            return True
        if experience_id and not experience_name and any(blocking(limits) for limits in self.by_type.values()):
            return True
        if experience_id and blocking(self.by_experience.get(experience_id, ())):
            return True
        if user_id and blocking(self.by_user.get(user_id, ())):
            return True
        return any(blocking(self.by_tag.get(tag, ())) for tag in tags)

    def applicable(self, subject: Subject) -> list[tuple[Limit, str]]:
        """The limits that apply to this context, each with its spend's subject."""
        found: list[tuple[Limit, str]] = [(limit, "") for limit in self.everything]
        experience = str(subject.experience_id) if subject.experience_id else ""
        for limit in self.by_type.get(subject.experience_name, ()) if subject.experience_name else ():
            scope = limit.scope
            if scope.experience_version and scope.experience_version != subject.experience_version:
                continue
            if scope.per_experience:
                if experience:
                    found.append((limit, experience))
            else:
                found.append((limit, ""))
        if experience:
            found.extend((limit, "") for limit in self.by_experience.get(experience, ()))
        if subject.user_id:
            found.extend((limit, "") for limit in self.by_user.get(subject.user_id, ()))
        for tag in dict.fromkeys(subject.request_tags):
            found.extend((limit, "") for limit in self.by_tag.get(tag, ()))
        return found


def _calendar_start(period: LimitPeriod, time_us: int) -> int:
    if period == LimitPeriod.LIFETIME:
        return 0
    moment = datetime.fromtimestamp(time_us / 1e6, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == LimitPeriod.WEEK:
        day -= timedelta(days=day.weekday())
    elif period == LimitPeriod.MONTH:
        day = day.replace(day=1)
    return int(day.timestamp()) * 1_000_000


def _calendar_next(period: LimitPeriod, start_us: int) -> int | None:
    if period == LimitPeriod.LIFETIME:
        return None
    start = datetime.fromtimestamp(start_us / 1e6, UTC)
    if period == LimitPeriod.DAY:
        after = start + timedelta(days=1)
    elif period == LimitPeriod.WEEK:
        after = start + timedelta(days=7)
    else:
        after = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return int(after.timestamp()) * 1_000_000


def period_start(limit: Limit, time_us: int) -> int:
    """The start of the period `time_us` falls in: its calendar period's start, or the last
    reset in that period before it."""
    start = _calendar_start(limit.period, time_us)
    for reset in reversed(limit.resets_us):
        if reset <= time_us:
            return max(start, reset)
    return start


def period_of(limit: Limit, time_us: int) -> tuple[int, int | None]:
    """The period `time_us` falls in, as (start, end or None)."""
    start = period_start(limit, time_us)
    return start, period_end(limit, start)


def period_end(limit: Limit, start_us: int) -> int | None:
    """When the period that started at `start_us` ends: the next calendar boundary or the
    first reset after it; None for a lifetime period not reset since."""
    end = _calendar_next(limit.period, _calendar_start(limit.period, start_us))
    for reset in limit.resets_us:
        if reset > start_us:
            return reset if end is None else min(end, reset)
    return end


def state_of(limit: Limit, spend_nanos: int) -> LimitState:
    if spend_nanos > limit.max_nanos:
        return LimitState.EXCEEDED
    if spend_nanos * 100 >= limit.max_nanos * limit.threshold_percent:
        return LimitState.THRESHOLD
    return LimitState.OK


def applied(limit: Limit, subject: str, before_nanos: int, after_nanos: int) -> Applied:
    state = state_of(limit, after_nanos)
    return Applied(limit, subject, state, state != state_of(limit, before_nanos), after_nanos)


def may_settle(reserving_key: str, key_name: str) -> bool:
    """Whether a call with `key_name` may release or settle a reservation made with
    `reserving_key` ("" for either: API keys were off)."""
    return not (reserving_key and key_name and reserving_key != key_name)


def room_for(limit: Limit, spend: PeriodSpend, amount_nanos: int) -> bool:
    """Whether a BLOCK limit lets a reservation of `amount_nanos` in."""
    return spend.spend_nanos + spend.reserved_nanos + amount_nanos <= limit.max_nanos


def limit_not_found(name: str) -> TallyError:
    return not_found("LIMIT_NOT_FOUND", "tally.v1.Limit", name, f"there is no limit named {name!r}")


def limit_exceeded(refused: Sequence[tuple[Limit, PeriodSpend]], amount_nanos: int, now_us: int) -> TallyError:
    """RESOURCE_EXHAUSTED naming each refusing limit (QuotaFailure), with RetryInfo when
    there is room again: once every refusing limit's period has ended (none, when one of
    them is a lifetime limit)."""
    names = ", ".join(repr(limit.name) for limit, _ in refused)
    ends = [period_end(limit, spend.key.start_us) for limit, spend in refused]
    finite = [end for end in ends if end is not None]
    retry_seconds = max(1.0, (max(finite) - now_us) / 1e6) if finite and len(finite) == len(ends) else None
    return TallyError(
        Code.RESOURCE_EXHAUSTED,
        "LIMIT_EXCEEDED",
        f"the reservation of ${amount_nanos / 1e9:,.6f} does not fit within limit {names}",
        retry_after_seconds=retry_seconds,
        quota_violations=[
            (
                f"limits/{limit.name}",
                f"spend ${spend.spend_nanos / 1e9:,.6f} and reserved ${spend.reserved_nanos / 1e9:,.6f} "
                f"of ${limit.max_nanos / 1e9:,.2f} leave no room for ${amount_nanos / 1e9:,.6f}",
            )
            for limit, spend in refused
        ],
    )


def check_limit(limit: Limit) -> None:
    """INVALID_ARGUMENT naming every bad field of a limit to create."""
    v = Violations("limit.")
    check_name(v, "name", limit.name, what="limit name")
    if not 0 < limit.max_nanos <= MAX_LIMIT_NANOS:
        v.add("max", "must be more than $0 and at most $1,000,000,000")
    if limit.kind not in set(LimitKind):
        v.add("kind", "must be LIMIT_KIND_BLOCK or LIMIT_KIND_ALLOW")
    if limit.period not in set(LimitPeriod):
        v.add("period", "must be LIMIT_PERIOD_LIFETIME, _DAY, _WEEK or _MONTH")
    if not 1 <= limit.threshold_percent <= 99:
        v.add("threshold_percent", f"must be 1 to 99 (0: {DEFAULT_THRESHOLD_PERCENT}), got {limit.threshold_percent}")
    scope = limit.scope
    if scope.kind == ScopeKind.EXPERIENCE_TYPE:
        if not NAME_PATTERN.fullmatch(scope.experience_type):
            v.add("scope.experience_type", "experience type name must match [A-Za-z0-9._-]{1,64}")
        if scope.experience_version < 0:
            v.add("scope.experience_version", "must be 0 (all versions) or a version number")
    elif scope.kind == ScopeKind.EXPERIENCE:
        if parse_uuid(scope.value) is None:
            v.add("scope.experience_id", f"not a UUID: {scope.value[:80]!r}")
    elif scope.kind in (ScopeKind.USER, ScopeKind.REQUEST_TAG):
        field_path = "scope.user_id" if scope.kind == ScopeKind.USER else "scope.request_tag"
        check_text(v, field_path, scope.value, 256 if scope.kind == ScopeKind.USER else 128)
    v.raise_if_any()

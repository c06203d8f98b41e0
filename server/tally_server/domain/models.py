"""Domain records. Times are integer microseconds since the Unix epoch (UTC);
money is integer nano-dollars."""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .annotations import Annotation
from .limits import Applied
from .outcomes import OutcomeDefinition, ScoredOutcome

if TYPE_CHECKING:  # compare reads stats, which reads these records
    from .compare import OutcomeSummary


def now_us() -> int:
    return time.time_ns() // 1_000


@dataclass(frozen=True)
class ExperienceType:
    name: str
    description: str
    settings: dict[str, str]
    version: int
    create_time_us: int
    update_time_us: int
    outcomes: tuple[OutcomeDefinition, ...] = ()


@dataclass(frozen=True)
class ExperienceTypeVersion:
    name: str
    version: int
    description: str
    settings: dict[str, str]
    create_time_us: int


@dataclass(frozen=True)
class Experience:
    experience_id: uuid.UUID
    experience_name: str
    experience_version: int
    create_time_us: int
    properties: dict[str, str]
    stats: ExperienceStats | None = None  # set where a read asked for them
    outcomes: tuple[ScoredOutcome, ...] | None = None  # set where a read asked for them
    step_costs: tuple[StepCost, ...] = ()  # set where a read asked for them
    property_updates: tuple[PropertyUpdate, ...] = ()  # set where a read asked for them


@dataclass(frozen=True)
class PropertyUpdate:
    """Who last set a property of an experience, and when."""

    key: str
    update_time_us: int
    key_name: str


@dataclass(frozen=True)
class StepCost:
    """What the events of one step cost: of one run, or over a version's runs."""

    step: str
    event_count: int
    cost_nanos: int
    version: int = 0  # over a version's runs: the version, its runs with the step, and all its runs
    experience_count: int = 0
    version_experience_count: int = 0


@dataclass(frozen=True)
class ExperienceStats:
    cost_input_nanos: int = 0
    cost_output_nanos: int = 0
    cost_total_nanos: int = 0
    event_count: int = 0
    failed_event_count: int = 0
    unpriced_event_count: int = 0
    latency_mean_ms: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    first_event_time_us: int | None = None
    last_event_time_us: int | None = None
    latency_reported_event_count: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class CostDistribution:
    experience_count: int = 0
    event_count: int = 0
    unpriced_event_count: int = 0
    failed_event_count: int = 0
    total_nanos: int = 0
    mean_nanos: int = 0
    p50_nanos: int = 0
    p95_nanos: int = 0
    max_nanos: int = 0


@dataclass(frozen=True)
class TypeStats:
    name: str
    total: CostDistribution
    by_version: dict[int, CostDistribution]
    steps: tuple[StepCost, ...] = ()
    # Per version, each declared outcome over the same experiences (types with outcomes only).
    outcomes: dict[int, tuple[OutcomeSummary, ...]] = field(default_factory=dict)


class CostState(enum.IntEnum):
    """Values match tally.v1.CostState."""

    PRICED = 1
    PARTIALLY_PRICED = 2
    UNPRICED = 3


class PriceSource(enum.IntEnum):
    """Values match tally.v1.PriceSource."""

    NONE = 0
    SYSTEM = 1
    CUSTOM = 2


@dataclass(frozen=True)
class PriceReference:
    source: PriceSource
    category: str
    resource: str
    version: str
    effective_time_us: int | None
    # The pairs of the event's price context that selected this variant; () for the standard rate.
    price_context: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UnknownUnit:
    unit_type: str
    input: int
    output: int
    reason: str


# Records made once per ingested event are plain slotted dataclasses: frozen ones
# cost several times more to construct.
@dataclass(slots=True)
class Cost:
    input_nanos: int
    output_nanos: int
    total_nanos: int
    state: CostState
    price: PriceReference | None
    unknown_units: tuple[UnknownUnit, ...] = ()
    warnings: tuple[str, ...] = ()  # e.g. a price context with no variant for the model


@dataclass(frozen=True)
class UnitPrice:
    """Dollars per million units, exact decimal strings as given."""

    input_per_million: str
    output_per_million: str


@dataclass(frozen=True)
class CustomPrice:
    price_id: uuid.UUID
    category: str
    resource: str
    effective_time_us: int
    unit_prices: dict[str, UnitPrice]
    create_time_us: int
    create_key: str = ""  # the API key that added it; empty with authentication off
    end_time_us: int | None = None
    end_key: str = ""
    # A variant: applies only to events whose price context has all these pairs.
    price_context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiKey:
    """An API key, without its secret. Scopes are "ingest", "read" and "admin"."""

    name: str
    scopes: tuple[str, ...]
    create_time_us: int
    last_use_time_us: int | None = None
    revoke_time_us: int | None = None

    def allows(self, scope: str) -> bool:
        """An admin key may do everything; another only what its scopes say."""
        return self.revoke_time_us is None and ("admin" in self.scopes or scope in self.scopes)


@dataclass(frozen=True)
class EventContext:
    """Experience context of an event: metadata and event fields, already merged."""

    experience_id: str = ""
    experience_name: str = ""
    experience_version: int = 0
    user_id: str = ""
    request_tags: tuple[str, ...] = ()
    # The limit reservation the event settles (a UUID from Reserve), if any.
    limit_reservation: str = ""
    # Price context pairs from the call's metadata (xproxy-price-context), sorted.
    price_context: tuple[tuple[str, str], ...] = ()
    # What the call's metadata said that Tally ignored (unknown xproxy-* keys).
    warnings: tuple[str, ...] = ()
    # The step of its run the event belongs to ("" for none).
    step: str = ""


# The context of a call or event that names nothing: the event is unattributed.
NO_CONTEXT = EventContext()


@dataclass(slots=True)
class UsageEvent:
    """A validated event, ready to be priced and stored."""

    category: str
    resource: str
    units: dict[str, tuple[int, int]]
    event_time_us: int
    end_to_end_latency_ms: int
    time_to_first_token_ms: int
    http_status_code: int
    provider_response_id: str
    idempotency_key: str
    properties: dict[str, str]
    context: EventContext
    # SHA-256 of the event as the caller sent it, to tell a retry from a reuse of its key.
    content_hash: str
    price_context: dict[str, str] = field(default_factory=dict)
    # The API key the event came with ("" with keys off): it settles only its own reservations.
    key_name: str = ""
    # Set by the proxy, which names the stored event in its answer's headers before it is stored.
    request_id: uuid.UUID | None = None
    # Why the call's usage could not be read (the proxy could not find it in the response):
    # the event is stored as not priced, with this reason, never as $0.
    unread_usage: str = ""


@dataclass(slots=True)
class Resolution:
    """Where an event's experience resolved to; `experience` is None when unattributed."""

    experience: Experience | None
    created: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(slots=True)
class IngestResult:
    request_id: uuid.UUID
    event_time_us: int
    ingest_time_us: int
    cost: Cost
    experience_id: uuid.UUID | None
    experience_name: str
    experience_version: int
    experience_created: bool
    user_id: str
    request_tags: tuple[str, ...]
    warnings: tuple[str, ...]
    duplicate: bool = False
    idempotency_key: str = ""
    # The limits that applied, each as the event left it (not kept for duplicates).
    limits: tuple[Applied, ...] = ()


@dataclass(frozen=True)
class Page:
    """One page of a list and the opaque token of the next (empty at the end)."""

    items: list[Any] = field(default_factory=list)
    next_page_token: str = ""
    # The token that resumes after the first n items, for an edge that sends fewer than the
    # page holds (its answer would be over the message bound); None where no list offers it.
    token_after: Callable[[int], str] | None = None


# --- rollups: what each commit adds to the statistics kept at ingest ------------------


@dataclass(slots=True)
class CostTotals:
    """Sums over a set of events; money in exact nano-dollars."""

    event_count: int = 0
    failed_event_count: int = 0
    unpriced_event_count: int = 0
    cost_input_nanos: int = 0
    cost_output_nanos: int = 0
    cost_total_nanos: int = 0
    # The units' input and output counts summed over every unit type (tokens_of).
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, other: CostTotals) -> None:
        self.event_count += other.event_count
        self.failed_event_count += other.failed_event_count
        self.unpriced_event_count += other.unpriced_event_count
        self.cost_input_nanos += other.cost_input_nanos
        self.cost_output_nanos += other.cost_output_nanos
        self.cost_total_nanos += other.cost_total_nanos
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens

    def subtract(self, other: CostTotals) -> None:
        self.event_count -= other.event_count
        self.failed_event_count -= other.failed_event_count
        self.unpriced_event_count -= other.unpriced_event_count
        self.cost_input_nanos -= other.cost_input_nanos
        self.cost_output_nanos -= other.cost_output_nanos
        self.cost_total_nanos -= other.cost_total_nanos
        self.input_tokens -= other.input_tokens
        self.output_tokens -= other.output_tokens


@dataclass(slots=True)
class ExperienceAddition:
    """What one commit adds to one experience's statistics."""

    totals: CostTotals = field(default_factory=CostTotals)
    first_event_time_us: int = 0
    last_event_time_us: int = 0
    latency_sum_ms: int = 0
    latency_buckets: dict[int, int] = field(default_factory=dict)  # bucket: events


@dataclass(frozen=True)
class ExperienceRollup:
    """An experience's rollup as stored: its sums and its latency histogram."""

    totals: CostTotals
    latency_sum_ms: int
    first_event_time_us: int | None
    last_event_time_us: int | None
    latency_buckets: dict[int, int]


@dataclass(frozen=True, slots=True)
class CostRollupKey:
    """One row of the hourly cost rollup: events of one hour, type version and model.
    experience_name is "" (version 0) for unattributed events."""

    hour_us: int
    experience_name: str
    experience_version: int
    category: str
    resource: str
    model: str  # the price entry's model, or the resource when no entry priced the event


@dataclass(frozen=True)
class StoredEvent:
    """An event read back, with the result it was acknowledged with."""

    event: UsageEvent
    result: IngestResult
    annotations: tuple[Annotation, ...] = ()  # set where a read asked for them


@dataclass(frozen=True)
class CostFilter:
    """Which events a cost breakdown sums ("" and 0: any)."""

    experience_name: str = ""
    experience_version: int = 0
    category: str = ""
    model: str = ""
    user_id: str = ""
    request_tag: str = ""

    @property
    def of_events_only(self) -> bool:
        """Whether only the events know it (the hourly rollup keeps no user or tag)."""
        return bool(self.user_id or self.request_tag)


ALL_EVENTS = CostFilter()


@dataclass(frozen=True)
class CostGroup:
    """One group of a cost breakdown: its keys by dimension name, and its sums."""

    keys: dict[str, Any]
    totals: CostTotals

"""Statistics kept at ingest: what a commit adds to each experience, to the hourly cost
rollup and to the type rollup (whose rows an experience moves between as it grows), and
the log-scaled histograms of latencies and costs they keep.

Every commit of the writer adds its events here, in the transaction that stores them,
so reads sum a few rollup rows instead of every event (docs/guarantees.md, "Statistics").
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, TypeVar

from .models import Cost, CostRollupKey, CostState, CostTotals, ExperienceAddition, IngestResult, UsageEvent
from .outcomes import OutcomeDefinition, succeeded

HOUR_US = 3600 * 1_000_000
DAY_US = 24 * HOUR_US

# Histograms in log-scaled buckets (as DDSketch keeps them): bucket b > 0 holds the values
# in (GAMMA^(b-2), GAMMA^(b-1)] and answers with a value within RELATIVE_ERROR of each of
# them; bucket 0 holds 0 exactly. An experience's latencies (ms) are kept so, and so are
# the total costs (nano-dollars) of a type's experiences.
RELATIVE_ERROR = 0.01
_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)


def log_bucket(value: int) -> int:
    if value <= 0:
        return 0
    return 1 + math.ceil(math.log(value) / _LOG_GAMMA - 1e-9)


latency_bucket = log_bucket
cost_bucket = log_bucket


def bucket_value(bucket: int) -> float:
    """The value a bucket answers with: within RELATIVE_ERROR of any value in it."""
    if bucket <= 0:
        return 0.0
    return 2 * _GAMMA ** (bucket - 1) / (_GAMMA + 1)


def histogram_percentile(buckets: Mapping[int, int], fraction: float) -> float:
    """The nearest-rank percentile of the latencies counted in `buckets`, within the
    histogram's relative error."""
    count = sum(buckets.values())
    if not count:
        return 0.0
    rank = max(1, math.ceil(fraction * count))
    seen = 0
    for bucket in sorted(buckets):
        seen += buckets[bucket]
        if seen >= rank:
            return bucket_value(bucket)
    raise AssertionError("unreachable: rank <= count")


def packed_histogram(buckets: Mapping[int, int]) -> bytes:
    """A histogram's buckets (bucket: count, both at least 0; empty ones left out) as bytes:
    in bucket order, each bucket's distance from the one before (from 0 for the first) and
    its count, as unsigned LEB128 varints. An experience keeps its latencies so, on its own
    row (migration 0025): a few bytes a bucket, where a row per bucket took 26."""
    out = bytearray()
    previous = 0
    for bucket in sorted(buckets):
        count = buckets[bucket]
        if count:
            _put_varint(out, bucket - previous)
            _put_varint(out, count)
            previous = bucket
    return bytes(out)


def unpacked_histogram(packed: bytes | None) -> dict[int, int]:
    """The buckets packed_histogram packed (None or b"": none)."""
    buckets: dict[int, int] = {}
    if not packed:
        return buckets
    position, bucket = 0, 0
    while position < len(packed):
        distance, position = _varint_at(packed, position)
        count, position = _varint_at(packed, position)
        bucket += distance
        buckets[bucket] = count
    return buckets


def merged_histogram(packed: bytes | None, added: Mapping[int, int]) -> bytes:
    """A packed histogram with `added`'s counts added to its buckets."""
    buckets = unpacked_histogram(packed)
    for bucket, count in added.items():
        buckets[bucket] = buckets.get(bucket, 0) + count
    return packed_histogram(buckets)


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"a histogram holds buckets and counts of at least 0, not {value}")
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _varint_at(data: bytes, position: int) -> tuple[int, int]:
    """The varint at `position` and the position after it."""
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def day_of(time_us: int) -> int:
    return time_us - time_us % DAY_US


def bucket_nanos(bucket: int) -> int:
    return round(bucket_value(bucket))


def histogram_rank(buckets: Mapping[int, int], rank: int) -> tuple[int, int]:
    """The bucket holding the rank-th smallest (from 1) of the values counted, and how many
    values lie in the buckets below it."""
    seen = 0
    for bucket in sorted(buckets):
        if seen + buckets[bucket] >= rank:
            return bucket, seen
        seen += buckets[bucket]
    raise ValueError(f"rank {rank} beyond the {seen} values counted")


def _first_in_or_after(bucket: int) -> int:
    """The least integer that cost_bucket puts in `bucket` or a later one (a binary search
    around the bucket's edge: floats alone miss it by many nanos at large values)."""
    edge = _GAMMA ** (bucket - 2)
    low, high = max(1, math.floor(edge * (1 - 1e-9)) - 2), math.ceil(edge * (1 + 1e-9)) + 2
    while low < high:
        middle = (low + high) // 2
        if log_bucket(middle) >= bucket:
            high = middle
        else:
            low = middle + 1
    return low


def bucket_bounds(bucket: int) -> tuple[int, int]:
    """The least and greatest integer that cost_bucket puts in `bucket` (by the same
    function, so that a range query over them holds exactly the bucket's values; low > high
    for a bucket that holds no integer)."""
    if bucket <= 0:
        return 0, 0
    return _first_in_or_after(bucket), _first_in_or_after(bucket + 1) - 1


# An outcome's verdict as the type rollups count a scored run (whether it meets the goal
# the type declares now; a goal changed later recounts the type's runs).
SUCCEEDED, FAILED, NO_GOAL = 1, 0, -1


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    verdict: int  # SUCCEEDED, FAILED or NO_GOAL
    value: float


StepSums = Mapping[str, tuple[int, int]]  # step -> (events, cost in nanos)


@dataclass(frozen=True, slots=True)
class ExperienceState:
    """What the type's rollups count of one experience (read, locked, before a commit adds
    to it): its sums, its declared outcomes' verdicts and, when read, its step costs."""

    type_id: int
    version: int
    event_count: int
    unpriced_event_count: int
    cost_total_nanos: int
    first_event_time_us: int | None
    failed_event_count: int = 0
    verdicts: tuple[Verdict, ...] = ()
    steps: StepSums | None = None  # None: not read (a change that leaves its steps as they were)


@dataclass(slots=True)
class TypeTotals:
    """A change to one row of type_rollups (signed)."""

    experience_count: int = 0
    event_count: int = 0
    failed_event_count: int = 0
    unpriced_event_count: int = 0
    cost_total_nanos: int = 0


@dataclass(slots=True)
class OutcomeTotals:
    """A change to one row of type_outcome_rollups (signed): runs with the verdict, the sum
    of their values and of their costs."""

    run_count: int = 0
    value_sum: float = 0.0
    cost_total_nanos: int = 0


@dataclass(slots=True)
class StepTotals:
    """A change to one row of type_step_rollups (signed): runs with the step, its events and cost."""

    run_count: int = 0
    event_count: int = 0
    cost_total_nanos: int = 0


TypeKey = tuple[int, int, int]  # type_id, version, day of the first event
OutcomeKey = tuple[int, int, int, str, int]  # TypeKey, outcome name, verdict
StepKey = tuple[int, int, int, str]  # TypeKey, step


@dataclass
class TypeDeltas:
    """Changes to the type rollups: sums and cost histogram per version and day, the same
    per outcome verdict, and step sums. Reads fill the same shape from the stored rows."""

    totals: dict[TypeKey, TypeTotals] = field(default_factory=dict)
    buckets: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    outcomes: dict[OutcomeKey, OutcomeTotals] = field(default_factory=dict)
    outcome_buckets: dict[tuple[int, int, int, str, int, int], int] = field(default_factory=dict)
    steps: dict[StepKey, StepTotals] = field(default_factory=dict)


def count(deltas: TypeDeltas, state: ExperienceState, sign: int) -> None:
    """Adds (sign 1) or takes away (sign -1) an experience's whole contribution."""
    if not state.event_count or state.first_event_time_us is None:
        return
    key = (state.type_id, state.version, day_of(state.first_event_time_us))
    cost = state.cost_total_nanos
    totals = deltas.totals.get(key)
    if totals is None:
        totals = deltas.totals[key] = TypeTotals()
    totals.experience_count += sign
    totals.event_count += sign * state.event_count
    totals.failed_event_count += sign * state.failed_event_count
    totals.unpriced_event_count += sign * state.unpriced_event_count
    totals.cost_total_nanos += sign * cost
    bucket = cost_bucket(cost)
    bucket_key = (*key, bucket)
    deltas.buckets[bucket_key] = deltas.buckets.get(bucket_key, 0) + sign
    for verdict in state.verdicts:
        outcome_key = (*key, verdict.name, verdict.verdict)
        outcome = deltas.outcomes.setdefault(outcome_key, OutcomeTotals())
        outcome.run_count += sign
        outcome.value_sum += sign * verdict.value
        outcome.cost_total_nanos += sign * cost
        outcome_bucket = (*outcome_key, bucket)
        deltas.outcome_buckets[outcome_bucket] = deltas.outcome_buckets.get(outcome_bucket, 0) + sign
    for step, (events, step_cost) in (state.steps or {}).items():
        step_totals = deltas.steps.setdefault((*key, step), StepTotals())
        step_totals.run_count += sign
        step_totals.event_count += sign * events
        step_totals.cost_total_nanos += sign * step_cost


def _grown(
    old: ExperienceState, rollup: ExperienceAddition, step_sums: Mapping[str, tuple[int, int]]
) -> ExperienceState:
    """The experience once a commit's events are added."""
    first = rollup.first_event_time_us
    if old.first_event_time_us is not None:
        first = min(first, old.first_event_time_us)
    steps = old.steps
    if step_sums:
        merged = dict(steps or {})
        for step, (events, cost) in step_sums.items():
            before_events, before_cost = merged.get(step, (0, 0))
            merged[step] = (before_events + events, before_cost + cost)
        steps = merged
    return replace(
        old,
        event_count=old.event_count + rollup.totals.event_count,
        unpriced_event_count=old.unpriced_event_count + rollup.totals.unpriced_event_count,
        failed_event_count=old.failed_event_count + rollup.totals.failed_event_count,
        cost_total_nanos=old.cost_total_nanos + rollup.totals.cost_total_nanos,
        first_event_time_us=first,
        steps=steps,
    )


def steps_to_read(
    before: Mapping[uuid.UUID, ExperienceState],
    added: Mapping[uuid.UUID, ExperienceAddition],
    step_sums: Mapping[tuple[uuid.UUID, str], tuple[int, int]],
) -> set[uuid.UUID]:
    """The experiences whose step costs a commit must read before type_deltas: those it adds
    to a step of, and those whose first event moves to another day (their steps move with it)."""
    wanted = {experience_id for experience_id, _ in step_sums}
    for experience_id, rollup in added.items():
        old = before.get(experience_id)
        if old is None or old.first_event_time_us is None or not old.event_count:
            continue  # not counted yet: it has no steps to move
        if day_of(min(old.first_event_time_us, rollup.first_event_time_us)) != day_of(old.first_event_time_us):
            wanted.add(experience_id)
    return wanted


def type_deltas(
    before: Mapping[uuid.UUID, ExperienceState],
    added: Mapping[uuid.UUID, ExperienceAddition],
    step_sums: Mapping[tuple[uuid.UUID, str], tuple[int, int]] | None = None,
) -> TypeDeltas:
    """How a commit's events change their types' rollups: each experience they touch leaves
    its old day and cost bucket and enters its new ones (zero-sum rows drop out later).
    The states of steps_to_read's experiences must carry their steps."""
    by_experience: dict[uuid.UUID, dict[str, tuple[int, int]]] = {}
    for (experience_id, step), sums in (step_sums or {}).items():
        by_experience.setdefault(experience_id, {})[step] = sums
    deltas = TypeDeltas()
    for experience_id, rollup in added.items():
        old = before.get(experience_id)
        if old is None:  # deleted meanwhile: nothing counts it
            continue
        count(deltas, old, -1)
        count(deltas, _grown(old, rollup, by_experience.get(experience_id, {})), 1)
    return deltas


def verdicts_of(values: Mapping[str, float], definitions: Sequence[OutcomeDefinition]) -> tuple[Verdict, ...]:
    """A run's verdicts on the outcomes its type declares (values of outcomes no longer
    declared count nowhere)."""
    found = []
    for definition in definitions:
        if definition.name in values:
            value = values[definition.name]
            ok = succeeded(definition, value)
            found.append(Verdict(definition.name, NO_GOAL if ok is None else SUCCEEDED if ok else FAILED, value))
    return tuple(found)


def removal(state: ExperienceState) -> TypeDeltas:
    """How deleting an experience changes its type's rollups (its state read with its steps)."""
    deltas = TypeDeltas()
    count(deltas, state, -1)
    return deltas


def rescored(before: ExperienceState, verdicts: tuple[Verdict, ...], into: TypeDeltas | None = None) -> TypeDeltas:
    """How new outcome values (or goals) of a run change its type's rollups (only their
    outcome rows: the rest cancels out)."""
    deltas = TypeDeltas() if into is None else into
    count(deltas, replace(before, steps=None), -1)
    count(deltas, replace(before, verdicts=verdicts, steps=None), 1)
    return deltas


def priced_model(event: UsageEvent, cost: Cost) -> str:
    """The model an event counts under in reports and metrics: the price entry's that priced
    it (a dated snapshot such as gpt-4o-2024-08-06 under gpt-4o), else the resource sent."""
    return cost.price.resource if cost.price is not None else event.resource


def tokens_of(event: UsageEvent) -> tuple[int, int]:
    """An event's tokens in and out: its units' input and output counts over every unit type
    (units are disjoint buckets, so the sum counts each token once)."""
    tokens_in = tokens_out = 0
    for input_count, output_count in event.units.values():
        tokens_in += input_count
        tokens_out += output_count
    return tokens_in, tokens_out


# A group's sums as rollups_of keeps them in a list: CostTotals' fields in order.
_SUMS = 8


def _add(sums: list[int], failed: int, unpriced: int, cost: Cost, tokens: tuple[int, int]) -> None:
    """One event into a group's sums: events, failed, unpriced, input, output, total cost,
    tokens in and out."""
    sums[0] += 1
    sums[1] += failed
    sums[2] += unpriced
    sums[3] += cost.input_nanos
    sums[4] += cost.output_nanos
    sums[5] += cost.total_nanos
    sums[6] += tokens[0]
    sums[7] += tokens[1]


def rollups_of(
    stored: Iterable[tuple[UsageEvent, IngestResult]],
) -> tuple[dict[uuid.UUID, ExperienceAddition], dict[CostRollupKey, CostTotals]]:
    """What the stored events add to their experiences and to the hourly cost rollup.
    (Summed in plain lists, objects made once per group: this runs once per event.)"""
    # Per group, the sums of _add; per experience also the first and last event time and
    # the latency sum, after them.
    first, last, latency_sum = _SUMS, _SUMS + 1, _SUMS + 2
    by_hour: dict[tuple[int, str, int, str, str, str], list[int]] = {}
    by_experience: dict[uuid.UUID, list[int]] = {}
    latencies: dict[uuid.UUID, dict[int, int]] = {}
    priced = CostState.PRICED
    for event, result in stored:
        cost, time_us = result.cost, event.event_time_us
        failed = 1 if event.http_status_code >= 400 else 0
        unpriced = 0 if cost.state == priced else 1
        tokens = tokens_of(event)
        key = (
            time_us - time_us % HOUR_US,
            result.experience_name,
            result.experience_version,
            event.category,
            event.resource,
            priced_model(event, cost),
        )
        hourly = by_hour.get(key)
        if hourly is None:
            hourly = by_hour[key] = [0] * _SUMS
        _add(hourly, failed, unpriced, cost, tokens)
        experience_id = result.experience_id
        if experience_id is None:
            continue
        sums = by_experience.get(experience_id)
        if sums is None:
            sums = by_experience[experience_id] = [0] * _SUMS + [time_us, time_us, 0]
            latencies[experience_id] = {}
        _add(sums, failed, unpriced, cost, tokens)
        sums[first] = min(sums[first], time_us)
        sums[last] = max(sums[last], time_us)
        latency = event.end_to_end_latency_ms
        sums[latency_sum] += latency
        buckets = latencies[experience_id]
        bucket = latency_bucket(latency)
        buckets[bucket] = buckets.get(bucket, 0) + 1
    return (
        {
            experience_id: ExperienceAddition(
                CostTotals(*sums[:_SUMS]), sums[first], sums[last], sums[latency_sum], latencies[experience_id]
            )
            for experience_id, sums in by_experience.items()
        },
        {CostRollupKey(*key): CostTotals(*sums) for key, sums in by_hour.items()},
    )


# The dimensions of the user, request-tag and API-key rollup (storage: attribute_rollups),
# each kept per hour and, as dimension + DAYS, per UTC day: a long window reads days, its
# edges hours (and the events of its partial first and last hours). Keys since 0019.
USER_DIMENSION, TAG_DIMENSION, KEY_DIMENSION = 1, 2, 5
DAYS = 2
# One of its rows: dimension, hour (or day), value ("" for none: an event without a user,
# or without tags), experience name and version ("" and 0: unattributed).
AttributeKey = tuple[int, int, str, str, int]


# One row of the rollup per UTC day, user, tag or key, and provider and model (storage:
# attribute_model_days): dimension (USER_DIMENSION, TAG_DIMENSION or KEY_DIMENSION), day,
# value, experience name and version, category, and the model that priced the events.
ModelDayKey = tuple[int, int, str, str, int, str, str]

# One row of the rollup per UTC day, user, tag or key, and provider (storage:
# attribute_provider_days): as ModelDayKey without the model. A provider's rows are a fifth
# of its models' where it has five, and SQLite sums a row's 13 columns in about 0.7 µs.
ProviderDayKey = tuple[int, int, str, str, int, str]

# One row of the rollup of each request tag's events per UTC day by user or API key (storage:
# tag_attribute_days): tag ("" for none, since 0023), dimension (USER_DIMENSION or
# KEY_DIMENSION), day, value ("" for none), experience name and version. Not by tag: pairs
# of an event's tags would grow with the square of its tags (up to 32), and a row per tag is
# what a tag's events by user, and a user's events by tag, need.
TagDayKey = tuple[str, int, int, str, str, int]

# One row of the rollup of why events were not (fully) priced (storage: unpriced_reason_days,
# migration 0026): dimension (USER_DIMENSION, TAG_DIMENSION or KEY_DIMENSION), value ("" for
# none), UTC day, category, the model that priced them (else the resource sent), cost state
# and reason (cut to REASON_CHARS). Each such event counts once per distinct reason under its
# user, each of its tags and its key, as attribute_rollups counts it: a user's or a tag's
# reasons are a read of its rows, not of its newest events, and every key's rows are all the
# events' reasons.
ReasonDayKey = tuple[int, str, int, str, str, int, str]
REASON_CHARS = 300


# A group's sums in CostTotals' field order: events, failed, unpriced, input, output and
# total cost, tokens in and out. The rollups by user, tag and key hold these lists, not
# CostTotals: making one per group was a third of attribute_rollups_of's time (measured).
Sums = list[int]


def sums_of(totals: CostTotals) -> Sums:
    t = totals
    return [
        t.event_count,
        t.failed_event_count,
        t.unpriced_event_count,
        t.cost_input_nanos,
        t.cost_output_nanos,
        t.cost_total_nanos,
        t.input_tokens,
        t.output_tokens,
    ]


class AttributeRollups(NamedTuple):
    """What stored events add to the rollups by user, request tag and API key."""

    by_hour_and_day: dict[AttributeKey, Sums]
    by_model_day: dict[ModelDayKey, Sums]
    by_provider_day: dict[ProviderDayKey, Sums]
    by_tag_day: dict[TagDayKey, Sums]
    by_reason_day: dict[ReasonDayKey, int]


# All that names an event's groups in the rollups by user, tag and key: hour, type name and
# version, category, model, user, tags, key name, cost state and reasons not priced.
_Signature = tuple[int, str, int, str, str, str, tuple[str, ...], str, int, tuple[str, ...]]


def attribute_rollups_of(stored: Iterable[tuple[UsageEvent, IngestResult]]) -> AttributeRollups:
    """What the stored events add to the rollup by user, request tag and API key: each event
    counts once under its user, once under each of its tags (once under a tag it repeats;
    under "" for none) and once under its key's name, as a breakdown of the events by each
    groups them, in its hour and its day; the same per day and provider, and per day,
    provider and model; and, under each of its tags (or ""), once under its user and once
    under its key per day."""
    # The events of a commit mostly share their groups (a service's calls of one hour, user
    # and run type): summed first by all that names their groups, each such set of events
    # adds to its fourteen or more groups once: 8.5 -> 1.0 us an event where a commit's
    # events share them, 8.9 -> 8.9 where each has its own user (python -m bench.rollups).
    signatures: dict[_Signature, Sums] = {}
    priced = CostState.PRICED
    for event, result in stored:
        cost, time_us, context = result.cost, event.event_time_us, event.context
        tokens_in, tokens_out = tokens_of(event)
        state = int(cost.state)
        signature = (
            time_us - time_us % HOUR_US,
            result.experience_name,
            result.experience_version,
            event.category,
            priced_model(event, cost),
            context.user_id,
            context.request_tags,
            event.key_name,
            state,
            () if state == priced else tuple(reasons_of(cost)),
        )
        # The event's sums, in CostTotals' order.
        failed, unpriced = (1 if event.http_status_code >= 400 else 0), (0 if state == priced else 1)
        sums = (1, failed, unpriced, cost.input_nanos, cost.output_nanos, cost.total_nanos, tokens_in, tokens_out)
        _add_to(signatures, signature, sums)
    by_key: dict[AttributeKey, Sums] = {}
    by_model: dict[ModelDayKey, Sums] = {}
    by_provider: dict[ProviderDayKey, Sums] = {}
    by_tag: dict[TagDayKey, Sums] = {}
    by_reason: dict[ReasonDayKey, int] = {}
    for signature, summed in signatures.items():
        hour, name, version, category, model, user_id, request_tags, key_name, state, reasons = signature
        day = hour - hour % DAY_US
        # Each tag once, however often the event repeats it (as its limits and the events of
        # a tag count it); "" for none.
        tags = tuple(dict.fromkeys(request_tags)) or ("",)
        values = (
            (USER_DIMENSION, user_id),
            *((TAG_DIMENSION, tag) for tag in tags),
            (KEY_DIMENSION, key_name),
        )
        for dimension, value in values:
            _add_to(by_key, (dimension, hour, value, name, version), summed)
            _add_to(by_key, (dimension + DAYS, day, value, name, version), summed)
            _add_to(by_provider, (dimension, day, value, name, version, category), summed)
            _add_to(by_model, (dimension, day, value, name, version, category, model), summed)
        for tag in tags:
            _add_to(by_tag, (tag, USER_DIMENSION, day, user_id, name, version), summed)
            _add_to(by_tag, (tag, KEY_DIMENSION, day, key_name, name, version), summed)
        for reason in reasons:
            for dimension, value in values:
                key = (dimension, value, day, category, model, state, reason)
                by_reason[key] = by_reason.get(key, 0) + summed[0]
    return AttributeRollups(by_key, by_model, by_provider, by_tag, by_reason)


def reasons_of(cost: Cost) -> list[str]:
    """Why an event was not (fully) priced: its units' distinct reasons, each cut to
    REASON_CHARS, in their order (an event counts once per reason)."""
    return list(dict.fromkeys(unit.reason[:REASON_CHARS] for unit in cost.unknown_units))


_K = TypeVar("_K")


def _add_to(groups: dict[_K, Sums], key: _K, sums: Sequence[int]) -> None:
    """Sums (an event's, or a set of events') into their group's: a new group copies them,
    an old one adds them in place (a new list per event and key cost 8 µs an event where a
    commit's events share their keys)."""
    found = groups.get(key)
    if found is None:
        groups[key] = list(sums)
        return
    found[0] += sums[0]
    found[1] += sums[1]
    found[2] += sums[2]
    found[3] += sums[3]
    found[4] += sums[4]
    found[5] += sums[5]
    found[6] += sums[6]
    found[7] += sums[7]


def step_costs(stored: Iterable[tuple[UsageEvent, IngestResult]]) -> dict[tuple[uuid.UUID, str], tuple[int, int]]:
    """What the stored events that name a step add to their run's step: (events, cost)."""
    sums: dict[tuple[uuid.UUID, str], tuple[int, int]] = {}
    for event, result in stored:
        step = event.context.step
        if step and result.experience_id is not None:
            key = (result.experience_id, step)
            events, nanos = sums.get(key, (0, 0))
            sums[key] = (events + 1, nanos + result.cost.total_nanos)
    return sums

"""Statistics kept at ingest: what a commit adds to each experience, to the hourly cost
rollup and to the type rollup (whose rows an experience moves between as it grows), and
the log-scaled histograms of latencies and costs they keep.

Every commit of the writer adds its events here, in the transaction that stores them,
so reads sum a few rollup rows instead of every event (docs/guarantees.md, "Statistics").
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .models import Cost, CostRollupKey, CostState, CostTotals, ExperienceAddition, IngestResult, UsageEvent

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


@dataclass(frozen=True, slots=True)
class ExperienceState:
    """What the type's rollups count of one experience (read, locked, before a commit adds to it)."""

    type_id: int
    version: int
    event_count: int
    unpriced_event_count: int
    cost_total_nanos: int
    first_event_time_us: int | None


@dataclass(slots=True)
class TypeTotals:
    """A change to one row of type_rollups (signed)."""

    experience_count: int = 0
    event_count: int = 0
    unpriced_event_count: int = 0
    cost_total_nanos: int = 0


TypeKey = tuple[int, int, int]  # type_id, version, day of the first event
TypeDeltas = tuple[dict[TypeKey, TypeTotals], dict[tuple[int, int, int, int], int]]


def _count(deltas: TypeDeltas, state: ExperienceState, sign: int) -> None:
    """Adds (sign 1) or takes away (sign -1) an experience's whole contribution."""
    if not state.event_count or state.first_event_time_us is None:
        return
    key = (state.type_id, state.version, day_of(state.first_event_time_us))
    totals = deltas[0].setdefault(key, TypeTotals())
    totals.experience_count += sign
    totals.event_count += sign * state.event_count
    totals.unpriced_event_count += sign * state.unpriced_event_count
    totals.cost_total_nanos += sign * state.cost_total_nanos
    bucket_key = (*key, cost_bucket(state.cost_total_nanos))
    deltas[1][bucket_key] = deltas[1].get(bucket_key, 0) + sign


def type_deltas(
    before: Mapping[uuid.UUID, ExperienceState], added: Mapping[uuid.UUID, ExperienceAddition]
) -> TypeDeltas:
    """How a commit's events change their types' rollups: each experience they touch leaves
    its old day and cost bucket and enters its new ones (zero-sum rows drop out later)."""
    deltas: TypeDeltas = ({}, {})
    for experience_id, rollup in added.items():
        old = before.get(experience_id)
        if old is None:  # deleted meanwhile: nothing counts it
            continue
        first = rollup.first_event_time_us
        if old.first_event_time_us is not None:
            first = min(first, old.first_event_time_us)
        new = ExperienceState(
            old.type_id,
            old.version,
            old.event_count + rollup.totals.event_count,
            old.unpriced_event_count + rollup.totals.unpriced_event_count,
            old.cost_total_nanos + rollup.totals.cost_total_nanos,
            first,
        )
        _count(deltas, old, -1)
        _count(deltas, new, 1)
    return deltas


def removal(state: ExperienceState) -> TypeDeltas:
    """How deleting an experience changes its type's rollups."""
    deltas: TypeDeltas = ({}, {})
    _count(deltas, state, -1)
    return deltas


def priced_model(event: UsageEvent, cost: Cost) -> str:
    """The model an event counts under in reports and metrics: the price entry's that priced
    it (a dated snapshot such as gpt-4o-2024-08-06 under gpt-4o), else the resource sent."""
    return cost.price.resource if cost.price is not None else event.resource


def _add(sums: list[int], failed: int, unpriced: int, cost: Cost) -> None:
    """One event into a group's sums: events, failed, unpriced, input, output, total."""
    sums[0] += 1
    sums[1] += failed
    sums[2] += unpriced
    sums[3] += cost.input_nanos
    sums[4] += cost.output_nanos
    sums[5] += cost.total_nanos


def rollups_of(
    stored: Iterable[tuple[UsageEvent, IngestResult]],
) -> tuple[dict[uuid.UUID, ExperienceAddition], dict[CostRollupKey, CostTotals]]:
    """What the stored events add to their experiences and to the hourly cost rollup.
    (Summed in plain lists, objects made once per group: this runs once per event.)"""
    # Per group, the sums of _add; per experience also the first and last event time and
    # the latency sum.
    by_hour: dict[tuple[int, str, int, str, str, str], list[int]] = {}
    by_experience: dict[uuid.UUID, list[int]] = {}
    latencies: dict[uuid.UUID, dict[int, int]] = {}
    priced = CostState.PRICED
    for event, result in stored:
        cost, time_us = result.cost, event.event_time_us
        failed = 1 if event.http_status_code >= 400 else 0
        unpriced = 0 if cost.state == priced else 1
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
            hourly = by_hour[key] = [0] * 6
        _add(hourly, failed, unpriced, cost)
        experience_id = result.experience_id
        if experience_id is None:
            continue
        sums = by_experience.get(experience_id)
        if sums is None:
            sums = by_experience[experience_id] = [0, 0, 0, 0, 0, 0, time_us, time_us, 0]
            latencies[experience_id] = {}
        _add(sums, failed, unpriced, cost)
        sums[6] = min(sums[6], time_us)
        sums[7] = max(sums[7], time_us)
        latency = event.end_to_end_latency_ms
        sums[8] += latency
        buckets = latencies[experience_id]
        bucket = latency_bucket(latency)
        buckets[bucket] = buckets.get(bucket, 0) + 1
    return (
        {
            experience_id: ExperienceAddition(
                CostTotals(*sums[:6]), sums[6], sums[7], sums[8], latencies[experience_id]
            )
            for experience_id, sums in by_experience.items()
        },
        {CostRollupKey(*key): CostTotals(*sums) for key, sums in by_hour.items()},
    )


def step_costs(stored: Iterable[tuple[UsageEvent, IngestResult]]) -> dict[tuple[uuid.UUID, str], tuple[int, int]]:
    """What the stored events that name a step add to their run's step: (events, cost)."""
    sums: dict[tuple[uuid.UUID, str], tuple[int, int]] = {}
    for event, result in stored:
        step = event.context.step
        if step and result.experience_id is not None:
            key = (result.experience_id, step)
            count, nanos = sums.get(key, (0, 0))
            sums[key] = (count + 1, nanos + result.cost.total_nanos)
    return sums

"""Statistics kept at ingest: what a commit adds to each experience and to the hourly
cost rollup, and the latency histogram they keep.

Every commit of the writer adds its events here, in the transaction that stores them,
so reads sum a few rollup rows instead of every event (docs/guarantees.md, "Statistics").
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping

from .models import CostRollupKey, CostState, CostTotals, ExperienceRollup, IngestResult, UsageEvent

HOUR_US = 3600 * 1_000_000
DAY_US = 24 * HOUR_US

# Latencies are kept as a log-scaled histogram (as DDSketch does): bucket b > 0 holds
# latencies in (GAMMA^(b-2), GAMMA^(b-1)] ms and answers with a value within
# LATENCY_RELATIVE_ERROR of each of them; bucket 0 holds latency 0 exactly.
LATENCY_RELATIVE_ERROR = 0.01
_GAMMA = (1 + LATENCY_RELATIVE_ERROR) / (1 - LATENCY_RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)


def latency_bucket(latency_ms: int) -> int:
    if latency_ms <= 0:
        return 0
    return 1 + math.ceil(math.log(latency_ms) / _LOG_GAMMA - 1e-9)


def bucket_value(bucket: int) -> float:
    """The value a bucket answers with: within LATENCY_RELATIVE_ERROR of any latency in it."""
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


def hour_of(time_us: int) -> int:
    return time_us - time_us % HOUR_US


def event_totals(event: UsageEvent, result: IngestResult) -> CostTotals:
    cost = result.cost
    return CostTotals(
        event_count=1,
        failed_event_count=1 if event.http_status_code >= 400 else 0,
        unpriced_event_count=0 if cost.state == CostState.PRICED else 1,
        cost_input_nanos=cost.input_nanos,
        cost_output_nanos=cost.output_nanos,
        cost_total_nanos=cost.total_nanos,
    )


def rollups_of(
    stored: Iterable[tuple[UsageEvent, IngestResult]],
) -> tuple[dict[uuid.UUID, ExperienceRollup], dict[CostRollupKey, CostTotals]]:
    """What the stored events add to their experiences and to the hourly cost rollup."""
    by_experience: dict[uuid.UUID, ExperienceRollup] = {}
    by_hour: dict[CostRollupKey, CostTotals] = {}
    for event, result in stored:
        totals = event_totals(event, result)
        key = CostRollupKey(
            hour_of(event.event_time_us),
            result.experience_name,
            result.experience_version,
            event.category,
            event.resource,
        )
        hourly = by_hour.get(key)
        if hourly is None:
            by_hour[key] = totals
        else:
            hourly.add(totals)
        if result.experience_id is None:
            continue
        rollup = by_experience.get(result.experience_id)
        if rollup is None:
            rollup = by_experience[result.experience_id] = ExperienceRollup(
                first_event_time_us=event.event_time_us, last_event_time_us=event.event_time_us
            )
        rollup.totals.add(totals)
        rollup.first_event_time_us = min(rollup.first_event_time_us, event.event_time_us)
        rollup.last_event_time_us = max(rollup.last_event_time_us, event.event_time_us)
        rollup.latency_sum_ms += event.end_to_end_latency_ms
        bucket = latency_bucket(event.end_to_end_latency_ms)
        rollup.latency_buckets[bucket] = rollup.latency_buckets.get(bucket, 0) + 1
    return by_experience, by_hour

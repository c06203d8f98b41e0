"""Statistics arithmetic: exact integer money, nearest-rank percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from .models import CostDistribution, ExperienceStats, TypeStats
from .money import divide_half_even

T = TypeVar("T")


def nearest_rank(sorted_values: Sequence[T], fraction: float) -> T | int:
    """The nearest-rank percentile: always one of the values, never interpolated."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def experience_stats(summary: Any, latencies: list[int]) -> ExperienceStats:
    count = int(summary.event_count)
    return ExperienceStats(
        cost_input_nanos=int(summary.cost_input),
        cost_output_nanos=int(summary.cost_output),
        cost_total_nanos=int(summary.cost_total),
        event_count=count,
        failed_event_count=int(summary.failed),
        unpriced_event_count=int(summary.unpriced),
        latency_mean_ms=(sum(latencies) / len(latencies)) if latencies else 0.0,
        latency_p50_ms=float(nearest_rank(latencies, 0.50)),
        latency_p95_ms=float(nearest_rank(latencies, 0.95)),
        first_event_time_us=None if summary.first_us is None else int(summary.first_us),
        last_event_time_us=None if summary.last_us is None else int(summary.last_us),
    )


def distribution(rows: Sequence[Any]) -> CostDistribution:
    """Rows of (version, id, total, events, unpriced), one per experience."""
    costs = sorted(int(row.total) for row in rows)
    total = sum(costs)
    return CostDistribution(
        experience_count=len(costs),
        event_count=sum(int(row.events) for row in rows),
        unpriced_event_count=sum(int(row.unpriced) for row in rows),
        total_nanos=total,
        mean_nanos=divide_half_even(total, len(costs)),
        p50_nanos=nearest_rank(costs, 0.50),
        p95_nanos=nearest_rank(costs, 0.95),
        max_nanos=costs[-1] if costs else 0,
    )


def type_stats(name: str, rows: Sequence[Any]) -> TypeStats:
    by_version: dict[int, list[Any]] = {}
    for row in rows:
        by_version.setdefault(int(row.version), []).append(row)
    return TypeStats(
        name=name,
        total=distribution(rows),
        by_version={version: distribution(by_version[version]) for version in sorted(by_version)},
    )

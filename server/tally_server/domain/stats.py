"""Statistics from the rollups: exact integer money, nearest-rank percentiles found through histograms."""

from __future__ import annotations

import math

from .models import ExperienceRollup, ExperienceStats
from .rollups import DAY_US, histogram_percentile


def nearest_rank(count: int, fraction: float) -> int:
    """The rank (from 1) of the nearest-rank percentile among `count` sorted values."""
    return max(1, math.ceil(fraction * count))


def experience_stats(rollup: ExperienceRollup) -> ExperienceStats:
    """An experience's statistics: sums and mean exact, latency percentiles within the
    histogram's relative error (domain.rollups.RELATIVE_ERROR)."""
    totals = rollup.totals
    count = totals.event_count
    # A latency of 0 is one never reported: the latency figures are over the others only.
    reported = count - rollup.latency_buckets.get(0, 0)
    timed = {bucket: n for bucket, n in rollup.latency_buckets.items() if bucket}
    return ExperienceStats(
        cost_input_nanos=totals.cost_input_nanos,
        cost_output_nanos=totals.cost_output_nanos,
        cost_total_nanos=totals.cost_total_nanos,
        event_count=count,
        failed_event_count=totals.failed_event_count,
        unpriced_event_count=totals.unpriced_event_count,
        latency_mean_ms=rollup.latency_sum_ms / reported if reported else 0.0,
        latency_p50_ms=histogram_percentile(timed, 0.50),
        latency_p95_ms=histogram_percentile(timed, 0.95),
        latency_reported_event_count=reported,
        first_event_time_us=rollup.first_event_time_us,
        last_event_time_us=rollup.last_event_time_us,
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
    )


def _day_up(time_us: int) -> int:
    return -(-time_us // DAY_US) * DAY_US


def split_window(
    start_us: int | None, end_us: int | None
) -> tuple[tuple[int | None, int | None] | None, list[tuple[int, int]]]:
    """A stats window as the whole days the type rollup answers (None when no whole day is
    inside) and the partial days at its edges, answered from the experiences themselves."""
    start_day = None if start_us is None else _day_up(start_us)
    end_day = None if end_us is None else end_us - end_us % DAY_US
    edges: list[tuple[int, int]] = []
    if start_us is not None and end_us is not None and start_day is not None and end_day is not None:
        if end_day <= start_day:  # no whole day inside: the window's experiences alone
            return None, [(start_us, end_us)] if start_us < end_us else []
        edges = [(start_us, start_day), (end_day, end_us)]
    else:
        if start_us is not None and start_day is not None:
            edges.append((start_us, start_day))
        if end_us is not None and end_day is not None:
            edges.append((end_day, end_us))
    return (start_day, end_day), [(low, high) for low, high in edges if low < high]

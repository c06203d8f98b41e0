"""Statistics from the rollups: exact integer money, nearest-rank percentiles found through histograms."""

from __future__ import annotations

import math

from sqlalchemy.ext.asyncio import AsyncConnection

from ..storage import repository as repo
from .models import CostDistribution, ExperienceStats, TypeStats
from .money import divide_half_even
from .rollups import DAY_US, bucket_bounds, bucket_nanos, cost_bucket, histogram_percentile, histogram_rank


def nearest_rank(count: int, fraction: float) -> int:
    """The rank (from 1) of the nearest-rank percentile among `count` sorted values."""
    return max(1, math.ceil(fraction * count))


def experience_stats(rollup: repo.ExperienceRollup) -> ExperienceStats:
    """An experience's statistics: sums and mean exact, latency percentiles within the
    histogram's relative error (domain.rollups.RELATIVE_ERROR)."""
    totals = rollup.totals
    count = totals.event_count
    return ExperienceStats(
        cost_input_nanos=totals.cost_input_nanos,
        cost_output_nanos=totals.cost_output_nanos,
        cost_total_nanos=totals.cost_total_nanos,
        event_count=count,
        failed_event_count=totals.failed_event_count,
        unpriced_event_count=totals.unpriced_event_count,
        latency_mean_ms=rollup.latency_sum_ms / count if count else 0.0,
        latency_p50_ms=histogram_percentile(rollup.latency_buckets, 0.50),
        latency_p95_ms=histogram_percentile(rollup.latency_buckets, 0.95),
        first_event_time_us=rollup.first_event_time_us,
        last_event_time_us=rollup.last_event_time_us,
    )


def _day_up(time_us: int) -> int:
    return -(-time_us // DAY_US) * DAY_US


async def _costs(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> dict[int, repo.VersionCosts]:
    """Per version, the sums and cost histogram of the experiences whose first event is in
    the window: whole days from the type rollup, a partial day at either edge from its
    experiences themselves."""
    start_day = None if start_us is None else _day_up(start_us)
    end_day = None if end_us is None else end_us - end_us % DAY_US
    if start_us is not None and end_us is not None and start_day is not None and end_day is not None:
        if end_day <= start_day:  # no whole day inside: the window's experiences alone
            costs: dict[int, repo.VersionCosts] = {}
            edges = [(start_us, end_us)]
        else:
            costs = await repo.type_costs(conn, type_id, version, start_day, end_day)
            edges = [(start_us, start_day), (end_day, end_us)]
    else:
        costs = await repo.type_costs(conn, type_id, version, start_day, end_day)
        edges = []
        if start_us is not None and start_day is not None:
            edges.append((start_us, start_day))
        if end_us is not None and end_day is not None:
            edges.append((end_day, end_us))
    edges = [(low, high) for low, high in edges if low < high]
    for edge_start, edge_end in edges:
        for state in await repo.experience_costs(conn, type_id, version, edge_start, edge_end):
            entry = costs.setdefault(state.version, repo.VersionCosts(state.version))
            entry.experience_count += 1
            entry.event_count += state.event_count
            entry.unpriced_event_count += state.unpriced_event_count
            entry.total_nanos += state.cost_total_nanos
            bucket = cost_bucket(state.cost_total_nanos)
            entry.buckets[bucket] = entry.buckets.get(bucket, 0) + 1
    return costs


async def type_stats(
    conn: AsyncConnection, name: str, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> TypeStats:
    """The cost distribution of a type's experiences, in total and per version, from the type
    rollup: money, counts, mean, max and the nearest-rank percentiles all exact."""
    by_version = await _costs(conn, type_id, version, start_us, end_us)

    async def distribution(selected: list[repo.VersionCosts], only_version: int) -> CostDistribution:
        count = sum(v.experience_count for v in selected)
        if not count:
            return CostDistribution()
        total = sum(v.total_nanos for v in selected)
        buckets: dict[int, int] = {}
        for v in selected:
            for bucket, n in v.buckets.items():
                buckets[bucket] = buckets.get(bucket, 0) + n
        highest = await repo.max_experience_cost(conn, type_id, only_version, start_us, end_us)

        async def at(fraction: float) -> int:
            """Exact: the histogram names the bucket of the rank, the cost index is walked
            within that bucket's range only (its representative value if the rollup and the
            experiences moved apart meanwhile)."""
            rank = nearest_rank(count, fraction)
            bucket, below = histogram_rank(buckets, rank)
            low, high = bucket_bounds(bucket)
            exact = await repo.experience_cost_in_range(
                conn, type_id, only_version, start_us, end_us, low, high, rank - below
            )
            return exact if exact is not None else min(highest, bucket_nanos(bucket))

        return CostDistribution(
            experience_count=count,
            event_count=sum(v.event_count for v in selected),
            unpriced_event_count=sum(v.unpriced_event_count for v in selected),
            total_nanos=total,
            mean_nanos=divide_half_even(total, count),
            p50_nanos=await at(0.50),
            p95_nanos=await at(0.95),
            max_nanos=highest,
        )

    ordered = [by_version[v] for v in sorted(by_version)]
    versions = {v.version: await distribution([v], v.version) for v in ordered}
    if version or len(versions) == 1:
        total = next(iter(versions.values()), CostDistribution())
    else:
        total = await distribution(ordered, 0)
    return TypeStats(name=name, total=total, by_version=versions)

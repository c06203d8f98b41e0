"""Statistics from the rollups: exact integer money, nearest-rank percentiles."""

from __future__ import annotations

import math

from sqlalchemy.ext.asyncio import AsyncConnection

from ..storage import repository as repo
from .models import CostDistribution, ExperienceStats, TypeStats
from .money import divide_half_even
from .rollups import histogram_percentile


def nearest_rank(count: int, fraction: float) -> int:
    """The rank (from 1) of the nearest-rank percentile among `count` sorted values."""
    return max(1, math.ceil(fraction * count))


def experience_stats(rollup: repo.ExperienceRollup) -> ExperienceStats:
    """An experience's statistics: sums and mean exact, latency percentiles within the
    histogram's relative error (domain.rollups.LATENCY_RELATIVE_ERROR)."""
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


async def type_stats(
    conn: AsyncConnection, name: str, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> TypeStats:
    """The cost distribution of a type's experiences, in total and per version, from their
    rollups: sums in one pass, each percentile by walking the cost index to its rank."""
    by_version = await repo.cost_by_version(conn, type_id, version, start_us, end_us)

    async def distribution(selected: list[repo.VersionCosts], only_version: int) -> CostDistribution:
        count = sum(v.experience_count for v in selected)
        total = sum(v.total_nanos for v in selected)
        if not count:
            return CostDistribution()

        async def at(fraction: float) -> int:
            rank = nearest_rank(count, fraction)
            return await repo.experience_cost_at_rank(conn, type_id, only_version, start_us, end_us, rank)

        return CostDistribution(
            experience_count=count,
            event_count=sum(v.event_count for v in selected),
            unpriced_event_count=sum(v.unpriced_event_count for v in selected),
            total_nanos=total,
            mean_nanos=divide_half_even(total, count),
            p50_nanos=await at(0.50),
            p95_nanos=await at(0.95),
            max_nanos=await at(1.0),
        )

    versions = {v.version: await distribution([v], v.version) for v in by_version}
    if version or len(versions) == 1:
        total = next(iter(versions.values()), CostDistribution())
    else:
        total = await distribution(by_version, 0)
    return TypeStats(name=name, total=total, by_version=versions)

"""GetExperienceTypeStats and CompareVersions: the cost distribution of a type's
experiences, their outcomes and steps, read from the type rollups (whole days) and the
experiences at the window's edges."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain.compare import PercentileKey, VersionSummary, VersionSums, percentiles_needed, summarize, version_sums
from ..domain.models import CostDistribution, TypeStats
from ..domain.money import divide_half_even
from ..domain.outcomes import OutcomeDefinition
from ..domain.rollups import DAY_US, TypeDeltas, bucket_bounds, bucket_nanos, count, histogram_rank
from ..domain.stats import nearest_rank, split_window
from ..storage import statistics as stored_statistics


async def unbounded_if_whole(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> tuple[int | None, int | None]:
    """The window, or no window when it holds every day the type's runs started on: the
    same runs, read without a bound that keeps the cost index from answering directly
    (measured: GetExperienceTypeStats with outcomes over a 90-day window at 1,000,000
    events, 363 ms with the bound against 35 ms without)."""
    if start_us is None and end_us is None:
        return None, None
    extent = await stored_statistics.day_extent(conn, type_id, version)
    if extent is None:
        return start_us, end_us
    first, last = extent
    if (start_us is None or start_us <= first) and (end_us is None or end_us >= last + DAY_US):
        return None, None
    return start_us, end_us


async def type_stats(
    conn: AsyncConnection,
    name: str,
    type_id: int,
    version: int,
    start_us: int | None,
    end_us: int | None,
    sums: dict[int, VersionSums],
    with_total: bool = True,
) -> TypeStats:
    """The cost distribution of a type's experiences, in total (unless not `with_total`,
    when it is read only for a single version) and per version, from the window's sums
    (window_sums): money, counts, mean, max and the nearest-rank percentiles all exact."""

    async def distribution(selected: list[VersionSums], only_version: int) -> CostDistribution:
        count = sum(v.totals.experience_count for v in selected)
        if not count:
            return CostDistribution()
        total = sum(v.totals.cost_total_nanos for v in selected)
        buckets: dict[int, int] = {}
        for v in selected:
            for bucket, n in v.buckets.items():
                buckets[bucket] = buckets.get(bucket, 0) + n
        highest = await stored_statistics.max_experience_cost(conn, type_id, only_version, start_us, end_us)
        walk = functools.partial(
            stored_statistics.experience_cost_in_range, conn, type_id, only_version, start_us, end_us
        )
        return CostDistribution(
            experience_count=count,
            event_count=sum(v.totals.event_count for v in selected),
            unpriced_event_count=sum(v.totals.unpriced_event_count for v in selected),
            failed_event_count=sum(v.totals.failed_event_count for v in selected),
            total_nanos=total,
            mean_nanos=divide_half_even(total, count),
            p50_nanos=await _exact_percentile(buckets, 0.50, walk, highest),
            p95_nanos=await _exact_percentile(buckets, 0.95, walk, highest),
            max_nanos=highest,
        )

    ordered = [sums[v] for v in sorted(sums)]
    versions = {v.version: await distribution([v], v.version) for v in ordered}
    if version or len(versions) == 1:
        total = next(iter(versions.values()), CostDistribution())
    else:
        total = await distribution(ordered, 0) if with_total else CostDistribution()
    return TypeStats(name=name, total=total, by_version=versions)


async def window_sums(
    conn: AsyncConnection, type_id: int, version: int, start_us: int | None, end_us: int | None
) -> dict[int, VersionSums]:
    """Per version, the type rollups' sums (with outcomes and steps) over the runs whose first
    event is in the window: whole days from the rollups, a partial day at either edge from
    its runs themselves, counted as the writer counts them."""
    days, edges = split_window(start_us, end_us)
    sums = TypeDeltas() if days is None else await stored_statistics.type_sums(conn, type_id, version, *days)
    for edge_start, edge_end in edges:
        for state in await stored_statistics.edge_states(conn, type_id, version, edge_start, edge_end):
            count(sums, state, 1)
    return version_sums(sums)


async def _exact_percentile(
    buckets: dict[int, int],
    fraction: float,
    walk: Callable[[int, int, int], Awaitable[int | None]],
    highest: int | None = None,
) -> int:
    """The nearest-rank percentile of the runs a histogram counts, exact: the histogram names
    the bucket of the rank, `walk(low, high, offset)` finds the run within that bucket's
    range (its representative value, at most `highest`, if the rollup and the runs moved
    apart meanwhile)."""
    total = sum(buckets.values())
    if not total:
        return 0
    rank = nearest_rank(total, fraction)
    bucket, below = histogram_rank(buckets, rank)
    low, high = bucket_bounds(bucket)
    exact = await walk(low, high, rank - below)
    if exact is not None:
        return exact
    return bucket_nanos(bucket) if highest is None else min(highest, bucket_nanos(bucket))


async def summaries(
    conn: AsyncConnection,
    type_id: int,
    start_us: int | None,
    end_us: int | None,
    sums: dict[int, VersionSums],
    definitions: Sequence[OutcomeDefinition],
    known: Mapping[int, CostDistribution] | None = None,
    of_outcomes: bool = True,
) -> dict[int, VersionSummary]:
    """Each version's summary: its sums, and the percentiles of its runs' costs (of all of
    them, taken from `known` where it has the version, and unless not `of_outcomes`, of
    those that met and missed each outcome's goal), exact."""
    declared = {d.name: d for d in definitions}
    found = {}
    for version, of_version in sorted(sums.items()):
        percentiles: dict[PercentileKey, int] = {}
        for key in percentiles_needed(of_version, definitions):
            name, verdict, fraction = key
            walk: Callable[[int, int, int], Awaitable[int | None]]
            if verdict is None and known and version in known:  # read already: no second walk
                of_runs = known[version]
                percentiles[key] = of_runs.p50_nanos if fraction == 0.50 else of_runs.p95_nanos
                continue
            if verdict is not None and not of_outcomes:
                continue
            if verdict is None:
                buckets = of_version.buckets
                walk = functools.partial(
                    stored_statistics.experience_cost_in_range, conn, type_id, version, start_us, end_us
                )
            else:
                buckets = of_version.outcome_buckets.get((name, verdict), {})
                walk = functools.partial(
                    stored_statistics.scored_cost_in_range,
                    conn,
                    type_id,
                    version,
                    start_us,
                    end_us,
                    declared[name],
                    verdict,
                )
            percentiles[key] = await _exact_percentile(buckets, fraction, walk)
        found[version] = summarize(of_version, definitions, percentiles)
    return found

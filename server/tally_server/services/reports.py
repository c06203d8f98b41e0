"""Cost breakdowns: cost and events over a window of event time, grouped by one or two
dimensions, the most expensive group first."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..domain import compare, paging
from ..domain.compare import VersionSums
from ..domain.errors import Violations
from ..domain.models import ALL_EVENTS, CostFilter, CostGroup, CostTotals, Page
from ..domain.rollups import DAY_US
from ..domain.validation import TEXT_MAX, check_name, utf8_length
from ..storage import reports as stored_reports, types as stored_types
from ..storage.db import Database
from .experience_types import type_not_found
from .type_stats import summaries, unbounded_if_whole, window_sums

DIMENSIONS = (
    "experience_name",
    "experience_version",
    "category",
    "resource",
    "model",
    "user_id",
    "request_tag",
    "step",
    "api_key_name",
    "day",
    "hour",
)
# The key columns of each dimension, in the order storage returns them.
_KEY_NAMES = {"experience_version": ("experience_name", "experience_version")}


class Reports:
    def __init__(self, db: Database, pages: paging.PageTokens | None = None) -> None:
        self.db = db
        self.pages = pages or paging.PageTokens()

    async def compare(
        self, experience_name: str, baseline: int, candidate: int, start_us: int | None, end_us: int | None
    ) -> compare.Comparison:
        return await compare_versions(self.db, experience_name, baseline, candidate, start_us, end_us)

    async def breakdown(
        self,
        group_by: Sequence[str],
        start_us: int | None,
        end_us: int | None,
        f: CostFilter = ALL_EVENTS,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[Page, CostGroup]:
        """A page of groups (CostGroup) of the filter's events and their total over the window."""
        v = Violations()
        if not 1 <= len(group_by) <= 2:
            v.add("group_by", f"one or two dimensions, got {len(group_by)}")
        elif len(set(group_by)) != len(group_by):
            v.add("group_by", "the dimensions must differ")
        elif {"day", "hour"} <= set(group_by):
            v.add("group_by", "day and hour do not go together")
        for i, dimension in enumerate(group_by):
            if dimension not in DIMENSIONS:
                v.add(f"group_by[{i}]", f"not a dimension: {dimension!r}")
        check_filter(v, f)
        if start_us is not None and end_us is not None and end_us <= start_us:
            v.add("end_time", "must be after start_time")
        v.raise_if_any()
        size = paging.page_size(page_size)
        filters = [list(group_by), start_us, end_us, *dataclasses.astuple(f)]
        offset = self.pages.decode(
            page_token, "cost_breakdown", filters, lambda p: isinstance(p, int) and not isinstance(p, bool) and p >= 0
        )
        offset = offset or 0
        async with self.db.read() as conn:
            groups = await stored_reports.cost_breakdown(conn, group_by, start_us, end_us, f)
            if "request_tag" in group_by:
                whole = await stored_reports.cost_breakdown(conn, (), start_us, end_us, f)
                total = whole.get((), CostTotals())
            else:
                total = _sum(groups.values())
        names = [name for dimension in group_by for name in _KEY_NAMES.get(dimension, (dimension,))]
        ordered = sorted(groups.items(), key=lambda item: (-item[1].cost_total_nanos, _sortable(item[0])))
        page = [
            CostGroup(dict(zip(names, key, strict=True)), totals) for key, totals in ordered[offset : offset + size]
        ]
        token = self.pages.encode("cost_breakdown", filters, offset + size) if len(ordered) > offset + size else ""
        return Page(page, token), CostGroup({}, total)

    async def top_spend_by_day(
        self, dimension: str, start_us: int, end_us: int, top: int, f: CostFilter = ALL_EVENTS
    ) -> TopSpend:
        """The `top` costliest groups of a rollup dimension (ranked over the window's whole
        hours, in the database), their spend per day, and the others' per day, of the
        filter's events: three reads whose answers are bounded by `top` and the window's days."""
        names = list(_KEY_NAMES.get(dimension, (dimension,)))
        v = Violations()
        check_filter(v, f)
        v.raise_if_any()
        async with self.db.read() as conn:
            chosen = await stored_reports.costliest_groups(conn, dimension, start_us, end_us, top + 1, f)
            kept = chosen[:top]
            by_day = await stored_reports.cost_breakdown(conn, [dimension, "day"], start_us, end_us, f, kept)
            days = await stored_reports.cost_breakdown(conn, ["day"], start_us, end_us, f)
        width = len(names)
        groups = [
            CostGroup({**dict(zip(names, key[:width], strict=True)), "day": key[width]}, totals)
            for key, totals in sorted(by_day.items(), key=lambda item: _sortable(item[0]))
        ]
        kept_by_day: dict[Any, CostTotals] = {}
        for key, totals in by_day.items():
            kept_by_day.setdefault(key[width], CostTotals()).add(totals)
        other = []
        for (day,), totals in sorted(days.items()):
            rest = dataclasses.replace(totals)
            rest.subtract(kept_by_day.get(day, CostTotals()))
            if rest.event_count:
                other.append(CostGroup({"day": day}, rest))
        return TopSpend(groups, other, CostGroup({}, _sum(days.values())), len(chosen) > top)

    async def window_total(self, start_us: int, end_us: int, f: CostFilter) -> CostTotals:
        """The filter's events in [start_us, end_us) summed (from the rollups where one
        keeps the filter, as the breakdown reads them)."""
        v = Violations()
        check_filter(v, f)
        v.raise_if_any()
        async with self.db.read() as conn:
            return _sum((await stored_reports.cost_breakdown(conn, (), start_us, end_us, f)).values())

    async def window_summary(self, start_us: int, end_us: int, f: CostFilter) -> WindowSummary:
        """The filter's events in [start_us, end_us) summed, and its runs: those whose first
        event is in the window (whole UTC days, no filter but type and version: from the type
        rollup); with a user filter, those with one of its events in the window, read from the
        user's events (ix_events_user_time) when they are at most RUNS_COUNTED_EVENTS; else not
        counted (no rollup knows the runs of a model or a tag: counting them would read every
        event of the window)."""
        v = Violations()
        check_filter(v, f)
        v.raise_if_any()
        async with self.db.read() as conn:
            totals = _sum((await stored_reports.cost_breakdown(conn, (), start_us, end_us, f)).values())
            by_rollup = not (f.category or f.model or f.of_events_only)
            if by_rollup and start_us % DAY_US == 0 and end_us % DAY_US == 0:
                runs, cost = await stored_reports.runs_started(conn, start_us, end_us, f)
                return WindowSummary(totals, runs, cost, True)
            if not f.user_id:
                why = "no rollup knows the runs of a provider, model or tag"
                return WindowSummary(totals, None, 0, False, why)
            if totals.event_count > RUNS_COUNTED_EVENTS:
                why = f"the user has more than {RUNS_COUNTED_EVENTS:,} events in the window"
                return WindowSummary(totals, None, 0, False, why)
            touched = await stored_reports.runs_touched(conn, start_us, end_us, f)
        return WindowSummary(totals, touched, totals.cost_total_nanos, False)


# The summary counts a user's runs from the user's events in the window up to this many.
RUNS_COUNTED_EVENTS = 20_000


@dataclasses.dataclass(frozen=True)
class WindowSummary:
    """What the dashboard's tiles show of a window: the filter's events, and its runs."""

    totals: CostTotals
    runs: int | None  # None: not counted (why_not_counted says why)
    run_cost_nanos: int  # what those runs cost in all: the cost per run's numerator
    runs_started: bool  # runs counted by their first event (else: runs with an event in the window)
    why_not_counted: str = ""  # when runs is None


def check_filter(v: Violations, f: CostFilter) -> None:
    """Adds a violation for each filter field a breakdown refuses (named as the request's)."""
    if f.experience_name:
        check_name(v, "experience_name", f.experience_name, what="experience type name")
    if f.experience_version < 0:
        v.add("experience_version", "must be 0 (all versions) or a version number")
    elif f.experience_version and not f.experience_name:
        v.add("experience_version", "a version is of a type: give experience_name too")
    for name in ("category", "model", "user_id", "request_tag"):
        if utf8_length(getattr(f, name)) > TEXT_MAX:
            v.add(name, f"at most {TEXT_MAX} bytes")


def _sum(all_totals: Any) -> CostTotals:
    total = CostTotals()
    for totals in all_totals:
        total.add(totals)
    return total


def _sortable(key: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    """A group's keys as a total order (text and numbers apart)."""
    return tuple((0, k) if isinstance(k, int) else (1, str(k)) for k in key)


@dataclasses.dataclass(frozen=True)
class TopSpend:
    """Spend per day of the costliest groups of a dimension, the rest as "other": bounded
    however many groups callers' names made."""

    groups: list[CostGroup]  # per (group, day), of the top groups only
    other: list[CostGroup]  # per day, of every group not among them
    total: CostGroup
    other_groups: bool  # whether any group was left out of `groups`


async def compare_versions(
    db: Database, experience_name: str, baseline: int, candidate: int, start_us: int | None, end_us: int | None
) -> compare.Comparison:
    """Two versions of a type over their runs whose first event is in the window."""
    v = Violations()
    check_name(v, "experience_name", experience_name, what="experience type name")
    for field_name, version in (("baseline_version", baseline), ("candidate_version", candidate)):
        if version < 1:
            v.add(field_name, f"must be a version number, from 1; got {version}")
    if baseline == candidate and baseline >= 1:
        v.add("candidate_version", f"is the baseline version ({baseline}): compare two versions")
    if start_us is not None and end_us is not None and end_us <= start_us:
        v.add("end_time", "must be after start_time")
    v.raise_if_any()
    async with db.read() as conn:
        found = await stored_types.get_type(conn, experience_name)
        if found is None:
            raise type_not_found(experience_name)
        type_id, experience_type = found
        for field_name, version in (("baseline_version", baseline), ("candidate_version", candidate)):
            if version > experience_type.version:
                v.add(field_name, f"{experience_name!r} has versions 1 to {experience_type.version}; got {version}")
        v.raise_if_any()
        start_us, end_us = await unbounded_if_whole(conn, type_id, 0, start_us, end_us)
        sums = await window_sums(conn, type_id, 0, start_us, end_us)
        chosen = {v: sums.get(v, VersionSums(v)) for v in (baseline, candidate)}
        summarized = await summaries(conn, type_id, start_us, end_us, chosen, experience_type.outcomes)
    return compare.compare(
        chosen[baseline], summarized[baseline], chosen[candidate], summarized[candidate], experience_type.outcomes
    )

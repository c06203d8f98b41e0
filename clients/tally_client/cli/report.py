"""`tally report`: what experiences, types and windows cost."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tally.v1 import (
    experience_type_service_pb2 as et_pb,
    report_service_pb2 as report_pb,
)

from ..client import TallyClient
from ..output import money, table
from .common import Commands, _emit, _more, _time
from .experiences import experiences_get


def report_type(tally: TallyClient, args: argparse.Namespace) -> None:
    stats = tally.get_experience_type_stats(
        args.name, version=args.version, start=_time(args.since), end=_time(args.until)
    )

    def row(label: str, d: et_pb.CostDistribution) -> list[object]:
        return [
            label,
            f"{d.experience_count:,}",
            f"{d.event_count:,}",
            money(d.total_cost),
            money(d.mean_cost_per_experience),
            money(d.p50_cost_per_experience),
            money(d.p95_cost_per_experience),
            money(d.max_cost_per_experience),
        ]

    rows = [row(f"v{v.version}", v.stats) for v in stats.versions] + [row("all", stats.total)]
    headers = ["VERSION", "EXPERIENCES", "EVENTS", "TOTAL", "MEAN/EXP", "P50/EXP", "P95/EXP", "MAX/EXP"]
    _emit(args, stats, f"cost of {args.name} per experience\n" + table(headers, rows))


def report_experience(tally: TallyClient, args: argparse.Namespace) -> None:
    experiences_get(tally, args)


def _with_empty_periods(groups: list[Any], unit: str, start: datetime, end: datetime) -> list[Any]:
    """The groups of a breakdown by day or hour, with a zero group for every period of the
    window that had no event (UTC periods, as the server keys them)."""
    step = timedelta(days=1) if unit == "day" else timedelta(hours=1)
    moment = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if unit == "day":
        moment = moment.replace(hour=0)
    by_start = {g.period_start.seconds: g for g in groups}
    filled = []
    while moment < end:
        seconds = int(moment.timestamp())
        group = by_start.pop(seconds, None)
        if group is None:
            group = report_pb.CostGroup()
            group.period_start.FromDatetime(moment)
        filled.append(group)
        moment += step
    return filled + sorted(by_start.values(), key=lambda g: g.period_start.seconds)


def report_breakdown(tally: TallyClient, args: argparse.Namespace) -> None:
    by = args.by or ["model"]
    end = _time(args.until) or datetime.now().astimezone()
    start = _time(args.since) or end - timedelta(days=args.days)
    response = tally.break_down_cost(
        by, start=start, end=end, experience_name=args.type or "", page_size=args.limit, page_token=args.page_token
    )
    columns: dict[str, tuple[str, Callable[[Any], str]]] = {
        "type": ("TYPE", lambda g: g.experience_name or "(unattributed)"),
        "version": ("TYPE VERSION", lambda g: f"{g.experience_name or '(unattributed)'} v{g.experience_version}"),
        "category": ("CATEGORY", lambda g: g.category),
        "model": ("MODEL", lambda g: g.model),
        "resource": ("RESOURCE", lambda g: g.resource),
        "user": ("USER", lambda g: g.user_id or "-"),
        "tag": ("TAG", lambda g: g.request_tag or "-"),
        "day": ("DAY", lambda g: g.period_start.ToDatetime().strftime("%Y-%m-%d")),
        "hour": ("HOUR", lambda g: g.period_start.ToDatetime().strftime("%Y-%m-%d %H:00")),
    }
    headers = [columns[name][0] for name in by] + ["EVENTS", "NOT PRICED", "COST"]

    def row(g: Any, keys: list[str]) -> list[object]:
        return [*keys, f"{g.event_count:,}", f"{g.unpriced_event_count:,}", money(g.cost_total)]

    groups = list(response.groups)
    timed = next((name for name in by if name in ("day", "hour")), None)
    if timed is not None:  # by time: in time order, every period of the window shown
        groups.sort(key=lambda g: (g.period_start.seconds, -(g.cost_total.units * 10**9 + g.cost_total.nanos)))
        if by == [timed] and not response.next_page_token:
            groups = _with_empty_periods(groups, timed, start, end)
    rows = [row(g, [columns[name][1](g) for name in by]) for g in groups]
    total = response.total
    rows.append(row(total, ["total"] + [""] * (len(by) - 1)))
    window = f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M}"
    _emit(args, response, f"cost by {', '.join(by)}, {window} (UTC periods)\n" + table(headers, rows))
    flags = " ".join(f"--by {name}" for name in by)
    _more(
        args,
        response.next_page_token,
        f"tally report breakdown {flags} --since {start.isoformat()} --until {end.isoformat()}",
    )


def add_commands(commands: Commands, client: argparse.ArgumentParser) -> None:
    """`tally report ...`."""
    reports = commands.add_parser("report", help="cost reports").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = reports.add_parser("experience", parents=[client], help="the cost of one experience")
    p.add_argument("id")
    p.set_defaults(remote=report_experience)
    p = reports.add_parser("type", parents=[client], help="the cost per experience of a type, by version")
    p.add_argument("name")
    p.add_argument("--version", type=int, default=0, help="only this version")
    p.add_argument("--since", help="only experiences whose first event is at or after this ISO 8601 time")
    p.add_argument("--until", help="only experiences whose first event is before this ISO 8601 time")
    p.set_defaults(remote=report_type)
    p = reports.add_parser(
        "breakdown",
        parents=[client],
        help="cost over a window by one or two dimensions, most expensive first (by day or hour: in time order)",
    )
    p.add_argument(
        "--by",
        action="append",
        choices=["type", "version", "category", "model", "resource", "user", "tag", "day", "hour"],
        help="a dimension; give it once or twice (default: model, the price entry's, so that "
        "dated snapshots count under their model; resource: the name as sent)",
    )
    p.add_argument("--days", type=int, default=30, help="without --since: the last this many days (default 30)")
    p.add_argument("--since", help="from this ISO 8601 time")
    p.add_argument("--until", help="to this ISO 8601 time (default now)")
    p.add_argument("--type", help="only events of this experience type")
    p.add_argument("--limit", type=int, default=50, help="at most this many groups (default 50)")
    p.add_argument("--page-token", default="", help="the page after the one that printed this token")
    p.set_defaults(remote=report_breakdown)

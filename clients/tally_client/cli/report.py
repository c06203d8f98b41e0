"""`tally report`: what experiences, types and windows cost."""

from __future__ import annotations

import argparse
import re
import sys
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
        by,
        start=start,
        end=end,
        experience_name=args.type or "",
        experience_version=args.version,
        category=args.provider or "",
        model=args.model or "",
        user_id=args.user or "",
        request_tag=args.tag or "",
        page_size=args.limit,
        page_token=args.page_token,
    )
    columns: dict[str, tuple[str, Callable[[Any], str]]] = {
        "type": ("TYPE", lambda g: g.experience_name or "(unattributed)"),
        "version": ("TYPE VERSION", lambda g: f"{g.experience_name or '(unattributed)'} v{g.experience_version}"),
        "category": ("CATEGORY", lambda g: g.category),
        "model": ("MODEL", lambda g: g.model),
        "resource": ("RESOURCE", lambda g: g.resource),
        "user": ("USER", lambda g: g.user_id or "-"),
        "tag": ("TAG", lambda g: g.request_tag or "-"),
        "step": ("STEP", lambda g: g.step or "-"),
        "key": ("API KEY", lambda g: g.api_key_name or "(no key)"),
        "day": ("DAY", lambda g: g.period_start.ToDatetime().strftime("%Y-%m-%d")),
        "hour": ("HOUR", lambda g: g.period_start.ToDatetime().strftime("%Y-%m-%d %H:00")),
    }
    headers = [columns[name][0] for name in by] + ["EVENTS", "NOT PRICED", "TOKENS IN", "TOKENS OUT", "COST"]

    def row(g: Any, keys: list[str]) -> list[object]:
        counts = (g.event_count, g.unpriced_event_count, g.input_tokens, g.output_tokens)
        return [*keys, *(f"{n:,}" for n in counts), money(g.cost_total)]

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


# --fail-if METRIC OP CHANGE: CHANGE is a relative change (+10%), a change in percentage
# points (-2pt, for rates) or a plain difference in the metric's unit (USD, events).
_CONDITION = re.compile(r"^\s*([a-z0-9_]+(?::[A-Za-z0-9._-]+)?)\s*(>=|<=|>|<)\s*([+-]?\d+(?:\.\d+)?)(%|pt)?\s*$")
_OUTCOME_METRICS = ("success_rate", "cost_per_success")


def _condition_holds(text: str, differences: dict[str, Any], response: Any) -> tuple[bool, str]:
    """Whether a --fail-if condition holds, and its one-line reason. ValueError for one that
    does not parse or names no metric of the comparison."""
    match = _CONDITION.match(text)
    if match is None:
        raise ValueError(
            f"--fail-if takes METRIC OP CHANGE, e.g. 'cost_p95 > +10%' or 'success_rate < -2pt'; got {text!r}"
        )
    metric, op, number, unit = match.groups()
    if metric in _OUTCOME_METRICS:  # the first outcome that has it
        metric = next((name for name in differences if name.startswith(metric + ":")), metric)
    difference = differences.get(metric)
    if difference is None:
        raise ValueError(f"--fail-if {text!r}: no metric {metric!r} here (there are: {', '.join(differences)})")
    if not difference.enough_runs:
        runs = f"baseline {response.baseline.runs}, candidate {response.candidate.runs}"
        return False, f"{text.strip()}: not enough runs to tell ({runs}; each needs {response.min_runs})"
    if unit == "%":
        if not difference.HasField("relative"):
            return False, f"{text.strip()}: the baseline is 0, a relative change is not defined"
        value, shown = difference.relative * 100, f"{difference.relative * 100:+.1f}%"
    elif unit == "pt":
        value, shown = difference.delta * 100, f"{difference.delta * 100:+.1f}pt"
    else:
        value, shown = difference.delta, f"{difference.delta:+.6g}"
    threshold = float(number)
    holds = {">": value > threshold, "<": value < threshold, ">=": value >= threshold, "<=": value <= threshold}[op]
    interval = ""
    if difference.HasField("interval"):
        low, high = difference.interval.low, difference.interval.high
        interval = f", {response.confidence:.0%} interval of the difference {low:+.6g} to {high:+.6g}"
    said = "FAILS" if holds else "passes"
    return holds, (
        f"{text.strip()}: {said} at {shown} (v{response.baseline.version} {difference.baseline:.6g}, "
        f"v{response.candidate.version} {difference.candidate:.6g}{interval})"
    )


def report_compare(tally: TallyClient, args: argparse.Namespace) -> int:
    response = tally.compare_versions(
        args.name, baseline=args.baseline, candidate=args.candidate, start=_time(args.since), end=_time(args.until)
    )
    differences = {d.metric: d for d in response.differences}
    verdicts = [_condition_holds(text, differences, response) for text in args.fail_if or ()]
    rows = []
    for d in response.differences:
        relative = f"{d.relative * 100:+.1f}%" if d.HasField("relative") else "-"
        interval = f"{d.interval.low:+.4g} to {d.interval.high:+.4g}" if d.HasField("interval") else "-"
        if not d.enough_runs:
            interval = "not enough runs"
        rows.append([d.metric, f"{d.baseline:.6g}", f"{d.candidate:.6g}", f"{d.delta:+.6g}", relative, interval])
    headers = [
        "METRIC",
        f"v{args.baseline}",
        f"v{args.candidate}",
        "DELTA",
        "CHANGE",
        f"{response.confidence:.0%} INTERVAL",
    ]
    runs = f"{response.baseline.runs:,} and {response.candidate.runs:,} runs"
    human = f"{args.name}: v{args.candidate} against v{args.baseline} ({runs})\n" + table(headers, rows)
    _emit(args, response, human)
    for holds, reason in verdicts:
        print(reason, file=sys.stderr if holds else sys.stdout)
    return 1 if any(holds for holds, _ in verdicts) else 0


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
        choices=["type", "version", "category", "model", "resource", "user", "tag", "step", "key", "day", "hour"],
        help="a dimension; give it once or twice (default: model, the price entry's, so that "
        "dated snapshots count under their model; resource: the name as sent)",
    )
    p.add_argument("--days", type=int, default=30, help="without --since: the last this many days (default 30)")
    p.add_argument("--since", help="from this ISO 8601 time")
    p.add_argument("--until", help="to this ISO 8601 time (default now)")
    p.add_argument("--type", help="only events of this experience type")
    p.add_argument("--version", type=int, default=0, help="with --type: only events of this version")
    p.add_argument("--provider", help="only events of this category, e.g. system.openai")
    p.add_argument("--model", help="only events this model's price entry priced")
    p.add_argument("--user", help="only events of this user id (reads the window's events)")
    p.add_argument("--tag", help="only events carrying this request tag (reads the window's events)")
    p.add_argument("--limit", type=int, default=50, help="at most this many groups (default 50)")
    p.add_argument("--page-token", default="", help="the page after the one that printed this token")
    p.set_defaults(remote=report_breakdown)
    p = reports.add_parser(
        "compare",
        parents=[client],
        help="two versions of a type side by side: cost per run, failures, outcomes; a CI gate with --fail-if",
    )
    p.add_argument("name", help="the experience type")
    p.add_argument("--baseline", type=int, required=True, help="the version compared against")
    p.add_argument("--candidate", type=int, required=True, help="the version under judgement")
    p.add_argument("--since", help="only runs whose first event is at or after this ISO 8601 time")
    p.add_argument("--until", help="only runs whose first event is before this ISO 8601 time")
    p.add_argument(
        "--fail-if",
        action="append",
        metavar="CONDITION",
        help="exit 1 when it holds, e.g. 'cost_p95 > +10%%', 'success_rate < -2pt', 'cost_per_success > +10%%' "
        "(metrics: cost_per_run, cost_p50, cost_p95, events_per_run, failure_rate, success_rate[:OUTCOME], "
        "cost_per_success[:OUTCOME]); repeatable, one line of reason each",
    )
    p.set_defaults(remote=report_compare)

"""`tally experiences`: runs of a type."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..client import TallyClient
from ..output import money, table, when
from .common import Commands, _emit, _more, _pairs


def experiences_create(tally: TallyClient, args: argparse.Namespace) -> None:
    created = tally.create_experience(
        args.type, experience_id=args.id or "", version=args.version, properties=_pairs(args.property, "--property")
    )
    _emit(
        args,
        created,
        created.experience_id
        if not args.verbose
        else f"{created.experience_id} ({created.experience_name} v{created.experience_version})",
    )


def experiences_get(tally: TallyClient, args: argparse.Namespace) -> None:
    e = tally.get_experience(args.id)
    _emit(args, e, experience_report(e))


def experiences_list(tally: TallyClient, args: argparse.Namespace) -> None:
    page = tally.list_experiences(
        args.type, version=args.version, order_by=args.order_by, page_size=args.limit, page_token=args.page_token
    )
    rows = [
        [
            e.experience_id,
            e.experience_version,
            when(e.create_time),
            f"{e.stats.event_count:,}",
            money(e.stats.cost_total),
        ]
        for e in page.experiences
    ]
    headers = ["EXPERIENCE ID", "VERSION", "CREATED", "EVENTS", "COST"]
    _emit(args, page, table(headers, rows) if rows else f"no experiences of {args.type}")
    order = f" --order-by {args.order_by!r}" if args.order_by else ""
    _more(args, page.next_page_token, f"tally experiences list {args.type}{order} --limit {args.limit}")


def experiences_delete(tally: TallyClient, args: argparse.Namespace) -> None:
    unattributed = tally.delete_experience(args.id)
    if args.json:
        print(json.dumps({"unattributed_event_count": unattributed}))
    else:
        print(f"deleted experience {args.id}; {unattributed} event(s) kept as unattributed")


def _latencies(s: Any) -> str:
    """A run's latencies, of the events that reported one, or that none did (0 ms would read
    as instant)."""
    reported = s.latency_reported_event_count
    if not reported:
        return "not reported"
    of = f" (of the {reported:,} events that reported one)" if reported < s.event_count else ""
    return f"mean {s.latency_mean_ms:,.0f} ms, p50 {s.latency_p50_ms:,.0f} ms, p95 {s.latency_p95_ms:,.0f} ms{of}"


def experience_report(e: Any) -> str:
    s = e.stats
    rows = [
        ["experience", e.experience_id],
        ["type", f"{e.experience_name} (version {e.experience_version})"],
        ["cost", f"{money(s.cost_total)}  (input {money(s.cost_input)}, output {money(s.cost_output)})"],
        [
            "events",
            f"{s.event_count:,}  ({s.failed_event_count:,} failed, {s.unpriced_event_count:,} not fully priced)",
        ],
        ["tokens", f"{s.input_tokens:,} in, {s.output_tokens:,} out"],
        ["latency", _latencies(s)],
        ["first event", when(s.first_event_time)],
        ["last event", when(s.last_event_time)],
    ]
    if e.properties:
        rows.append(["properties", ", ".join(f"{k}={v}" for k, v in sorted(e.properties.items()))])
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def add_commands(commands: Commands, client: argparse.ArgumentParser) -> None:
    """`tally experiences ...`."""
    exps = commands.add_parser("experiences", help="experiences").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = exps.add_parser("create", parents=[client], help="create an experience; prints its id")
    p.add_argument("type", help="experience type name")
    p.add_argument("--id", help="your own UUID for it")
    p.add_argument("--version", type=int, default=0, help="pin a type version (default: current)")
    p.add_argument("--property", action="append", metavar="KEY=VALUE")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(remote=experiences_create)
    p = exps.add_parser("get", parents=[client], help="show an experience and its cost")
    p.add_argument("id")
    p.set_defaults(remote=experiences_get)
    p = exps.add_parser("list", parents=[client], help="list the experiences of a type, newest first")
    p.add_argument("type")
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument(
        "--order-by",
        default="",
        help='e.g. "cost_total desc" (the most expensive first), "event_count desc", "create_time" '
        "(default: newest first)",
    )
    p.add_argument("--page-token", default="", help="the page after the one that printed this token")
    p.set_defaults(remote=experiences_list)

    p = exps.add_parser("delete", parents=[client], help="delete an experience (its events are kept, unattributed)")
    p.add_argument("id")
    p.set_defaults(remote=experiences_delete)

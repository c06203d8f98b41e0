"""`tally events`: stored events, read back."""

from __future__ import annotations

import argparse
import json
import sys

from tally.v1 import (
    ingest_service_pb2 as ing_pb,
)

from .._calls import EventFilter
from ..client import TallyClient
from ..output import money, table, when
from .common import COST_STATES, Commands, _emit, _more, _state, _time


def events_list(tally: TallyClient, args: argparse.Namespace) -> None:
    filters = EventFilter(
        experience_id=args.experience_id or "",
        experience_name=args.type or "",
        experience_version=args.version,
        user_id=args.user or "",
        request_tag=args.tag or "",
        category=args.category or "",
        resource=args.resource or "",
        cost_state=COST_STATES[args.cost_state] if args.cost_state else ing_pb.COST_STATE_UNSPECIFIED,
        start=_time(args.since),
        end=_time(args.until),
    )
    page = tally.list_events(filters, page_size=args.limit, page_token=args.page_token)
    rows = [
        [
            when(e.event.event_timestamp),
            e.request_id,
            e.event.context.experience_name or "-",
            e.event.resource,
            money(e.xproxy_result.cost_total),
            _state(e.xproxy_result.cost_state),
            e.event.context.user_id or "-",
            "; ".join(dict.fromkeys(u.reason for u in e.xproxy_result.unknown_units)) or "-",
        ]
        for e in page.events
    ]
    headers = ["EVENT TIME", "REQUEST ID", "TYPE", "RESOURCE", "COST", "STATE", "USER", "WHY NOT PRICED"]
    _emit(args, page, table(headers, rows) if rows else "no events")
    _more(args, page.next_page_token, "tally events list " + " ".join(_repeatable(args)))


def _repeatable(args: argparse.Namespace) -> list[str]:
    """The filters of `tally events list` as flags, to print the next page's command."""
    flags = []
    for name in (
        "experience_id",
        "type",
        "version",
        "user",
        "tag",
        "category",
        "resource",
        "cost_state",
        "since",
        "until",
    ):
        value = getattr(args, name)
        if value:
            flags.append(f"--{name.replace('_', '-')} {json.dumps(value) if isinstance(value, str) else value}")
    return [*flags, f"--limit {args.limit}"]


def events_get(tally: TallyClient, args: argparse.Namespace) -> None:
    found = tally.get_event(args.request_id or "", idempotency_key=args.key or "")
    if args.json:
        _emit(args, found, "")
        return
    e, r = found.event, found.xproxy_result
    units = ", ".join(f"{unit} {c.input:,}/{c.output:,}" for unit, c in sorted(e.units.items()))
    rows = [
        ["request id", found.request_id],
        ["event time", when(e.event_timestamp)],
        ["stored", when(found.ingest_timestamp)],
        [
            "experience",
            f"{e.context.experience_id} ({e.context.experience_name} v{e.context.experience_version})"
            if e.context.experience_id
            else "- (unattributed)",
        ],
        ["resource", f"{e.category} {e.resource}"],
        ["units (in/out)", units or "-"],
        ["cost", f"{money(r.cost_total)}  (input {money(r.cost_input)}, output {money(r.cost_output)})"],
        [
            "cost state",
            _state(r.cost_state) + "".join(f"\n{' ' * 17}{u.unit_type}: {u.reason}" for u in r.unknown_units),
        ],
        [
            "latency",
            (f"{e.end_to_end_latency_ms:,} ms" if e.end_to_end_latency_ms else "not reported")
            + f", HTTP {e.http_status_code or '-'}",
        ],
        ["user", e.context.user_id or "-"],
        ["tags", ", ".join(e.context.request_tags) or "-"],
        ["idempotency key", e.idempotency_key or "-"],
    ]
    width = max(len(row[0]) for row in rows)
    print("\n".join(f"{label.ljust(width)}  {value}" for label, value in rows))


def events_prune(tally: TallyClient, args: argparse.Namespace) -> None:
    before = _time(args.before)
    if before is None:
        raise SystemExit("tally: --before needs an ISO 8601 date or time")
    deleted = 0
    while True:
        answer = tally.prune_events(before, max_events=args.batch)
        deleted += answer.deleted_event_count
        if not answer.more:
            break
        print(f"deleted {deleted:,} events so far", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"deletedEventCount": deleted, "beforeTime": answer.before_time.ToJsonString()}))
        return
    print(f"deleted {deleted:,} events before {when(answer.before_time)}; statistics and limits are unchanged")


def events_erase(tally: TallyClient, args: argparse.Namespace) -> None:
    deleted = 0
    while True:
        answer = tally.erase_user(args.user, max_events=args.batch)
        deleted += answer.deleted_event_count
        if not answer.more:
            break
        print(f"deleted {deleted:,} events of the user so far", file=sys.stderr, flush=True)
    if args.json:
        names = list(answer.deleted_limit_names)
        moved = answer.moved_rollup_row_count
        print(json.dumps({"deletedEventCount": deleted, "movedRollupRowCount": moved, "deletedLimitNames": names}))
        return
    limits = ", ".join(answer.deleted_limit_names)
    print(
        f"erased user {args.user!r}: {deleted:,} events deleted, {answer.moved_rollup_row_count:,} rows of spend by "
        f"user moved to no user (totals unchanged), "
        + (f"limits deleted: {limits}" if limits else "no limit was scoped to the user")
    )


def add_commands(commands: Commands, client: argparse.ArgumentParser) -> None:
    """`tally events ...`."""
    events = commands.add_parser("events", help="stored events, read back").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = events.add_parser("list", parents=[client], help="list stored events, newest first, with filters")
    p.add_argument("--experience-id", help="only this experience's events")
    p.add_argument("--type", help="only events of experiences of this type")
    p.add_argument("--version", type=int, default=0, help="with --type: only this version")
    p.add_argument("--user", help="only this user id")
    p.add_argument("--tag", help="only events carrying this request tag")
    p.add_argument("--category", help="e.g. system.openai")
    p.add_argument("--resource", help="e.g. gpt-4o")
    p.add_argument("--cost-state", choices=sorted(COST_STATES), help="only events priced so")
    p.add_argument("--since", help="only events at or after this ISO 8601 time")
    p.add_argument("--until", help="only events before this ISO 8601 time")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--page-token", default="", help="the page after the one that printed this token")
    p.set_defaults(remote=events_list)
    p = events.add_parser("get", parents=[client], help="show one stored event and its cost")
    p.add_argument("request_id", nargs="?", help="the request id Tally returned")
    p.add_argument("--key", help="find it by the idempotency key it was sent with instead")
    p.set_defaults(remote=events_get)
    p = events.add_parser(
        "prune",
        parents=[client],
        help="delete stored events before a time, in batches (admin); statistics and limits stay as they were",
    )
    p.add_argument("--before", required=True, help="ISO 8601 date or time (taken down to a whole hour)")
    p.add_argument("--batch", type=int, default=0, help="events per call, 1 to 100,000 (default 10,000)")
    p.set_defaults(remote=events_prune)
    p = events.add_parser(
        "erase", parents=[client], help="erase one end user's events (admin): an erasure request; totals stay"
    )
    p.add_argument("--user", required=True, help="the user id as events carry it")
    p.add_argument("--batch", type=int, default=0, help="events per call, 1 to 100,000 (default 10,000)")
    p.set_defaults(remote=events_erase)

"""`tally limits`: spending limits."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .._calls import new_limit
from ..client import TallyClient
from ..output import as_json, money, table, when
from .common import Commands, _emit, _more


def _scope_text(limit: Any) -> str:
    scope = limit.scope
    if scope.everything:
        return "everything"
    if scope.experience_type:
        version = f" v{scope.experience_version}" if scope.experience_version else ""
        return f"type {scope.experience_type}{version}" + (" per experience" if scope.per_experience else "")
    if scope.experience_id:
        return f"experience {scope.experience_id}"
    if scope.user_id:
        return f"user {scope.user_id}"
    return f"tag {scope.request_tag}"


def _limit_state(value: int) -> str:
    return {1: "ok", 2: "threshold", 3: "exceeded"}.get(value, "-")


def limit_row(limit: Any, current: Any) -> list[object]:
    kind = {1: "block", 2: "allow"}.get(limit.kind, "?")
    period = {1: "lifetime", 2: "day", 3: "week", 4: "month"}.get(limit.period, "?")
    has = current is not None and current.HasField("max")
    # No current period: each experience has its own (per experience), or none was read (a create).
    none = "per experience" if limit.scope.per_experience else "-"
    return [
        limit.name,
        kind,
        period,
        _scope_text(limit),
        money(limit.max),
        money(current.spend) if has else "-",
        money(current.reserved) if has else "-",
        _limit_state(current.state) if has else none,
    ]


LIMIT_HEADERS = ["LIMIT", "KIND", "PERIOD", "SCOPE", "MAX", "SPEND", "RESERVED", "STATE"]


def limits_create(tally: TallyClient, args: argparse.Namespace) -> None:
    scope = {"everything": args.everything, "experience_type": args.type or "", "experience_version": args.version}
    scope.update(per_experience=args.per_experience, experience_id=args.experience or "")
    scope.update(user_id=args.user or "", request_tag=args.tag or "")
    limit = new_limit(
        args.name, args.max, kind=args.kind, period=args.period, threshold_percent=args.threshold, **scope
    )
    created = tally.create_limit(limit)
    current = None if created.scope.per_experience else tally.get_limit(created.name).current
    _emit(args, created, f"created limit {created.name}\n" + table(LIMIT_HEADERS, [limit_row(created, current)]))


def limits_get(tally: TallyClient, args: argparse.Namespace) -> None:
    got = tally.get_limit(args.name, experience_id=args.experience or "")
    _emit(args, got, table(LIMIT_HEADERS, [limit_row(got.limit, got.current)]))


def limits_list(tally: TallyClient, args: argparse.Namespace) -> None:
    page = tally.list_limits(page_size=args.limit, page_token=args.page_token)
    rows = [limit_row(limit, current) for limit, current in zip(page.limits, page.current, strict=True)]
    _emit(args, page, table(LIMIT_HEADERS, rows) if rows else "no limits")
    _more(args, page.next_page_token, f"tally limits list --limit {args.limit}")


def limits_periods(tally: TallyClient, args: argparse.Namespace) -> None:
    order = "spend desc" if args.busiest else ""
    page = tally.list_limit_periods(
        args.name, experience_id=args.experience or "", page_size=args.limit, order_by=order
    )
    rows = [
        [
            when(p.start_time),
            when(p.end_time),
            p.experience_id or "-",
            money(p.spend),
            p.event_count,
            _limit_state(p.state),
        ]
        for p in page.periods
    ]
    headers = ["START", "END", "EXPERIENCE", "SPEND", "EVENTS", "STATE"]
    _emit(args, page, table(headers, rows) if rows else "no periods yet")


def limits_reset(tally: TallyClient, args: argparse.Namespace) -> None:
    reset = tally.reset_limit(args.name)
    _emit(args, reset, f"limit {reset.limit.name} starts a new period now; the past one is kept")


def limits_delete(tally: TallyClient, args: argparse.Namespace) -> None:
    tally.delete_limit(args.name)
    print(f"deleted limit {args.name}")


def limits_watch(tally: TallyClient, args: argparse.Namespace) -> None:
    try:
        for change in tally.watch_limits(args.names):
            p = change.period
            line = f"{p.limit}: {_limit_state(p.state)} ({change.reason}), spend {money(p.spend)} of {money(p.max)}"
            print(json.dumps(as_json(change)) if args.json else line, flush=True)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends: exit at once. Unwinding through the open stream and the
        # channel's close still waited on grpc's threads now and then, past the cancel in
        # watch_limits (the README's `timeout -s INT -k 10 2 tally limits watch` was killed
        # 10 s after its SIGINT in a full test run, 2026-12-07).
        sys.stdout.flush()
        os._exit(130)


def add_commands(commands: Commands, client: argparse.ArgumentParser) -> None:
    """`tally limits ...`."""
    limits = commands.add_parser("limits", help="spending limits").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = limits.add_parser("create", parents=[client], help="create a limit (admin)")
    p.add_argument("name")
    p.add_argument("--max", required=True, help="the maximum in USD, e.g. 25.00")
    p.add_argument("--kind", choices=["block", "allow"], default="block", help="block refuses reservations (default)")
    p.add_argument("--period", choices=["lifetime", "day", "week", "month"], default="month", help="default month")
    p.add_argument("--threshold", type=int, default=0, help="warning at this percent of the maximum (default 80)")
    p.add_argument("--everything", action="store_true", help="scope: every event")
    p.add_argument("--type", help="scope: experiences of this type")
    p.add_argument("--version", type=int, default=0, help="with --type: only this version")
    p.add_argument("--per-experience", action="store_true", help="with --type: each experience its own maximum")
    p.add_argument("--experience", help="scope: this one experience (a UUID)")
    p.add_argument("--user", help="scope: this user id")
    p.add_argument("--tag", help="scope: this request tag")
    p.set_defaults(remote=limits_create)
    p = limits.add_parser("list", parents=[client], help="list limits with their current spend")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--page-token", default="", help="the page after the one that printed this token")
    p.set_defaults(remote=limits_list)
    p = limits.add_parser("get", parents=[client], help="show a limit and its current period")
    p.add_argument("name")
    p.add_argument("--experience", help="for a per-experience limit: this experience's period")
    p.set_defaults(remote=limits_get)
    p = limits.add_parser("periods", parents=[client], help="a limit's periods, the newest first")
    p.add_argument("name")
    p.add_argument("--experience", help="for a per-experience limit: this experience's periods")
    p.add_argument(
        "--busiest",
        action="store_true",
        help="the periods current now, the most spent first (a per-experience limit's busiest runs)",
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(remote=limits_periods)
    p = limits.add_parser("reset", parents=[client], help="start a new period now (admin)")
    p.add_argument("name")
    p.set_defaults(remote=limits_reset)
    p = limits.add_parser("delete", parents=[client], help="delete a limit (admin)")
    p.add_argument("name")
    p.set_defaults(remote=limits_delete)
    p = limits.add_parser("watch", parents=[client], help="print each change of state as it happens (Ctrl-C ends)")
    p.add_argument("names", nargs="*", help="the limits to watch (default: all)")
    p.set_defaults(remote=limits_watch)

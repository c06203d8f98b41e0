"""`tally`: the command line. The commands here talk to a server; an installed server
(the tally-genai distribution) adds `tally serve` and `tally migrate`.

Every client command takes --target (env TALLY_TARGET, default 127.0.0.1:50051)
and --json (machine-readable output). Failures print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from typing import Any, TextIO, cast

from google.protobuf import json_format

from tally.v1 import (
    common_pb2,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as ing_pb,
    price_catalog_service_pb2 as price_pb,
    report_service_pb2 as report_pb,
)

from ._calls import EventFilter, new_limit
from .client import DEFAULT_TARGET, TallyClient
from .errors import AlreadyExists, TallyError
from .metadata import create_metadata
from .output import as_json, money, table, when


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for value in values or ():
        key, sep, val = value.partition("=")
        if not sep:
            raise SystemExit(f"tally: {what} must be KEY=VALUE, got {value!r}")
        pairs[key] = val
    return pairs


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"tally: not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.astimezone()


def _emit(args: argparse.Namespace, message: Any, human: str) -> None:
    print(json.dumps(as_json(message), indent=2) if args.json else human)


# --- experience types -------------------------------------------------------------


def type_row(t: et_pb.ExperienceType) -> list[object]:
    return [t.name, t.version, when(t.create_time), t.description]


def types_create(tally: TallyClient, args: argparse.Namespace) -> None:
    try:
        created = tally.create_experience_type(args.name, args.description, settings=_pairs(args.setting, "--setting"))
    except AlreadyExists:
        if not args.exist_ok:
            raise
        found = tally.get_experience_type(args.name)
        _emit(args, found, f"experience type {found.name} exists (version {found.version}): left as it is")
        return
    _emit(args, created, f"created experience type {created.name} (version {created.version})")


def types_get(tally: TallyClient, args: argparse.Namespace) -> None:
    t = tally.get_experience_type(args.name)
    settings = ", ".join(f"{k}={v}" for k, v in sorted(t.settings.items())) or "-"
    _emit(
        args,
        t,
        f"{t.name} (version {t.version})\n  {t.description}\n  settings: {settings}\n"
        f"  created {when(t.create_time)}, updated {when(t.update_time)}",
    )


def types_list(tally: TallyClient, args: argparse.Namespace) -> None:
    items: list[et_pb.ExperienceType] = []
    token = ""
    while True:
        page = tally.list_experience_types(page_size=1000, page_token=token)
        items.extend(page.experience_types)
        token = page.next_page_token
        if not token:
            break
    if args.json:
        print(json.dumps([as_json(t) for t in items], indent=2))
    else:
        print(
            table(["NAME", "VERSION", "CREATED", "DESCRIPTION"], [type_row(t) for t in items])
            if items
            else "no experience types"
        )


def types_update(tally: TallyClient, args: argparse.Namespace) -> None:
    settings = _pairs(args.setting, "--setting") if args.setting is not None else None
    try:
        updated = tally.update_experience_type(args.name, description=args.description, settings=settings)
    except ValueError as error:
        raise SystemExit(f"tally: {error}") from None
    _emit(args, updated, f"updated {updated.name} (still version {updated.version})")


def types_increment(tally: TallyClient, args: argparse.Namespace) -> None:
    response = tally.increment_experience_type_version(args.name)
    _emit(args, response, f"{args.name} is now at version {response.experience_type.version}")


def types_versions(tally: TallyClient, args: argparse.Namespace) -> None:
    response = tally.list_experience_type_versions(args.name, page_size=1000)
    rows = [[v.version, when(v.create_time), v.description] for v in response.experience_type_versions]
    _emit(args, response, table(["VERSION", "CREATED", "DESCRIPTION"], rows))


def types_delete(tally: TallyClient, args: argparse.Namespace) -> None:
    deleted = tally.delete_experience_type(args.name, force=args.force)
    if args.json:
        print(json.dumps({"deleted_experience_count": deleted}))
    else:
        print(f"deleted experience type {args.name}" + (f" and {deleted} experience(s)" if deleted else ""))


# --- experiences ------------------------------------------------------------------


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


def _more(args: argparse.Namespace, token: str, command: str) -> None:
    """Where a page is full, says how to get the next one (on stderr: stdout stays the table)."""
    if token and not args.json:
        print(f"more: {command} --page-token {token}", file=sys.stderr)


# --- prices -------------------------------------------------------------------------------


def _unit_prices(values: list[str]) -> dict[str, tuple[str, str]]:
    """--unit text=0.20/0.60 (input/output USD per million; either may be empty)."""
    prices = {}
    for value in values:
        unit, sep, rates = value.partition("=")
        per_input, slash, per_output = rates.partition("/")
        if not sep or not slash:
            raise SystemExit(f"tally: --unit must be UNIT=INPUT/OUTPUT (USD per million), got {value!r}")
        prices[unit] = (per_input, per_output)
    return prices


def _unit_counts(values: list[str]) -> dict[str, tuple[int, int]]:
    """--units text=1000/100 (input/output counts)."""
    counts = {}
    for value in values:
        unit, sep, numbers = value.partition("=")
        count_in, _, count_out = numbers.partition("/")
        try:
            counts[unit] = (int(count_in or 0), int(count_out or 0))
        except ValueError:
            raise SystemExit(f"tally: --units must be UNIT=INPUT/OUTPUT counts, got {value!r}") from None
        if not sep:
            raise SystemExit(f"tally: --units must be UNIT=INPUT/OUTPUT counts, got {value!r}")
    return counts


def price_row(p: price_pb.CustomPrice) -> list[object]:
    rates = ", ".join(
        f"{u} {r.input_per_million or '-'}/{r.output_per_million or '-'}" for u, r in sorted(p.unit_prices.items())
    )
    variant = ",".join(f"{k}={v}" for k, v in sorted(p.price_context.items())) or "-"
    return [p.price_id, p.category, p.resource, variant, when(p.effective_time), when(p.end_time), rates]


PRICE_HEADERS = ["PRICE ID", "CATEGORY", "RESOURCE", "VARIANT", "EFFECTIVE", "ENDED", "USD/M IN/OUT"]


def prices_create(tally: TallyClient, args: argparse.Namespace) -> None:
    try:
        created = tally.create_custom_price(
            args.category,
            args.resource,
            _unit_prices(args.unit),
            effective_time=_time(args.effective),
            price_context=_pairs(args.context, "--context"),
        )
    except AlreadyExists as exists:
        if not args.exist_ok:
            raise
        found = tally.list_custom_prices(category=args.category, resource=args.resource, page_size=1000)
        listed = table(PRICE_HEADERS, [price_row(price) for price in found.prices])
        _emit(args, found, f"{exists.message}: left as it is\n{listed}")
        return
    for warning in created.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _emit(args, created, f"created price {created.price.price_id}\n" + table(PRICE_HEADERS, [price_row(created.price)]))


def prices_get(tally: TallyClient, args: argparse.Namespace) -> None:
    price = tally.get_custom_price(args.price_id)
    _emit(args, price, table(PRICE_HEADERS, [price_row(price)]))


def prices_list(tally: TallyClient, args: argparse.Namespace) -> None:
    page = tally.list_custom_prices(
        category=args.category or "", resource=args.resource or "", page_size=args.limit, page_token=args.page_token
    )
    rows = [price_row(p) for p in page.prices]
    _emit(args, page, table(PRICE_HEADERS, rows) if rows else "no custom prices")
    _more(args, page.next_page_token, f"tally prices list --limit {args.limit}")


def prices_end(tally: TallyClient, args: argparse.Namespace) -> None:
    ended = tally.end_custom_price(args.price_id, end_time=_time(args.at))
    _emit(args, ended, f"price {ended.price_id} ends at {when(ended.end_time)}; events stored before keep their cost")


def prices_quote(tally: TallyClient, args: argparse.Namespace) -> None:
    result = tally.quote_price(
        args.category,
        args.resource,
        _unit_counts(args.units),
        event_time=_time(args.at),
        price_context=_pairs(args.context, "--context"),
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    source = {1: "system", 2: "custom"}.get(result.price.source, "none")
    variant = ",".join(f"{k}={v}" for k, v in sorted(result.price.price_context.items()))
    lines = [
        f"{money(result.cost_total)}  (input {money(result.cost_input)}, output {money(result.cost_output)})",
        f"price: {source} {result.price.category}/{result.price.resource} {result.price.version}"
        + (f" variant {variant}" if variant else ""),
    ]
    lines += [f"not priced: {u.unit_type} {u.input}/{u.output}: {u.reason}" for u in result.unknown_units]
    _emit(args, result, "\n".join(lines))


def experiences_delete(tally: TallyClient, args: argparse.Namespace) -> None:
    unattributed = tally.delete_experience(args.id)
    if args.json:
        print(json.dumps({"unattributed_event_count": unattributed}))
    else:
        print(f"deleted experience {args.id}; {unattributed} event(s) kept as unattributed")


# --- reports ------------------------------------------------------------------------


def _latencies(s: Any) -> str:
    """A run's latencies, or that none of its events reported one (0 ms would read as instant)."""
    if not s.latency_mean_ms and not s.latency_p95_ms:
        return "not reported"
    return f"mean {s.latency_mean_ms:,.0f} ms, p50 {s.latency_p50_ms:,.0f} ms, p95 {s.latency_p95_ms:,.0f} ms"


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
        ["latency", _latencies(s)],
        ["first event", when(s.first_event_time)],
        ["last event", when(s.last_event_time)],
    ]
    if e.properties:
        rows.append(["properties", ", ".join(f"{k}={v}" for k, v in sorted(e.properties.items()))])
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


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


COST_STATES = {
    "priced": ing_pb.COST_STATE_PRICED,
    "partially_priced": ing_pb.COST_STATE_PARTIALLY_PRICED,
    "unpriced": ing_pb.COST_STATE_UNPRICED,
}


def _state(value: int) -> str:
    return {v: k for k, v in COST_STATES.items()}.get(cast(Any, value), "-")


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


# --- ingest -----------------------------------------------------------------------


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, a line every 5 s otherwise."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.total, self.stream, self.done = total, stream, 0
        self.tty = stream.isatty()
        self.started = self.last = time.monotonic()

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= (0.1 if self.tty else 5.0):
            self.last = now
            self.draw(end="\r" if self.tty else "\n")

    def draw(self, end: str) -> None:
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        if self.total:
            filled = int(30 * self.done / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done:,}/{self.total:,}"
        else:
            bar = f"{self.done:,}"
        self.stream.write(f"{bar} events, {rate:,.0f}/s{' ' * 8}{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.draw(end="\n")


def _read_events(source: TextIO, rejected: list[tuple[int, str]]) -> Iterator[tuple[int, ing_pb.UsageEvent]]:
    """Parses JSONL lines into (line number, UsageEvent); a line that does not parse is rejected here."""

    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            yield number, json_format.Parse(line, ing_pb.UsageEvent())
        except json_format.ParseError as error:
            rejected.append((number, f"not a UsageEvent in JSON: {error}"))


# The largest event `tally ingest` sends: gRPC's default message bound, which the server keeps
# unless --max-message-bytes says otherwise. A larger one is rejected here, by its line, rather
# than sent to end the whole stream.
MAX_EVENT_BYTES = 4 * 1024 * 1024 - 1024

_NOT_PRICED = {ing_pb.COST_STATE_UNPRICED: "unpriced", ing_pb.COST_STATE_PARTIALLY_PRICED: "partially priced"}


def ingest(tally: TallyClient, args: argparse.Namespace) -> int:
    path = args.file
    source = sys.stdin if path in (None, "-") else open(path, encoding="utf-8")  # noqa: SIM115
    total = None
    if source is not sys.stdin:
        total = sum(1 for line in source if line.strip())
        source.seek(0)
    rejected: list[tuple[int, str]] = []
    accepted = duplicates = 0
    numbers: list[int] = []
    progress = Progress(total)

    def events() -> Iterator[ing_pb.UsageEvent]:
        for number, event in _read_events(source, rejected):
            size = event.ByteSize()
            if size > MAX_EVENT_BYTES:  # the server would end the whole stream for it
                rejected.append((number, f"the event is {size:,} bytes; one message holds at most {MAX_EVENT_BYTES:,}"))
                continue
            numbers.append(number)
            yield event

    experience_id = args.experience_id
    if args.experience_name and not experience_id and not args.experience_per_line:
        # One run for the whole file: an id of our own, which the first new event creates the
        # experience with (a file of duplicates only creates none).
        experience_id = str(uuid.uuid4())
    metadata = create_metadata(
        experience_id,
        args.experience_name,
        None,
        args.user_id,
        args.tags.split(",") if args.tags else None,
        price_context=_pairs(args.price_context, "--price-context"),
    )
    experiences: set[str] = set()
    costs = 0
    # Accepted events that are not (fully) priced, and why: a run of misspelt models is loud.
    not_priced = {"unpriced": Counter[str](), "partially priced": Counter[str]()}
    not_priced_events = {"unpriced": 0, "partially priced": 0}
    answered = 0
    ended: TallyError | None = None
    try:
        for response in tally.ingest_stream(events(), metadata=metadata):
            answered += 1
            line = numbers[response.position]
            if response.HasField("error"):
                fields = "; ".join(f"{v.field}: {v.description}" for v in response.error.field_violations)
                rejected.append((line, fields or response.error.message))
            elif response.result.xproxy_result.duplicate_request:
                duplicates += 1
            else:
                accepted += 1
                if response.result.xproxy_result.experience_created:
                    experiences.add(response.result.xproxy_result.experience_id)
                result = response.result.xproxy_result
                total_cost = result.cost_total
                costs += total_cost.units * 1_000_000_000 + total_cost.nanos
                state = _NOT_PRICED.get(result.cost_state)
                if state is not None:
                    not_priced_events[state] += 1
                    not_priced[state].update(list(dict.fromkeys(u.reason for u in result.unknown_units)))
            progress.advance()
    except TallyError as error:  # the stream ended: what was answered stands, the rest was not stored
        ended = error
    finally:
        progress.close()
        if source is not sys.stdin:
            source.close()
    unanswered = numbers[answered:] if ended is not None else []
    summary = {
        "accepted": accepted,
        "duplicates": duplicates,
        "rejected": len(rejected),
        "cost_of_accepted": money(common_pb2.Money(units=costs // 1_000_000_000, nanos=costs % 1_000_000_000)),
        "rejections": [{"line": line, "reason": reason} for line, reason in sorted(rejected)],
        "unpriced": not_priced_events["unpriced"],
        "partially_priced": not_priced_events["partially priced"],
        "not_priced_reasons": {state: dict(reasons.most_common()) for state, reasons in not_priced.items() if reasons},
        "experiences_created": sorted(experiences),
    }
    if ended is not None:
        summary["stream_ended"] = f"{type(ended).__name__}: {ended}"
        summary["not_stored_lines"] = unanswered
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"accepted {accepted:,}, duplicates {duplicates:,}, rejected {len(rejected):,}; "
            f"cost of accepted events {summary['cost_of_accepted']}"
        )
        for state, count in not_priced_events.items():
            if count:
                reasons = not_priced[state].most_common()
                said = ", ".join(f"{reason} ({n:,})" for reason, n in reasons[:5])
                more = f", and {len(reasons) - 5} more reasons (use --json)" if len(reasons) > 5 else ""
                print(f"{count:,} {state}: {said}{more}")
        if len(experiences) == 1:
            print(f"experience {next(iter(experiences))} ({args.experience_name}) created for this file")
        elif experiences:
            print(f"{len(experiences):,} experiences of {args.experience_name} created")
        for line, reason in sorted(rejected)[:20]:
            print(f"  line {line}: {reason}")
        if len(rejected) > 20:
            print(f"  ... and {len(rejected) - 20} more (use --json for all)")
        common = Counter(reason for _, reason in rejected).most_common(1)
        if len(rejected) > 20 and common:
            print(f"  most common: {common[0][0]} ({common[0][1]}x)")
        if ended is not None:
            lines = ", ".join(map(str, unanswered[:10])) + (" ..." if len(unanswered) > 10 else "")
            sent = f"; sent and not answered: line{'s' if len(unanswered) != 1 else ''} {lines}" if unanswered else ""
            print(f"the stream ended after {answered:,} answers: {ended}{sent}", file=sys.stderr)
            print(
                "the lines after them were not read. Lines sent and not answered may have been stored: fix the "
                "cause and run again, and those stored come back as duplicates",
                file=sys.stderr,
            )
    if rejected or ended is not None:
        return 1
    return 1 if args.fail_on_unpriced and any(not_priced_events.values()) else 0


# --- limits -------------------------------------------------------------------------


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
    page = tally.list_limit_periods(args.name, experience_id=args.experience or "", page_size=args.limit)
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
    for change in tally.watch_limits(args.names):
        p = change.period
        line = f"{p.limit}: {_limit_state(p.state)} ({change.reason}), spend {money(p.spend)} of {money(p.max)}"
        print(json.dumps(as_json(change)) if args.json else line, flush=True)


# --- the parser -----------------------------------------------------------------------


def _add_installed_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands other installed distributions add (the server's `serve` and
    `migrate`), found by entry point so that the client never imports the server."""
    plugins = entry_points(group="tally.commands")
    for plugin in plugins:
        plugin.load()(commands)
    if "serve" not in commands.choices:
        hint = commands.add_parser("serve", help="run the gRPC server (needs the server: pip install tally-genai)")
        hint.set_defaults(local=_server_not_installed)


def _server_not_installed(args: argparse.Namespace) -> int:
    print(
        "tally: `tally serve` needs the Tally server, which is not installed here; install the "
        "tally-genai distribution (from a checkout: pip install ./clients .)",
        file=sys.stderr,
    )
    return 1


def _unavailable_hint(error: TallyError, args: argparse.Namespace) -> str:
    """Why a server may not answer: not running, or TLS on one side only."""
    text = error.message.lower()
    secure = args.tls or args.ca_file
    if not secure and ("socket closed" in text or "connection reset" in text or "eof" in text):
        return (
            f" (is Tally running at {args.target}? If it serves TLS, add --tls, or --ca-file with its CA, "
            "or set TALLY_TLS=1 / TALLY_CA_FILE)"
        )
    if secure and ("ssl" in text or "handshake" in text or "wrong_version" in text):
        return f" (Tally at {args.target} does not answer TLS: is it serving plaintext? Leave out --tls / --ca-file)"
    if secure and not args.client_cert and ("socket closed" in text or "connection reset" in text):
        return (
            f" (Tally at {args.target} may require a client certificate, mTLS: add --client-cert and --client-key, "
            "or set TALLY_CLIENT_CERT / TALLY_CLIENT_KEY)"
        )
    return f" (is Tally running at {args.target}?)"


def _versions() -> str:
    """This command's version, and the server's where it is installed beside it."""
    from importlib.metadata import PackageNotFoundError, version

    said = f"tally {version('tally-genai-client')} (tally-genai-client)"
    with contextlib.suppress(PackageNotFoundError):
        said += f", server tally-genai {version('tally-genai')}"
    return said


def build_parser() -> argparse.ArgumentParser:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--target", help=f"the Tally server, host:port (env TALLY_TARGET, default {DEFAULT_TARGET})")
    client.add_argument("--json", action="store_true", help="print JSON instead of text")
    client.add_argument("--timeout", type=float, default=10.0, help="seconds each call may take (default 10)")
    tls = client.add_argument_group("TLS (the API key comes from the environment: TALLY_API_KEY)")
    tls.add_argument(
        "--tls",
        action="store_true",
        default=bool(os.environ.get("TALLY_TLS")),
        help="TLS with the system's roots (env TALLY_TLS=1)",
    )
    tls.add_argument(
        "--ca-file", default=os.environ.get("TALLY_CA_FILE"), help="TLS with this PEM CA (env TALLY_CA_FILE)"
    )
    tls.add_argument(
        "--client-cert",
        default=os.environ.get("TALLY_CLIENT_CERT"),
        help="PEM client certificate, for mTLS (env TALLY_CLIENT_CERT)",
    )
    tls.add_argument(
        "--client-key",
        default=os.environ.get("TALLY_CLIENT_KEY"),
        help="PEM client key, for mTLS (env TALLY_CLIENT_KEY)",
    )

    parser = argparse.ArgumentParser(prog="tally", description="Tally: what your GenAI calls cost, per experience.")
    parser.add_argument("--version", action="version", version=_versions())
    # Also accepted before the command: `tally --target HOST:PORT types list`.
    parser.add_argument("--target", dest="global_target", help=argparse.SUPPRESS)
    parser.add_argument("--json", dest="global_json", action="store_true", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_installed_commands(commands)

    types = commands.add_parser("types", help="experience types").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = types.add_parser("create", parents=[client], help="create an experience type")
    p.add_argument("name")
    p.add_argument("--description", "-d", required=True)
    p.add_argument("--setting", action="append", metavar="KEY=VALUE")
    p.add_argument("--exist-ok", action="store_true", help="a type of that name already there is not an error")
    p.set_defaults(remote=types_create)
    p = types.add_parser("list", parents=[client], help="list experience types")
    p.set_defaults(remote=types_list)
    p = types.add_parser("get", parents=[client], help="show an experience type")
    p.add_argument("name")
    p.set_defaults(remote=types_get)
    p = types.add_parser("update", parents=[client], help="change the description or settings (not the version)")
    p.add_argument("name")
    p.add_argument("--description", "-d")
    p.add_argument("--setting", action="append", metavar="KEY=VALUE", help="replaces all settings")
    p.set_defaults(remote=types_update)
    p = types.add_parser("increment-version", parents=[client], help="start the next version")
    p.add_argument("name")
    p.set_defaults(remote=types_increment)
    p = types.add_parser("versions", parents=[client], help="list the versions of a type")
    p.add_argument("name")
    p.set_defaults(remote=types_versions)
    p = types.add_parser("delete", parents=[client], help="delete an experience type")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="also delete its experiences (their events are kept)")
    p.set_defaults(remote=types_delete)

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
    p = exps.add_parser("delete", parents=[client], help="delete an experience (its events are kept, unattributed)")
    p.add_argument("id")
    p.set_defaults(remote=experiences_delete)

    p = commands.add_parser(
        "ingest", parents=[client], help="ingest usage events from JSONL (a file or standard input)"
    )
    p.add_argument("file", nargs="?", help="a JSONL file of UsageEvent objects; - or nothing for standard input")
    p.add_argument("--experience-id", help="xproxy-experience-id for every event")
    p.add_argument(
        "--experience-name",
        help="the experience type: without --experience-id, the whole file is one new experience of it",
    )
    p.add_argument(
        "--experience-per-line", action="store_true", help="with --experience-name: a new experience per event"
    )
    p.add_argument("--user-id", help="xproxy-user-id for every event")
    p.add_argument("--tags", help="xproxy-request-tags for every event, comma-separated")
    p.add_argument("--price-context", action="append", metavar="KEY=VALUE", help="price context of every event")
    p.add_argument(
        "--fail-on-unpriced",
        action="store_true",
        help="exit 1 when any accepted event is unpriced or partially priced (its reasons are printed either way)",
    )
    p.set_defaults(remote=ingest)

    prices = commands.add_parser("prices", help="the price catalog: custom prices and quotes").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = prices.add_parser("create", parents=[client], help="add a custom price (admin)")
    p.add_argument("category", help="e.g. custom.acme, or system.openai to override a system price")
    p.add_argument("resource", help="e.g. acme-llm-7b")
    p.add_argument(
        "--unit", action="append", required=True, metavar="UNIT=IN/OUT", help="USD per million, e.g. text=0.20/0.60"
    )
    p.add_argument("--effective", help="ISO 8601 time it applies from (default: always)")
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="make it a variant, e.g. processing=batch")
    p.add_argument(
        "--exist-ok", action="store_true", help="a price already there at that time is not an error: it is shown"
    )
    p.set_defaults(remote=prices_create)
    p = prices.add_parser("list", parents=[client], help="list custom prices")
    p.add_argument("--category")
    p.add_argument("--resource")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--page-token", default="", help="the page after the one that printed this token")
    p.set_defaults(remote=prices_list)
    p = prices.add_parser("get", parents=[client], help="show a custom price")
    p.add_argument("price_id")
    p.set_defaults(remote=prices_get)
    p = prices.add_parser("end", parents=[client], help="end a custom price (admin); stored events keep their cost")
    p.add_argument("price_id")
    p.add_argument("--at", help="ISO 8601 time it ends (default now; its effective time voids it)")
    p.set_defaults(remote=prices_end)
    p = prices.add_parser("quote", parents=[client], help="what usage costs, without storing anything")
    p.add_argument("category")
    p.add_argument("resource")
    p.add_argument("--units", action="append", required=True, metavar="UNIT=IN/OUT", help="counts, e.g. text=1000/100")
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="price context, e.g. service_tier=flex")
    p.add_argument("--at", help="ISO 8601 time to price at (default now)")
    p.set_defaults(remote=prices_quote)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "local"):
        args.target = args.target or args.global_target or os.environ.get("TALLY_TARGET") or DEFAULT_TARGET
        args.json = args.json or args.global_json
    try:
        if hasattr(args, "local"):
            return int(args.local(args))
        client = TallyClient(
            args.target,
            api_key=os.environ.get("TALLY_API_KEY") or None,
            secure=args.tls,
            ca_file=args.ca_file,
            client_cert_file=args.client_cert,
            client_key_file=args.client_key,
            timeout=args.timeout,
        )
        with client as tally:
            return int(args.remote(tally, args) or 0)
    except TallyError as error:
        detail = "; ".join(f"{field}: {why}" for field, why in error.field_violations.items())
        where = _unavailable_hint(error, args) if error.code.name == "UNAVAILABLE" else ""
        print(
            f"tally: {error}{where}" + (f" [{detail}]" if detail and detail not in error.message else ""),
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as error:  # a TLS file that cannot be read, half a key pair
        print(f"tally: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

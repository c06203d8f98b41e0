"""`tally ingest`: usage events from JSONL, in batches, with progress."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import TextIO

from google.protobuf import json_format

from tally.v1 import (
    ingest_service_pb2 as ing_pb,
)

from ..client import TallyClient
from ..errors import TallyError
from ..metadata import create_metadata
from ..output import exact_money, format_nanos
from .common import Commands, _pairs


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
        "cost_of_accepted": exact_money(costs),  # JSON: exact
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
            f"cost of accepted events {format_nanos(costs)}"
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


def add_commands(commands: Commands, client: argparse.ArgumentParser) -> None:
    """`tally ingest`."""
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

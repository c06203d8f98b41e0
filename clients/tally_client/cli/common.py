"""What the command groups share: parsing pairs and times, printing, paging hints."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any, TypeAlias, cast

from tally.v1 import (
    ingest_service_pb2 as ing_pb,
)

from ..output import as_json


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


def _more(args: argparse.Namespace, token: str, command: str) -> None:
    """Where a page is full, says how to get the next one (on stderr: stdout stays the table)."""
    if token and not args.json:
        print(f"more: {command} --page-token {token}", file=sys.stderr)


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


COST_STATES = {
    "priced": ing_pb.COST_STATE_PRICED,
    "partially_priced": ing_pb.COST_STATE_PARTIALLY_PRICED,
    "unpriced": ing_pb.COST_STATE_UNPRICED,
}


def _state(value: int) -> str:
    return {v: k for k, v in COST_STATES.items()}.get(cast(Any, value), "-")


# The subcommands of `tally`, where each group adds its own.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

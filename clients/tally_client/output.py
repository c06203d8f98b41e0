"""Readable terminal output: money, times and aligned tables."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from tally.v1 import common_pb2


def dollars(m: common_pb2.Money) -> Decimal:
    """A tally.v1.Money as an exact Decimal of dollars."""
    return Decimal(m.units * 1_000_000_000 + m.nanos) / 1_000_000_000


def money(m: common_pb2.Money) -> str:
    """Money as every table shows it (the dashboard too): from $1, to the cent with thousands
    separators ($1,234.57); below, four significant digits without trailing zeros but with
    at least cents ($0.4228, $0.0575, $0.00048, $0.50); rounded half to even. (JSON output,
    `--json`, is exact.)"""
    return format_nanos(m.units * 1_000_000_000 + m.nanos)


def exact_money(nanos: int) -> str:
    """$0.0031875, $12.50: exact, with at least cents and no trailing zeros beyond them (for
    JSON output, where amounts are never rounded)."""
    text = f"{Decimal(nanos).scaleb(-9):.9f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def format_nanos(nanos: int) -> str:
    """`money` of an amount in nano-dollars."""
    sign, value = ("-" if nanos < 0 else ""), Decimal(abs(nanos)).scaleb(-9)
    if value >= 1 or value == 0:
        return f"{sign}${value.quantize(Decimal('0.01'), ROUND_HALF_EVEN):,}"
    rounded = value.quantize(Decimal(1).scaleb(value.adjusted() - 3), ROUND_HALF_EVEN)
    if rounded >= 1:  # $0.99995 and up: a dollar, to the cent
        return f"{sign}${rounded.quantize(Decimal('0.01'), ROUND_HALF_EVEN):,}"
    text = f"{rounded:f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{sign}${whole}.{fraction.ljust(2, '0')}"


def when(timestamp: timestamp_pb2.Timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    return timestamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) and rows for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    return bool(text) and (text[0] == "$" or text.replace(",", "").replace(".", "").replace("-", "").isdigit())


def as_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)

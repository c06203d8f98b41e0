"""`tally prices`: custom prices and quotes."""

from __future__ import annotations

import argparse
import sys

from tally.v1 import (
    price_catalog_service_pb2 as price_pb,
)

from ..client import TallyClient
from ..errors import AlreadyExists
from ..output import money, table, when
from .common import Commands, _emit, _more, _pairs, _time, _unit_counts


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


def add_commands(commands: Commands, client: argparse.ArgumentParser) -> None:
    """`tally prices ...`."""
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

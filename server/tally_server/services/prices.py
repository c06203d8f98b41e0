"""Custom prices: added through the API, versioned by effective time."""

from __future__ import annotations

import uuid
from decimal import Decimal, InvalidOperation

from ..domain import paging
from ..domain.errors import Violations, already_exists, failed_precondition, not_found
from ..domain.events import quote
from ..domain.models import Cost, CustomPrice, Page, UnitPrice, now_us
from ..domain.validation import CATEGORY_PATTERN, UNIT_TYPE_PATTERN, check_price_context, check_text, parse_uuid
from ..storage import prices as stored_prices
from ..storage.db import Database
from .catalog import LiveCatalog

MAX_UNIT_PRICES = 32


def _check_decimal(v: Violations, field_path: str, text: str) -> None:
    if not text:
        return
    try:
        value = Decimal(text)
    except InvalidOperation:
        v.add(field_path, f"not a decimal number: {text[:40]!r}")
        return
    if not value.is_finite() or value < 0:
        v.add(field_path, "must be a finite, non-negative decimal")
    elif int(value.as_tuple().exponent) < -9 or value >= Decimal(10) ** 9:
        v.add(field_path, "at most 9 decimal places and less than 1,000,000,000")


def price_not_found(price_id: str) -> Exception:
    return not_found("PRICE_NOT_FOUND", "tally.v1.CustomPrice", price_id, f"custom price {price_id} does not exist")


def _price_id(text: str) -> uuid.UUID:
    parsed = parse_uuid(text)
    if parsed is None:
        v = Violations()
        v.add("price_id", f"not a UUID: {text[:80]!r}" if text else "price_id is required")
        v.raise_if_any()
    assert parsed is not None
    return parsed


class Prices:
    """Custom prices, and quotes of what a call would cost."""

    def __init__(self, db: Database, catalog: LiveCatalog, pages: paging.PageTokens | None = None) -> None:
        self.db = db
        self.live = catalog
        self.catalog = catalog.prices
        self.pages = pages or paging.PageTokens()

    async def quote(
        self,
        category: str,
        resource: str,
        units: dict[str, tuple[int, int]],
        time_us: int,
        price_context: dict[str, str],
    ) -> Cost:
        """What such an event would cost, by the catalog as every replica sees it now."""
        catalog = await self.live.refreshed(self.db)
        return quote(catalog, category, resource, units, time_us, price_context)

    async def create(
        self,
        category: str,
        resource: str,
        effective_time_us: int | None,
        unit_prices: dict[str, UnitPrice],
        create_key: str = "",
        price_context: dict[str, str] | None = None,
    ) -> tuple[CustomPrice, list[str]]:
        """The added price, and warnings for the caller (it overrides a system price)."""
        v = Violations("price.")
        if not CATEGORY_PATTERN.fullmatch(category):
            v.add("category", "category is required and must match [A-Za-z0-9._-]{1,128}")
        if not resource or len(resource) > 256 or not resource.isprintable():
            v.add("resource", "resource is required: 1 to 256 printable characters")
        if not unit_prices:
            v.add("unit_prices", "at least one unit price is required")
        if len(unit_prices) > MAX_UNIT_PRICES:
            v.add("unit_prices", f"at most {MAX_UNIT_PRICES} unit types")
        for unit, unit_price in unit_prices.items():
            if not UNIT_TYPE_PATTERN.fullmatch(unit):
                v.add(f"unit_prices[{unit[:64]!r}]", "unit type must match [a-z0-9_]{1,64}")
            if not unit_price.input_per_million and not unit_price.output_per_million:
                v.add(f"unit_prices[{unit[:64]!r}]", "set input_per_million, output_per_million or both")
            _check_decimal(v, f"unit_prices[{unit[:64]!r}].input_per_million", unit_price.input_per_million)
            _check_decimal(v, f"unit_prices[{unit[:64]!r}].output_per_million", unit_price.output_per_million)
        if effective_time_us is not None and effective_time_us < 0:
            v.add("effective_time", "must not be before 1970-01-01")
        check_price_context(v, "price_context", price_context or {})
        v.raise_if_any()
        price = CustomPrice(
            price_id=uuid.uuid4(),
            category=category,
            resource=resource.lower(),
            effective_time_us=effective_time_us or 0,
            unit_prices=dict(unit_prices),
            create_time_us=now_us(),
            create_key=create_key,
            price_context=dict(price_context or {}),
        )
        async with self.db.write() as conn:
            if not await stored_prices.insert_price(conn, price):
                raise already_exists(
                    "PRICE_ALREADY_EXISTS",
                    "tally.v1.CustomPrice",
                    f"{category}/{resource}",
                    f"{category}/{resource} already has a price effective at that time"
                    + (
                        f" for price context {stored_prices.price_context_key(price.price_context)}"
                        if price.price_context
                        else ""
                    ),
                )
        self.catalog.invalidate()
        warnings = []
        system = self.catalog.system_reference(price.category, price.resource, price.effective_time_us)
        if system is not None:
            warnings.append(
                f"this price overrides the system price of {category}/{resource} (genai-prices, {system.resource}) "
                "for events from its effective time on"
            )
        return price, warnings

    async def end(self, price_id: str, end_time_us: int | None, end_key: str = "") -> CustomPrice:
        """Ends the price at `end_time_us` (default now): from then on it prices no new event."""
        parsed = _price_id(price_id)
        async with self.db.write() as conn:
            price = await stored_prices.get_price(conn, parsed)
            if price is None:
                raise price_not_found(price_id)
            end = now_us() if end_time_us is None else end_time_us
            if end < price.effective_time_us:
                v = Violations()
                v.add("end_time", "must not be before the price's effective time (equal to it voids the price)")
                v.raise_if_any()
            if not await stored_prices.end_price(conn, parsed, end, end_key, now_us()):
                raise failed_precondition(
                    "PRICE_ALREADY_ENDED",
                    f"custom price {price_id} already has an end time",
                    ("tally.v1.CustomPrice", price_id),
                )
            ended = await stored_prices.get_price(conn, parsed)
        self.catalog.invalidate()
        assert ended is not None
        return ended

    async def get(self, price_id: str) -> CustomPrice:
        parsed = _price_id(price_id)
        async with self.db.read() as conn:
            price = await stored_prices.get_price(conn, parsed)
        if price is None:
            raise price_not_found(price_id)
        return price

    async def list(self, category: str, resource: str, page_size: int, page_token: str) -> Page:
        v = Violations()
        check_text(v, "category", category, 128)
        check_text(v, "resource", resource, 256)
        v.raise_if_any()
        size = paging.page_size(page_size)
        filters = [category, resource.lower()]
        after = self.pages.decode(page_token, "custom_prices", filters, lambda p: isinstance(p, list) and len(p) == 4)
        async with self.db.read() as conn:
            items = await stored_prices.list_prices(
                conn, category, resource.lower(), tuple(after) if after else None, size + 1
            )
        token = ""
        if len(items) > size:
            last = items[size - 1]
            position = [
                last.category,
                last.resource,
                last.effective_time_us,
                stored_prices.price_context_key(last.price_context),
            ]
            token = self.pages.encode("custom_prices", filters, position)
        return Page(items[:size], token)

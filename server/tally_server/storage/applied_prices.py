"""The prices events were priced with: one row per price applied, which an event names by
id (migration 0018), instead of its source, category, resource, version, effective time
and variant as text in every event row."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from .sql import insert_or_ignore
from .tables import applied_prices

# Ids known to be committed, per database connection (its `info`): one lookup per price
# and connection, then none. A catalog has thousands of prices at most; past this many the
# cache starts over.
_CACHE = "tally.applied_prices"
_CACHE_SIZE = 10_000


def _variant_json(price: m.PriceReference) -> str | None:
    """A price's variant as stored: compact JSON of its sorted pairs, None for the standard rate."""
    return json.dumps(dict(price.price_context), separators=(",", ":")) if price.price_context else None


def key_of(price: m.PriceReference) -> str:
    """The text a price is unique by (as migration 0018 builds it from the events' columns)."""
    effective = "" if price.effective_time_us is None else str(price.effective_time_us)
    variant = _variant_json(price) or ""
    return f"{int(price.source)}|{price.category}|{price.resource}|{price.version}|{effective}|{variant}"


async def ids_of(conn: AsyncConnection, prices: Collection[m.PriceReference]) -> dict[m.PriceReference, int]:
    """The id of each price's row, made if there is none. Only ids read before this
    transaction wrote any are cached: one it made would be gone if it rolled back."""
    cache: dict[m.PriceReference, int] = conn.info.setdefault(_CACHE, {})
    found = {price: cache[price] for price in prices if price in cache}
    missing = {key_of(price): price for price in prices if price not in found}
    if not missing:
        return found
    committed = await _ids(conn, missing)
    if len(cache) + len(committed) > _CACHE_SIZE:
        cache.clear()
    cache.update(committed)
    found.update(committed)
    new = {key: price for key, price in missing.items() if price not in committed}
    if new:
        await conn.execute(
            insert_or_ignore(conn, applied_prices).on_conflict_do_nothing(index_elements=["price_key"]),
            [_row(key, price) for key, price in new.items()],
        )
        found.update(await _ids(conn, new))
    return found


async def _ids(conn: AsyncConnection, prices: dict[str, m.PriceReference]) -> dict[m.PriceReference, int]:
    a = applied_prices
    rows = await conn.execute(sa.select(a.c.price_key, a.c.id).where(a.c.price_key.in_(list(prices))))
    return {prices[key]: int(price_id) for key, price_id in rows}


def _row(key: str, price: m.PriceReference) -> dict[str, Any]:
    return {
        "price_key": key,
        "source": int(price.source),
        "category": price.category,
        "resource": price.resource,
        "version": price.version,
        "effective_time_us": price.effective_time_us,
        "variant": dict(price.price_context) or None,
    }


async def priced_as(conn: AsyncConnection, model: str) -> bool:
    """Whether some price applied to an event is of this model (its resource)."""
    p = applied_prices
    return (await conn.execute(sa.select(p.c.id).where(p.c.resource == model).limit(1))).first() is not None

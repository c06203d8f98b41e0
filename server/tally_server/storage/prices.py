"""Custom prices, and the revision that tells replicas to reload them."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from .sql import insert_or_ignore
from .tables import (
    custom_prices,
)


def _price(row: Any) -> m.CustomPrice:
    return m.CustomPrice(
        price_id=row.id,
        category=row.category,
        resource=row.resource,
        effective_time_us=row.effective_time_us,
        unit_prices={unit: m.UnitPrice(*pair) for unit, pair in row.unit_prices.items()},
        create_time_us=row.create_time_us,
        create_key=row.create_key or "",
        end_time_us=row.end_time_us,
        end_key=row.end_key or "",
        price_context=dict(row.price_context or {}),
    )


async def insert_price(conn: AsyncConnection, price: m.CustomPrice) -> bool:
    stmt = (
        insert_or_ignore(conn, custom_prices)
        .values(
            id=price.price_id,
            category=price.category,
            resource=price.resource,
            effective_time_us=price.effective_time_us,
            unit_prices={u: [p.input_per_million, p.output_per_million] for u, p in price.unit_prices.items()},
            create_time_us=price.create_time_us,
            update_time_us=price.create_time_us,
            create_key=price.create_key or None,
            price_context=price.price_context or None,
            price_context_key=price_context_key(price.price_context),
        )
        .on_conflict_do_nothing()
        .returning(custom_prices.c.id)
    )
    return (await conn.execute(stmt)).scalar() is not None


async def get_price(conn: AsyncConnection, price_id: uuid.UUID) -> m.CustomPrice | None:
    row = (await conn.execute(sa.select(custom_prices).where(custom_prices.c.id == price_id))).first()
    return None if row is None else _price(row)


def price_context_key(context: dict[str, str]) -> str:
    """A variant's price context as the text its uniqueness is kept by: "k=v,k=v", sorted."""
    return ",".join(f"{k}={v}" for k, v in sorted(context.items()))


async def list_prices(
    conn: AsyncConnection, category: str, resource: str, after: tuple[str, str, int, str] | None, limit: int
) -> list[m.CustomPrice]:
    """By category, resource, effective time (newest first) and variant."""
    p = custom_prices
    order = (p.c.category, p.c.resource, p.c.effective_time_us.desc(), p.c.price_context_key)
    query = sa.select(p).order_by(*order).limit(limit)
    if category:
        query = query.where(p.c.category == category)
    if resource:
        query = query.where(p.c.resource == resource)
    if after is not None:
        cat, res, eff, variant = after
        same_time = sa.and_(p.c.category == cat, p.c.resource == res, p.c.effective_time_us == eff)
        query = query.where(
            sa.or_(
                p.c.category > cat,
                sa.and_(p.c.category == cat, p.c.resource > res),
                sa.and_(p.c.category == cat, p.c.resource == res, p.c.effective_time_us < eff),
                sa.and_(same_time, p.c.price_context_key > variant),
            )
        )
    return [_price(row) for row in await conn.execute(query)]


async def all_prices(conn: AsyncConnection) -> list[m.CustomPrice]:
    return [_price(row) for row in await conn.execute(sa.select(custom_prices))]


async def price_catalog_revision(conn: AsyncConnection) -> tuple[int, int]:
    """Changes whenever a custom price is added or ended: (count, latest change)."""
    p = custom_prices
    row = (await conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(p.c.update_time_us), 0)))).one()
    return int(row[0]), int(row[1])


async def end_price(conn: AsyncConnection, price_id: uuid.UUID, end_time_us: int, key: str, now_us: int) -> bool:
    """Sets the end of a price that has none; False if it already had one."""
    p = custom_prices
    stmt = (
        sa.update(p)
        .where(p.c.id == price_id, p.c.end_time_us.is_(None))
        .values(end_time_us=end_time_us, end_key=key or None, update_time_us=now_us)
    )
    return bool((await conn.execute(stmt)).rowcount)

"""API keys (by the hash of their secret) and the keys the replicas share."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m
from .sql import insert_or_ignore
from .tables import (
    api_keys,
    server_keys,
)


def _api_key(row: Any) -> m.ApiKey:
    return m.ApiKey(row.name, tuple(row.scopes), row.create_time_us, row.last_use_time_us, row.revoke_time_us)


async def insert_api_key(conn: AsyncConnection, key: m.ApiKey, secret_hash: str) -> bool:
    """Inserts the key; False if its name is taken."""
    stmt = (
        insert_or_ignore(conn, api_keys)
        .values(name=key.name, scopes=list(key.scopes), secret_hash=secret_hash, create_time_us=key.create_time_us)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(api_keys.c.id)
    )
    return (await conn.execute(stmt)).scalar() is not None


async def api_key_by_hash(conn: AsyncConnection, secret_hash: str) -> m.ApiKey | None:
    row = (await conn.execute(sa.select(api_keys).where(api_keys.c.secret_hash == secret_hash))).first()
    return None if row is None else _api_key(row)


async def list_api_keys(conn: AsyncConnection, after_name: str | None, limit: int) -> list[m.ApiKey]:
    query = sa.select(api_keys).order_by(api_keys.c.name).limit(limit)
    if after_name is not None:
        query = query.where(api_keys.c.name > after_name)
    return [_api_key(row) for row in await conn.execute(query)]


async def revoke_api_key(conn: AsyncConnection, name: str, now_us: int) -> m.ApiKey | None:
    """Revokes the key (a revoked key stays revoked at its first time); None if there is none."""
    await conn.execute(
        sa.update(api_keys)
        .where(api_keys.c.name == name, api_keys.c.revoke_time_us.is_(None))
        .values(revoke_time_us=now_us)
    )
    row = (await conn.execute(sa.select(api_keys).where(api_keys.c.name == name))).first()
    return None if row is None else _api_key(row)


async def touch_api_key(conn: AsyncConnection, secret_hash: str, now_us: int) -> None:
    await conn.execute(sa.update(api_keys).where(api_keys.c.secret_hash == secret_hash).values(last_use_time_us=now_us))


async def server_key(conn: AsyncConnection, name: str) -> bytes:
    """A key the replicas of this database share (made by migration 0004)."""
    value = (await conn.execute(sa.select(server_keys.c.value).where(server_keys.c.name == name))).scalar_one()
    return bytes.fromhex(value)

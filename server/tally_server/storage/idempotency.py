"""request_id idempotency of the admin calls: what each request id did, kept with its effect."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .tables import (
    idempotent_requests,
)


async def get_idempotent_request(conn: AsyncConnection, operation: str, request_id: str) -> tuple[str, str] | None:
    """(fingerprint, resource_key) recorded for the request id, if any."""
    t = idempotent_requests
    row = (
        await conn.execute(
            sa.select(t.c.fingerprint, t.c.resource_key).where(t.c.operation == operation, t.c.request_id == request_id)
        )
    ).first()
    return None if row is None else (row.fingerprint, row.resource_key)


async def put_idempotent_request(
    conn: AsyncConnection, operation: str, request_id: str, fingerprint: str, resource_key: str, now_us: int
) -> None:
    await conn.execute(
        sa.insert(idempotent_requests).values(
            operation=operation,
            request_id=request_id,
            fingerprint=fingerprint,
            resource_key=resource_key,
            create_time_us=now_us,
        )
    )

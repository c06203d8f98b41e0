"""Annotations of stored events, the latest value of each key with who set it and when."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain.annotations import Annotation
from .sql import insert_or_ignore
from .tables import event_annotations


async def change(
    conn: AsyncConnection,
    event_id: uuid.UUID,
    set_annotations: Mapping[str, str],
    remove_keys: Sequence[str],
    now_us: int,
    key_name: str,
) -> None:
    a = event_annotations
    if remove_keys:
        await conn.execute(sa.delete(a).where(a.c.event_id == event_id, a.c.key.in_(list(remove_keys))))
    for key, value in sorted(set_annotations.items()):
        insert = insert_or_ignore(conn, a).values(
            event_id=event_id, key=key, value=value, update_time_us=now_us, key_name=key_name
        )
        await conn.execute(
            insert.on_conflict_do_update(
                index_elements=["event_id", "key"],
                set_={"value": value, "update_time_us": now_us, "key_name": key_name},
            )
        )


async def of_events(conn: AsyncConnection, event_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, tuple[Annotation, ...]]:
    a = event_annotations
    ids = list(event_ids)
    if not ids:
        return {}
    found: dict[uuid.UUID, list[Annotation]] = {}
    rows = await conn.execute(sa.select(a).where(a.c.event_id.in_(ids)).order_by(a.c.event_id, a.c.key))
    for row in rows:
        found.setdefault(row.event_id, []).append(Annotation(row.key, row.value, int(row.update_time_us), row.key_name))
    return {event_id: tuple(items) for event_id, items in found.items()}

"""Limits: their definitions and resets, their spend per period, and reservations.

Spend rows are locked in key order by every writer (the ingest writer's upserts and
Reserve's reads), so that concurrent transactions on PostgreSQL take turns without
deadlocking; SQLite's write lock takes turns for the whole file.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import limits as rules
from .sql import insert_or_ignore
from .tables import limit_holds, limit_reservations, limit_resets, limit_revision, limit_spend, limits

NANOS_PER_DOLLAR = 1_000_000_000


def _limit(row: Any, resets: Sequence[int]) -> rules.Limit:
    return rules.Limit(
        name=row.name,
        max_nanos=int(row.max_nanos),
        kind=rules.LimitKind(row.kind),
        threshold_percent=int(row.threshold_percent),
        scope=rules.LimitScope(
            rules.ScopeKind(row.scope_kind),
            row.scope_type,
            int(row.scope_version),
            bool(row.per_experience),
            row.scope_value,
        ),
        period=rules.LimitPeriod(row.period),
        create_time_us=int(row.create_time_us),
        limit_id=int(row.id),
        resets_us=tuple(sorted(resets)),
    )


async def revision(conn: AsyncConnection) -> int:
    return int((await conn.execute(sa.select(limit_revision.c.revision).where(limit_revision.c.id == 1))).scalar_one())


async def bump_revision(conn: AsyncConnection) -> None:
    """Marks a change of the limits; its row lock also makes changes take turns."""
    await conn.execute(
        sa.update(limit_revision).where(limit_revision.c.id == 1).values(revision=limit_revision.c.revision + 1)
    )


async def all_limits(conn: AsyncConnection) -> list[rules.Limit]:
    resets: dict[int, list[int]] = {}
    for limit_id, reset in await conn.execute(sa.select(limit_resets.c.limit_id, limit_resets.c.reset_time_us)):
        resets.setdefault(int(limit_id), []).append(int(reset))
    rows = await conn.execute(sa.select(limits).order_by(limits.c.name))
    return [_limit(row, resets.get(int(row.id), ())) for row in rows]


async def insert_limit(conn: AsyncConnection, limit: rules.Limit) -> int | None:
    """The new limit's id; None if the name is taken."""
    scope = limit.scope
    statement = (
        insert_or_ignore(conn, limits)
        .values(
            name=limit.name,
            kind=int(limit.kind),
            max_nanos=limit.max_nanos,
            threshold_percent=limit.threshold_percent,
            scope_kind=int(scope.kind),
            scope_type=scope.experience_type,
            scope_version=scope.experience_version,
            per_experience=scope.per_experience,
            scope_value=scope.value,
            period=int(limit.period),
            create_time_us=limit.create_time_us,
        )
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(limits.c.id)
    )
    limit_id = (await conn.execute(statement)).scalar()
    return None if limit_id is None else int(limit_id)


async def get_limit(conn: AsyncConnection, name: str) -> rules.Limit | None:
    row = (await conn.execute(sa.select(limits).where(limits.c.name == name))).first()
    if row is None:
        return None
    resets = await conn.execute(sa.select(limit_resets.c.reset_time_us).where(limit_resets.c.limit_id == row.id))
    return _limit(row, [int(r[0]) for r in resets])


async def list_limits(conn: AsyncConnection, after_name: str | None, count: int) -> list[rules.Limit]:
    query = sa.select(limits.c.name).order_by(limits.c.name).limit(count)
    if after_name is not None:
        query = query.where(limits.c.name > after_name)
    names = [row[0] for row in await conn.execute(query)]
    found = [await get_limit(conn, name) for name in names]
    return [limit for limit in found if limit is not None]


async def add_reset(conn: AsyncConnection, limit_id: int, time_us: int) -> None:
    await conn.execute(sa.insert(limit_resets).values(limit_id=limit_id, reset_time_us=time_us))
    # What was held against the ended period is released with it.
    await conn.execute(sa.delete(limit_holds).where(limit_holds.c.limit_id == limit_id))


async def delete_limit(conn: AsyncConnection, limit_id: int) -> None:
    for table, column in (
        (limit_holds, limit_holds.c.limit_id),
        (limit_spend, limit_spend.c.limit_id),
        (limit_resets, limit_resets.c.limit_id),
        (limits, limits.c.id),
    ):
        await conn.execute(sa.delete(table).where(column == limit_id))


# --- spend ---------------------------------------------------------------------------------


def _spend(row: Any) -> int:
    return int(row.spend_dollars) * NANOS_PER_DOLLAR + int(row.spend_nanos)


async def add_spend(
    conn: AsyncConnection, added: Mapping[rules.PeriodKey, tuple[int, int]]
) -> dict[rules.PeriodKey, int]:
    """Adds (cost in nanos, event count) to each period, in key order; returns each period's
    spend after it."""
    after: dict[rules.PeriodKey, int] = {}
    s = limit_spend
    for key in sorted(added, key=lambda k: (k.limit_id, k.subject, k.start_us)):
        nanos, count = added[key]
        dollars, leftover = divmod(nanos, NANOS_PER_DOLLAR)
        insert = insert_or_ignore(conn, s).values(
            limit_id=key.limit_id,
            subject=key.subject,
            start_us=key.start_us,
            spend_dollars=dollars,
            spend_nanos=leftover,
            event_count=count,
        )
        statement = insert.on_conflict_do_update(
            index_elements=["limit_id", "subject", "start_us"],
            set_={
                "spend_dollars": s.c.spend_dollars + insert.excluded.spend_dollars,
                "spend_nanos": s.c.spend_nanos + insert.excluded.spend_nanos,
                "event_count": s.c.event_count + insert.excluded.event_count,
            },
        ).returning(s.c.spend_dollars, s.c.spend_nanos)
        after[key] = _spend((await conn.execute(statement)).one())
    return after


async def locked_spend(
    conn: AsyncConnection, keys: Iterable[rules.PeriodKey], now_us: int
) -> dict[rules.PeriodKey, rules.PeriodSpend]:
    """Each period's spend and what is reserved against its limit and subject, the rows locked
    (in key order) until the transaction ends, so that concurrent reservations take turns."""
    s = limit_spend
    found: dict[rules.PeriodKey, rules.PeriodSpend] = {}
    for key in sorted(set(keys), key=lambda k: (k.limit_id, k.subject, k.start_us)):
        await conn.execute(
            insert_or_ignore(conn, s)
            .values(
                limit_id=key.limit_id,
                subject=key.subject,
                start_us=key.start_us,
                spend_dollars=0,
                spend_nanos=0,
                event_count=0,
            )
            .on_conflict_do_nothing(index_elements=["limit_id", "subject", "start_us"])
        )
        query = sa.select(s.c.spend_dollars, s.c.spend_nanos, s.c.event_count).where(
            s.c.limit_id == key.limit_id, s.c.subject == key.subject, s.c.start_us == key.start_us
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).one()
        found[key] = rules.PeriodSpend(key, _spend(row), int(row.event_count), await reserved(conn, key, now_us))
    return found


async def reserved(conn: AsyncConnection, key: rules.PeriodKey, now_us: int) -> int:
    """What outstanding reservations hold against a limit and subject."""
    h = limit_holds
    total = await conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(h.c.amount_nanos), 0)).where(
            h.c.limit_id == key.limit_id, h.c.subject == key.subject, h.c.expire_time_us > now_us
        )
    )
    return int(total.scalar_one())


async def spend_of(conn: AsyncConnection, key: rules.PeriodKey, now_us: int) -> rules.PeriodSpend:
    s = limit_spend
    row = (
        await conn.execute(
            sa.select(s.c.spend_dollars, s.c.spend_nanos, s.c.event_count).where(
                s.c.limit_id == key.limit_id, s.c.subject == key.subject, s.c.start_us == key.start_us
            )
        )
    ).first()
    spent, count = (0, 0) if row is None else (_spend(row), int(row.event_count))
    return rules.PeriodSpend(key, spent, count, await reserved(conn, key, now_us))


async def periods(
    conn: AsyncConnection, limit_id: int, subject: str | None, before: tuple[int, str] | None, count: int
) -> list[rules.PeriodSpend]:
    """A limit's periods, the newest first (by start, then subject)."""
    s = limit_spend
    query = sa.select(s).where(s.c.limit_id == limit_id)
    if subject is not None:
        query = query.where(s.c.subject == subject)
    if before is not None:
        query = query.where(sa.tuple_(s.c.start_us, s.c.subject) < sa.tuple_(*before))
    query = query.order_by(s.c.start_us.desc(), s.c.subject.desc()).limit(count)
    return [
        rules.PeriodSpend(rules.PeriodKey(limit_id, row.subject, int(row.start_us)), _spend(row), int(row.event_count))
        for row in await conn.execute(query)
    ]


# --- reservations --------------------------------------------------------------------------


async def insert_reservation(
    conn: AsyncConnection,
    reservation_id: uuid.UUID,
    amount_nanos: int,
    holds: Sequence[rules.PeriodKey],
    now_us: int,
    expire_time_us: int,
    key_name: str,
) -> None:
    await conn.execute(
        sa.insert(limit_reservations).values(
            id=reservation_id,
            amount_nanos=amount_nanos,
            create_time_us=now_us,
            expire_time_us=expire_time_us,
            key_name=key_name,
        )
    )
    distinct = {(key.limit_id, key.subject) for key in holds}
    if distinct:
        await conn.execute(
            sa.insert(limit_holds),
            [
                {
                    "reservation_id": reservation_id,
                    "limit_id": limit_id,
                    "subject": subject,
                    "amount_nanos": amount_nanos,
                    "expire_time_us": expire_time_us,
                }
                for limit_id, subject in sorted(distinct)
            ],
        )


async def get_reservation(conn: AsyncConnection, reservation_id: uuid.UUID) -> Any:
    r = limit_reservations
    return (await conn.execute(sa.select(r).where(r.c.id == reservation_id))).first()


async def holds_of(conn: AsyncConnection, reservation_id: uuid.UUID) -> list[tuple[int, str]]:
    h = limit_holds
    rows = await conn.execute(sa.select(h.c.limit_id, h.c.subject).where(h.c.reservation_id == reservation_id))
    return [(int(limit_id), subject) for limit_id, subject in rows]


async def settle(conn: AsyncConnection, ids: Iterable[uuid.UUID], now_us: int) -> set[uuid.UUID]:
    """Settles the outstanding reservations among `ids` (not settled, not expired): their
    holds go. Returns those it settled."""
    ids = list(set(ids))
    if not ids:
        return set()
    r = limit_reservations
    outstanding = sa.and_(r.c.id.in_(ids), r.c.settle_time_us.is_(None), r.c.expire_time_us > now_us)
    settled = {
        row[0]
        for row in await conn.execute(sa.update(r).where(outstanding).values(settle_time_us=now_us).returning(r.c.id))
    }
    if settled:
        await conn.execute(sa.delete(limit_holds).where(limit_holds.c.reservation_id.in_(list(settled))))
    return settled


async def forget_expired(conn: AsyncConnection, now_us: int, keep_us: int) -> None:
    """Deletes holds that expired, and reservations settled or expired before `keep_us`."""
    await conn.execute(sa.delete(limit_holds).where(limit_holds.c.expire_time_us <= now_us))
    r = limit_reservations
    await conn.execute(sa.delete(r).where(sa.or_(r.c.expire_time_us < keep_us, r.c.settle_time_us < keep_us)))

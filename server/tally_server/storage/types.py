"""Experience types and their version snapshots."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain import models as m, outcomes
from . import rollups
from .sql import insert_or_ignore
from .tables import (
    events,
    experience_type_versions,
    experience_types,
    experiences,
)

_type_columns = (
    experience_types.c.id,
    experience_types.c.name,
    experience_types.c.description,
    experience_types.c.settings,
    experience_types.c.version,
    experience_types.c.create_time_us,
    experience_types.c.update_time_us,
    experience_types.c.outcomes,
)


def _type(row: Any) -> m.ExperienceType:
    return m.ExperienceType(
        name=row.name,
        description=row.description,
        settings=dict(row.settings),
        version=row.version,
        create_time_us=row.create_time_us,
        update_time_us=row.update_time_us,
        outcomes=outcomes.from_json(row.outcomes),
    )


async def get_type(conn: AsyncConnection, name: str) -> tuple[int, m.ExperienceType] | None:
    row = (await conn.execute(sa.select(*_type_columns).where(experience_types.c.name == name))).first()
    return None if row is None else (row.id, _type(row))


async def get_types(conn: AsyncConnection, names: Iterable[str]) -> dict[str, tuple[int, m.ExperienceType]]:
    rows = await conn.execute(sa.select(*_type_columns).where(experience_types.c.name.in_(list(names))))
    return {row.name: (row.id, _type(row)) for row in rows}


async def insert_type(conn: AsyncConnection, t: m.ExperienceType) -> int | None:
    """Inserts the type and its version-1 snapshot; None if the name is taken."""
    stmt = (
        insert_or_ignore(conn, experience_types)
        .values(
            name=t.name,
            description=t.description,
            settings=t.settings,
            version=t.version,
            create_time_us=t.create_time_us,
            update_time_us=t.update_time_us,
            outcomes=outcomes.to_json(t.outcomes) if t.outcomes else None,
        )
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(experience_types.c.id)
    )
    type_id = (await conn.execute(stmt)).scalar()
    if type_id is not None:
        await insert_type_version(conn, type_id, t.version, t.description, t.settings, t.create_time_us)
    return None if type_id is None else int(type_id)


async def insert_type_version(
    conn: AsyncConnection, type_id: int, version: int, description: str, settings: dict[str, str], now_us: int
) -> None:
    await conn.execute(
        sa.insert(experience_type_versions).values(
            type_id=type_id, version=version, description=description, settings=settings, create_time_us=now_us
        )
    )


async def list_types(conn: AsyncConnection, after_name: str | None, limit: int) -> list[m.ExperienceType]:
    query = sa.select(*_type_columns).order_by(experience_types.c.name).limit(limit)
    if after_name is not None:
        query = query.where(experience_types.c.name > after_name)
    return [_type(row) for row in await conn.execute(query)]


async def update_type(conn: AsyncConnection, type_id: int, version: int, values: dict[str, Any], now_us: int) -> None:
    """Updates the type and the snapshot of its current version alike (the snapshot keeps
    description and settings; outcomes are the type's)."""
    if "outcomes" in values:
        values = {**values, "outcomes": outcomes.to_json(values["outcomes"]) or None}
    await conn.execute(
        sa.update(experience_types).where(experience_types.c.id == type_id).values(**values, update_time_us=now_us)
    )
    snapshot = {key: value for key, value in values.items() if key != "outcomes"}
    if snapshot:
        await conn.execute(
            sa.update(experience_type_versions)
            .where(experience_type_versions.c.type_id == type_id, experience_type_versions.c.version == version)
            .values(**snapshot)
        )


async def increment_version(conn: AsyncConnection, type_id: int, now_us: int) -> int:
    """Adds 1 atomically (safe against concurrent increments) and returns the new version."""
    stmt = (
        sa.update(experience_types)
        .where(experience_types.c.id == type_id)
        .values(version=experience_types.c.version + 1, update_time_us=now_us)
        .returning(experience_types.c.version)
    )
    return int((await conn.execute(stmt)).scalar_one())


async def list_versions(
    conn: AsyncConnection, type_id: int, name: str, before_version: int | None, limit: int
) -> list[m.ExperienceTypeVersion]:
    v = experience_type_versions
    query = sa.select(v).where(v.c.type_id == type_id).order_by(v.c.version.desc()).limit(limit)
    if before_version is not None:
        query = query.where(v.c.version < before_version)
    return [
        m.ExperienceTypeVersion(name, row.version, row.description, dict(row.settings), row.create_time_us)
        for row in await conn.execute(query)
    ]


async def get_version(conn: AsyncConnection, type_id: int, name: str, version: int) -> m.ExperienceTypeVersion:
    v = experience_type_versions
    row = (await conn.execute(sa.select(v).where(v.c.type_id == type_id, v.c.version == version))).one()
    return m.ExperienceTypeVersion(name, row.version, row.description, dict(row.settings), row.create_time_us)


async def count_experiences_of_type(conn: AsyncConnection, type_id: int) -> int:
    stmt = sa.select(sa.func.count()).select_from(experiences).where(experiences.c.type_id == type_id)
    return (await conn.execute(stmt)).scalar_one()


async def lock_type(conn: AsyncConnection, type_id: int) -> None:
    """Locks the type's row and its experiences' rows for this transaction (PostgreSQL; a
    SQLite writer holds the whole file), so that a writer adding an experience or events to
    the type commits before it, or waits and finds them gone."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.select(experience_types.c.id).where(experience_types.c.id == type_id).with_for_update())
        of_type = sa.select(experiences.c.id).where(experiences.c.type_id == type_id).order_by(experiences.c.id)
        await conn.execute(of_type.with_for_update())


async def delete_type(conn: AsyncConnection, type_id: int) -> int:
    """Deletes the type, its versions and its experiences; their events become unattributed
    (and move to the unattributed rows of the hourly rollups). Call lock_type first."""
    of_type = sa.select(experiences.c.id).where(experiences.c.type_id == type_id)
    await rollups.unattribute(conn, events.c.experience_id.in_(of_type))
    await conn.execute(sa.update(events).where(events.c.experience_id.in_(of_type)).values(experience_id=None))
    await rollups.drop_type(conn, type_id)
    deleted = (await conn.execute(sa.delete(experiences).where(experiences.c.type_id == type_id))).rowcount
    await conn.execute(sa.delete(experience_type_versions).where(experience_type_versions.c.type_id == type_id))
    await conn.execute(sa.delete(experience_types).where(experience_types.c.id == type_id))
    return deleted

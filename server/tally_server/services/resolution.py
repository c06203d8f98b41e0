"""Resolves the experiences of one commit's events inside its transaction: reads what
exists, creates what is missing, and applies the rules of domain.resolution.

Safe under concurrency: creation is an insert that ignores a conflicting id,
followed by a read of whichever row won, so concurrent resolutions of one new
id end with one experience, on one server or many.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain.errors import Code, TallyError
from ..domain.limits import Subject
from ..domain.models import EventContext, Experience, ExperienceType, Resolution
from ..domain.resolution import Decision, Plan, ToCreate, decide, per_event, plan_of, plans, type_mismatch
from ..storage import experiences as stored_experiences, types as stored_types


async def resolve_experiences(
    conn: AsyncConnection, contexts: Sequence[EventContext], now_us: int
) -> list[Resolution | TallyError]:
    """Resolves each context inside the caller's transaction, creating experiences as needed.

    Returns, per context, its Resolution or the TallyError that refuses it.
    """
    planned = plans(contexts)
    distinct = list({id(plan): plan for plan in planned if plan is not None}.values())
    existing, types = await _read_existing(conn, distinct)
    decided = {id(plan): decide(plan, existing, types) for plan in distinct}
    await _create(conn, decided, now_us)
    return per_event(planned, decided)


async def _read_existing(
    conn: AsyncConnection, plans: Sequence[Plan]
) -> tuple[dict[uuid.UUID, Experience], dict[str, tuple[int, ExperienceType]]]:
    """The experiences the plans name that exist, and the types of those that do not."""
    existing = await stored_experiences.get_experiences(conn, {p.experience_id for p in plans if not p.generated})
    names = {p.name for p in plans if p.experience_id not in existing and p.name}
    types = await stored_types.get_types(conn, names) if names else {}
    return existing, types


async def _create(conn: AsyncConnection, decided: dict[int, Decision], now_us: int) -> None:
    """Inserts the experiences to create, and replaces each such decision by what
    became of it: created here, or created first by a concurrent resolution."""
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    for decision in decided.values():
        if isinstance(decision, ToCreate) and decision.plan.experience_id not in rows:
            rows[decision.plan.experience_id] = {
                "id": decision.plan.experience_id,
                "type_id": decision.type_id,
                "version": decision.version,
                "create_time_us": now_us,
                "properties": {},
            }
    if not rows:
        return
    inserted = await stored_experiences.insert_experiences(conn, list(rows.values()))
    lost_race = set(rows) - inserted
    winners = await stored_experiences.get_experiences(conn, lost_race) if lost_race else {}
    for key, decision in decided.items():
        if not isinstance(decision, ToCreate):
            continue
        plan = decision.plan
        if plan.experience_id in inserted:
            experience = Experience(plan.experience_id, plan.name, rows[plan.experience_id]["version"], now_us, {})
            decided[key] = Resolution(experience, True, plan.warnings)
        elif (winner := winners.get(plan.experience_id)) is None:  # created and deleted between the statements
            decided[key] = TallyError(
                Code.ABORTED, "CONCURRENT_DELETE", "the experience was deleted concurrently; retry"
            )
        elif winner.experience_name != plan.name:
            decided[key] = type_mismatch(winner, plan.name)
        else:
            decided[key] = Resolution(winner, False, plan.warnings)


async def limit_subject(conn: AsyncConnection, context: EventContext) -> Subject:
    """What decides which limits apply to a call with this context, resolved as ingest would
    resolve its event (the same rules, nothing created): an existing experience's type and
    version; else the named type at the version given or, as a new run gets, its current one.
    A non-UUID id is its derived UUID; a name alone names no experience yet."""
    plan = plan_of(context)
    if plan is None:
        return Subject(None, "", 0, context.user_id, context.request_tags)
    if not plan.generated:
        found = await stored_experiences.get_experience(conn, plan.experience_id)
        if found is not None:
            name, version = found.experience_name, found.experience_version
            return Subject(found.experience_id, name, version, context.user_id, context.request_tags)
    version = plan.version
    if plan.name and not version:
        types = await stored_types.get_types(conn, [plan.name])
        if plan.name in types:
            version = types[plan.name][1].version
    experience_id = None if plan.generated else plan.experience_id
    return Subject(experience_id, plan.name, version, context.user_id, context.request_tags)

"""Which experience an event belongs to: the five rules of DESIGN.md, in one place.

1. A valid UUID that exists: that experience. A name that differs from its type
   is FAILED_PRECONDITION (EXPERIENCE_TYPE_MISMATCH).
2. A valid UUID that does not exist: with a name, the experience is created with
   exactly that id; without one, NOT_FOUND (EXPERIENCE_NOT_FOUND).
3. Not a UUID: the id is mapped to a UUIDv5 in Tally's namespace, with a
   warning, and rules 1 and 2 apply to that id, so the same bad id always lands
   in the same experience.
4. A name alone: a new experience with a server-generated UUIDv7.
5. Neither: the event is unattributed.

Safe under concurrency: creation is an insert that ignores a conflicting id,
followed by a read of whichever row won, so concurrent resolutions of one new
id end with one experience, on one server or many.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from ..storage import repository as repo
from .ids import uuid7
from .errors import Code, TallyError, Violation, failed_precondition, invalid, not_found
from .models import EventContext, Experience, Resolution
from .validation import parse_uuid

# Fixed forever: derived ids of existing experiences depend on it.
DERIVED_ID_NAMESPACE = uuid.UUID("6f1c2b8e-3d4a-5b6c-9d7e-8f9a0b1c2d3e")


def derive_experience_id(raw_id: str) -> uuid.UUID:
    return uuid.uuid5(DERIVED_ID_NAMESPACE, raw_id)


def new_experience_id() -> uuid.UUID:
    """Server-generated ids are UUIDv7: time-ordered, so they index well."""
    return uuid7()


def experience_not_found(experience_id: uuid.UUID | str) -> TallyError:
    return not_found(
        "EXPERIENCE_NOT_FOUND",
        "tally.v1.Experience",
        str(experience_id),
        f"experience {experience_id} does not exist; to create it with this id, also pass its "
        "experience type name (metadata xproxy-experience-name or context.experience_name)",
    )


def type_mismatch(experience: Experience, name: str) -> TallyError:
    return failed_precondition(
        "EXPERIENCE_TYPE_MISMATCH",
        f"experience {experience.experience_id} is of type {experience.experience_name!r}, not {name!r}",
        resource=("tally.v1.Experience", str(experience.experience_id)),
    )


class _Plan:
    """What one context asks for, before the database is read."""

    __slots__ = ("experience_id", "name", "version", "warnings", "generated")

    def __init__(self, experience_id: uuid.UUID | None, name: str, version: int, warnings: tuple[str, ...], generated: bool):
        self.experience_id = experience_id
        self.name = name
        self.version = version
        self.warnings = warnings
        self.generated = generated


def _plan(context: EventContext) -> _Plan | None:
    if not context.experience_id:
        if not context.experience_name:
            return None  # rule 5
        return _Plan(new_experience_id(), context.experience_name, context.experience_version, (), True)  # rule 4
    parsed = parse_uuid(context.experience_id)
    warnings: tuple[str, ...] = ()
    if parsed is None:  # rule 3
        parsed = derive_experience_id(context.experience_id)
        warnings = (
            f"experience id {context.experience_id[:80]!r} is not a UUID; "
            f"the event is attributed to the derived id {parsed}",
        )
    return _Plan(parsed, context.experience_name, context.experience_version, warnings, False)


async def resolve_experiences(
    conn: AsyncConnection, contexts: Sequence[EventContext], now_us: int
) -> list[Resolution | TallyError]:
    """Resolves each context inside the caller's transaction, creating experiences as needed.

    Returns, per context, its Resolution or the TallyError that refuses it.
    """
    plans = _plans(contexts)
    distinct = list({id(plan): plan for plan in plans if plan is not None}.values())
    existing = await repo.get_experiences(conn, {p.experience_id for p in distinct if not p.generated})
    names = {p.name for p in distinct if p.experience_id not in existing and p.name}
    types = await repo.get_types(conn, names) if names else {}

    # Each distinct plan is decided once: found, refused, or to be created.
    decided: dict[int, Resolution | TallyError | _Plan] = {}
    to_create: dict[uuid.UUID, dict] = {}
    for plan in distinct:
        found = existing.get(plan.experience_id)
        if found is not None:
            mismatch = plan.name and plan.name != found.experience_name
            decided[id(plan)] = type_mismatch(found, plan.name) if mismatch else Resolution(found, False, plan.warnings)
            continue
        if not plan.name:
            decided[id(plan)] = experience_not_found(plan.experience_id)
            continue
        type_row = types.get(plan.name)
        if type_row is None:
            decided[id(plan)] = not_found(
                "EXPERIENCE_TYPE_NOT_FOUND",
                "tally.v1.ExperienceType",
                plan.name,
                f"experience type {plan.name!r} does not exist; create it first",
            )
            continue
        type_id, experience_type = type_row
        version = plan.version or experience_type.version
        if not 1 <= version <= experience_type.version:
            decided[id(plan)] = invalid(
                [
                    Violation(
                        "experience_version",
                        f"version {plan.version} of {plan.name!r} does not exist (current: {experience_type.version})",
                    )
                ]
            )
            continue
        if plan.experience_id not in to_create:
            to_create[plan.experience_id] = {
                "id": plan.experience_id,
                "type_id": type_id,
                "version": version,
                "create_time_us": now_us,
                "properties": {},
            }
        decided[id(plan)] = plan

    inserted = await repo.insert_experiences(conn, list(to_create.values()))
    lost_race = set(to_create) - inserted
    winners = await repo.get_experiences(conn, lost_race) if lost_race else {}
    for key, outcome in decided.items():
        if not isinstance(outcome, _Plan):
            continue
        plan = outcome
        if plan.experience_id in inserted:
            experience = Experience(plan.experience_id, plan.name, to_create[plan.experience_id]["version"], now_us, {})
            decided[key] = Resolution(experience, True, plan.warnings)
            continue
        winner = winners.get(plan.experience_id)
        if winner is None:  # created and deleted again between the two statements
            decided[key] = TallyError(Code.ABORTED, "CONCURRENT_DELETE", "the experience was deleted concurrently; retry")
        elif winner.experience_name != plan.name:
            decided[key] = type_mismatch(winner, plan.name)
        else:
            decided[key] = Resolution(winner, False, plan.warnings)

    results: list[Resolution | TallyError] = []
    announced: set[uuid.UUID] = set()
    for plan in plans:
        if plan is None:
            results.append(_UNATTRIBUTED)
            continue
        outcome = decided[id(plan)]
        if isinstance(outcome, TallyError):
            outcome = dataclasses.replace(outcome)  # each event raises its own exception
        elif outcome.created:
            # Only the first event of a new experience says it created it.
            experience_id = outcome.experience.experience_id
            if experience_id in announced:
                outcome = Resolution(outcome.experience, False, outcome.warnings)
            announced.add(experience_id)
        results.append(outcome)
    return results


_UNATTRIBUTED = Resolution(None)


def _plans(contexts: Sequence[EventContext]) -> list[_Plan | None]:
    """A plan per context. Events of one call mostly share a context: each distinct
    id is planned once (rule 4 plans a new experience per event)."""
    planned: dict[EventContext, _Plan | None] = {}
    plans: list[_Plan | None] = []
    last_context, last_plan = None, None
    for context in contexts:
        if context is last_context and context.experience_id:  # the same object: no hashing
            plans.append(last_plan)
            continue
        if not context.experience_id:
            plan = _plan(context)
        else:
            plan = planned.get(context)
            if plan is None:
                plan = planned[context] = _plan(context)
        plans.append(plan)
        last_context, last_plan = context, plan
    return plans

"""Which experience an event belongs to: the five rules of docs/guarantees.md, in one place.

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

The steps, for all the events of one commit at once: plan each context, read what
exists, decide each distinct plan, create what is missing, and answer each event.
The rules are here, without I/O; services.resolution reads and creates.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from .errors import TallyError, Violation, failed_precondition, invalid, not_found
from .ids import uuid7
from .models import EventContext, Experience, ExperienceType, Resolution
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


def _type_not_found(name: str) -> TallyError:
    return not_found(
        "EXPERIENCE_TYPE_NOT_FOUND",
        "tally.v1.ExperienceType",
        name,
        f"experience type {name!r} does not exist; create it first",
    )


def _no_such_version(name: str, version: int, current: int) -> TallyError:
    message = f"version {version} of {name!r} does not exist (current: {current})"
    return invalid([Violation("experience_version", message)])


class Plan:
    """What one context asks for, before the database is read. `generated` ids are
    new by construction (rule 4), so they are never looked up."""

    __slots__ = ("experience_id", "generated", "name", "version", "warnings")

    def __init__(
        self, experience_id: uuid.UUID, name: str, version: int, warnings: tuple[str, ...], generated: bool
    ) -> None:
        self.experience_id = experience_id
        self.name = name
        self.version = version
        self.warnings = warnings
        self.generated = generated


@dataclasses.dataclass(slots=True)
class ToCreate:
    """A plan that will create its experience, of this type at this version."""

    plan: Plan
    type_id: int
    version: int


Decision = Resolution | TallyError | ToCreate
_UNATTRIBUTED = Resolution(None)


def plan_of(context: EventContext) -> Plan | None:
    if not context.experience_id:
        if not context.experience_name:
            return None  # rule 5
        return Plan(new_experience_id(), context.experience_name, context.experience_version, (), True)  # rule 4
    parsed = parse_uuid(context.experience_id)
    warnings: tuple[str, ...] = ()
    if parsed is None:  # rule 3
        parsed = derive_experience_id(context.experience_id)
        warnings = (
            f"experience id {context.experience_id[:80]!r} is not a UUID; "
            f"the event is attributed to the derived id {parsed}",
        )
    return Plan(parsed, context.experience_name, context.experience_version, warnings, False)


def plans(contexts: Sequence[EventContext]) -> list[Plan | None]:
    """A plan per context. Events of one call mostly share a context: each distinct
    id is planned once (rule 4 plans a new experience per event)."""
    planned: dict[EventContext, Plan | None] = {}
    plans: list[Plan | None] = []
    last_context: EventContext | None = None
    last_plan: Plan | None = None
    for context in contexts:
        if context is last_context and context.experience_id:  # the same object: no hashing
            plans.append(last_plan)
            continue
        if not context.experience_id:
            plan = plan_of(context)
        else:
            if context not in planned:
                planned[context] = plan_of(context)
            plan = planned[context]
        plans.append(plan)
        last_context, last_plan = context, plan
    return plans


def decide(plan: Plan, existing: dict[uuid.UUID, Experience], types: dict[str, tuple[int, ExperienceType]]) -> Decision:
    """Found (rules 1 and 3), refused, or to be created (rules 2 and 4)."""
    found = existing.get(plan.experience_id)
    if found is not None:
        if plan.name and plan.name != found.experience_name:
            return type_mismatch(found, plan.name)
        return Resolution(found, False, plan.warnings)
    if not plan.name:
        return experience_not_found(plan.experience_id)
    if plan.name not in types:
        return _type_not_found(plan.name)
    type_id, experience_type = types[plan.name]
    version = plan.version or experience_type.version
    if not 1 <= version <= experience_type.version:
        return _no_such_version(plan.name, plan.version, experience_type.version)
    return ToCreate(plan, type_id, version)


def per_event(plans: Sequence[Plan | None], decided: dict[int, Decision]) -> list[Resolution | TallyError]:
    """Each event's answer: each refusal its own exception object, and only the first
    event of a new experience saying it created it."""
    results: list[Resolution | TallyError] = []
    announced: set[uuid.UUID] = set()
    for plan in plans:
        if plan is None:
            results.append(_UNATTRIBUTED)
            continue
        outcome = decided[id(plan)]
        assert not isinstance(outcome, ToCreate), "_create settles every creation"
        if isinstance(outcome, TallyError):
            outcome = dataclasses.replace(outcome)
        elif outcome.created and outcome.experience is not None:
            experience_id = outcome.experience.experience_id
            if experience_id in announced:
                outcome = Resolution(outcome.experience, False, outcome.warnings)
            announced.add(experience_id)
        results.append(outcome)
    return results

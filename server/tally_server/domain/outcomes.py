"""Outcomes: what a run of an experience type achieved. A type declares its outcomes (a
kind and, optionally, a goal); a run is scored with values of them. Pure rules: what a
valid declaration and a valid value are, and whether a value is a success."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import Violations
from .validation import NAME_PATTERN, utf8_length

MAX_OUTCOMES = 32
DESCRIPTION_MAX = 1024


class OutcomeKind(enum.IntEnum):
    """Values match tally.v1.OutcomeKind."""

    BOOLEAN = 1
    NUMBER = 2
    PERCENTAGE = 3
    LIKERT_5 = 4
    LIKERT_7 = 5
    LIKERT_10 = 6


# The scale of each bounded kind: (lowest, highest, whole numbers only).
_SCALES = {
    OutcomeKind.PERCENTAGE: (0.0, 100.0, False),
    OutcomeKind.LIKERT_5: (1.0, 5.0, True),
    OutcomeKind.LIKERT_7: (1.0, 7.0, True),
    OutcomeKind.LIKERT_10: (1.0, 10.0, True),
}


class GoalComparison(enum.Enum):
    EQUALS = "equals"  # BOOLEAN: the value that is success (1.0 true, 0.0 false)
    AT_LEAST = "at_least"
    AT_MOST = "at_most"


@dataclass(frozen=True)
class Goal:
    comparison: GoalComparison
    value: float


@dataclass(frozen=True)
class OutcomeDefinition:
    name: str
    kind: OutcomeKind
    goal: Goal | None = None
    description: str = ""


@dataclass(frozen=True)
class OutcomeValue:
    """A value as a number: a BOOLEAN's is 1.0 (true) or 0.0 (false)."""

    name: str
    value: float
    boolean: bool  # whether it was given as true/false (BOOLEAN outcomes take only those)


@dataclass(frozen=True)
class RecordedOutcome:
    name: str
    value: float
    record_time_us: int
    key_name: str


@dataclass(frozen=True)
class ScoredOutcome:
    """A recorded outcome with its declaration as the type has it now (None: no longer
    declared) and whether it meets its goal (None: no goal to meet)."""

    recorded: RecordedOutcome
    definition: OutcomeDefinition | None
    succeeded: bool | None


def scored(recorded: Sequence[RecordedOutcome], declared: Mapping[str, OutcomeDefinition]) -> tuple[ScoredOutcome, ...]:
    found = []
    for outcome in recorded:
        definition = declared.get(outcome.name)
        success = succeeded(definition, outcome.value) if definition is not None else None
        found.append(ScoredOutcome(outcome, definition, success))
    return tuple(found)


def check_definitions(v: Violations, path: str, definitions: Sequence[OutcomeDefinition]) -> None:
    """Adds a violation for each invalid declaration (paths `path[i].field`)."""
    if len(definitions) > MAX_OUTCOMES:
        v.add(path, f"at most {MAX_OUTCOMES} outcomes, got {len(definitions)}")
        return
    seen: set[str] = set()
    for index, definition in enumerate(definitions):
        at = f"{path}[{index}]"
        if not NAME_PATTERN.fullmatch(definition.name):
            v.add(f"{at}.name", "must match [A-Za-z0-9._-]{1,64}")
        elif definition.name in seen:
            v.add(f"{at}.name", f"{definition.name!r} is declared twice")
        seen.add(definition.name)
        if definition.kind not in set(OutcomeKind):
            v.add(f"{at}.kind", "must be BOOLEAN, NUMBER, PERCENTAGE, LIKERT_5, LIKERT_7 or LIKERT_10")
            continue
        if utf8_length(definition.description) > DESCRIPTION_MAX:
            v.add(f"{at}.description", f"at most {DESCRIPTION_MAX:,} bytes")
        goal = definition.goal
        if goal is None:
            continue
        if definition.kind == OutcomeKind.BOOLEAN:
            if goal.comparison != GoalComparison.EQUALS:
                v.add(f"{at}.goal", "a BOOLEAN outcome's goal is `equals` true or false")
            continue
        if goal.comparison == GoalComparison.EQUALS:
            v.add(f"{at}.goal", "`equals` is for BOOLEAN outcomes; use at_least or at_most")
        elif not math.isfinite(goal.value):
            v.add(f"{at}.goal", "must be a finite number")
        elif definition.kind in _SCALES:
            low, high, _ = _SCALES[definition.kind]
            if not low <= goal.value <= high:
                v.add(f"{at}.goal", f"must be within the scale, {low:g} to {high:g}")


def check_values(
    v: Violations, path: str, declared: Mapping[str, OutcomeDefinition], values: Sequence[OutcomeValue]
) -> None:
    """Adds a violation for each value the declarations refuse (paths `path[i]`)."""
    if not 1 <= len(values) <= MAX_OUTCOMES:
        v.add(path, f"1 to {MAX_OUTCOMES} values, got {len(values)}")
        return
    seen: set[str] = set()
    for index, value in enumerate(values):
        at = f"{path}[{index}]"
        definition = declared.get(value.name)
        if definition is None:
            known = ", ".join(sorted(declared)) or "none"
            v.add(f"{at}.name", f"the type declares no outcome {value.name[:64]!r} (it declares: {known})")
            continue
        if value.name in seen:
            v.add(f"{at}.name", f"{value.name!r} is given twice")
        seen.add(value.name)
        if definition.kind == OutcomeKind.BOOLEAN:
            if not value.boolean:
                v.add(f"{at}.bool_value", f"{value.name!r} is BOOLEAN: give bool_value")
            continue
        if value.boolean:
            v.add(f"{at}.number_value", f"{value.name!r} is {definition.kind.name}: give number_value")
            continue
        if not math.isfinite(value.value):
            v.add(f"{at}.number_value", "must be a finite number")
        elif definition.kind in _SCALES:
            low, high, whole = _SCALES[definition.kind]
            if not low <= value.value <= high or (whole and value.value != int(value.value)):
                scale = f"a whole number from {low:g} to {high:g}" if whole else f"{low:g} to {high:g}"
                v.add(f"{at}.number_value", f"{value.name!r} is {definition.kind.name}: {scale}, got {value.value:g}")


def succeeded(definition: OutcomeDefinition, value: float) -> bool | None:
    """Whether a value meets its outcome's goal; a BOOLEAN without a goal succeeds when
    true; None for another outcome without a goal."""
    goal = definition.goal
    if goal is None:
        return value == 1.0 if definition.kind == OutcomeKind.BOOLEAN else None
    if goal.comparison == GoalComparison.EQUALS:
        return value == goal.value
    if goal.comparison == GoalComparison.AT_LEAST:
        return value >= goal.value
    return value <= goal.value


# --- as stored: a JSON list on the type -------------------------------------------------------


def to_json(definitions: Sequence[OutcomeDefinition]) -> list[dict[str, Any]]:
    return [
        {
            "name": d.name,
            "kind": d.kind.name,
            "description": d.description,
            **({"goal": {d.goal.comparison.value: d.goal.value}} if d.goal else {}),
        }
        for d in definitions
    ]


def from_json(stored: Any) -> tuple[OutcomeDefinition, ...]:
    definitions = []
    for item in stored or ():
        goal = None
        if item.get("goal"):
            ((comparison, value),) = item["goal"].items()
            goal = Goal(GoalComparison(comparison), float(value))
        definitions.append(
            OutcomeDefinition(item["name"], OutcomeKind[item["kind"]], goal, item.get("description", ""))
        )
    return tuple(definitions)

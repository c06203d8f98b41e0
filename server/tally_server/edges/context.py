"""The xproxy metadata keys of a call, as an experience and price context, and that
context merged with each event's own."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

from tally_client.metadata import (
    CONTEXT_KEYS,
    EXPERIENCE_ID,
    EXPERIENCE_NAME,
    EXPERIENCE_OUTCOMES,
    EXPERIENCE_STEP,
    EXPERIENCE_VERSION,
    KNOWN_KEYS,
    LIMIT_RESERVATION,
    OUTCOME_KEYS,
    PRICE_CONTEXT,
    REQUEST_TAGS,
    USECASE_ALIASES,
    USECASE_OUTCOMES,
    USER_ID,
)

from ..domain.errors import Violations
from ..domain.models import NO_CONTEXT, EventContext, UsageEvent
from ..domain.outcomes import OutcomeValue

__all__ = ["EXPERIENCE_ID", "call_context"]


def call_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> EventContext:
    """The context every event of the call gets; INVALID_ARGUMENT for a malformed key."""
    pairs = tuple((key, value) for key, value in metadata or () if key.startswith("xproxy-") and isinstance(value, str))
    return _context_of(pairs) if pairs else NO_CONTEXT


# A caller sends the same few contexts again and again; a refused one raises and is not cached.
@functools.lru_cache(maxsize=4096)
def _context_of(pairs: tuple[tuple[str, str], ...]) -> EventContext:
    v = Violations()
    values: dict[str, str] = {}
    warnings: list[str] = []
    for key, raw in pairs:
        value = raw.strip()
        if key in OUTCOME_KEYS:
            warnings.append(
                f"metadata key {key!r} is read by the proxy only; it was ignored: record outcomes with "
                "ExperienceService/RecordOutcomes"
            )
            continue
        if key not in KNOWN_KEYS:
            warnings.append(f"metadata key {key[:64]!r} is not one Tally reads; it was ignored")
            continue
        # Pay-i's use-case keys are aliases of the experience keys; both with different values is a contradiction.
        canonical = USECASE_ALIASES.get(key, key)
        if canonical in values and values[canonical] != value:
            v.add(key, f"{value[:80]!r} contradicts {canonical}={values[canonical][:80]!r}")
        values[canonical] = value
    version = 0
    raw_version = values.get(EXPERIENCE_VERSION, "")
    if raw_version:
        if raw_version.isdigit() and 0 < int(raw_version) < 2**31:
            version = int(raw_version)
        else:
            v.add(EXPERIENCE_VERSION, f"must be a positive integer, got {raw_version[:40]!r}")
    tags = tuple(tag.strip() for tag in values.get(REQUEST_TAGS, "").split(",") if tag.strip())
    price_context: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in values.get(PRICE_CONTEXT, "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            v.add(PRICE_CONTEXT, f"comma-separated key=value pairs, got {item[:80]!r}")
        else:
            price_context[key.strip()] = value.strip()
    v.raise_if_any()
    return EventContext(
        experience_id=values.get(EXPERIENCE_ID, ""),
        experience_name=values.get(EXPERIENCE_NAME, ""),
        experience_version=version,
        user_id=values.get(USER_ID, ""),
        request_tags=tags,
        limit_reservation=values.get(LIMIT_RESERVATION, ""),
        step=values.get(EXPERIENCE_STEP, ""),
        price_context=tuple(sorted(price_context.items())),
        warnings=tuple(warnings),
    )


def outcome_values(pairs: Iterable[tuple[str, str]]) -> tuple[OutcomeValue, ...]:
    """The outcome values of a proxied call's xProxy-Experience-Outcomes header (a JSON
    object of true/false and numbers), () without one; INVALID_ARGUMENT naming the header."""
    given = [(key, value) for key, value in pairs if key in OUTCOME_KEYS]
    if not given:
        return ()
    v = Violations()
    if len({value.strip() for _, value in given}) > 1:
        v.add(EXPERIENCE_OUTCOMES, f"{USECASE_OUTCOMES} contradicts {EXPERIENCE_OUTCOMES}")
        v.raise_if_any()
    try:
        parsed = json.loads(given[0][1])
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not parsed:
        v.add(EXPERIENCE_OUTCOMES, 'must be a JSON object of outcome values, e.g. {"resolved": true, "csat": 4}')
        v.raise_if_any()
    found = []
    for name, value in parsed.items():
        if isinstance(value, bool):
            found.append(OutcomeValue(name, 1.0 if value else 0.0, True))
        elif isinstance(value, int | float):
            found.append(OutcomeValue(name, float(value), False))
        else:
            v.add(f"{EXPERIENCE_OUTCOMES}[{name[:64]!r}]", "must be true, false or a number")
    v.raise_if_any()
    return tuple(found)


def merge_context(call: EventContext, event: EventContext, v: Violations) -> EventContext:
    """The call's metadata and the event's own context as one; a contradiction is a violation.
    (The event's own context has no price context or warnings: those come from metadata.)"""
    if event == NO_CONTEXT:
        return call
    if call == NO_CONTEXT:
        return event
    merged: dict[str, Any] = {"price_context": call.price_context, "warnings": call.warnings}
    for name, key in CONTEXT_KEYS.items():
        from_call, from_event = getattr(call, name), getattr(event, name)
        if from_call and from_event and from_call != from_event:
            v.add(f"context.{name}", f"{from_event!r} contradicts metadata {key}={from_call!r}")
        merged[name] = from_event or from_call
    return EventContext(**merged)


def merge_price_context(call: EventContext, event: UsageEvent, v: Violations) -> dict[str, str]:
    """The call's xproxy-price-context and the event's own price_context as one."""
    if not call.price_context:
        return event.price_context
    merged = dict(call.price_context)
    for key, value in event.price_context.items():
        if merged.get(key, value) != value:
            v.add(f"price_context[{key[:64]!r}]", f"{value[:64]!r} contradicts metadata {PRICE_CONTEXT}")
        merged[key] = value
    return merged

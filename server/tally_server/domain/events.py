"""An event's rules: what makes it valid, its idempotency key, the bound on its cost,
and the quote of a planned call. No I/O: the ingest service applies them."""

from __future__ import annotations

import logging

from .errors import Code, TallyError, Violation, Violations, invalid
from .models import (
    NO_CONTEXT,
    Cost,
    UsageEvent,
)
from .pricing import PriceCatalog
from .validation import (
    CATEGORY_PATTERN,
    LATENCY_MAX_MS,
    NAME_PATTERN,
    PROPERTIES_MAX_ENTRIES,
    UNIT_COUNT_MAX,
    UNIT_TYPE_PATTERN,
    check_price_context,
    check_string_map,
    check_text,
    parse_uuid,
    utf8_length,
)

log = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1000
MAX_FUTURE_SKEW_US = 5 * 60 * 1_000_000
MAX_UNIT_TYPES = 32
MAX_TAGS = 32


def checked_event(event: UsageEvent, now: int, v: Violations) -> UsageEvent | TallyError:
    """The event if it is valid, else the INVALID_ARGUMENT that refuses it: the violations
    already found (`v`, e.g. by merging the call's context) and those of its fields."""
    validate_event(event, now, v)
    return invalid(v.items, "INVALID_EVENT") if v else event


def validate_event(event: UsageEvent, now: int | None, v: Violations) -> None:
    """Adds a violation for each invalid field; paths are relative to the event.
    `now` None skips the future check (a quote may price a planned call)."""
    if not event.category:
        v.add("category", "category is required, e.g. 'system.openai'")
    elif not CATEGORY_PATTERN.fullmatch(event.category):
        v.add("category", "must match [A-Za-z0-9._-]{1,128}")
    if not event.resource:
        v.add("resource", "resource is required, e.g. 'gpt-4o'")
    elif utf8_length(event.resource) > 256 or not event.resource.isprintable():
        v.add("resource", "must be 1 to 256 bytes of printable UTF-8")
    if len(event.units) > MAX_UNIT_TYPES:
        v.add("units", f"at most {MAX_UNIT_TYPES} unit types, got {len(event.units)}")
    for unit_type, (input_count, output_count) in event.units.items():
        if not UNIT_TYPE_PATTERN.fullmatch(unit_type):
            v.add(f"units[{unit_type[:64]!r}]", "unit type must match [a-z0-9_]{1,64}")
        if not (0 <= input_count <= UNIT_COUNT_MAX and 0 <= output_count <= UNIT_COUNT_MAX):
            for direction, count in (("input", input_count), ("output", output_count)):
                if not 0 <= count <= UNIT_COUNT_MAX:
                    v.add(f"units[{unit_type[:64]!r}].{direction}", f"must be 0 to {UNIT_COUNT_MAX:,}, got {count}")
    if now is not None and event.event_time_us > now + MAX_FUTURE_SKEW_US:
        v.add("event_timestamp", "is more than 5 minutes in the future")
    elif event.event_time_us < 0:
        v.add("event_timestamp", "must not be before 1970-01-01")
    latency, first_token = event.end_to_end_latency_ms, event.time_to_first_token_ms
    if not (0 <= latency <= LATENCY_MAX_MS and 0 <= first_token <= LATENCY_MAX_MS):
        for name, value in (("end_to_end_latency_ms", latency), ("time_to_first_token_ms", first_token)):
            if not 0 <= value <= LATENCY_MAX_MS:
                v.add(name, f"must be 0 to {LATENCY_MAX_MS:,} (a week), got {value}")
    if event.http_status_code and not 100 <= event.http_status_code <= 599:
        v.add("http_status_code", f"must be 0 (unknown) or 100..599, got {event.http_status_code}")
    check_text(v, "provider_response_id", event.provider_response_id)
    check_text(v, "idempotency_key", event.idempotency_key)
    check_string_map(v, "properties", event.properties, PROPERTIES_MAX_ENTRIES)
    context = event.context
    check_text(v, "context.experience_id", context.experience_id)
    if context.experience_name and not NAME_PATTERN.fullmatch(context.experience_name):
        v.add("context.experience_name", "experience type name must match [A-Za-z0-9._-]{1,64}")
    if context.experience_version < 0:
        v.add("context.experience_version", "must be 0 (current) or a version number")
    check_text(v, "context.user_id", context.user_id)
    if context.step and not NAME_PATTERN.fullmatch(context.step):
        v.add("context.step", "a step name must match [A-Za-z0-9._-]{1,64}")
    if context.limit_reservation and parse_uuid(context.limit_reservation) is None:
        v.add("limit_reservation_id", f"not a UUID: {context.limit_reservation[:80]!r}")
    if event.price_context:
        check_price_context(v, "price_context", event.price_context)
    if len(context.request_tags) > MAX_TAGS:
        v.add("context.request_tags", f"at most {MAX_TAGS} tags")
    for tag in context.request_tags:
        if not tag or utf8_length(tag) > 128 or "," in tag or "\x00" in tag:
            v.add("context.request_tags", f"each tag is 1 to 128 bytes of UTF-8 without commas, got {tag[:80]!r}")


# At most $1,000,000 an event. With it, an event's costs fit in 64-bit nano-dollars with
# room to spare, and sums (taken as whole dollars and nanos apart, storage/rollups.py)
# cannot overflow below 9 trillion events.
MAX_EVENT_COST_NANOS = 10**15


def cost_out_of_range(cost: Cost) -> TallyError:
    return invalid(
        [Violation("units", f"the event would cost ${cost.total_nanos / 1e9:,.0f}; at most $1,000,000 an event")],
        "COST_OUT_OF_RANGE",
    )


def idempotency_key(event: UsageEvent) -> str:
    return event.idempotency_key or event.provider_response_id


def key_reused(key: str) -> TallyError:
    return TallyError(
        Code.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        f"idempotency key {key[:80]!r} was already used by an event with different content",
        resource=("tally.v1.UsageEvent", key[:256]),
    )


def quote(
    catalog: PriceCatalog,
    category: str,
    resource: str,
    units: dict[str, tuple[int, int]],
    time_us: int,
    price_context: dict[str, str] | None = None,
) -> Cost:
    v = Violations()
    context = price_context or {}
    probe = UsageEvent(category, resource, units, time_us, 0, 0, 0, "", "", {}, NO_CONTEXT, "", context)
    validate_event(probe, None, v)
    v.raise_if_any()
    return catalog.price(category, resource, units, time_us, context)

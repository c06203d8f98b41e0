"""OpenTelemetry GenAI spans as usage events, after the GenAI semantic conventions.

A span is a model call when it names a provider (`gen_ai.provider.name`, or the older
`gen_ai.system`) and its operation is a call to a model (chat, text completion, content
generation, embeddings) or, without `gen_ai.operation.name`, when it reports token usage.
Agent and tool spans (`invoke_agent`, `execute_tool`, ...) are not calls: their usage, where
they report one, sums calls that have spans of their own.

The conventions count inclusively: `gen_ai.usage.input_tokens` includes the cache reads and
cache writes, `gen_ai.usage.output_tokens` includes the reasoning tokens. Tally's unit types
are disjoint, so those are taken out of the text counts: every token is priced once, cached
ones at their cache rate, reasoning at its own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import TallyError, Violations
from .events import checked_event
from .models import EventContext, UsageEvent

# An attribute value as OTLP carries it: a scalar or an array of scalars.
AttributeValue = str | bool | int | float | bytes | Sequence[object] | None

# Operations that are one call to a model; the others (agents, tools) are not priced.
CALL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings", "responses"})
# gen_ai.provider.name values whose genai-prices provider has another id.
PROVIDERS = {
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
}
# Service tiers that change nothing about the price (as the Python client's instrumentation).
STANDARD_TIERS = frozenset({"", "default", "auto", "standard"})
FAILED_STATUS = 500  # a span with an error status and no HTTP status of its own

# The experience, by Tally's names and Pay-i's use-case names (aliases, as in metadata).
_EXPERIENCE_KEYS = {
    "experience_id": ("tally.experience.id", "tally.use_case.id"),
    "experience_name": ("tally.experience.name", "tally.use_case.name"),
    "experience_version": ("tally.experience.version", "tally.use_case.version"),
}


@dataclass(frozen=True, slots=True)
class Span:
    """What a span says, as plain values (the rpc layer reads them out of OTLP)."""

    trace_id: bytes
    span_id: bytes
    start_unix_nano: int
    end_unix_nano: int
    failed: bool  # its status is ERROR
    attributes: Mapping[str, AttributeValue]
    resource: Mapping[str, AttributeValue] = field(default_factory=dict)  # the resource's attributes


def provider(attributes: Mapping[str, AttributeValue]) -> str:
    value = attributes.get("gen_ai.provider.name") or attributes.get("gen_ai.system")
    return value if isinstance(value, str) else ""


def is_model_call(attributes: Mapping[str, AttributeValue]) -> bool:
    """True for a span of one call to a model (see the module's note)."""
    if not provider(attributes):
        return False
    operation = attributes.get("gen_ai.operation.name")
    if isinstance(operation, str) and operation:
        return operation in CALL_OPERATIONS
    return any(key.startswith("gen_ai.usage.") for key in attributes)


def idempotency_key(span: Span) -> str:
    """A retried export carries the same trace and span ids: it is a duplicate."""
    return f"otel:{span.trace_id.hex()}:{span.span_id.hex()}"


def usage_event(span: Span, now_us: int) -> UsageEvent | TallyError:
    """The event a model-call span stands for, or the INVALID_ARGUMENT that refuses it
    (paths name the span's attributes). Checked as any ingested event is."""
    v = Violations()
    attributes = span.attributes
    model = _text(attributes, "gen_ai.response.model") or _text(attributes, "gen_ai.request.model")
    if not model:
        v.add("gen_ai.request.model", "a model call names its model (gen_ai.response.model or gen_ai.request.model)")
    name = provider(attributes)
    category = f"system.{PROVIDERS.get(name, name)}"
    units = _units(attributes, v)
    tier = _text(attributes, "openai.response.service_tier") or _text(attributes, "gen_ai.openai.response.service_tier")
    status = _integer(attributes, "http.response.status_code", v) or (FAILED_STATUS if span.failed else 0)
    first_token_ms = _milliseconds(attributes, "gen_ai.response.time_to_first_chunk", v)
    if span.end_unix_nano < span.start_unix_nano:
        v.add("end_time_unix_nano", "the span ends before it starts")
    # The ids are the event's idempotency key: OTLP's sizes, and not all zeros (invalid there).
    for id_field, value, size in (("trace_id", span.trace_id, 16), ("span_id", span.span_id, 8)):
        if len(value) != size or not any(value):
            v.add(id_field, f"must be {size} bytes, not all zero (got {len(value)} bytes)")
    event = UsageEvent(
        category=category,
        resource=model,
        units=units,
        event_time_us=span.start_unix_nano // 1000,
        end_to_end_latency_ms=max(0, span.end_unix_nano - span.start_unix_nano) // 1_000_000,
        time_to_first_token_ms=first_token_ms,
        http_status_code=status,
        provider_response_id=_text(attributes, "gen_ai.response.id"),
        idempotency_key=idempotency_key(span),
        properties={"otel.trace_id": span.trace_id.hex(), "otel.span_id": span.span_id.hex()},
        context=_context(span, v),
        content_hash="",
        price_context={} if tier.lower() in STANDARD_TIERS else {"service_tier": tier},
    )
    event.content_hash = _content_hash(event)
    return checked_event(event, now_us, v)


def _units(attributes: Mapping[str, AttributeValue], v: Violations) -> dict[str, tuple[int, int]]:
    """The inclusive counts of the conventions as Tally's disjoint unit types."""
    input_tokens = _integer(attributes, "gen_ai.usage.input_tokens", v, "gen_ai.usage.prompt_tokens")
    output_tokens = _integer(attributes, "gen_ai.usage.output_tokens", v, "gen_ai.usage.completion_tokens")
    cache_read = _integer(attributes, "gen_ai.usage.cache_read.input_tokens", v)
    cache_write = _integer(
        attributes, "gen_ai.usage.cache_creation.input_tokens", v, "gen_ai.usage.cache_write.input_tokens"
    )
    reasoning = _integer(attributes, "gen_ai.usage.reasoning.output_tokens", v)
    if cache_read + cache_write > input_tokens:
        v.add(
            "gen_ai.usage.input_tokens",
            f"includes the cache reads and writes ({cache_read} + {cache_write}), so cannot be {input_tokens}",
        )
    if reasoning > output_tokens:
        v.add(
            "gen_ai.usage.output_tokens", f"includes the reasoning tokens ({reasoning}), so cannot be {output_tokens}"
        )
    units = {"text": (max(0, input_tokens - cache_read - cache_write), max(0, output_tokens - reasoning))}
    for unit_type, counts in (
        ("text_cache_read", (cache_read, 0)),
        ("text_cache_write", (cache_write, 0)),
        ("reasoning", (0, reasoning)),
    ):
        if any(counts):
            units[unit_type] = counts
    return units


def _context(span: Span, v: Violations) -> EventContext:
    """The experience, user and tags: from the span's attributes, else its resource's."""
    values: dict[str, str] = {}
    for target, keys in _EXPERIENCE_KEYS.items():
        for key in keys:
            value = _attribute(span, key)
            if value is None or value == "":
                continue
            if isinstance(value, bool) or not isinstance(value, str | int):
                v.add(key, f"must be a string, got {str(value)[:80]!r}")
                continue
            text = str(value)
            if target in values and values[target] != text:
                v.add(key, f"{text[:80]!r} contradicts {keys[0]}={values[target][:80]!r}")
            values.setdefault(target, text)
    version = 0
    if values.get("experience_version"):
        try:
            version = int(values["experience_version"])
        except ValueError:
            v.add("tally.experience.version", f"not a version number: {values['experience_version'][:80]!r}")
    user = _attribute(span, "user.id") or _attribute(span, "enduser.id")
    tags = _attribute(span, "tally.request_tags")
    # A comma-separated string, or an array of strings (each a tag).
    items = [tags] if isinstance(tags, str) else list(tags) if isinstance(tags, list | tuple) else []
    if (tags is not None and not isinstance(tags, str | list | tuple)) or not all(isinstance(i, str) for i in items):
        v.add("tally.request_tags", f"a string of comma-separated tags or an array of strings, got {str(tags)[:80]!r}")
        items = []
    request_tags = tuple(tag.strip() for item in items for tag in str(item).split(",") if tag.strip())
    return EventContext(
        experience_id=values.get("experience_id", ""),
        experience_name=values.get("experience_name", ""),
        experience_version=version,
        user_id=user if isinstance(user, str) else "",
        request_tags=request_tags,
    )


def _attribute(span: Span, key: str) -> AttributeValue:
    value = span.attributes.get(key)
    return span.resource.get(key) if value is None else value


def _text(attributes: Mapping[str, AttributeValue], key: str) -> str:
    value = attributes.get(key)
    return value if isinstance(value, str) else ""


def _integer(attributes: Mapping[str, AttributeValue], key: str, v: Violations, older: str = "") -> int:
    """A count: absent is 0; a negative, fractional or non-numeric one is a violation."""
    value = attributes.get(key)
    if value is None and older:
        key, value = older, attributes.get(older)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        v.add(key, f"must be a whole number of 0 or more, got {str(value)[:80]!r}")
        return 0
    return value


def _milliseconds(attributes: Mapping[str, AttributeValue], key: str, v: Violations) -> int:
    """A duration in seconds (a double, as the conventions give it) in milliseconds."""
    value = attributes.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        v.add(key, f"must be a duration of 0 seconds or more, got {str(value)[:80]!r}")
        return 0
    return round(value * 1000)


def _content_hash(event: UsageEvent) -> str:
    """What a retry of the same span repeats: its priced content."""
    parts = [
        event.category,
        event.resource,
        repr(sorted(event.units.items())),
        str(event.event_time_us),
        str(event.http_status_code),
        event.provider_response_id,
        repr(sorted(event.price_context.items())),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

"""Records provider SDK calls as Tally usage events, in the current experience context.

    tally = TallyClient()
    with tally.experience("Document_Summarization"):
        response = openai_client.chat.completions.create(model="gpt-4o", messages=[...])
        record_openai(tally, response, latency_ms=...)

or once for every call of one OpenAI client: `track_openai(openai_client, tally)`.
The provider's response id is the idempotency key, so a recorded call is never counted twice.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from tally.v1 import ingest_service_pb2 as ing_pb

from .client import TallyClient, usage_event


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A field of an SDK object or of its JSON form."""
    if obj is None:
        return default
    value = obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)
    return default if value is None else value


def openai_units(usage: Any) -> dict[str, tuple[int, int]]:
    """OpenAI's inclusive counts as Tally's disjoint buckets: cached, audio and image
    input, and reasoning and audio output, are taken out of the text counts."""
    prompt_details = _get(usage, "prompt_tokens_details")
    completion_details = _get(usage, "completion_tokens_details")
    cached = _get(prompt_details, "cached_tokens", 0)
    cache_write = _get(prompt_details, "cache_write_tokens", 0)
    audio_in = _get(prompt_details, "audio_tokens", 0)
    image_in = _get(prompt_details, "image_tokens", 0)
    reasoning = _get(completion_details, "reasoning_tokens", 0)
    audio_out = _get(completion_details, "audio_tokens", 0)
    text_in = max(0, _get(usage, "prompt_tokens", 0) - cached - cache_write - audio_in - image_in)
    text_out = max(0, _get(usage, "completion_tokens", 0) - reasoning - audio_out)
    units = {"text": (text_in, text_out)}
    for unit_type, counts in (
        ("text_cache_read", (cached, 0)),
        ("text_cache_write", (cache_write, 0)),
        ("reasoning", (0, reasoning)),
        ("audio", (audio_in, audio_out)),
        ("image", (image_in, 0)),
    ):
        if any(counts):
            units[unit_type] = counts
    return units


def anthropic_units(usage: Any) -> dict[str, tuple[int, int]]:
    """Anthropic's input_tokens already exclude cache reads and writes."""
    units = {"text": (_get(usage, "input_tokens", 0), _get(usage, "output_tokens", 0))}
    cache_read = _get(usage, "cache_read_input_tokens", 0)
    cache_write = _get(usage, "cache_creation_input_tokens", 0)
    if cache_read:
        units["text_cache_read"] = (cache_read, 0)
    if cache_write:
        units["text_cache_write"] = (cache_write, 0)
    return units


def _event(
    response: Any,
    units: Callable[[Any], dict[str, tuple[int, int]]],
    category: str,
    latency_ms: int,
    http_status_code: int,
) -> ing_pb.UsageEvent:
    """A provider response as a usage event: its model, its usage, and its id as the idempotency key."""
    return usage_event(
        category,
        _get(response, "model", ""),
        units(_get(response, "usage")),
        latency_ms=int(latency_ms),
        http_status_code=http_status_code,
        provider_response_id=_get(response, "id", ""),
    )


def openai_event(
    response: Any, *, latency_ms: int = 0, category: str = "system.openai", http_status_code: int = 200
) -> ing_pb.UsageEvent:
    """The usage event of an OpenAI-compatible chat completion (SDK object or JSON dict)."""
    return _event(response, openai_units, category, latency_ms, http_status_code)


def anthropic_event(
    response: Any, *, latency_ms: int = 0, category: str = "system.anthropic", http_status_code: int = 200
) -> ing_pb.UsageEvent:
    """The usage event of an Anthropic message (SDK object or JSON dict)."""
    return _event(response, anthropic_units, category, latency_ms, http_status_code)


def record_openai(
    tally: TallyClient, response: Any, *, latency_ms: int = 0, category: str = "system.openai"
) -> ing_pb.IngestResponse:
    """Ingests the usage of one OpenAI-compatible chat completion; returns Tally's result."""
    return tally.ingest(openai_event(response, latency_ms=latency_ms, category=category))


def record_anthropic(
    tally: TallyClient, response: Any, *, latency_ms: int = 0, category: str = "system.anthropic"
) -> ing_pb.IngestResponse:
    """Ingests the usage of one Anthropic message; returns Tally's result."""
    return tally.ingest(anthropic_event(response, latency_ms=latency_ms, category=category))


def track_openai(openai_client: Any, tally: TallyClient, *, category: str = "system.openai") -> Any:
    """Makes every `chat.completions.create` of this OpenAI client record its usage and
    latency in Tally (a failed call is recorded with its HTTP status). Returns the client."""
    completions = openai_client.chat.completions
    create = completions.create

    @functools.wraps(create)
    def recorded_create(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            response = create(*args, **kwargs)
        except Exception as error:
            status = getattr(error, "status_code", None)
            if status:
                model = kwargs.get("model", "")
                tally.ingest(usage_event(category, model, {}, latency_ms=_ms_since(start), http_status_code=status))
            raise
        tally.ingest(openai_event(response, latency_ms=_ms_since(start), category=category))
        return response

    completions.create = recorded_create
    return openai_client


def _ms_since(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)

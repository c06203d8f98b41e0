"""What a provider's response says it used, as Tally's units: OpenAI-compatible responses
(chat completions, the Responses API, embeddings) and Anthropic messages, whole or as the
items of a stream, as SDK objects or as their JSON.

Pure functions and no I/O: the provider instrumentation (instrument.py) and the server's
proxy read usage with the same code, so a call is priced the same whichever way it reached
Tally.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Units = dict[str, tuple[int, int]]


def field(obj: Any, name: str, default: Any = None) -> Any:
    """A field of an SDK object or of its JSON form; `default` when absent or null."""
    if obj is None:
        return default
    value = obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)
    return default if value is None else value


def _count(obj: Any, name: str) -> int:
    """A token count; 0 when absent or not a whole number (a provider's JSON is not trusted)."""
    value = field(obj, name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    dump = getattr(value, "model_dump", None)
    return dict(dump()) if dump else dict(vars(value))


def openai_units(usage: Any) -> Units:
    """OpenAI's inclusive counts as Tally's disjoint buckets: cached, audio and image
    input, and reasoning and audio output, are taken out of the text counts. Takes chat
    completion usage (prompt/completion tokens), Responses API usage (input/output) and
    embeddings usage (prompt tokens only)."""
    prompt_details = field(usage, "prompt_tokens_details") or field(usage, "input_tokens_details")
    completion_details = field(usage, "completion_tokens_details") or field(usage, "output_tokens_details")
    prompt = _count(usage, "prompt_tokens") or _count(usage, "input_tokens")
    completion = _count(usage, "completion_tokens") or _count(usage, "output_tokens")
    cached = _count(prompt_details, "cached_tokens")
    cache_write = _count(prompt_details, "cache_write_tokens")
    audio_in = _count(prompt_details, "audio_tokens")
    image_in = _count(prompt_details, "image_tokens")
    reasoning = _count(completion_details, "reasoning_tokens")
    audio_out = _count(completion_details, "audio_tokens")
    text_in = max(0, prompt - cached - cache_write - audio_in - image_in)
    text_out = max(0, completion - reasoning - audio_out)
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


def anthropic_units(usage: Any) -> Units:
    """Anthropic's input_tokens already exclude cache reads and writes. Cache writes are
    split by how long they live where the usage says (5 minutes, 1 hour): priced apart."""
    units = {"text": (_count(usage, "input_tokens"), _count(usage, "output_tokens"))}
    cache_read = _count(usage, "cache_read_input_tokens")
    if cache_read:
        units["text_cache_read"] = (cache_read, 0)
    creation = field(usage, "cache_creation")
    five_minutes = _count(creation, "ephemeral_5m_input_tokens")
    one_hour = _count(creation, "ephemeral_1h_input_tokens")
    if five_minutes or one_hour:
        if five_minutes:
            units["text_cache_write_5m"] = (five_minutes, 0)
        if one_hour:
            units["text_cache_write_1h"] = (one_hour, 0)
    elif cache_write := _count(usage, "cache_creation_input_tokens"):
        units["text_cache_write"] = (cache_write, 0)
    return units


def openai_price_context(response: Any) -> dict[str, str]:
    """The service tier the response was served at, where it changes the price."""
    tier = field(response, "service_tier")
    return {"service_tier": str(tier)} if isinstance(tier, str) and tier not in ("", "default", "auto") else {}


def anthropic_price_context(usage: Any) -> dict[str, str]:
    tier = field(usage, "service_tier")
    if tier == "batch":
        return {"processing": "batch"}
    return {"service_tier": str(tier)} if tier == "priority" else {}


@dataclass(frozen=True)
class Reading:
    """What a response said of itself: its id (the idempotency key), its model, its usage
    as units and the price context its service tier selects."""

    response_id: str
    model: str
    units: Units
    price_context: dict[str, str]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def read_response(provider: str, response: Any) -> Reading | None:
    """The reading of a whole (not streamed) response; None when it reports no usage."""
    usage = field(response, "usage")
    if not usage or isinstance(usage, str | int | float | list):
        return None
    response_id, model = _text(field(response, "id", "")), _text(field(response, "model", ""))
    if provider == "anthropic":
        return Reading(response_id, model, anthropic_units(usage), anthropic_price_context(usage))
    return Reading(response_id, model, openai_units(usage), openai_price_context(response))


class StreamUsage:
    """Collects a stream's response id, model and final usage from its items (the JSON of
    each server-sent event, or the SDK's objects), whichever provider's shape they have."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.response: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}
        self.first_item_ms: int = 0

    def _name(self, source: Any) -> None:
        """Takes a response id and model where the item has them (some providers send an
        empty id on a first chunk of filter results: it does not erase one seen)."""
        for name in ("id", "model"):
            if value := _text(field(source, name, "")):
                self.response[name] = value

    def observe(self, item: Any, elapsed_ms: int = 0) -> None:
        if not self.first_item_ms:
            self.first_item_ms = elapsed_ms
        kind = field(item, "type", "")
        if self.provider == "anthropic":
            if kind == "message_start":
                message = field(item, "message")
                self._name(message)
                self.usage.update(as_dict(field(message, "usage")))
            elif kind == "message_delta":  # output tokens so far, cumulative
                self.usage.update({k: v for k, v in as_dict(field(item, "usage")).items() if v is not None})
        elif kind in ("response.completed", "response.incomplete", "response.failed"):  # Responses API
            response = field(item, "response")
            self._name(response)
            self.response["service_tier"] = field(response, "service_tier")
            self.usage = as_dict(field(response, "usage"))
        elif field(item, "object") == "chat.completion.chunk" or field(item, "choices") is not None:
            self._name(item)
            self.response["service_tier"] = field(item, "service_tier") or self.response.get("service_tier")
            # Usage may come on its own chunk (choices: []) or on the last chunk that still
            # carries choices (Mistral, OpenRouter): taken wherever it is, details and all.
            if field(item, "usage"):
                self.usage = as_dict(field(item, "usage"))

    def reading(self) -> Reading | None:
        """The stream's reading; None when it ended before any usage was reported."""
        if not self.usage:
            return None
        response_id, model = self.response.get("id", ""), self.response.get("model", "")
        if self.provider == "anthropic":
            return Reading(response_id, model, anthropic_units(self.usage), anthropic_price_context(self.usage))
        return Reading(response_id, model, openai_units(self.usage), openai_price_context(self.response))


# --- the most a call may use, before it is made ------------------------------------------------

# Tokens per character when estimating a prompt before the call: 1 in 3 overestimates
# English (about 4 characters a token), so that a reservation rarely falls short.
CHARACTERS_PER_TOKEN = 3
DEFAULT_MAX_OUTPUT_TOKENS = 4096
_PROMPT_FIELDS = ("messages", "input", "system", "instructions", "prompt")


def _text_of(value: Any, depth: int = 0) -> int:
    """The characters of the text in a request's messages, system prompt or input."""
    if depth > 32:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_of(v, depth + 1) for k, v in value.items() if k in ("content", "text", "input", "system"))
    if isinstance(value, list | tuple):
        return sum(_text_of(item, depth + 1) for item in value)
    return 0


def estimate(request: Mapping[str, Any], default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS) -> Units:
    """The most a call may use: its prompt's characters / 3 in, its max_tokens
    (max_completion_tokens, max_output_tokens) or the default out."""
    prompt = sum(_text_of(request.get(key)) for key in _PROMPT_FIELDS)
    output = 0
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = request.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            output = value
            break
    return {"text": (-(-prompt // CHARACTERS_PER_TOKEN), output or default_max_output_tokens)}

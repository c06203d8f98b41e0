"""Records provider SDK calls as Tally usage events, in the current experience context.

Once per provider client, every call is recorded in the background, off the app's path:

    recorder = Recorder(TallyClient())               # AsyncRecorder(AsyncTallyClient()) for asyncio
    track_openai(openai_client, recorder)            # chat completions and the Responses API
    track_anthropic(anthropic_client, recorder)      # messages
    with tally.experience("Document_Summarization"):
        openai_client.chat.completions.create(model="gpt-4o", messages=[...])   # recorded

Tracking never changes what the provider call returns or raises, and nothing Tally does
raises into it: recording only queues the event (see recorder.py). Streams are recorded
when they end, with the usage of their last chunk; a chat completion stream asks for that
usage (`stream_options.include_usage`) unless the caller said otherwise. The response's
service tier becomes the event's price context, so flex or priority calls are priced as
such. The provider's response id is the idempotency key: a response recorded twice is
counted once.

`record_openai` and `record_anthropic` record one response now and return Tally's result.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tally.v1 import ingest_service_pb2 as ing_pb

from . import metadata
from .client import AsyncTallyClient, TallyClient, current_scope, usage_event
from .errors import TallyError, Unavailable
from .recorder import AsyncRecorder, Recorder
from .usage import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    StreamUsage,
    anthropic_price_context,
    anthropic_units,
    estimate,
    field as _get,
    openai_price_context,
    openai_units,
)

log = logging.getLogger("tally_client.instrument")
AnyRecorder = Recorder | AsyncRecorder


# --- one response as an event --------------------------------------------------------------


def _event(
    response: Any,
    units: dict[str, tuple[int, int]],
    category: str,
    latency_ms: int,
    http_status_code: int,
    price_context: dict[str, str],
    time_to_first_token_ms: int = 0,
) -> ing_pb.UsageEvent:
    """A provider response as a usage event: its model, its usage, and its id as the idempotency key."""
    event = usage_event(
        category,
        _get(response, "model", ""),
        units,
        latency_ms=int(latency_ms),
        time_to_first_token_ms=int(time_to_first_token_ms),
        http_status_code=http_status_code,
        provider_response_id=_get(response, "id", ""),
    )
    event.price_context.update(price_context)
    return event


def openai_event(
    response: Any, *, latency_ms: int = 0, category: str = "system.openai", http_status_code: int = 200
) -> ing_pb.UsageEvent:
    """The usage event of an OpenAI-compatible chat completion or Responses API response."""
    usage = _get(response, "usage")
    return _event(response, openai_units(usage), category, latency_ms, http_status_code, openai_price_context(response))


def anthropic_event(
    response: Any, *, latency_ms: int = 0, category: str = "system.anthropic", http_status_code: int = 200
) -> ing_pb.UsageEvent:
    """The usage event of an Anthropic message (SDK object or JSON dict)."""
    usage = _get(response, "usage")
    return _event(
        response, anthropic_units(usage), category, latency_ms, http_status_code, anthropic_price_context(usage)
    )


def record_openai(
    tally: TallyClient, response: Any, *, latency_ms: int = 0, category: str = "system.openai"
) -> ing_pb.IngestResponse:
    """Ingests the usage of one OpenAI-compatible response now; returns Tally's result."""
    return tally.ingest(openai_event(response, latency_ms=latency_ms, category=category))


def record_anthropic(
    tally: TallyClient, response: Any, *, latency_ms: int = 0, category: str = "system.anthropic"
) -> ing_pb.IngestResponse:
    """Ingests the usage of one Anthropic message now; returns Tally's result."""
    return tally.ingest(anthropic_event(response, latency_ms=latency_ms, category=category))


def _stream_event(usage: StreamUsage, category: str, latency_ms: int) -> ing_pb.UsageEvent | None:
    """A stream's event; None when it ended before its id and usage were reported."""
    reading = usage.reading()
    if reading is None or not reading.response_id:
        return None  # nothing to price
    response = {"id": reading.response_id, "model": reading.model}
    return _event(response, reading.units, category, latency_ms, 200, reading.price_context, usage.first_item_ms)


class _RecordedStream:
    """The SDK's stream, as the app uses it (iteration, `with`, close, its attributes),
    recording the call's usage once the stream ends or is closed."""

    def __init__(self, stream: Any, usage: StreamUsage, finish: Callable[[StreamUsage], None], start: float) -> None:
        self._stream, self._usage, self._finish, self._start = stream, usage, finish, start
        self._items: Iterator[Any] | None = None
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self._stream:
                _safely(self._usage.observe, item, _ms_since(self._start))
                yield item
        finally:
            self._end()

    def __next__(self) -> Any:
        if self._items is None:
            self._items = iter(self)
        return next(self._items)

    def __enter__(self) -> _RecordedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._end()

    def _end(self) -> None:
        if not self._done:
            self._done = True
            _safely(self._finish, self._usage)


class _RecordedAsyncStream:
    """_RecordedStream for an asyncio SDK's stream."""

    def __init__(self, stream: Any, usage: StreamUsage, finish: Callable[[StreamUsage], None], start: float) -> None:
        self._stream, self._usage, self._finish, self._start = stream, usage, finish, start
        self._items: AsyncIterator[Any] | None = None
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            async for item in self._stream:
                _safely(self._usage.observe, item, _ms_since(self._start))
                yield item
        finally:
            self._end()

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._items is None:
            self._items = self._iterate()
        return self._items

    async def __anext__(self) -> Any:
        return await self.__aiter__().__anext__()

    async def __aenter__(self) -> _RecordedAsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            self._end()

    def _end(self) -> None:
        if not self._done:
            self._done = True
            _safely(self._finish, self._usage)


# --- wrapping a provider client's methods ------------------------------------------------------


def _safely(action: Callable[..., Any], *args: Any) -> None:
    """Runs a recording step; whatever goes wrong is logged, never raised into the app."""
    try:
        action(*args)
    except Exception:
        log.exception("Tally could not record a provider call")


def _ms_since(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


def _recorder(tally: TallyClient | AsyncTallyClient | AnyRecorder) -> AnyRecorder:
    if isinstance(tally, Recorder | AsyncRecorder):
        return tally
    if isinstance(tally, AsyncTallyClient):
        return AsyncRecorder(tally)
    return Recorder(tally)


@dataclass(frozen=True)
class _Enforcement:
    """Reserve-before-call for one tracked SDK client (track_openai(..., enforce_limits=True))."""

    client: TallyClient | AsyncTallyClient
    category: str
    fail_closed: bool
    default_max_output_tokens: int

    def estimate(self, kwargs: dict[str, Any]) -> tuple[str, dict[str, tuple[int, int]]]:
        """The model and the most a call may use: its prompt's characters / 3 in, its
        max_tokens (max_completion_tokens, max_output_tokens) or the default out. The run it
        belongs to gets its id now, so that its own limits (per experience) hold from its
        first call."""
        scope = current_scope()
        if scope is not None:
            scope.ensure_id()
        return str(kwargs.get("model", "")), estimate(kwargs, self.default_max_output_tokens)

    def reserve(self, kwargs: dict[str, Any]) -> str:
        assert isinstance(self.client, TallyClient)
        model, units = self.estimate(kwargs)
        try:
            return self.client.reserve(category=self.category, resource=model, units=units).reservation_id
        except TallyError as error:
            return self._without_reservation(error)

    async def reserve_async(self, kwargs: dict[str, Any]) -> str:
        assert isinstance(self.client, AsyncTallyClient)
        model, units = self.estimate(kwargs)
        try:
            return (await self.client.reserve(category=self.category, resource=model, units=units)).reservation_id
        except TallyError as error:
            return self._without_reservation(error)

    def _without_reservation(self, error: TallyError) -> str:
        """A refusal for a limit (LimitExceeded) or a bad request is raised; Tally not answering
        (unreachable, past the deadline, overloaded) lets the call go on, or fails it closed."""
        if isinstance(error, Unavailable) or error.code.name == "DEADLINE_EXCEEDED" or error.reason == "OVERLOADED":
            if self.fail_closed:
                raise error
            log.warning("Tally did not answer the limit reservation (%s): the call goes ahead unchecked", error)
            return ""
        raise error


def _wrap(
    owner: Any,
    name: str,
    recorder: AnyRecorder,
    provider: str,
    category: str,
    to_event: Callable[[Any, int], ing_pb.UsageEvent],
    ask_for_stream_usage: bool = False,
    enforcement: _Enforcement | None = None,
) -> None:
    """Replaces owner.name (an SDK's create method) by one that records each call, and with
    `enforcement` reserves its estimate first: refused, the SDK is not called."""
    original = getattr(owner, name)

    def prepare(kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = _without_xproxy_headers(kwargs)
        if ask_for_stream_usage and kwargs.get("stream") and "stream_options" not in kwargs:
            return {**kwargs, "stream_options": {"include_usage": True}}
        return kwargs

    def record(event: ing_pb.UsageEvent, held: _Held) -> None:
        if held.headers:
            _apply_headers(event, held.headers)
        if held.reservation:
            event.limit_reservation_id = held.reservation  # settles it: the real cost replaces the estimate
        recorder.record(event)

    def failed(error: Exception, kwargs: dict[str, Any], start: float, held: _Held) -> None:
        status = getattr(error, "status_code", None)
        if status:
            event = usage_event(
                category, str(kwargs.get("model", "")), {}, latency_ms=_ms_since(start), http_status_code=status
            )
            record(event, held)
        elif held.reservation:  # no answer at all: nothing to record, the reservation is freed
            release(held.reservation)

    def release(reservation: str) -> None:
        client = recorder.client
        if isinstance(client, TallyClient):
            _safely(client.release, reservation)
        else:
            asyncio.get_running_loop().create_task(_release_later(client, reservation))

    def finish(usage: StreamUsage, start: float, held: _Held) -> None:
        event = _stream_event(usage, category, _ms_since(start))
        if event is not None:
            record(event, held)
        elif held.reservation:
            release(held.reservation)

    def answered(result: Any, start: float, asynchronous: bool, held: _Held) -> Any:
        if not hasattr(result, "close") or not (hasattr(result, "__iter__") or hasattr(result, "__aiter__")):
            _safely(lambda: record(to_event(result, _ms_since(start)), held))
            return result
        stream_type = _RecordedAsyncStream if asynchronous else _RecordedStream
        return stream_type(result, StreamUsage(provider), lambda usage: finish(usage, start, held), start)

    async def answered_later(pending: Any, kwargs: dict[str, Any], start: float, held: _Held) -> Any:
        try:
            result = await pending
        except Exception as error:
            _safely(failed, error, kwargs, start, held)
            raise
        return answered(result, start, True, held)

    def call(args: tuple[Any, ...], kwargs: dict[str, Any], reservation: str) -> Any:
        held = _Held(reservation, _xproxy_headers(kwargs))
        start = time.perf_counter()
        try:
            result = original(*args, **prepare(kwargs))
        except Exception as error:
            _safely(failed, error, kwargs, start, held)
            raise
        if inspect.isawaitable(result):
            return answered_later(result, kwargs, start, held)
        return answered(result, start, False, held)

    async def reserved_then_called(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert enforcement is not None
        reservation = await enforcement.reserve_async(kwargs)
        return await call(args, kwargs, reservation)

    # The asyncio SDKs' methods are plain functions returning a coroutine: whether the call
    # is asynchronous is known from what it returns, not from the method.
    @functools.wraps(original)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if enforcement is None:
            return call(args, kwargs, "")
        if isinstance(enforcement.client, AsyncTallyClient):
            return reserved_then_called(args, kwargs)
        return call(args, kwargs, enforcement.reserve(kwargs))

    setattr(owner, name, recorded)


@dataclass(frozen=True)
class _Held:
    """What a call's event takes from the call itself: the reservation it settles, and the
    xProxy-* headers of its `extra_headers` (its context, as the proxy would read them)."""

    reservation: str
    headers: dict[str, str]


def _xproxy_headers(kwargs: dict[str, Any]) -> dict[str, str]:
    extra = kwargs.get("extra_headers")
    if not isinstance(extra, Mapping):
        return {}
    return {str(k).lower(): str(v) for k, v in extra.items() if str(k).lower().startswith("xproxy-")}


def _without_xproxy_headers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments without xProxy-* headers: they are Tally's, not the provider's."""
    extra = kwargs.get("extra_headers")
    if not isinstance(extra, Mapping) or not any(str(k).lower().startswith("xproxy-") for k in extra):
        return kwargs
    kept = {k: v for k, v in extra.items() if not str(k).lower().startswith("xproxy-")}
    return {**kwargs, "extra_headers": kept}


def _apply_headers(event: ing_pb.UsageEvent, headers: dict[str, str]) -> None:
    """The call's xProxy-* headers as its event's context (the use-case spellings too)."""
    context = event.context
    if value := headers.get(metadata.EXPERIENCE_ID) or headers.get(metadata.USECASE_ID):
        context.experience_id = value
    if value := headers.get(metadata.EXPERIENCE_NAME) or headers.get(metadata.USECASE_NAME):
        context.experience_name = value
    version = headers.get(metadata.EXPERIENCE_VERSION) or headers.get(metadata.USECASE_VERSION) or ""
    if version.isdigit():
        context.experience_version = int(version)
    if value := headers.get(metadata.USER_ID):
        context.user_id = value
    context.request_tags.extend(t.strip() for t in headers.get(metadata.REQUEST_TAGS, "").split(",") if t.strip())
    for pair in headers.get(metadata.PRICE_CONTEXT, "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip() and value.strip():
            event.price_context[key.strip()] = value.strip()
    if value := headers.get(metadata.LIMIT_RESERVATION):
        event.limit_reservation_id = value


async def _release_later(client: AsyncTallyClient, reservation: str) -> None:
    try:
        await client.release(reservation)
    except TallyError as error:
        log.warning("Tally could not release limit reservation %s: %s", reservation, error)


def _enforcement(
    recorder: AnyRecorder, category: str, enforce_limits: bool, fail_closed: bool, max_output_tokens: int
) -> _Enforcement | None:
    if not enforce_limits:
        return None
    return _Enforcement(recorder.client, category, fail_closed, max_output_tokens)


def track_openai(
    openai_client: Any,
    tally: TallyClient | AsyncTallyClient | AnyRecorder,
    *,
    category: str = "system.openai",
    enforce_limits: bool = False,
    fail_closed: bool = False,
    default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
) -> AnyRecorder:
    """Records every `chat.completions.create` and `responses.create` of this OpenAI client
    (OpenAI or AsyncOpenAI; streaming or not) in the background. Returns the recorder:
    `flush()` it (await it, for AsyncRecorder) where the app wants its events sent.

    With `enforce_limits`, each call first reserves its estimate (the prompt's characters / 3
    as input tokens, max_tokens or `default_max_output_tokens` as output) against the BLOCK
    limits of the current experience context: refused, it raises LimitExceeded and OpenAI is
    not called; granted, the call's event settles the reservation with its real cost. When
    Tally does not answer, the call goes ahead unchecked (logged), or with `fail_closed`
    raises Unavailable."""
    recorder = _recorder(tally)
    enforcement = _enforcement(recorder, category, enforce_limits, fail_closed, default_max_output_tokens)

    def to_event(response: Any, latency_ms: int) -> ing_pb.UsageEvent:
        return openai_event(response, latency_ms=latency_ms, category=category)

    completions = openai_client.chat.completions
    _wrap(completions, "create", recorder, "openai", category, to_event, True, enforcement)
    responses = getattr(openai_client, "responses", None)
    if responses is not None:
        _wrap(responses, "create", recorder, "openai", category, to_event, enforcement=enforcement)
    return recorder


def track_anthropic(
    anthropic_client: Any,
    tally: TallyClient | AsyncTallyClient | AnyRecorder,
    *,
    category: str = "system.anthropic",
    enforce_limits: bool = False,
    fail_closed: bool = False,
    default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
) -> AnyRecorder:
    """Records every `messages.create` of this Anthropic client (Anthropic or AsyncAnthropic;
    `stream=True` too) in the background. Returns the recorder, as track_openai, and enforces
    limits as it does (Anthropic requires max_tokens, so the output estimate is exact)."""
    recorder = _recorder(tally)
    enforcement = _enforcement(recorder, category, enforce_limits, fail_closed, default_max_output_tokens)

    def to_event(response: Any, latency_ms: int) -> ing_pb.UsageEvent:
        return anthropic_event(response, latency_ms=latency_ms, category=category)

    _wrap(anthropic_client.messages, "create", recorder, "anthropic", category, to_event, enforcement=enforcement)
    return recorder

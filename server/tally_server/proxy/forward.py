"""One call through the proxy: checked, reserved against BLOCK limits, forwarded to its
upstream, its answer passed back as it comes (a stream event by event), its usage read from
that answer, stored through the same writer as an Ingest, and its result added.

The order of a call:
1. the route names a configured upstream and a safe path (else 404/400, nothing forwarded);
2. Tally's key (`xProxy-Api-Key`) when keys are on, and the xproxy headers as context;
3. a metered call (chat completions, Responses, embeddings, completions, messages) under a
   BLOCK limit reserves its estimate first: refused, 429, and the upstream receives nothing;
4. forwarded without the xproxy headers and with the provider's key as the caller sent it;
5. the answer: a JSON body is read whole (bounded), gains `xproxy_result`, and goes back; a
   stream goes back event by event as it arrives, only its last event held for the result;
6. the event is stored (settling the reservation); a database that does not answer leaves
   the call answered and counted as unrecorded (`tally_proxy_calls{outcome="unrecorded"}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tally_client.metadata import API_KEY, EXPERIENCE_OUTCOMES, OUTCOME_KEYS
from tally_client.usage import Reading, StreamUsage, estimate, read_response

from .. import metrics
from ..domain.errors import StorageUnavailable, TallyError, Violations
from ..domain.events import validate_event
from ..domain.ids import uuid7
from ..domain.keys import unauthenticated
from ..domain.models import NO_CONTEXT, EventContext, IngestResult, UsageEvent, now_us
from ..domain.outcomes import OutcomeValue
from ..domain.resolution import derive_experience_id
from ..domain.validation import TEXT_MAX, parse_uuid
from ..edges.context import call_context, outcome_values
from ..logs import RepeatedLog
from ..services.experiences import Experiences
from ..services.ingest import Ingestor
from ..services.keys import ApiKeys
from ..services.limits import Limits
from . import answers, sse
from .upstreams import ANTHROPIC, Upstream, safe_rest

log = logging.getLogger("tally.proxy")
repeated = RepeatedLog(log)

# What each API shape meters: a POST to one of these paths (after /v1/) is priced.
METERED = {
    "openai": frozenset(("chat/completions", "responses", "embeddings", "completions")),
    ANTHROPIC: frozenset(("messages",)),
}
# Headers that belong to one connection (RFC 9110 7.6.1), and those the proxy sets itself.
_NOT_FORWARDED = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    )
)
# The status an event gets when its caller went away before the upstream answered (nginx's
# "client closed request"): a failed call.
CALLER_GONE = 499
# How ingest refuses an event for its context (rules 1 and 2 of resolution, a type not created).
_CONTEXT_REFUSALS = frozenset(("NOT_FOUND", "FAILED_PRECONDITION"))
_NOT_RETURNED = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "content-encoding", "trailer")
)


@dataclass(frozen=True)
class ProxySettings:
    max_body_bytes: int = 16 * 1024 * 1024  # a request's body, a buffered answer, one stream event
    max_held_bytes: int = 256 * 1024 * 1024  # request bodies and buffered answers held at once
    fail_closed: bool = False  # refuse calls (503) while the database does not answer
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 600.0  # the longest silence of an upstream, between bytes


@dataclass(frozen=True)
class ProxyServices:
    ingestor: Ingestor
    limits: Limits
    keys: ApiKeys | None  # None: API keys are off
    experiences: Experiences
    # Whether the database answered the server's last health check (every 2 s).
    database_answers: Callable[[], bool] = lambda: True


class HeldBytes:
    """The bytes of bodies held at once: past the bound, a call is refused (429), not queued."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


@dataclass
class Call:
    """What the proxy knows of one call as it goes."""

    upstream: Upstream
    rest: str
    context: EventContext
    key_name: str
    request_id: uuid.UUID
    model: str = ""
    metered: bool = False
    streamed: bool = False
    usage_asked: bool = True  # an OpenAI chat stream whose caller did not ask: the proxy asked
    reservation: str = ""
    recorded: bool = False  # its event was made (and handed to the writer)
    started: float = 0.0
    warnings: tuple[str, ...] = ()
    outcomes: tuple[OutcomeValue, ...] = ()  # xProxy-Experience-Outcomes: recorded once the event is stored


class Forwarder:
    def __init__(self, services: ProxyServices, upstreams: Mapping[str, Upstream], settings: ProxySettings) -> None:
        self.services = services
        self.upstreams = dict(upstreams)
        self.settings = settings
        self.held = HeldBytes(settings.max_held_bytes)
        self._session: aiohttp.ClientSession | None = None
        self._recording: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # No pool bound of aiohttp's own (100 by default): the proxy's admission bounds calls.
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout_seconds,
                sock_read=self.settings.read_timeout_seconds,
            ),
            auto_decompress=True,  # compressed answers are read decoded, and passed on decoded
            cookie_jar=aiohttp.DummyCookieJar(),  # one caller's cookies are never another's
            trust_env=False,  # no HTTP(S)_PROXY from the environment: only the configured upstreams
        )

    async def stop(self) -> None:
        if self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the route, the key, the context ------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        name, _, rest = path.lstrip("/").partition("/")
        upstream = self.upstreams.get(name)
        if upstream is None:
            known = ", ".join(f"/{n}/v1/" for n in sorted(self.upstreams))
            return answers.error("", 404, f"no upstream at {path[:80]!r}; the routes are {known}")
        version, _, rest = rest.partition("/")
        if version != "v1" or not safe_rest(rest):
            return answers.error(
                upstream.shape,
                400,
                f"the path must be /{name}/v1/ and an API path of the provider's, got {path[:120]!r}",
            )
        try:
            key_name = await self._key_name(request)
            context, outcomes = _context(request)
            if outcomes:
                await self.services.experiences.check_outcomes(
                    context.experience_id, context.experience_name, outcomes, EXPERIENCE_OUTCOMES
                )
        except StorageUnavailable:
            return answers.error(upstream.shape, 503, "the database is unavailable; retry", retry_after=1)
        except TallyError as refusal:
            metrics.PROXY_CALLS.labels(upstream.name, "refused").inc()
            return answers.from_tally_error(upstream.shape, refusal)
        call = Call(upstream, rest, context, key_name, uuid7(), started=time.perf_counter(), outcomes=outcomes)
        size = request.content_length if request.content_length is not None else self.settings.max_body_bytes
        if size > self.settings.max_body_bytes:
            return _too_large(upstream, self.settings.max_body_bytes)
        if not self.held.take(size):
            return answers.error(upstream.shape, 429, "the proxy holds as many bodies as it may; retry", retry_after=1)
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _too_large(upstream, self.settings.max_body_bytes)
            return await self._forward(request, call, body)
        finally:
            self.held.give(size)

    async def _key_name(self, request: web.Request) -> str:
        keys = self.services.keys
        if keys is None:
            return ""
        secret = request.headers.get(API_KEY, "").strip()
        if not secret:
            raise unauthenticated(
                "API_KEY_MISSING", f"the proxy needs Tally's API key (ingest scope) in the {API_KEY} header"
            )
        return (await keys.authenticate(secret, "ingest")).name

    # --- before the call: what it is, and whether a limit lets it go ------------------------

    async def _forward(self, request: web.Request, call: Call, body: bytes) -> web.StreamResponse:
        upstream = call.upstream
        call.metered = request.method == "POST" and call.rest in METERED[upstream.shape]
        if call.metered and self.settings.fail_closed and not self.services.database_answers():
            metrics.PROXY_CALLS.labels(upstream.name, "refused").inc()
            return answers.error(
                upstream.shape,
                503,
                "the database is unavailable: calls are refused (--proxy-fail-closed)",
                retry_after=2,
            )
        parsed: dict[str, Any] | None = None
        if call.metered:
            try:
                loaded = json.loads(body) if body else None
            except ValueError:
                loaded = None
            if isinstance(loaded, dict):
                parsed = loaded
                call.model = _text(parsed.get("model"))
                call.streamed = parsed.get("stream") is True
                if call.streamed and upstream.shape != ANTHROPIC and call.rest in ("chat/completions", "completions"):
                    options = parsed.get("stream_options")
                    if not (isinstance(options, dict) and options.get("include_usage")):
                        # The usage of a stream comes only when asked for: the proxy asks, and
                        # keeps the usage chunk from a caller that did not.
                        call.usage_asked = False
                        parsed["stream_options"] = {
                            **(options if isinstance(options, dict) else {}),
                            "include_usage": True,
                        }
                        body = answers.encode(parsed)
            refused = await self._reserve(call, parsed or {})
            if refused is not None:
                return refused
        try:
            return await self._call_upstream(request, call, body)
        except asyncio.CancelledError:
            if call.metered and not call.recorded:  # the caller left before the upstream answered
                said = "the caller went away before the upstream answered; what the call used is unknown"
                self._detached(self._store(call, self._event(call, None, CALLER_GONE, said)))
            raise
        finally:
            if call.reservation:  # still held: the call ended without an event to settle it
                self._detached(self._release(call))

    async def _reserve(self, call: Call, request_body: dict[str, Any]) -> web.StreamResponse | None:
        """Reserves the call's estimate when a BLOCK limit may apply; the refusal to answer, or None."""
        if call.context.limit_reservation:  # the caller reserved itself (LimitService.Reserve)
            return None
        limits = self.services.limits
        try:
            if not await limits.may_block(call.context):
                return None
            units = estimate(request_body)
            granted = await limits.reserve(
                call.context, None, (call.upstream.category, _resource(call.model), units), "", 0, call.key_name
            )
        except StorageUnavailable:
            if self.settings.fail_closed:
                metrics.PROXY_CALLS.labels(call.upstream.name, "refused").inc()
                return answers.error(
                    call.upstream.shape, 503, "the database is unavailable and limits cannot be checked", retry_after=1
                )
            repeated.warning("the database is unavailable: proxied calls go ahead without their limits checked")
            call.warnings += ("limits were not checked: the database was unavailable",)
            return None
        except TallyError as refusal:
            metrics.PROXY_CALLS.labels(call.upstream.name, "refused").inc()
            return answers.from_tally_error(call.upstream.shape, refusal)
        call.reservation = str(granted.reservation_id)
        return None

    async def _release(self, call: Call) -> None:
        try:
            await self.services.limits.release(call.reservation, call.key_name)
        except (TallyError, StorageUnavailable) as error:
            repeated.warning("a proxied call's reservation could not be released (it expires): %s", error)

    # --- the call ---------------------------------------------------------------------------

    async def _call_upstream(self, request: web.Request, call: Call, body: bytes) -> web.StreamResponse:
        assert self._session is not None
        query = request.raw_path.partition("?")[2]
        url = URL(call.upstream.url(call.rest) + (f"?{query}" if query else ""), encoded=True)
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _NOT_FORWARDED and not name.lower().startswith("xproxy-")
        )
        try:
            async with self._session.request(
                request.method, url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                if call.metered and answer.content_type == "text/event-stream" and answer.status < 400:
                    return await self._stream(request, call, answer)
                if call.metered:
                    return await self._whole(request, call, answer)
                return await _pass_through(request, answer, call)
        except TimeoutError:
            metrics.PROXY_CALLS.labels(call.upstream.name, "failed").inc()
            if call.metered and not call.recorded:  # sent, so maybe billed: stored, not priced
                said = f"the upstream was silent for {self.settings.read_timeout_seconds:g} s; what it used is unknown"
                await self._record(call, None, 504, said)
            return answers.error(call.upstream.shape, 504, f"upstream {call.upstream.name} did not answer in time")
        except aiohttp.ClientError as error:
            metrics.PROXY_CALLS.labels(call.upstream.name, "failed").inc()
            return answers.error(
                call.upstream.shape, 502, f"upstream {call.upstream.name} could not be reached ({type(error).__name__})"
            )

    async def _whole(self, request: web.Request, call: Call, answer: aiohttp.ClientResponse) -> web.StreamResponse:
        """A JSON answer: read whole (bounded), its usage recorded, `xproxy_result` added."""
        limit = self.settings.max_body_bytes
        chunks: list[bytes] = []
        held = 0
        try:
            too_much = ""
            async for chunk in answer.content.iter_any():
                chunks.append(chunk)
                if not self.held.take(len(chunk)):
                    too_much = "the proxy was holding as many bodies as it may"
                    break
                held += len(chunk)
                if held > limit:
                    too_much = f"the response was over {limit:,} bytes"
                    break
            if too_much:  # passed on as it is, recorded as not priced
                response = await _start(request, answer, call)
                for chunk in chunks:
                    await response.write(chunk)
                chunks.clear()
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await self._record(call, None, answer.status, f"{too_much}; its usage was not read")
                await response.write_eof()
                return response
            data = b"".join(chunks)
            chunks.clear()
            reading = None
            parsed: Any = None
            with contextlib.suppress(ValueError):
                parsed = json.loads(data)
            if isinstance(parsed, dict):
                reading = read_response(call.upstream.shape, parsed)
            unread = "" if reading is not None or answer.status >= 400 else "the response reported no usage"
            result = await self._record(call, reading, answer.status, unread)
            if answer.status < 400 and isinstance(parsed, dict):
                data = answers.inject(data, result) or data
            return web.Response(status=answer.status, body=data, headers=_returned_headers(answer, call))
        finally:
            self.held.give(held)

    async def _stream(self, request: web.Request, call: Call, answer: aiohttp.ClientResponse) -> web.StreamResponse:
        """An event stream, passed on as each event arrives. Held back: the event that will
        carry the result (the last chunk with a finish reason, the usage chunk if the caller
        asked for it, Responses' final event, Anthropic's message_stop) and `[DONE]`; dropped:
        the usage chunk the proxy asked for when the caller did not."""
        response = await _start(request, answer, call)
        usage = StreamUsage(call.upstream.shape)
        splitter = sse.Splitter(self.settings.max_body_bytes)
        held: list[sse.Event] = []
        carrier: int | None = None  # the index in `held` of the event to carry xproxy_result
        ended = False
        try:
            async for chunk in answer.content.iter_any():
                for event in splitter.feed(chunk):
                    item = event.json()
                    if isinstance(item, dict):
                        usage.observe(item, _ms_since(call.started))
                    hold, carry, drop = _hold(call, event, item)
                    if drop:
                        continue
                    if hold:
                        held.append(event)
                        if carry:
                            carrier = len(held) - 1
                    else:
                        await response.write(event.raw)
            ended = True
        except (ConnectionError, asyncio.CancelledError) as gone:
            # The caller went away: leaving the upstream's `async with` closes its connection
            # (the upstream call is cancelled), and what the stream reported until then is
            # recorded, once, by a task of its own.
            unread = _unread(usage, cut=True)
            self._detached(
                self._store(call, self._event(call, usage.reading(), answer.status, unread, usage.first_item_ms))
            )
            if isinstance(gone, asyncio.CancelledError):
                raise
            return response
        rest = splitter.rest()
        unread = _unread(usage, cut=not ended, overflowed=splitter.overflowed)
        result = await self._record(call, usage.reading(), answer.status, unread, usage.first_item_ms)
        if carrier is not None:
            event = held[carrier]
            held[carrier] = sse.Event(answers.inject(event.raw, result) or event.raw, event.name, event.data)
        for event in held:
            await response.write(event.raw)
        if rest:
            await response.write(rest)
        await response.write_eof()
        return response

    # --- after the call: its event ------------------------------------------------------------

    def _event(self, call: Call, reading: Reading | None, status: int, unread: str, first_ms: int = 0) -> UsageEvent:
        """The call's event, which takes over its reservation (it settles it when stored). A
        provider's usage that is no valid event (a count past 10^12, a unit type of its own
        spelling) leaves the event not priced, with the violations as its reason."""
        event = _event(call, reading, status, unread, first_ms)
        v = Violations()
        validate_event(event, None, v)
        if v:
            said = "; ".join(f"{item.field}: {item.description}" for item in v.items[:4])
            event = dataclasses.replace(event, units={}, unread_usage=f"the response's usage is not valid ({said})")
        call.reservation = ""
        call.recorded = True
        return event

    async def _record(
        self, call: Call, reading: Reading | None, status: int, unread: str, first_ms: int = 0
    ) -> dict[str, Any]:
        """Stores the call's event and returns its xproxy_result. Run to its end even when the
        caller goes away meanwhile (shielded): the upstream was paid for."""
        task = asyncio.ensure_future(self._store(call, self._event(call, reading, status, unread, first_ms)))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        return await asyncio.shield(task)

    def _detached(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _store(self, call: Call, event: UsageEvent) -> dict[str, Any]:
        outcome: IngestResult | TallyError | None = None
        error: Exception | None = None
        for attempt in range(2):
            try:
                outcome = await self.services.ingestor.enqueue(event)
            except TallyError as refusal:
                outcome = refusal
            except StorageUnavailable as failure:
                error = failure
                break
            except Exception as failure:  # a bug: the caller still gets the provider's answer
                log.exception("storing a proxied call's event failed")
                error = failure
                break
            if isinstance(outcome, IngestResult) or attempt or outcome.code.name not in _CONTEXT_REFUSALS:
                break
            # Refused for its context (an experience that does not exist, of another type):
            # the call was made and paid for, so it is stored unattributed, the caller told why.
            call.warnings += (
                f"the call's experience context was refused ({outcome.message}); it is stored unattributed",
            )
            reservation = event.context.limit_reservation
            event = dataclasses.replace(event, context=dataclasses.replace(NO_CONTEXT, limit_reservation=reservation))
        if isinstance(outcome, IngestResult):
            if call.outcomes:
                await self._score(call, outcome)
            metrics.PROXY_CALLS.labels(call.upstream.name, "recorded").inc()
            log.debug("proxied %s/%s: request %s", call.upstream.name, call.rest, outcome.request_id)
            result = answers.xproxy_result(outcome)
            if call.warnings:
                result["warnings"] = [*call.warnings, *result["warnings"]]
            return result
        metrics.PROXY_CALLS.labels(call.upstream.name, "unrecorded").inc()
        if event.context.limit_reservation:
            call.reservation = event.context.limit_reservation
            await self._release(call)
        reason = str(error or outcome)
        repeated.error("a proxied call to %s was answered but not recorded: %s", call.upstream.name, reason)
        said = [*call.warnings, f"the call was not recorded: {reason}"]
        return answers.not_recorded(said, _experience_header(call), str(call.request_id))

    async def _score(self, call: Call, stored: IngestResult) -> None:
        """Records the call's outcome values on its run (checked before the call was made:
        only a type changed meanwhile refuses them, and the answer then says so)."""
        if stored.experience_id is None:
            call.warnings += ("the outcomes were not recorded: the call's event is not attributed to a run",)
            return
        try:
            await self.services.experiences.record_outcomes(str(stored.experience_id), call.outcomes, call.key_name)
        except (TallyError, StorageUnavailable) as refusal:
            call.warnings += (f"the outcomes were not recorded: {refusal}",)


# --- helpers ---------------------------------------------------------------------------------


def _context(request: web.Request) -> tuple[EventContext, tuple[OutcomeValue, ...]]:
    """The call's context and outcome values from its xproxy headers; INVALID_ARGUMENT for a
    malformed one. A type named without an experience id gets a new id now, so that the
    answer's headers can name the experience before its body (the event then creates it
    with that id)."""
    pairs = [(name.lower(), value) for name, value in request.headers.items() if name.lower().startswith("xproxy-")]
    outcomes = outcome_values(pairs)
    context = call_context([(key, value) for key, value in pairs if key not in OUTCOME_KEYS])
    v = Violations()
    probe = UsageEvent("proxy", "probe", {}, 0, 0, 0, 0, "", "", {}, context, "")
    validate_event(probe, None, v)
    v.raise_if_any()
    if context.experience_name and not context.experience_id:
        context = dataclasses.replace(context, experience_id=str(uuid7()))
    return context, outcomes


def _experience_header(call: Call) -> str:
    raw = call.context.experience_id
    if not raw:
        return ""
    return str(parse_uuid(raw) or derive_experience_id(raw))


def _resource(model: str) -> str:
    """The event's resource: the model as the provider named it, bounded; `unknown` without one."""
    model = model.strip()
    if not model or not model.isprintable() or len(model.encode()) > 256:
        return "unknown"
    return model


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _ms_since(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


def _unread(usage: StreamUsage, cut: bool = False, overflowed: bool = False) -> str:
    if usage.reading() is not None:
        return ""
    if overflowed:
        return "a stream event was too large to read; the usage was not read"
    if cut:
        return "the stream ended before it reported its usage"
    return "the stream reported no usage"


def _event(call: Call, reading: Reading | None, status: int, unread: str, first_ms: int) -> UsageEvent:
    model = reading.model if reading is not None and reading.model else call.model
    units = reading.units if reading is not None else {}
    response_id = reading.response_id if reading is not None else ""
    price_context = dict(call.context.price_context)
    if reading is not None:
        price_context.update(reading.price_context)
    latency = _ms_since(call.started)
    return UsageEvent(
        category=call.upstream.category,
        resource=_resource(model),
        units=units,
        event_time_us=now_us(),
        end_to_end_latency_ms=latency,
        time_to_first_token_ms=first_ms,
        http_status_code=status if 100 <= status <= 599 else 0,
        provider_response_id=response_id if len(response_id.encode()) <= TEXT_MAX else "",
        # The proxy sees each call once: its own request id is the key. (The provider's
        # response id is kept, but some compatible servers repeat one for every answer.)
        idempotency_key=str(call.request_id),
        properties={},
        context=dataclasses.replace(call.context, limit_reservation=call.reservation)
        if call.reservation
        else call.context,
        # What tells a retry from a reuse of a key; the proxy's keys are never reused.
        content_hash=call.request_id.hex,
        price_context=price_context,
        key_name=call.key_name,
        request_id=call.request_id,
        unread_usage=unread,
    )


def _hold(call: Call, event: sse.Event, item: Any) -> tuple[bool, bool, bool]:
    """(hold, carry, drop) for one event of a stream."""
    shape = call.upstream.shape
    if shape == ANTHROPIC:
        stop = isinstance(item, dict) and item.get("type") == "message_stop"
        return stop, stop, False
    if event.data == "[DONE]":
        return True, False, False
    if not isinstance(item, dict):
        return False, False, False
    kind = item.get("type")
    if isinstance(kind, str) and kind in ("response.completed", "response.incomplete", "response.failed"):
        return True, True, False
    choices = item.get("choices")
    if item.get("usage") and choices == []:  # the usage chunk
        return call.usage_asked, call.usage_asked, not call.usage_asked
    if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
        return True, not call.usage_asked, False
    return False, False, False


def _returned_headers(answer: aiohttp.ClientResponse, call: Call) -> CIMultiDict[str]:
    headers = CIMultiDict((name, value) for name, value in answer.headers.items() if name.lower() not in _NOT_RETURNED)
    if call.metered:
        headers["xproxy-request-id"] = str(call.request_id)
        if experience := _experience_header(call):
            headers["xproxy-experience-id"] = experience
    return headers


async def _start(request: web.Request, answer: aiohttp.ClientResponse, call: Call) -> web.StreamResponse:
    response = web.StreamResponse(status=answer.status, headers=_returned_headers(answer, call))
    response.headers["X-Accel-Buffering"] = "no"  # nginx in front passes each event at once
    await response.prepare(request)
    return response


async def _pass_through(request: web.Request, answer: aiohttp.ClientResponse, call: Call) -> web.StreamResponse:
    """Any other route of the provider's API: its answer as it comes, unread."""
    response = web.StreamResponse(status=answer.status, headers=_returned_headers(answer, call))
    await response.prepare(request)
    async for chunk in answer.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


def _too_large(upstream: Upstream, limit: int) -> web.Response:
    return answers.error(upstream.shape, 413, f"the request body is over {limit:,} bytes (--proxy-max-body-bytes)")

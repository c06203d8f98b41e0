"""One server interceptor for every call: request id, access, one log line, and the error edge.

The request id is always the server's own; a caller's `x-request-id` is logged beside
it as the caller's, never instead of it, so that no caller can forge or reuse one.
A TallyError becomes its rich status; any other exception becomes INTERNAL with a
generic message, its details logged under the request id: no exception text or
stack trace ever reaches a caller.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import aio

from .. import metrics
from ..domain.errors import Code, TallyError, Violation, invalid, overloaded
from .access import OPEN_SERVICES, Access, current_key
from .status import as_tally_error, current_call, status_of

log = logging.getLogger("tally.rpc")
if TYPE_CHECKING:  # grpc's classes are generic in its type stubs only
    Context = aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
# A servicer method as grpc.aio calls it: (request or request iterator, context). grpc's
# stubs type a handler's behaviors for the blocking server, hence the loose signature.
Behavior = Callable[..., Any]
REQUEST_ID_KEY = "x-request-id"
# Request ids only need to be unique across replicas and calls: a random prefix per
# process and a counter are, and cost no system call per request (uuid4 does).
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:12]
_request_numbers = itertools.count(1)


def message_too_large(field_path: str, size: int, bound: int) -> TallyError:
    """A request message over --max-message-bytes, seen by Tally (gRPC reads up to twice the
    bound, GRPC_RECEIVE_FACTOR, so that Tally answers it rather than gRPC ending the call)."""
    return invalid([Violation(field_path, f"the message is {size:,} bytes, over the {bound:,} bytes one may hold")])


# gRPC itself reads messages up to this many times --max-message-bytes; Tally refuses those
# over the bound with INVALID_ARGUMENT (a stream by position, going on), and gRPC ends a call
# whose message is larger still (RESOURCE_EXHAUSTED, before Tally sees it).
GRPC_RECEIVE_FACTOR = 2


class Admission:
    """How many calls, and of them streams, may be in progress at once, and how many bytes of
    unary and batch requests. Past a limit a call is refused with RESOURCE_EXHAUSTED (and
    RetryInfo) at once, rather than queued in memory or left to time out. Health checks are
    always admitted. (What a stream holds is bounded by its own window: servicers.py.)"""

    def __init__(
        self,
        max_calls: int,
        max_streams: int,
        max_call_bytes: int = 16 * 1024 * 1024,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.max_calls, self.max_streams, self.max_call_bytes = max_calls, max_streams, max_call_bytes
        self.max_message_bytes = max_message_bytes
        self.calls = self.streams = self.call_bytes = 0

    def check_answer(self, answer: Any) -> None:
        """An answer over the message bound would fail in grpc-core as the call is logged OK;
        it is refused here instead, so that the caller, the log and the metrics agree (lists
        shrink their pages to fit first: this is the last guard)."""
        if isinstance(answer, Message) and (size := answer.ByteSize()) > self.max_message_bytes:
            raise TallyError(
                Code.RESOURCE_EXHAUSTED,
                "ANSWER_TOO_LARGE",
                f"the answer of {size:,} bytes is over the {self.max_message_bytes:,} bytes a message may hold; "
                "ask for less (a smaller page)",
            )

    def take_bytes(self, size: int) -> None:
        """Counts a request of `size` bytes as served; one request is always taken when none
        is (a message is at most --max-message-bytes), so a large one is never refused forever."""
        if self.call_bytes and self.call_bytes + size > self.max_call_bytes:
            metrics.SHED.labels("call_bytes").inc()
            raise overloaded(f"{self.max_call_bytes:,} bytes of requests in progress")
        self.call_bytes += size

    def give_bytes(self, size: int) -> None:
        self.call_bytes -= size

    def enter(self, method: str, stream: bool) -> None:
        if method.startswith(OPEN_SERVICES):
            return
        if self.calls >= self.max_calls:
            metrics.SHED.labels("calls").inc()
            raise overloaded(f"{self.max_calls:,} calls in progress")
        if stream and self.streams >= self.max_streams:
            metrics.SHED.labels("streams").inc()
            raise overloaded(f"{self.max_streams:,} streams in progress")
        self.calls += 1
        self.streams += stream

    def leave(self, method: str, stream: bool) -> None:
        if not method.startswith(OPEN_SERVICES):
            self.calls -= 1
            self.streams -= stream


DEADLINE_SLACK_SECONDS = 0.05


class _Call:
    """Bookkeeping of one call: its request id, its key and the status it ended with."""

    __slots__ = ("caller_request_id", "code", "key", "method", "request_id", "start")

    def __init__(self, method: str, context: Context) -> None:
        self.method = method
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.key = ""
        self.request_id = f"{_REQUEST_ID_PREFIX}-{next(_request_numbers):x}"
        given = next((value for key, value in context.invocation_metadata() or () if key == REQUEST_ID_KEY), "")
        # Logged quoted (repr), so a caller's id cannot pass for one of the server's or break a log line.
        self.caller_request_id = given[:128] if isinstance(given, str) else ""
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        current_call.set((method, self.request_id))

    async def fail(self, context: Context, error: Exception) -> None:
        status = status_of(as_tally_error(error, self.method, self.request_id))
        self.code = status.code
        metadata = (*status.trailing_metadata, (REQUEST_ID_KEY, self.request_id))
        await context.abort(status.code, status.details, metadata)

    def gone(self, context: Context) -> None:
        """The caller went away: its deadline passed, or it cancelled. Logged and counted with
        the code the caller itself saw."""
        remaining = context.time_remaining()
        # grpc-core's deadline timer can fire a few milliseconds before time_remaining()
        # reaches 0 (a call counted CANCELLED whose caller saw DEADLINE_EXCEEDED, about one run
        # in ten of test_metrics under two workers): a call gone this close to its deadline
        # went for it.
        expired = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def finish(self, context: Context) -> None:
        if self.code == grpc.StatusCode.OK and context.cancelled():  # answered, but too late to be heard
            self.gone(context)
        code = context.code() if self.code == grpc.StatusCode.OK else self.code
        if isinstance(code, int):  # grpc.aio reports some codes as their number
            code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        seconds = time.perf_counter() - self.start
        metrics.CALLS.labels(self.method, code.name if code else "OK").inc()
        metrics.CALL_SECONDS.labels(self.method).observe(seconds)
        log.info(
            "rpc method=%s code=%s duration_ms=%.2f request_id=%s%s%s",
            self.method,
            code.name if code else "OK",
            seconds * 1000,
            self.request_id,
            f" key={self.key}" if self.key else "",
            f" caller_request_id={self.caller_request_id!r}" if self.caller_request_id else "",
        )

    async def admit(self, access: Access, context: Context) -> None:
        """Raises UNAUTHENTICATED or PERMISSION_DENIED unless the call may proceed."""
        key = await access.check(self.method, context.invocation_metadata())
        if key is not None:
            self.key = key.name
        current_key.set(key)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _is_abort(error: BaseException) -> bool:
    return isinstance(error, aio.AbortError)


class ServerInterceptor(aio.ServerInterceptor):
    def __init__(self, access: Access, admission: Admission) -> None:
        self.access = access
        self.admission = admission
        # Wrapped handlers, made once per method rather than once per call.
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = _wrap(method, handler, self.access, self.admission)
        return wrapped


class Undecodable:
    """A request message that does not decode (e.g. a string field of invalid UTF-8), in
    place of the message: grpc would end the call with UNKNOWN, or a whole stream, where
    Tally answers INVALID_ARGUMENT for the call, or for that one message of a stream."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def error(self, field_path: str = "request") -> TallyError:
        return invalid([Violation(field_path, f"the message does not decode: {self.problem}")], "UNDECODABLE_MESSAGE")


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return Undecodable(str(error)[:200])

    return parse


def _wrap(method: str, handler: Handler, access: Access, admission: Admission) -> Handler:
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(method, access, admission, handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(method, access, admission, handler.unary_stream),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(method, access, admission, handler.stream_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    assert handler.stream_stream is not None, "a handler has one of the four behaviors"
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(method, access, admission, handler.stream_stream),
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _wrap_unary(method: str, access: Access, admission: Admission, behavior: Behavior) -> Behavior:
    async def wrapper(request_or_iterator: Any, context: Context) -> Any:
        call = _Call(method, context)
        entered = False
        size = 0
        try:
            admission.enter(method, stream=False)
            entered = True
            await call.admit(access, context)
            if isinstance(request_or_iterator, Undecodable):
                raise request_or_iterator.error()
            if isinstance(request_or_iterator, Message):
                requested = request_or_iterator.ByteSize()
                if requested > admission.max_message_bytes:  # the one bound of a message, either way
                    raise message_too_large("request", requested, admission.max_message_bytes)
                admission.take_bytes(requested)
                size = requested  # given back when the call ends
            answer = await behavior(request_or_iterator, context)
            admission.check_answer(answer)
            return answer
        except asyncio.CancelledError:
            call.gone(context)
            raise
        except Exception as error:
            if _is_abort(error):
                raise
            await call.fail(context, error)
        finally:
            # A refusal's exception holds this frame in a reference cycle until a full
            # collection: the frame lets go of the request (up to --max-message-bytes) now.
            request_or_iterator = None
            if entered:
                admission.give_bytes(size)
                admission.leave(method, stream=False)
            call.finish(context)

    return wrapper


# How often a stream's key is checked again while the stream is open. With the keys' cache
# (ApiKeys.CACHE_SECONDS, 5 s) a revocation on any replica ends the stream within 7.5 s,
# and an idle one REVOKED_GRACE_SECONDS later: inside the documented 10 s.
RECHECK_SECONDS = 2.5
REVOKED_GRACE_SECONDS = 1.0


class _Revocation:
    """Checks an open stream's credentials every RECHECK_SECONDS. Once they are no longer valid
    (the key revoked), the stream reads no more requests: its next one raises the refusal, so
    that the events it sent before are answered as usual and then the call ends with it. A
    stream that sends nothing more is cancelled after REVOKED_GRACE_SECONDS and ends with it."""

    def __init__(self, access: Access, method: str, context: Context) -> None:
        self.refusal: TallyError | None = None
        self._task = asyncio.create_task(self._watch(access, method, context, asyncio.current_task()))

    async def _watch(self, access: Access, method: str, context: Context, stream: asyncio.Task[Any] | None) -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            try:
                await access.check(method, context.invocation_metadata())
            except TallyError as refusal:
                if refusal.code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED):
                    self.refusal = refusal
                    await asyncio.sleep(REVOKED_GRACE_SECONDS)
                    if stream is not None:
                        stream.cancel()
                    return
                # The database did not answer: the key stays as it was last seen.

    async def guard(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The stream's requests, until its credentials are found invalid."""
        async for request in requests:
            if self.refusal is not None:
                raise self.refusal
            yield request

    def stop(self) -> None:
        self._task.cancel()


def _wrap_stream(method: str, access: Access, admission: Admission, behavior: Behavior) -> Behavior:
    async def wrapper(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
        call = _Call(method, context)
        entered = False
        revocation: _Revocation | None = None
        try:
            admission.enter(method, stream=True)
            entered = True
            await call.admit(access, context)
            if call.key:  # a stream outlives its key's check: checked again while it is open
                revocation = _Revocation(access, method, context)
                if hasattr(request_or_iterator, "__aiter__"):
                    request_or_iterator = revocation.guard(request_or_iterator)
            result = behavior(request_or_iterator, context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:  # a handler that writes through context.write and returns a coroutine
                await result
        except asyncio.CancelledError:
            if revocation is None or revocation.refusal is None:
                call.gone(context)
                raise
            # Ended for its key while idle (a stream still sending ends through `guard`).
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            await call.fail(context, revocation.refusal)
        except Exception as error:
            if _is_abort(error):
                raise
            await call.fail(context, error)
        finally:
            if revocation is not None:
                revocation.stop()
            if entered:
                admission.leave(method, stream=True)
            call.finish(context)

    return wrapper

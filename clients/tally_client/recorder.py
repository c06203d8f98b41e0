"""Recording off the app's path: events are queued at once and reach Tally in batches.

`Recorder` (a thread, for blocking apps) and `AsyncRecorder` (a task, for asyncio apps)
take events without waiting and without ever raising. A sender batches them
(IngestBatch), retries what Tally could not take (UNAVAILABLE, a deadline) with
backoff and the same idempotency keys, so nothing is counted twice, and flushes on
`flush()`, `close()` and at interpreter exit. The queue is bounded: past it, events
are dropped and counted, with a warning, rather than growing the app's memory.

Each event carries the experience context of the `tally.experience(...)` block it was
recorded in as its own `context`, so events of many experiences share a batch. A block
without an id gets one when its first event is recorded (a UUID the server creates the
experience with), so the whole run lands in one experience though nothing waits for the
server.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.rpc import code_pb2

from tally.v1 import ingest_service_pb2 as ing_pb

from .client import AsyncTallyClient, TallyClient, current_scope, current_step
from .errors import TallyError

log = logging.getLogger("tally_client.recorder")
T = TypeVar("T")
_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


@dataclass
class RecorderStats:
    """What a recorder did with the events it was given."""

    accepted: int = 0  # stored by Tally
    duplicates: int = 0  # Tally had them already (a retry, a re-recorded response)
    rejected: int = 0  # refused by Tally (logged with the reason): retrying would not help
    dropped: int = 0  # not sent: the queue was full, or close() timed out
    retries: int = 0  # batches sent again after Tally could not take them


@dataclass(frozen=True)
class RecorderLimits:
    max_queue: int = 10_000  # events waiting; past this they are dropped and counted
    batch_size: int = 500  # events per IngestBatch (at most 1,000)
    linger_seconds: float = 0.2  # how long the sender waits to fill a batch
    first_retry_seconds: float = 0.5  # backoff after a failed send, doubled up to max_retry_seconds
    max_retry_seconds: float = 30.0
    # How long the app's exit (and close() by default) waits for what is queued to be sent;
    # what is left then is dropped, counted and said.
    exit_wait_seconds: float = 2.0


def recordable(event: ing_pb.UsageEvent) -> ing_pb.UsageEvent:
    """The event as it is queued: with the current experience context as its own, and an
    idempotency key, so that a retried batch never counts it twice."""
    scope = current_scope()
    if scope is not None:
        scope.ensure_id()
        context = event.context
        context.experience_id = context.experience_id or scope.experience_id
        context.experience_name = context.experience_name or scope.experience_name
        context.user_id = context.user_id or scope.user_id
        if not context.request_tags:
            context.request_tags.extend(scope.request_tags)
        if scope.experience_version and not context.experience_version:
            context.experience_version = scope.experience_version
    if not event.context.step and (step := current_step()):
        event.context.step = step
    if not event.idempotency_key and not event.provider_response_id:
        event.idempotency_key = f"tally-recorder-{uuid.uuid4()}"
    return event


class _Sending:
    """What both recorders share: the counts, and how one batch's answer is read."""

    def __init__(self, limits: RecorderLimits) -> None:
        self.limits = limits
        self.stats = RecorderStats()
        self._warned_drops = 0
        self._unreachable: str = ""  # why the last send failed, while Tally cannot be reached

    def _dropped(self, count: int, why: str = "its queue is full") -> None:
        self.stats.dropped += count
        # The first drop, then every thousandth: visible, without flooding the app's log.
        if self.stats.dropped - self._warned_drops >= 1000 or not self._warned_drops:
            self._warned_drops = self.stats.dropped
            log.warning("Tally recorder dropped %d event(s) so far: %s", self.stats.dropped, why)

    def _reachable(self, reached: bool, why: str = "") -> None:
        """Says once when Tally stops answering, and once when it answers again."""
        if not reached and not self._unreachable:
            log.warning("Tally recorder cannot reach Tally (%s); keeping events and retrying", why)
        elif reached and self._unreachable:
            log.warning("Tally recorder reaches Tally again; sending what it kept")
        self._unreachable = "" if reached else (why or "unreachable")

    def _after(
        self, batch: list[ing_pb.UsageEvent], response: ing_pb.IngestBatchResponse | BaseException
    ) -> list[ing_pb.UsageEvent]:
        """What to send again after one attempt, which answered `response` or failed with it.
        Counts what was settled; the rest is retried with backoff."""
        if isinstance(response, ing_pb.IngestBatchResponse):
            self._reachable(True)
            return [batch[i] for i in self._settle(batch, response)]
        if isinstance(response, TallyError) and response.code.name not in _RETRYABLE:
            self._reachable(True)
            self._refused(batch, response)
            return []
        if isinstance(response, TallyError):
            self._reachable(False, f"{response.code.name}: {response.message}")
        if not isinstance(response, TallyError):  # a bug here must not stop the sender
            log.error("Tally recorder failed to send a batch; retrying", exc_info=response)
        self.stats.retries += 1
        return batch

    def _settle(self, events: Sequence[ing_pb.UsageEvent], response: ing_pb.IngestBatchResponse) -> list[int]:
        """Counts a batch's answers; returns the indexes to send again."""
        again = []
        for item in response.items:
            if item.HasField("result"):
                if item.result.xproxy_result.duplicate_request:
                    self.stats.duplicates += 1
                else:
                    self.stats.accepted += 1
            elif _code_name(item.error.code) in _RETRYABLE:
                again.append(item.index)
            else:
                self.stats.rejected += 1
                log.warning("Tally refused a recorded event (%s): %s", item.error.reason, item.error.message)
        return again

    def _refused(self, events: Sequence[ing_pb.UsageEvent], error: TallyError) -> None:
        self.stats.rejected += len(events)
        log.warning("Tally refused a batch of %d recorded event(s): %s", len(events), error)

    def _why_left(self) -> str:
        return _why(self)

    def _backoff(self, attempt: int) -> float:
        return min(self.limits.max_retry_seconds, self.limits.first_retry_seconds * 2.0**attempt)


def _why(sending: _Sending) -> str:
    if sending._unreachable:
        return f"closed while Tally could not be reached ({sending._unreachable})"
    return "closed before they could be sent"


def _code_name(code: int) -> str:
    return str(code_pb2.Code.Name(code)) if code in code_pb2.Code.values() else str(code)


class Recorder(_Sending):
    """Records events from any thread; a daemon thread sends them. Flushed at exit."""

    def __init__(self, client: TallyClient, limits: RecorderLimits = RecorderLimits()) -> None:
        super().__init__(limits)
        self.client = client
        self._queue: queue.Queue[ing_pb.UsageEvent] = queue.Queue(limits.max_queue)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tally-recorder", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def record(self, event: ing_pb.UsageEvent) -> bool:
        """Queues the event; False if it was dropped. Never blocks, never raises."""
        try:
            self._queue.put_nowait(recordable(event))
            return True
        except queue.Full:
            self._dropped(1)
        except Exception:
            log.exception("Tally recorder could not queue an event")
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything queued so far was answered; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:  # queued, or in a batch not yet answered
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flushes (for at most `timeout` seconds, by default the limits' exit_wait_seconds),
        then stops the sender; what is left is dropped, counted and said."""
        if self._closed.is_set():
            return
        self.flush(self.limits.exit_wait_seconds if timeout is None else timeout)
        self._closed.set()
        self._thread.join(timeout=1.0)
        left = self._queue.qsize()
        if left:
            self._dropped(left, self._why_left())
        atexit.unregister(self.close)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.limits.linger_seconds
            while len(batch) < self.limits.batch_size:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._send(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _send(self, batch: list[ing_pb.UsageEvent]) -> None:
        for attempt in itertools.count():
            answer: ing_pb.IngestBatchResponse | BaseException
            try:
                answer = self.client.ingest_batch(batch)
            except Exception as error:  # noqa: BLE001 - _after decides what each failure means
                answer = error
            batch = self._after(batch, answer)
            if not batch or self._closed.wait(self._backoff(attempt)):
                break
        if batch:
            self._dropped(len(batch), self._why_left())  # closed while Tally could not take them


class AsyncRecorder(_Sending):
    """Records events from the event loop; a task sends them. Await `aclose()` before the loop ends."""

    def __init__(self, client: AsyncTallyClient, limits: RecorderLimits = RecorderLimits()) -> None:
        super().__init__(limits)
        self.client = client
        self._queue: asyncio.Queue[ing_pb.UsageEvent] | None = None
        self._task: asyncio.Task[None] | None = None

    def record(self, event: ing_pb.UsageEvent) -> bool:
        """Queues the event (inside a running event loop); False if it was dropped. Never raises."""
        try:
            if self._queue is None:
                self._queue = asyncio.Queue(self.limits.max_queue)
                self._task = asyncio.get_running_loop().create_task(self._run(), name="tally-recorder")
            self._queue.put_nowait(recordable(event))
            return True
        except asyncio.QueueFull:
            self._dropped(1)
        except Exception:
            log.exception("Tally recorder could not queue an event")
        return False

    async def flush(self) -> None:
        """Waits until everything queued so far was answered (bound it with asyncio.timeout)."""
        if self._queue is not None:
            await self._queue.join()  # queued, or in a batch not yet answered

    async def aclose(self, flush_seconds: float | None = None) -> None:
        """Flushes (for at most `flush_seconds`, by default the limits' exit_wait_seconds), then
        stops the sender; what is left is dropped, counted and said."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.exit_wait_seconds if flush_seconds is None else flush_seconds):
                await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue is not None and self._queue.qsize():
            self._dropped(self._queue.qsize(), self._why_left())

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.limits.linger_seconds
            while len(batch) < self.limits.batch_size:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            try:
                await self._send(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _send(self, batch: list[ing_pb.UsageEvent]) -> None:
        for attempt in itertools.count():
            answer: ing_pb.IngestBatchResponse | BaseException
            try:
                answer = await self.client.ingest_batch(batch)
            except Exception as error:  # noqa: BLE001 - _after decides what each failure means
                answer = error
            batch = self._after(batch, answer)
            if not batch:
                return
            await asyncio.sleep(self._backoff(attempt))

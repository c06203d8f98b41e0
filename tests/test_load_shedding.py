"""Load shedding with bounded memory: past the limits of calls, streams and queued events,
new work is refused with RESOURCE_EXHAUSTED (reason OVERLOADED, with RetryInfo) instead
of growing memory or timing out, and the server answers normally afterwards. Measured on
a server process of its own: 50 streams whose clients never read, then 5,000 concurrent
unary calls, with its resident memory read from /proc. Every call of the flood reaches Tally
and is served or refused OVERLOADED: none is cancelled by grpc-core on the way (its default
pending-call limits did so to a third of it)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tally.v1 import ingest_service_pb2 as pb, ingest_service_pb2_grpc as ing_grpc
from tally_server.app import TallyServer
from tally_server.config import Settings

from .helpers import decode
from .server_process import ServerProcess

# Memory and a normal call's latency are measured here: with no other test beside them.
pytestmark = pytest.mark.alone

# The documented bound of what 50 stalled streams and a flood of 5,000 calls may add to a
# server's resident memory (docs/guarantees.md, "Load shedding").
RSS_GROWTH_BOUND_MB = 150


def event(n: int = 0) -> pb.UsageEvent:
    return pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=10 + n)})


def overloaded(error: aio.AioRpcError) -> bool:
    details = rpc_status.from_call(error)
    retry = details is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details.details)
    return decode(error).reason == "OVERLOADED" and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry


@pytest.fixture
async def small(tmp_path):
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'small.db'}",
        grace_seconds=1,
        max_calls=4,
        max_streams=2,
        max_queued_events=100,
    )
    server = TallyServer(settings)
    await server.start()
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    await server.stop()


async def test_calls_past_the_limit_are_refused_at_once_and_health_still_answers(small):
    stub = ing_grpc.IngestServiceStub(small)
    calls = [stub.Ingest(pb.IngestRequest(event=event(n))) for n in range(300)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    assert refused and all(overloaded(error) for error in refused), [decode(e).message for e in refused[:3]]
    assert len(refused) < len(outcomes), "the calls within the limit were served"
    health = await health_pb2_grpc.HealthStub(small).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert (await stub.Ingest(pb.IngestRequest(event=event()))).request_id, "served normally afterwards"


async def test_streams_past_the_limit_are_refused(small):
    stub = ing_grpc.IngestServiceStub(small)
    held = [stub.IngestStream() for _ in range(2)]
    for call in held:
        await call.write(pb.IngestStreamRequest(event=event()))
        assert (await call.read()).HasField("result")
    third = stub.IngestStream()
    await third.write(pb.IngestStreamRequest(event=event()))
    with pytest.raises(aio.AioRpcError) as caught:
        await third.read()
    assert overloaded(caught.value)
    for call in held:
        await call.done_writing()
        assert await call.read() == aio.EOF


async def test_events_past_the_writer_queue_are_refused_each(small):
    stub = ing_grpc.IngestServiceStub(small)
    too_many = await stub.IngestBatch(pb.IngestBatchRequest(events=[event(n) for n in range(150)]))
    assert too_many.rejected_count == 150 and {item.error.reason for item in too_many.items} == {"OVERLOADED"}
    fits = await stub.IngestBatch(pb.IngestBatchRequest(events=[event(n) for n in range(50)]))
    assert fits.accepted_count == 50


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def stall(stub: ing_grpc.IngestServiceStub, calls: list[aio.StreamStreamCall]) -> int:
    """A stream whose client writes events and never reads an answer; returns how many it wrote."""
    call = stub.IngestStream()
    calls.append(call)
    written = 0
    with contextlib.suppress(TimeoutError, aio.AioRpcError):
        while written < 5000:
            await asyncio.wait_for(call.write(pb.IngestStreamRequest(event=event(written))), 2)
            written += 1
    return written


async def settled_count(path: Path) -> int:
    """The events stored once the writer has caught up (the count still for half a second)."""
    counts: list[int] = []
    with contextlib.closing(sqlite3.connect(path)) as db:
        while len(counts) < 2 or counts[-1] != counts[-2]:
            counts.append(db.execute("SELECT count(*) FROM events").fetchone()[0])
            await asyncio.sleep(0.5)
    return counts[-1]


@pytest.mark.slow
async def test_stalled_readers_and_a_flood_keep_memory_bounded(tmp_path):
    server = await asyncio.to_thread(ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'load.db'}").start)
    assert server.process is not None
    try:
        # A stream window of 1 KiB and no BDP probing: the server can send a stream only a
        # few answers before the client, never reading, stalls it at the HTTP/2 level.
        stalling = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        async with aio.insecure_channel(server.target, options=stalling) as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            await stub.Ingest(pb.IngestRequest(event=event()))
            before = rss_mb(server.process.pid)
            calls: list[aio.StreamStreamCall] = []
            written = await asyncio.gather(*(stall(stub, calls) for _ in range(50)))
            stalled = rss_mb(server.process.pid)
            stored = await settled_count(tmp_path / "load.db") - 1  # the first, unary event
            print(f"\nevents written by 50 streams that never read: {sum(written):,} (at most 5,000 each)")
            print(f"stored meanwhile: {stored:,} (each stream stops at 512 events in flight)")
            # The rest wait in the transport's buffers: the server takes no more of a
            # stream while 512 of its events are unanswered.
            assert 50 * 400 <= stored <= 50 * (512 + 100), stored
            async with aio.insecure_channel(server.target) as other:  # other clients, another connection
                flooding = ing_grpc.IngestServiceStub(other)
                flood = [flooding.Ingest(pb.IngestRequest(event=event(n)), timeout=60) for n in range(5000)]
                outcomes = await asyncio.gather(*flood, return_exceptions=True)
            flooded = rss_mb(server.process.pid)
            errors = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
            codes = {e.code() for e in errors}
            # Served, or refused by Tally (OVERLOADED): never cancelled on the way, never a failure.
            assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            shed = sum(1 for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert all(overloaded(e) for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
            served = len(outcomes) - len(errors)
            print(f"flood of 5,000: {served:,} served, {shed:,} shed")
            for call in calls:
                call.cancel()
            await asyncio.sleep(1)
            assert (await stub.Ingest(pb.IngestRequest(event=event()), timeout=30)).request_id, "served normally after"
        growth = max(stalled, flooded) - before
        print(f"\nRSS {before:.0f} MB, {stalled:.0f} MB with 50 stalled streams, {flooded:.0f} MB after the flood")
        assert growth < RSS_GROWTH_BOUND_MB, f"grew {growth:.0f} MB"
    finally:
        server.terminate()


async def test_a_flood_past_max_calls_is_refused_overloaded_not_cancelled(tmp_path):
    """5,000 concurrent unary calls on one connection to a server that runs at most 100 at
    once: each is served or answered RESOURCE_EXHAUSTED (OVERLOADED, RetryInfo); grpc-core
    cancels none of them before Tally sees them."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'flood.db'}"
    server = await asyncio.to_thread(ServerProcess(url, "--max-calls", "100").start)
    try:
        async with aio.insecure_channel(server.target) as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            # The database's write lock held for 2 s (under the 5 s database timeout): the
            # first calls wait in the writer, so the flood surely passes 100 at once however
            # fast this machine serves.
            holder = sqlite3.connect(tmp_path / "flood.db", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            flood = [stub.Ingest(pb.IngestRequest(event=event(n)), timeout=60) for n in range(5000)]
            flooding = asyncio.gather(*flood, return_exceptions=True)
            await asyncio.sleep(2)
            holder.execute("ROLLBACK")
            holder.close()
            outcomes = await flooding
            errors = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
            assert {e.code() for e in errors} <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, {e.code() for e in errors}
            assert all(overloaded(e) for e in errors)
            print(f"\nflood of 5,000 at --max-calls 100: {len(outcomes) - len(errors):,} served, {len(errors):,} shed")
            assert errors and len(errors) < len(outcomes), "some served, some shed"
            assert (await stub.Ingest(pb.IngestRequest(event=event()), timeout=30)).request_id, "served normally after"
    finally:
        server.terminate()

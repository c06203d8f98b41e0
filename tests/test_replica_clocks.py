"""Two replicas, separate processes whose clocks differ by a second (libfaketime), on one
PostgreSQL database: reserving across UTC midnight against a daily BLOCK limit is never
over-granted. Before, the replica a second ahead counted in the next day's period, the two
did not take turns, and both were granted: $1.60 held against a $1.00 limit.

PostgreSQL only: on SQLite every Reserve takes the file's write lock, so replicas take
turns whatever their clocks say (test_limits covers its concurrency)."""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path

import pytest
from grpc import aio

from tally.v1 import common_pb2, limit_service_pb2 as lim_pb, limit_service_pb2_grpc as lim_grpc

from .conftest import drop_database_url, make_database_url
from .server_process import ServerProcess
from .test_limits import nanos

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
FAKETIME_INSTALLED = FAKETIME.exists()
# Both replicas are started this long before the instant the rounds begin (they must be ready by then).
STARTUP_SECONDS = 8.0
DOLLARS = lambda units, cents=0: common_pb2.Money(currency_code="USD", units=units, nanos=cents * 10_000_000)  # noqa: E731


def clock_ahead_by(seconds: float) -> dict[str, str]:
    """The environment of a process whose wall and monotonic clocks run `seconds` ahead."""
    return {"LD_PRELOAD": str(FAKETIME), "FAKETIME": f"{seconds:+.3f}s"}


async def test_replicas_with_different_clocks_never_over_grant_across_midnight(tmp_path):
    if not FAKETIME_INSTALLED:
        pytest.fail(f"libfaketime is not installed ({FAKETIME}); .ci/run installs Debian's faketime")
    url = await make_database_url("postgresql", tmp_path)
    # The rounds begin when replica A's clock reads 23:59:59.3 and B's 00:00:00.3 (a second ahead).
    begin = time.time() + STARTUP_SECONDS
    midnight = (datetime.datetime.fromtimestamp(begin, datetime.UTC) + datetime.timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    offset_a = midnight.timestamp() - 0.7 - begin
    starting = [ServerProcess(url, env=clock_ahead_by(offset)) for offset in (offset_a, offset_a + 1.0)]
    replicas = await asyncio.gather(*(asyncio.to_thread(replica.start) for replica in starting))
    try:
        assert time.time() < begin, f"the replicas took over {STARTUP_SECONDS:g} s to start"
        async with aio.insecure_channel(replicas[0].target) as a, aio.insecure_channel(replicas[1].target) as b:
            stub_a, stub_b = lim_grpc.LimitServiceStub(a), lim_grpc.LimitServiceStub(b)
            daily = lim_pb.Limit(
                name="daily", max=DOLLARS(1), kind=1, period=2, scope=lim_pb.LimitScope(everything=True)
            )
            await stub_a.CreateLimit(lim_pb.CreateLimitRequest(limit=daily))
            await stub_a.Reserve(lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=DOLLARS(0, 40))))
            await asyncio.sleep(begin - time.time())
            rounds = over = 0
            sixty = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=DOLLARS(0, 60)))
            while time.time() < begin + 0.6:  # A still before midnight, B after it
                outcomes = await asyncio.gather(stub_a.Reserve(sixty), stub_b.Reserve(sixty), return_exceptions=True)
                granted = [o.reservation.reservation_id for o in outcomes if not isinstance(o, BaseException)]
                errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, aio.AioRpcError)]
                assert not errors, errors
                got = await stub_a.GetLimit(lim_pb.GetLimitRequest(name="daily"))
                held = nanos(got.current.reserved)
                rounds += 1
                over += held > 1_000_000_000
                assert len(granted) <= 1, f"round {rounds}: both replicas granted $0.60; ${held / 1e9:.2f} held"
                for reservation_id in granted:
                    await stub_a.Release(lim_pb.ReleaseRequest(reservation_id=reservation_id))
            assert rounds >= 3, f"only {rounds} rounds ran across midnight"
            print(f"\n{rounds} rounds across midnight, replicas' clocks a second apart: never over-granted")
    finally:
        for replica in starting:
            replica.kill()
        await drop_database_url(url)

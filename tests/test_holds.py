"""Limits, part three, through the wire on both databases: watching costs one shared read
however many watch, limits are read in a constant number of queries, Reserve resolves its
context as ingest does, and reservations belong to the key that made them."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from grpc import aio

from tally.v1 import (
    experience_type_service_pb2 as types_pb,
    ingest_service_pb2 as pb,
    limit_service_pb2 as lim_pb,
    limit_service_pb2_grpc as lim_grpc,
    price_catalog_service_pb2 as price_pb,
)
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.services.limits import MAX_WATCHED_NAMES

from .conftest import drop_database_url, make_database_url, stubs_for
from .helpers import raises
from .test_limits import CATEGORY, CENT, CENT_TIMES, MODEL, nanos, new_type, price_model, type_limit, usage

EVERYTHING = lim_pb.LimitScope(everything=True)


@pytest.fixture
async def own_server(backend, tmp_path):
    """A server of the test's own (its limits would apply to every other test's calls)."""
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield stubs_for(channel, server, backend)
    finally:
        await server.stop()
        await drop_database_url(url)


def count_statements(server: TallyServer) -> list[str]:
    """The SQL statements the server sends from now on (SQLAlchemy's, the reads' path)."""
    sent: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    sa.event.listen(server.db.engine.sync_engine, "before_cursor_execute", before)
    return sent


async def test_a_thousand_limits_and_thirty_watchers_cost_one_read_a_second(own_server):
    """The repro of issue 25, item 1: 1,000 limits, 30 idle WatchLimits({}) streams, and a
    caller ingesting meanwhile. Before, each watch made 2,001 queries a second and the
    other callers' Ingest reached its 10 s deadline."""
    stubs = own_server
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    names = [f"l{n:04d}" for n in range(1000)]
    for first in range(0, len(names), 100):
        await asyncio.gather(
            *(
                limits.CreateLimit(
                    lim_pb.CreateLimitRequest(
                        limit=lim_pb.Limit(name=name, max=CENT, kind=2, period=2, scope=lim_pb.LimitScope(user_id=name))
                    )
                )
                for name in names[first : first + 100]
            )
        )
    sent = count_statements(stubs.server)
    began = time.perf_counter()
    listed = await limits.ListLimits(lim_pb.ListLimitsRequest(page_size=1000))
    print(f"\n{stubs.backend}: ListLimits(page_size=1000) in {(time.perf_counter() - began) * 1000:.0f} ms")
    assert [limit.name for limit in listed.limits] == names
    assert [state.limit for state in listed.current] == names
    assert len(sent) <= 6, f"ListLimits of 1,000 limits sent {len(sent)} statements"

    watches = [limits.WatchLimits(lim_pb.WatchLimitsRequest(), timeout=120) for _ in range(30)]
    for watch in watches:  # each gets every limit's period once
        initial = [await watch.read() for _ in names]
        assert {change.period.limit for change in initial} == set(names)
        assert {change.reason for change in initial} == {"initial"}
    feed = stubs.server.limits.feed
    reads_before, started = feed.reads, time.monotonic()
    latencies = []
    while time.monotonic() - started < 2.5:
        began = time.perf_counter()
        await stubs.ingest.Ingest(pb.IngestRequest(event=usage(10)), timeout=10)
        latencies.append((time.perf_counter() - began) * 1000)
        await asyncio.sleep(0.02)
    reads = feed.reads - reads_before
    elapsed = time.monotonic() - started
    print(
        f"\n{stubs.backend}: 30 watchers of 1,000 limits: {reads} shared reads in {elapsed:.1f} s; other caller's "
        f"Ingest p50 {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms over {len(latencies)} calls"
    )
    assert reads <= elapsed + 2, f"{reads} reads in {elapsed:.1f} s: the watchers do not share one read a second"
    assert reads >= 2, "the feed stopped reading"
    # Each event moved every ALLOW limit's spend, not its state: no watcher was told of a change.
    for watch in watches:
        watch.cancel()
    await asyncio.sleep(0.2)
    assert feed._task is None, "the reader stops when no one watches"


async def test_a_watch_names_at_most_a_thousand_limits(stubs):
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    began = time.perf_counter()
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        async for _ in limits.WatchLimits(lim_pb.WatchLimitsRequest(names=["l0000"] * 400_000), timeout=30):
            pass
    assert "names" in error.fields and f"{MAX_WATCHED_NAMES:,}" in error.fields["names"]
    print(f"\n{stubs.backend}: a watch of 400,000 names refused in {(time.perf_counter() - began) * 1000:.0f} ms")


async def test_a_version_scoped_block_limit_binds_a_new_runs_first_reservation(stubs):
    """A limit on (type, version 1), exceeded: Reserve with only the type's name (a new run,
    version resolved to the type's current one, as ingest does) is refused."""
    await price_model(stubs)
    type_name = await new_type(stubs)
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    name = f"v1-{uuid.uuid4().hex[:8]}"
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=type_limit(name, type_name, CENT, experience_version=1)))
    await stubs.ingest.Ingest(
        pb.IngestRequest(event=usage(2000)), metadata=(("xproxy-experience-name", type_name),)
    )  # $0.02 of $0.01: exceeded
    ask = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT))
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"):
        await limits.Reserve(ask, metadata=(("xproxy-experience-name", type_name),))
    # With a non-UUID id that does not exist yet, the same: the id is derived, the version the current one.
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"):
        await limits.Reserve(ask, metadata=(("xproxy-experience-name", type_name), ("xproxy-experience-id", "order-7")))
    # Version 2 is not bound by it.
    await stubs.types.IncrementExperienceTypeVersion(types_pb.IncrementExperienceTypeVersionRequest(name=type_name))
    granted = await limits.Reserve(ask, metadata=(("xproxy-experience-name", type_name),))
    assert name not in granted.reservation.limits


async def test_reserve_takes_a_non_uuid_experience_id_as_ingest_does(stubs):
    """Ingest maps a non-UUID id to a derived UUID; Reserve applies that experience's limits."""
    await price_model(stubs)
    type_name = await new_type(stubs)
    raw_id = f"ticket-{uuid.uuid4().hex[:8]}"
    context = (("xproxy-experience-name", type_name), ("xproxy-experience-id", raw_id))
    stored = await stubs.ingest.Ingest(pb.IngestRequest(event=usage(100)), metadata=context)
    derived = stored.xproxy_result.experience_id
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    name = f"run-{uuid.uuid4().hex[:8]}"
    scope = lim_pb.LimitScope(experience_id=derived)
    await limits.CreateLimit(
        lim_pb.CreateLimitRequest(limit=lim_pb.Limit(name=name, max=CENT_TIMES(5), kind=1, period=1, scope=scope))
    )
    granted = await limits.Reserve(
        lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT)),
        metadata=(("xproxy-experience-id", raw_id),),
    )
    assert name in granted.reservation.limits


@pytest.fixture
async def keyed_server(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required"))
    await server.start()
    try:
        secrets = {}
        for name, scope in (("admin", "admin"), ("mine", "ingest"), ("theirs", "ingest")):
            _, secrets[name] = await server.keys.create(name, [scope])
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield stubs_for(channel, server, backend), secrets
    finally:
        await server.stop()
        await drop_database_url(url)


def bearer(secret: str, *more: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"), *more)


async def test_reservations_belong_to_the_key_that_made_them(keyed_server):
    """Another key's event does not settle a reservation; request ids are each key's own; a
    replay after release says so; a duplicate event releases the new reservation it names."""
    stubs, keys = keyed_server
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    admin, mine, theirs = bearer(keys["admin"]), bearer(keys["mine"]), bearer(keys["theirs"])
    limit = lim_pb.Limit(name="all", max=CENT_TIMES(50), kind=1, period=1, scope=EVERYTHING)
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=limit), metadata=admin)
    await price_model_with(stubs, admin)

    async def held() -> int:
        got = await limits.GetLimit(lim_pb.GetLimitRequest(name="all"), metadata=admin)
        return nanos(got.current.reserved)

    ask = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT), request_id="same-id")
    a = (await limits.Reserve(ask, metadata=mine)).reservation.reservation_id
    # The same request id with another key is another reservation.
    b = (await limits.Reserve(ask, metadata=theirs)).reservation.reservation_id
    assert a != b
    assert (await limits.Reserve(ask, metadata=mine)).reservation.reservation_id == a
    assert await held() == 20_000_000

    # B's event naming A's reservation is stored and counted, but does not settle it.
    stored = await stubs.ingest.Ingest(
        pb.IngestRequest(event=usage(100, reservation=a, idempotency_key="theirs-1")), metadata=theirs
    )
    assert any("another API key" in w for w in stored.xproxy_result.warnings), stored.xproxy_result
    assert await held() == 20_000_000
    # A's own event settles it.
    stored = await stubs.ingest.Ingest(
        pb.IngestRequest(event=usage(100, reservation=a, idempotency_key="mine-1")), metadata=mine
    )
    assert not stored.xproxy_result.warnings, stored.xproxy_result.warnings
    assert await held() == 10_000_000

    # Replaying the request id of a settled reservation tells the truth.
    async with raises(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OUTSTANDING"):
        await limits.Reserve(ask, metadata=mine)
    await limits.Release(lim_pb.ReleaseRequest(reservation_id=b), metadata=theirs)
    async with raises(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OUTSTANDING"):
        await limits.Reserve(ask, metadata=theirs)
    assert await held() == 0

    # A retry of a stored event, holding a new reservation, releases it and says so.
    fresh = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT))
    c = (await limits.Reserve(fresh, metadata=mine)).reservation.reservation_id
    assert await held() == 10_000_000
    again = await stubs.ingest.Ingest(
        pb.IngestRequest(event=usage(100, idempotency_key="mine-1")),
        metadata=(*mine, ("xproxy-limit-reservation", c)),
    )
    assert again.xproxy_result.duplicate_request
    assert any(c in w and "released" in w for w in again.xproxy_result.warnings), again.xproxy_result
    assert await held() == 0
    # The spend counted each stored event once: $0.0001 each, two events.
    got = await limits.GetLimit(lim_pb.GetLimitRequest(name="all"), metadata=admin)
    assert got.current.event_count == 2


async def price_model_with(stubs, metadata) -> None:
    """price_model with a key: the catalog call needs the admin scope."""
    price = price_pb.CustomPrice(
        category=CATEGORY,
        resource=MODEL,
        effective_time=timestamp_pb2.Timestamp(seconds=0),
        unit_prices={"text": price_pb.UnitPrice(input_per_million="10")},
    )
    await stubs.prices.CreateCustomPrice(price_pb.CreateCustomPriceRequest(price=price), metadata=metadata)

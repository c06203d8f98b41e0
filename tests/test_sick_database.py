"""A sick database answers UNAVAILABLE (STORAGE_UNAVAILABLE, with RetryInfo) in time, is
never committed to after its caller was answered, shows in health, and recovers without
a restart: PostgreSQL refusing connections, a table locked by another session, a pool
with no connection free, and a SQLite file locked by another process. Each test has a
server and database of its own, with a one-second database timeout."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from tally.v1 import (
    experience_type_service_pb2 as types_pb,
    experience_type_service_pb2_grpc as types_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc as ing_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import POSTGRES_URL, drop_database_url, make_database_url
from .helpers import RichError, decode


def event(key: str) -> pb.UsageEvent:
    return pb.UsageEvent(
        category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=10)}, idempotency_key=key
    )


async def start(url: str) -> TallyServer:
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, database_timeout_seconds=1))
    server.HEALTH_INTERVAL_SECONDS = 0.5
    await server.start()
    return server


async def unavailable_in_time(stub: ing_grpc.IngestServiceStub, key: str) -> float:
    """Ingests `key`; asserts STORAGE_UNAVAILABLE with RetryInfo; returns how long it took."""
    started = time.monotonic()
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Ingest(pb.IngestRequest(event=event(key)), timeout=20)
    took = time.monotonic() - started
    error = decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"), error.message
    status = rpc_status.from_call(caught.value)
    assert any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in status.details), "RetryInfo"
    return took


async def health(channel: aio.Channel) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(answer.status)


async def until(condition, seconds: float = 10.0) -> float:
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < seconds, "did not happen in time"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def stored(url: str, key: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            query = sa.text("SELECT count(*) FROM events WHERE idempotency_key = :key")
            return int((await conn.execute(query, {"key": key})).scalar_one())
    finally:
        await engine.dispose()


@pytest.fixture
async def postgres_url(tmp_path):
    url = await make_database_url("postgresql", tmp_path)
    yield url
    await drop_database_url(url)


@contextlib.asynccontextmanager
async def table_locked(url: str, table: str) -> AsyncIterator[AsyncConnection]:
    """Another session holding `table` in ACCESS EXCLUSIVE mode until the block ends."""
    locker = create_async_engine(url)
    try:
        async with locker.connect() as conn:
            await conn.execute(sa.text("BEGIN"))
            await conn.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            yield conn
            await conn.execute(sa.text("ROLLBACK"))
    finally:
        await locker.dispose()


async def admin(statement: str) -> None:
    engine = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


async def test_a_postgresql_that_refuses_connections_is_unavailable_then_recovers(postgres_url):
    name = sa.make_url(postgres_url).database
    server = await start(postgres_url)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            await stub.Ingest(pb.IngestRequest(event=event(f"before-{uuid.uuid4()}")))
            await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            assert await unavailable_in_time(stub, f"during-{uuid.uuid4()}") < 3
            await until(lambda: _is(channel, health_pb2.HealthCheckResponse.NOT_SERVING))
            await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await until(lambda: _is(channel, health_pb2.HealthCheckResponse.SERVING))
            again = await stub.Ingest(pb.IngestRequest(event=event(f"after-{uuid.uuid4()}")))
            assert not again.xproxy_result.duplicate_request, "recovered without a restart"
    finally:
        await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await server.stop()


async def _is(channel: aio.Channel, status: int) -> bool:
    return await health(channel) == status


async def test_a_locked_postgresql_table_is_unavailable_in_time_and_never_committed_after(postgres_url):
    server = await start(postgres_url)
    key = f"locked-{uuid.uuid4()}"
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            await stub.Ingest(pb.IngestRequest(event=event(f"warm-{uuid.uuid4()}")))
            async with table_locked(postgres_url, "events"):
                assert await unavailable_in_time(stub, key) < 4, "the lock timeout, not the caller's deadline"
                await asyncio.sleep(1.5)
            await asyncio.sleep(0.5)
            assert await stored(postgres_url, key) == 0, "answered UNAVAILABLE: never committed afterwards"
            retried = await stub.Ingest(pb.IngestRequest(event=event(key)))
            assert not retried.xproxy_result.duplicate_request, "the retry is the first time it is stored"
    finally:
        await server.stop()


async def test_a_locked_sqlite_file_is_unavailable_in_time_and_never_committed_after(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'locked.db'}"
    server = await start(url)
    key = f"locked-{uuid.uuid4()}"
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            await stub.Ingest(pb.IngestRequest(event=event(f"warm-{uuid.uuid4()}")))
            other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)  # as another process would
            other.execute("BEGIN IMMEDIATE")
            try:
                assert await unavailable_in_time(stub, key) < 4
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert await stored(url, key) == 0
            retried = await stub.Ingest(pb.IngestRequest(event=event(key)))
            assert not retried.xproxy_result.duplicate_request
    finally:
        await server.stop()


async def test_an_exhausted_postgresql_pool_is_unavailable_in_time(postgres_url, caplog):
    """60 reads at once against a locked table: 20 hold every pooled connection while they
    wait for the lock, the other 40 wait for the pool. Every call answers UNAVAILABLE
    within the timeouts, the pool's own wait among them, and the server then serves."""
    server = await start(postgres_url)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = types_grpc.ExperienceTypeServiceStub(channel)
            await stub.ListExperienceTypes(types_pb.ListExperienceTypesRequest(), timeout=5)

            async def one_read() -> tuple[float, RichError]:
                started = time.monotonic()
                with pytest.raises(aio.AioRpcError) as caught:
                    await stub.ListExperienceTypes(types_pb.ListExperienceTypesRequest(), timeout=20)
                return time.monotonic() - started, decode(caught.value)

            async with table_locked(postgres_url, "experience_types"):
                answers = await asyncio.gather(*(one_read() for _ in range(60)))
            for took, error in answers:
                assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"), error.message
                assert took < 5, "the database timeouts (1 s each), not the caller's deadline"
            assert "QueuePool limit" in caplog.text, "some calls waited for the pool, not only for the lock"
            await stub.ListExperienceTypes(types_pb.ListExperienceTypesRequest(), timeout=5)
    finally:
        await server.stop()


async def test_a_server_holds_at_most_its_database_connections(postgres_url):
    """--database-connections 3: ten reads wait on a locked table at once, and the server
    holds three connections to its database, no more; once the lock goes, all are served.
    Fewer than 2 (the writer's and one more) refuses to start."""
    settings = Settings(listen="127.0.0.1:0", database_url=postgres_url, grace_seconds=1, database_timeout_seconds=5)
    server = TallyServer(dataclasses.replace(settings, database_connections=3))
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = types_grpc.ExperienceTypeServiceStub(channel)
            async with table_locked(postgres_url, "experience_types") as conn:
                reads = [stub.ListExperienceTypes(types_pb.ListExperienceTypesRequest(), timeout=20) for _ in range(10)]
                waiting = asyncio.gather(*reads)
                await asyncio.sleep(1.5)
                held = (
                    await conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    )
                ).scalar_one()
            await waiting
            assert held == 3, held
    finally:
        await server.stop()
    command = [sys.executable, "-m", "tally_server", "--listen", "127.0.0.1:0", "--database-connections", "1"]
    refused = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert refused.stderr.strip() == "tally: --database-connections must be 2 or more, got 1", refused.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_an_event_whose_caller_gave_up_before_its_commit_is_never_stored(backend, tmp_path):
    """While the writer waits on a locked database with event A, event B's caller passes its
    deadline: B is answered DEADLINE_EXCEEDED and is not stored when the lock goes; A is."""
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, database_timeout_seconds=5))
    await server.start()
    first, gone = f"first-{uuid.uuid4()}", f"gone-{uuid.uuid4()}"
    locker = create_async_engine(url) if backend == "postgresql" else None
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            await stub.Ingest(pb.IngestRequest(event=event(f"warm-{uuid.uuid4()}")))
            if locker is not None:
                conn = await locker.connect()
                await conn.execute(sa.text("BEGIN"))
                await conn.execute(sa.text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
            else:
                other = sqlite3.connect(tmp_path / "tally.db", isolation_level=None)
                other.execute("BEGIN IMMEDIATE")
            waiting = asyncio.ensure_future(stub.Ingest(pb.IngestRequest(event=event(first)), timeout=20))
            await asyncio.sleep(0.3)  # the writer is in A's commit, waiting on the lock
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.Ingest(pb.IngestRequest(event=event(gone)), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(1.0)
            if locker is not None:
                await conn.execute(sa.text("ROLLBACK"))
                await conn.close()
            else:
                other.execute("ROLLBACK")
                other.close()
            assert not (await waiting).xproxy_result.duplicate_request
            await stub.Ingest(pb.IngestRequest(event=event(f"after-{uuid.uuid4()}")))  # the writer went past B
            assert await stored(url, first) == 1
            assert await stored(url, gone) == 0, "its caller was answered DEADLINE_EXCEEDED: never stored after"
    finally:
        if locker is not None:
            await locker.dispose()
        await server.stop()
        await drop_database_url(url)


async def waiting_on_locks(url: str) -> int:
    """Statements of this database waiting on a lock right now."""
    name = sa.make_url(url).database
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = :name AND wait_event_type = 'Lock' AND state = 'active'"
    )
    engine = create_async_engine(POSTGRES_URL)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(query, {"name": name})).scalar_one())
    finally:
        await engine.dispose()


async def test_a_read_stops_waiting_on_the_database_when_its_caller_s_deadline_passes(postgres_url):
    """The call's own deadline bounds its database wait below --database-timeout: gRPC cancels
    the call at its deadline, and the cancellation reaches the statement (asyncpg cancels it
    on the server), so nothing waits on for the caller that left."""
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=postgres_url, database_timeout_seconds=10))
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            types = types_grpc.ExperienceTypeServiceStub(channel)
            async with table_locked(postgres_url, "experience_types"):
                started = time.monotonic()
                call = types.ListExperienceTypes(types_pb.ListExperienceTypesRequest(), timeout=1.0)
                await asyncio.sleep(0.5)
                assert await waiting_on_locks(postgres_url) == 1, "the read waits on the lock"
                with pytest.raises(aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await until(lambda: _none_waiting(postgres_url), seconds=3)
                assert time.monotonic() - started < 5, "well before the 10 s database timeout"
            listed = await types.ListExperienceTypes(types_pb.ListExperienceTypesRequest(), timeout=5)
            assert listed is not None  # the pool serves again
    finally:
        await server.stop()


async def _none_waiting(url: str) -> bool:
    return await waiting_on_locks(url) == 0


@contextlib.asynccontextmanager
async def events_locked(backend: str, url: str, path) -> AsyncIterator[None]:
    """The events table locked by another session: on SQLite, the file's write lock."""
    if backend == "postgresql":
        async with table_locked(url, "events"):
            yield
        return
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


LOCK_SECONDS = 20


async def test_a_lock_held_for_20_s_answers_every_call_within_the_timeout_and_retries_store_once(backend, tmp_path):
    """With the default 5 s database timeout: 16 callers keep ingesting (unary and batches,
    each event with its idempotency key) while another session holds the events table for
    20 s. Every call is answered within the timeout plus 1 s: UNAVAILABLE with RetryInfo
    while the lock holds, then stored; retried as told, every event is stored exactly once."""
    url = await make_database_url(backend, tmp_path)
    timeout = 5.0
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
    assert server.settings.database_timeout_seconds == timeout
    await server.start()
    answers: list[tuple[float, str]] = []  # (seconds, code) of every call
    keys: set[str] = set()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            await stub.Ingest(pb.IngestRequest(event=event(f"warm-{uuid.uuid4()}")))

            async def until_stored(attempt) -> None:
                """Calls `attempt` until it stores; it returns None then, else the retry delay."""
                while True:
                    started = time.monotonic()
                    try:
                        delay = await attempt()
                    except aio.AioRpcError as error:
                        rich = decode(error)
                        assert rich.reason == "STORAGE_UNAVAILABLE", (rich.code, rich.reason, rich.message)
                        assert rich.retry_delay_seconds, "UNAVAILABLE says when to retry"
                        delay = rich.retry_delay_seconds
                    answers.append((time.monotonic() - started, "OK" if delay is None else "UNAVAILABLE"))
                    if delay is None:
                        return
                    await asyncio.sleep(delay)

            async def unary(key: str) -> float | None:
                await stub.Ingest(pb.IngestRequest(event=event(key)), timeout=30)
                return None

            async def batch(request: pb.IngestBatchRequest) -> float | None:
                response = await stub.IngestBatch(request, timeout=30)
                errors = [item.error for item in response.items if item.HasField("error")]
                if not errors:
                    return None
                # The batch waited on the lock as one: refused as one, retried whole.
                assert len(errors) == len(request.events), len(errors)
                assert {(e.code, e.reason) for e in errors} == {(14, "STORAGE_UNAVAILABLE")}, errors[0]
                return 1.0

            async def caller(n: int) -> None:
                for i in range(4):
                    if n % 4:  # three callers in four send one event a call
                        key = f"unary-{n}-{i}-{uuid.uuid4()}"
                        keys.add(key)
                        await until_stored(lambda key=key: unary(key))
                    else:
                        batched = [f"batch-{n}-{i}-{j}-{uuid.uuid4()}" for j in range(50)]
                        keys.update(batched)
                        request = pb.IngestBatchRequest(events=[event(key) for key in batched])
                        await until_stored(lambda request=request: batch(request))
                    await asyncio.sleep(1.5)

            async with events_locked(backend, url, tmp_path / "tally.db"):
                started = time.monotonic()
                callers = asyncio.gather(*(caller(n) for n in range(16)))
                await asyncio.sleep(LOCK_SECONDS)
            held = time.monotonic() - started
            await callers
        slowest = max(seconds for seconds, _ in answers)
        refused = sum(1 for _, code in answers if code != "OK")
        print(
            f"\n{backend}: lock held {held:.1f} s; {len(answers)} calls, {refused} answered UNAVAILABLE, "
            f"the slowest answer in {slowest:.2f} s"
        )
        assert refused, "the lock was felt"
        assert slowest < timeout + 1, sorted(seconds for seconds, _ in answers)[-5:]
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(sa.text("SELECT idempotency_key, count(*) FROM events GROUP BY 1"))).all()
        finally:
            await engine.dispose()
        counts = {key: count for key, count in rows if key in keys}
        assert set(counts) == keys and set(counts.values()) == {1}, "every event stored, once"
    finally:
        await server.stop()
        await drop_database_url(url)


async def test_an_outage_is_logged_once_with_a_count_not_once_per_event(tmp_path, caplog, monkeypatch):
    """200 calls failing on a locked database make a handful of warning and error lines: the
    first of each message at once, then one line with how often it repeated."""
    from tally_server.rpc import status
    from tally_server.services import ingest

    for module in (status, ingest):
        monkeypatch.setattr(module.repeated, "interval", 1.0)
    url = f"sqlite+aiosqlite:///{tmp_path / 'outage.db'}"
    server = await start(url)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ing_grpc.IngestServiceStub(channel)
            await stub.Ingest(pb.IngestRequest(event=event(f"warm-{uuid.uuid4()}")))
            other = sqlite3.connect(tmp_path / "outage.db", isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            caplog.clear()
            try:
                calls = [stub.Ingest(pb.IngestRequest(event=event(f"o-{n}")), timeout=20) for n in range(200)]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            finally:
                other.execute("ROLLBACK")
                other.close()
            await asyncio.sleep(1.5)  # the counts are said when the interval ends
    finally:
        await server.stop()
    failed = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    assert len(failed) == 200 and {o.code() for o in failed} == {grpc.StatusCode.UNAVAILABLE}
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    print(f"\n200 calls on a locked database: {len(loud)} warning and error lines")
    assert len(loud) <= 10, loud
    assert any("repeated" in line for line in loud), loud

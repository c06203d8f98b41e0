"""A real server on 127.0.0.1:0 per database engine; tests talk to it over the wire.

Every test that uses `stubs` runs on SQLite and on PostgreSQL. PostgreSQL is
found at TALLY_TEST_POSTGRES_URL (default: the local server, database `test`);
each run creates a database of its own and drops it afterwards. Without
PostgreSQL those tests skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from grpc import aio
from sqlalchemy.ext.asyncio import create_async_engine

from tally.v1 import (
    experience_service_pb2_grpc,
    experience_type_service_pb2_grpc,
    ingest_service_pb2_grpc,
    price_catalog_service_pb2_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings

POSTGRES_URL = os.environ.get("TALLY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


@dataclass
class Stubs:
    channel: aio.Channel
    types: experience_type_service_pb2_grpc.ExperienceTypeServiceStub
    experiences: experience_service_pb2_grpc.ExperienceServiceStub
    ingest: ingest_service_pb2_grpc.IngestServiceStub
    prices: price_catalog_service_pb2_grpc.PriceCatalogServiceStub
    server: TallyServer
    target: str
    backend: str


def stubs_for(channel: aio.Channel, server: TallyServer | None, backend: str, target: str = "") -> Stubs:
    """Stubs on `channel` to `server` (in this process), or to the server at `target` (another process)."""
    return Stubs(
        channel=channel,
        types=experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel),
        experiences=experience_service_pb2_grpc.ExperienceServiceStub(channel),
        ingest=ingest_service_pb2_grpc.IngestServiceStub(channel),
        prices=price_catalog_service_pb2_grpc.PriceCatalogServiceStub(channel),
        server=server,  # type: ignore[arg-type]
        target=target or f"127.0.0.1:{server.port}",  # type: ignore[union-attr]
        backend=backend,
    )


async def _postgres_database() -> str:
    """Creates a fresh database for this run and returns its URL."""
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"tally_test_{uuid.uuid4().hex[:12]}"
    try:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return str(sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False))


async def _drop_postgres_database(url: str) -> None:
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = sa.make_url(url).database
    try:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


async def make_database_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'tally.db'}"
    try:
        return await asyncio.wait_for(_postgres_database(), 10)
    except Exception as error:  # noqa: BLE001 - any failure to reach it means "no PostgreSQL"
        reason = f"PostgreSQL not reachable at {POSTGRES_URL}: {type(error).__name__}: {error}"
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL. {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
async def postgres_url() -> str:
    """The PostgreSQL server's URL, for a test that makes its own databases there: skipped
    when it does not answer, failed under CI=true (as every PostgreSQL test)."""
    url = await make_database_url("postgresql", Path("."))
    await drop_database_url(url)
    return POSTGRES_URL


async def drop_database_url(url: str) -> None:
    if url.startswith("postgresql"):
        await _drop_postgres_database(url)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
async def database_url(backend: str, tmp_path_factory: pytest.TempPathFactory):
    url = await make_database_url(backend, tmp_path_factory.mktemp(backend))
    yield url
    await drop_database_url(url)


@pytest.fixture(scope="session")
async def server(database_url: str):
    tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=database_url, grace_seconds=2))
    await tally.start()
    yield tally
    await tally.stop()


@pytest.fixture(scope="session")
async def stubs(server: TallyServer, backend: str):
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield stubs_for(channel, server, backend)


def unique(prefix: str = "T") -> str:
    """A fresh experience type name: tests share one server per engine."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"

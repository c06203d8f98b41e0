"""Migration benchmark: how long upgrading a database that already holds events takes.

Migration 0005 builds the rollups of the reads from the events stored before it, in the
migration's one transaction. This loads a fresh database as `bench.reads` does (through
the wire, one experience per ten events, one heavy experience, 60 days), stops the
server, then at each size takes the schema back to 0004 (the rollups dropped) and times
`tally migrate` building them again (every migration from there: 0005's rollups, 0006's
limits, 0007's rebuild of the hourly rollup by model). `--from 0006` times 0007 alone:

    python -m bench.migration                           # SQLite, 100,000 and 1,000,000 events
    python -m bench.migration --postgres-url postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python -m bench.migration --sizes 20000             # a quicker look
    python -m bench.migration --from 0006               # migration 0007 only
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid

from alembic import command
from grpc import aio

from tally.v1 import experience_type_service_pb2 as et_pb, experience_type_service_pb2_grpc, ingest_service_pb2_grpc
from tally_server.storage.db import Database, alembic_config

from .__main__ import CHANNEL_OPTIONS, create_postgres_database, drop_postgres_database, start_server
from .reads import Loader

BEFORE_ROLLUPS = "0004"


async def load(database_url: str, name: str, size: int, loader: Loader | None) -> Loader:
    """Ingests up to `size` events (the type `name` created first) with a server of its
    own, stopped after."""
    process, port, _ = start_server(database_url)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            if loader is None:
                types = experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel)
                kind = et_pb.ExperienceType(name=name, description="migration")
                await types.CreateExperienceType(et_pb.CreateExperienceTypeRequest(experience_type=kind))
                loader = Loader(channel, name)
            loader.ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)  # this server's
            rate = await loader.load_to(size)
            print(f"   ingested to {size:,} events at {rate:,.0f} events/s", flush=True)
    finally:
        process.terminate()
        process.wait(60)
    return loader


async def time_migration(database_url: str, revision: str) -> tuple[float, float]:
    """Seconds to downgrade to `revision`, and to migrate back to the newest schema."""
    database = Database(database_url, timeout=3600)
    try:
        started = time.perf_counter()
        async with database.write() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), revision))
        down = time.perf_counter() - started
        started = time.perf_counter()
        await database.migrate()
        return down, time.perf_counter() - started
    finally:
        await database.dispose()


async def run_engine(label: str, database_url: str, sizes: list[int], revision: str) -> dict[int, float]:
    print(f"\n== {label}", flush=True)
    loader: Loader | None = None
    name = f"Migration_{uuid.uuid4().hex[:8]}"
    upgrades: dict[int, float] = {}
    for size in sizes:
        loader = await load(database_url, name, size, loader)
        down, up = await time_migration(database_url, revision)
        print(f"   {size:,} events: down to {revision} in {down:.1f} s, migrated back in {up:.1f} s", flush=True)
        upgrades[size] = up
    return upgrades


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.migration", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000", help="event counts to time the migration at (ascending)")
    parser.add_argument("--postgres-url", help="also run against this PostgreSQL (a fresh database is created in it)")
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument(
        "--from", dest="revision", default=BEFORE_ROLLUPS, help=f"the revision to go back to (default {BEFORE_ROLLUPS})"
    )
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    print(f"Tally migration benchmark: Python {sys.version.split()[0]}, sizes {', '.join(f'{s:,}' for s in sizes)}")
    report: dict[str, dict[int, float]] = {}
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            report["SQLite"] = await run_engine(
                "SQLite", f"sqlite+aiosqlite:///{tmp}/migration.db", sizes, args.revision
            )
    if args.postgres_url:
        pg_url = await create_postgres_database(args.postgres_url)
        try:
            report["PostgreSQL"] = await run_engine("PostgreSQL", pg_url, sizes, args.revision)
        finally:
            await drop_postgres_database(args.postgres_url, pg_url)
    print(f"\nthe migrations after {args.revision}, on a database of stored events")
    print(f"{'engine':<12}{'events':>12}{'seconds':>10}{'events/s':>12}")
    for label, upgrades in report.items():
        for size, seconds in upgrades.items():
            print(f"{label:<12}{size:>12,}{seconds:>10.1f}{size / seconds:>12,.0f}")


if __name__ == "__main__":
    asyncio.run(main())

"""Bytes of events that carry a provider response id, as calls instrumented by an SDK do.

An event's idempotency key is its `idempotency_key`, else its provider response id, so
most real events have one, and each key is kept once for the event (since migration 0028,
in the table event_keys; before it, in a unique index of the events). `bench.reads`' events
have none. This loads `--events` events through IngestBatch (1,000 a call, 200 users, the
last 60 days), each with a chat completion's 38-character response id, into a fresh
database, and prints the bytes per event of the events and of their keys:

    python -m bench.keys                                # SQLite, 100,000 events
    python -m bench.keys --postgres-url postgresql+asyncpg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time

from google.protobuf import timestamp_pb2
from grpc import aio

from tally.v1 import ingest_service_pb2 as pb, ingest_service_pb2_grpc

from .__main__ import CHANNEL_OPTIONS, create_postgres_database, drop_postgres_database, start_server
from .reads import planner_statistics, table_bytes

DAY = 86_400
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


async def load(database_url: str, count: int) -> None:
    process, port, _ = start_server(database_url)
    rng, now = random.Random(7), int(time.time())
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
            for start in range(0, count, 1_000):
                events = [
                    pb.UsageEvent(
                        category="system.openai",
                        resource="gpt-4o",
                        units={"text": pb.UnitCounts(input=rng.randint(100, 20_000), output=rng.randint(10, 2_000))},
                        event_timestamp=timestamp_pb2.Timestamp(seconds=now - rng.randint(60, 60 * DAY)),
                        end_to_end_latency_ms=rng.randint(50, 20_000),
                        http_status_code=200,
                        provider_response_id="chatcmpl-" + "".join(rng.choices(ALPHABET, k=29)),
                        context=pb.EventContext(user_id=f"user-{rng.randint(1, 200)}"),
                    )
                    for _ in range(min(1_000, count - start))
                ]
                await stub.IngestBatch(pb.IngestBatchRequest(events=events))
    finally:
        process.terminate()
        process.wait(60)


async def measure(label: str, database_url: str, count: int) -> None:
    started = time.perf_counter()
    await load(database_url, count)
    await planner_statistics(database_url)
    tables = await table_bytes(database_url)
    total = sum(tables.values())
    keys = tables.get("event_keys", 0)
    print(
        f"{label}: {count:,} events with response ids loaded in {time.perf_counter() - started:.0f} s;"
        f" {total / count:,.0f} bytes per event in all, the events {tables.get('events', 0) / count:,.0f}"
        f" (with their indexes), their keys' table {keys / count:,.0f}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.keys", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--postgres-url", help="also run against this PostgreSQL (a fresh database is created in it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        await measure("SQLite", f"sqlite+aiosqlite:///{directory}/keys.db", args.events)
    if args.postgres_url:
        url = await create_postgres_database(args.postgres_url)
        try:
            await measure("PostgreSQL", url, args.events)
        finally:
            await drop_postgres_database(args.postgres_url, url)


if __name__ == "__main__":
    asyncio.run(main())

"""Ingest benchmark: a server process under load from this process, over loopback.

Prints events/s and p50/p99 latency of unary Ingest (concurrency 64),
IngestBatch (1,000 events per request) and IngestStream, each beside a baseline
measured in the same run on the same machine: a no-op unary RPC and a no-op
stream on the same server stack, and raw inserts of the same rows (sqlite3
executemany, or asyncpg for PostgreSQL), 1,000 per transaction.

    python -m bench                       # SQLite (a temporary file)
    python -m bench --postgres-url postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python -m bench --workers 2 ...       # also: `tally serve` against `tally serve --workers 2`

Each scenario runs right after its baseline, in several rounds; the table gives
the median rate over the rounds and the median of the per-round ratios, with
their range: on a shared 2-core machine (client and server share the cores, and
neighbours come and go) a single pair of measurements can be off by half.
Compare the ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import sqlalchemy as sa
from grpc import aio

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc,
    ingest_service_pb2 as pb,
)
from tally_server.domain.ids import uuid7

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
TARGETS = {"Ingest unary": 0.7, "IngestStream": 0.5, "IngestBatch": 0.5}


@dataclass
class Result:
    scenario: str
    events: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def summarize(scenario: str, events: int, seconds: float, latencies: list[float]) -> Result:
    latencies.sort()
    return Result(scenario, events, seconds, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3)


def make_event(key: str) -> pb.UsageEvent:
    return pb.UsageEvent(
        category="system.openai",
        resource="gpt-4o",
        units={"text": pb.UnitCounts(input=1200, output=350), "text_cache_read": pb.UnitCounts(input=800)},
        end_to_end_latency_ms=850,
        time_to_first_token_ms=120,
        http_status_code=200,
        idempotency_key=key,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_batch(keys: list[str]) -> bytes:
    """An IngestBatchRequest of make_event(key) for each key, encoded by concatenation
    (protobuf merges repeated fields of concatenated encodings), so that the load
    generator spends little of the CPU it shares with the server."""
    template = make_event("").SerializeToString()
    parts = []
    for key in keys:
        encoded_key = key.encode()
        event = template + b"\x4a" + _varint(len(encoded_key)) + encoded_key  # field 9: idempotency_key
        parts.append(b"\x0a" + _varint(len(event)) + event)  # field 1: events
    return b"".join(parts)


class Keys:
    """Unique idempotency keys, as provider response ids would be."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"bench-{self.run}-{self.count}"


async def unary_load(channel, method: str, metadata, seconds: float, concurrency: int, keys: Keys, name: str) -> Result:
    call = channel.unary_unary(
        method,
        request_serializer=pb.IngestRequest.SerializeToString,
        response_deserializer=pb.IngestResponse.FromString,
    )
    latencies: list[float] = []
    measuring = False
    deadline = 0.0

    async def worker() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await call(pb.IngestRequest(event=make_event(keys.next())), metadata=metadata)
            if measuring:
                latencies.append(time.perf_counter() - start)

    deadline = time.perf_counter() + 0.5  # warm-up
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    measuring = True
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(name, len(latencies), time.perf_counter() - start, latencies)


async def stream_load(channel, method: str, metadata, seconds: float, window: int, keys: Keys, name: str) -> Result:
    call = channel.stream_stream(
        method,
        request_serializer=pb.IngestStreamRequest.SerializeToString,
        response_deserializer=pb.IngestStreamResponse.FromString,
    )
    sent_at: list[float] = []
    credit = asyncio.Semaphore(window)  # at most `window` unacknowledged events
    start = time.perf_counter()
    deadline = start + seconds

    async def requests():
        while time.perf_counter() < deadline:
            await credit.acquire()
            sent_at.append(time.perf_counter())
            yield pb.IngestStreamRequest(event=make_event(keys.next()))

    latencies = []
    async for response in call(requests(), metadata=metadata):
        latencies.append(time.perf_counter() - sent_at[response.position])
        credit.release()
    return summarize(name, len(latencies), time.perf_counter() - start, latencies)


async def request_load(
    send: Callable[[bytes], Awaitable[None]],
    make: Callable[[], bytes],
    per_request: int,
    seconds: float,
    concurrency: int,
    name: str,
) -> Result:
    """`concurrency` callers each sending make()'s request with send() until `seconds` pass;
    the latency of each call is the send alone, not the making of its request."""
    latencies: list[float] = []
    events = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal events
        while time.perf_counter() < deadline:
            request = make()
            sent = time.perf_counter()
            await send(request)
            latencies.append(time.perf_counter() - sent)
            events += per_request

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(name, events, time.perf_counter() - start, latencies)


async def batch_load(channel, metadata, seconds: float, batch_size: int, concurrency: int, keys: Keys) -> Result:
    call = channel.unary_unary(
        "/tally.v1.IngestService/IngestBatch",
        request_serializer=None,  # requests are encoded by encode_batch
        response_deserializer=pb.IngestBatchResponse.FromString,
    )

    async def send(request: bytes) -> None:
        response = await call(request, metadata=metadata)
        assert response.accepted_count == batch_size, response.items[0]

    def make() -> bytes:
        return encode_batch([keys.next() for _ in range(batch_size)])

    name = f"IngestBatch ({batch_size}/request, {concurrency} in flight)"
    return await request_load(send, make, batch_size, seconds, concurrency, name)


def storage_rows(count: int, experience_id: uuid.UUID, as_bytes: bool) -> list[tuple]:
    """The rows Tally stores for the benchmark's events, as the raw baseline inserts them
    (UUIDs as their 16 bytes on SQLite, as Tally stores them there)."""
    rows = []
    for _ in range(count):
        event_id = uuid7()
        now = time.time_ns() // 1000
        rows.append(
            (
                event_id.bytes if as_bytes else event_id,
                f"raw-{event_id.hex}",
                "ab" * 32,
                experience_id.bytes if as_bytes else experience_id,
                False,
                "system.openai",
                "gpt-4o",
                '{"text": [1200, 350], "text_cache_read": [800, 0]}',
                now,
                now,
                850,
                120,
                200,
                None,
                None,
                None,
                None,
                4_500_000,
                3_500_000,
                8_000_000,
                1,
                None,
                None,
                1,
            )
        )
    return rows


COLUMNS = (
    "id, idempotency_key, content_hash, experience_id, experience_created, category, resource, units, "
    "event_time_us, ingest_time_us, end_to_end_latency_ms, time_to_first_token_ms, http_status_code, "
    "provider_response_id, user_id, request_tags, properties, cost_input_nanos, cost_output_nanos, "
    "cost_total_nanos, cost_state, unknown_units, warnings, price_id"
)


# Each event's idempotency key is claimed in its own table before the event is stored
# (migration 0028): the baselines store both, as the server does.
KEYS_SQL = "INSERT INTO event_keys (idempotency_key, event_id, event_time_us) VALUES (?, ?, ?)"


def raw_sqlite(path: str, seconds: float, experience_id: uuid.UUID) -> Result:
    """sqlite3 executemany into the same schema and settings, 1,000 rows per transaction.
    Only the inserts are timed (rows are built outside the clock): the storage's own rate."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    sql = f"INSERT INTO events ({COLUMNS}) VALUES ({', '.join('?' * 24)})"
    latencies: list[float] = []
    while sum(latencies) < seconds:
        rows = storage_rows(1000, experience_id, as_bytes=True)
        sent = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.executemany(KEYS_SQL, [(row[1], row[0], row[8]) for row in rows])
        db.executemany(sql, rows)
        db.execute("COMMIT")
        latencies.append(time.perf_counter() - sent)
    db.close()
    return summarize("raw sqlite3 executemany (1,000/transaction)", 1000 * len(latencies), sum(latencies), latencies)


async def raw_postgres(url: str, seconds: float, experience_id: uuid.UUID) -> Result:
    import asyncpg

    plain = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(plain)
    sql = f"INSERT INTO events ({COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 25))})"
    latencies: list[float] = []
    while sum(latencies) < seconds:
        rows = storage_rows(1000, experience_id, as_bytes=False)
        sent = time.perf_counter()
        async with conn.transaction():
            await conn.executemany(
                KEYS_SQL.replace("?, ?, ?", "$1, $2, $3"), [(row[1], row[0], row[8]) for row in rows]
            )
            await conn.executemany(sql, rows)
        latencies.append(time.perf_counter() - sent)
    await conn.close()
    return summarize("raw asyncpg executemany (1,000/transaction)", 1000 * len(latencies), sum(latencies), latencies)


def start_server(database_url: str) -> tuple[subprocess.Popen, int, int]:
    """The server's process, its gRPC port and its dashboard's port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.server", "--database-url", database_url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise SystemExit(f"bench: the server did not start: {line!r}")
    return process, int(line.split()[1]), int(line.split()[2])


@dataclass
class Comparison:
    """One scenario over the rounds, beside its baseline of the same rounds."""

    name: str
    target: float
    results: list[Result]
    baselines: list[Result]

    def ratios(self) -> list[float]:
        return [r.rate / b.rate for r, b in zip(self.results, self.baselines, strict=True)]


def median_result(results: list[Result]) -> Result:
    rates = sorted(results, key=lambda r: r.rate)
    middle = rates[len(rates) // 2]
    return Result(
        middle.scenario,
        middle.events,
        middle.seconds,
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
    )


async def run_engine(label: str, database_url: str, args: argparse.Namespace) -> list[Comparison]:
    print(f"\n== {label}: starting the server", flush=True)
    process, port, _ = start_server(database_url)
    c, s = args.concurrency, args.seconds
    unary = Comparison("Ingest unary", TARGETS["Ingest unary"], [], [])
    stream = Comparison("IngestStream", TARGETS["IngestStream"], [], [])
    batch = Comparison("IngestBatch", TARGETS["IngestBatch"], [], [])
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            name = f"Bench_{uuid.uuid4().hex[:8]}"
            await experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel).CreateExperienceType(
                et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="bench"))
            )
            experience = (
                await experience_service_pb2_grpc.ExperienceServiceStub(channel).CreateExperience(
                    exp_pb.CreateExperienceRequest(experience_name=name)
                )
            ).experience
            experience_id = uuid.UUID(experience.experience_id)
            metadata = (("xproxy-experience-id", experience.experience_id),)
            keys = Keys()
            for round_number in range(1, args.rounds + 1):
                noop_unary = await unary_load(
                    channel, "/bench.Noop/Unary", metadata, s, c, keys, f"no-op unary (c={c})"
                )
                ingest_unary = await unary_load(
                    channel, "/tally.v1.IngestService/Ingest", metadata, s, c, keys, f"Ingest unary (c={c})"
                )
                noop_stream = await stream_load(
                    channel, "/bench.Noop/Stream", metadata, s, args.window, keys, "no-op stream"
                )
                ingest_stream = await stream_load(
                    channel, "/tally.v1.IngestService/IngestStream", metadata, s, args.window, keys, "IngestStream"
                )
                # The raw baseline runs here too, with the server idle beside it.
                if database_url.startswith("sqlite"):
                    raw = await asyncio.to_thread(raw_sqlite, sa.make_url(database_url).database, s, experience_id)
                else:
                    raw = await raw_postgres(database_url, s, experience_id)
                ingest_batch = await batch_load(channel, metadata, s, args.batch_size, args.batch_concurrency, keys)
                unary.results.append(ingest_unary)
                unary.baselines.append(noop_unary)
                stream.results.append(ingest_stream)
                stream.baselines.append(noop_stream)
                batch.results.append(ingest_batch)
                batch.baselines.append(raw)
                print(
                    f"   round {round_number}/{args.rounds}: "
                    + ", ".join(
                        f"{comparison.name} {comparison.results[-1].rate:,.0f}/s ({comparison.ratios()[-1]:.2f}x)"
                        for comparison in (unary, stream, batch)
                    ),
                    flush=True,
                )
    finally:
        process.terminate()
        process.wait(30)
    return [unary, stream, batch]


def start_tally(database_url: str, workers: int) -> tuple[subprocess.Popen, int]:
    """`tally serve --workers N` itself (no baselines in it), on a free port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tally_server",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--workers",
            str(workers),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    while line := process.stderr.readline():
        if match := re.search(r"tally ready: serving on [^:]+:(\d+)", line):
            # Drained from here on: a full pipe would stall the server.
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, int(match.group(1))
    raise SystemExit(f"bench: tally serve --workers {workers} did not start")


async def workers_load(database_url: str, workers: int, args: argparse.Namespace, keys: Keys) -> list[Result]:
    """IngestBatch over several connections (the kernel spreads connections, not calls,
    over the workers), `args.rounds` rounds."""
    process, port = start_tally(database_url, workers)
    # A local subchannel pool each: separate TCP connections, not one shared.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(args.connections)]
    results = []
    try:
        name = f"Workers_{uuid.uuid4().hex[:8]}"
        await experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channels[0]).CreateExperienceType(
            et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="bench"))
        )
        experience = (
            await experience_service_pb2_grpc.ExperienceServiceStub(channels[0]).CreateExperience(
                exp_pb.CreateExperienceRequest(experience_name=name)
            )
        ).experience
        metadata = (("xproxy-experience-id", experience.experience_id),)
        for _ in range(args.rounds):
            start = time.perf_counter()
            loads = await asyncio.gather(
                *(
                    batch_load(c, metadata, args.seconds, args.batch_size, args.batch_concurrency, keys)
                    for c in channels
                )
            )
            seconds = time.perf_counter() - start
            p50 = statistics.median(load.p50_ms for load in loads)
            p99 = max(load.p99_ms for load in loads)
            results.append(Result(f"{workers} worker(s)", sum(load.events for load in loads), seconds, p50, p99))
    finally:
        for channel in channels:
            await channel.close()
        process.terminate()
        process.wait(60)
    return results


async def run_workers(label: str, database_url: str, args: argparse.Namespace) -> tuple[list[Result], list[Result]]:
    print(f"\n== {label}: IngestBatch on 1 worker, then on {args.workers}", flush=True)
    keys = Keys()
    one = await workers_load(database_url, 1, args, keys)
    many = await workers_load(database_url, args.workers, args, keys)
    return one, many


def print_workers(label: str, one: list[Result], many: list[Result], workers: int, connections: int) -> None:
    single, multiple = median_result(one), median_result(many)
    ratios = [m.rate / o.rate for o, m in zip(one, many, strict=True)]
    print(
        f"\n{label}: IngestBatch over {connections} connections, medians of {len(one)} rounds\n"
        f"  tally serve:              {single.rate:>10,.0f} events/s\n"
        f"  tally serve --workers {workers}:  {multiple.rate:>10,.0f} events/s   "
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    )


def print_table(label: str, comparisons: list[Comparison], rounds: int) -> None:
    print(f"\n{label}: medians of {rounds} rounds")
    print(f"{'scenario':<46} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8}   ratio to baseline (range)")
    for comparison in comparisons:
        baseline = median_result(comparison.baselines)
        result = median_result(comparison.results)
        ratios = comparison.ratios()
        ratio = statistics.median(ratios)
        verdict = "meets" if ratio >= comparison.target else "BELOW"
        print(f"{baseline.scenario:<46} {baseline.rate:>10,.0f} {baseline.p50_ms:>8.2f} {baseline.p99_ms:>8.2f}")
        print(
            f"{result.scenario:<46} {result.rate:>10,.0f} {result.p50_ms:>8.2f} {result.p99_ms:>8.2f}   "
            f"{ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}; target {comparison.target}x: {verdict})"
        )


async def create_postgres_database(url: str) -> str:
    from sqlalchemy.ext.asyncio import create_async_engine

    name = f"tally_bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


async def drop_postgres_database(admin_url: str, url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{sa.make_url(url).database}" WITH (FORCE)'))
    await admin.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measured seconds per scenario and round (default 3)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of every scenario beside its baseline (default 3)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="unary calls in flight (default 64)")
    parser.add_argument("--window", type=int, default=1024, help="unacknowledged stream events at most (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per IngestBatch (default 1000)")
    parser.add_argument("--batch-concurrency", type=int, default=2, help="IngestBatch calls in flight (default 2)")
    parser.add_argument("--postgres-url", help="also run against this PostgreSQL (a fresh database is created in it)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also compare IngestBatch on `tally serve` with 1 worker and with this many (--workers N)",
    )
    parser.add_argument(
        "--connections", type=int, default=4, help="connections of the --workers comparison (default 4)"
    )
    args = parser.parse_args()

    print(f"Tally ingest benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, grpcio {grpc.__version__}")
    report = {}
    workers = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        report["sqlite"] = await run_engine("SQLite (WAL, synchronous=FULL)", sqlite_url, args)
        if args.workers:
            workers["sqlite"] = await run_workers("SQLite", f"sqlite+aiosqlite:///{tmp}/workers.db", args)
    if args.postgres_url:
        pg_url = await create_postgres_database(args.postgres_url)
        try:
            report["postgresql"] = await run_engine("PostgreSQL", pg_url, args)
            if args.workers:
                workers["postgresql"] = await run_workers("PostgreSQL", pg_url, args)
        finally:
            await drop_postgres_database(args.postgres_url, pg_url)
    for label, comparisons in report.items():
        print_table(label, comparisons, args.rounds)
    for label, (one, many) in workers.items():
        print_workers(label, one, many, args.workers, args.connections)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    label: [
                        {
                            "scenario": comparison.name,
                            "target": comparison.target,
                            "ratios": comparison.ratios(),
                            "results": [asdict(r) | {"rate": r.rate} for r in comparison.results],
                            "baselines": [asdict(r) | {"rate": r.rate} for r in comparison.baselines],
                        }
                        for comparison in comparisons
                    ]
                    for label, comparisons in report.items()
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    from tally_server.app import run_event_loop

    run_event_loop(main())  # the same loop as the server, for both the baselines and Tally

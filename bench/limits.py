"""Limits on the ingest path and before the model call, measured through the wire.

For each count of limits defined (1, 100 and 10,000 by default: one BLOCK limit that
applies to the load, the rest on request tags it never carries), it times `Reserve`
followed by the `Ingest` that settles it, beside a no-op unary call on the same server
stack; and `IngestBatch` with 100 limits defined beside the same load without any, in the
same run. Run: python -m bench.limits [--postgres-url URL] [--sizes 1,100,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid

from grpc import aio

from tally.v1 import (
    common_pb2,
    experience_type_service_pb2 as types_pb,
    experience_type_service_pb2_grpc as types_grpc,
    ingest_service_pb2 as pb,
    limit_service_pb2 as lim_pb,
    limit_service_pb2_grpc as lim_grpc,
)

from .__main__ import (
    Keys,
    Result,
    batch_load,
    create_postgres_database,
    drop_postgres_database,
    make_event,
    start_server,
    summarize,
    unary_load,
)

MICRO = common_pb2.Money(currency_code="USD", nanos=1000)  # $0.000001: the BLOCK limit never refuses


async def add_limits(limits: lim_grpc.LimitServiceStub, type_name: str, have: int, want: int) -> None:
    """Brings the limits defined to `want`: the first a BLOCK limit on the load's type, the
    others on request tags the load never carries."""
    for n in range(have, want):
        scope = lim_pb.LimitScope(experience_type=type_name) if n == 0 else lim_pb.LimitScope(request_tag=f"tag-{n}")
        limit = lim_pb.Limit(
            name=f"bench-{n}",
            max=common_pb2.Money(currency_code="USD", units=1_000_000),
            kind=lim_pb.LIMIT_KIND_BLOCK,
            period=lim_pb.LIMIT_PERIOD_MONTH,
            scope=scope,
        )
        await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=limit))


async def reserve_and_settle(channel, metadata, seconds: float, concurrency: int, keys: Keys, name: str) -> Result:
    limits = lim_grpc.LimitServiceStub(channel)
    ingest = channel.unary_unary(
        "/tally.v1.IngestService/Ingest",
        request_serializer=pb.IngestRequest.SerializeToString,
        response_deserializer=pb.IngestResponse.FromString,
    )
    latencies: list[float] = []
    measuring = False
    deadline = 0.0
    estimate = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=MICRO))

    async def worker() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            granted = await limits.Reserve(estimate, metadata=metadata)
            event = make_event(keys.next())
            event.limit_reservation_id = granted.reservation.reservation_id
            await ingest(pb.IngestRequest(event=event), metadata=metadata)
            if measuring:
                latencies.append(time.perf_counter() - start)

    deadline = time.perf_counter() + 0.5  # warm-up
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    measuring = True
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(name, len(latencies), time.perf_counter() - start, latencies)


def line(result: Result, baseline: Result | None = None) -> str:
    ratio = f"   {result.rate / baseline.rate:.2f}x" if baseline else ""
    return f"  {result.scenario:<46} {result.rate:>9,.0f}/s {result.p50_ms:>8.2f} {result.p99_ms:>8.2f}{ratio}"


async def run(label: str, url: str, sizes: list[int], seconds: float, concurrency: int) -> None:
    process, port, _ = start_server(url)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            type_name = f"Bench_{uuid.uuid4().hex[:8]}"
            await types_grpc.ExperienceTypeServiceStub(channel).CreateExperienceType(
                types_pb.CreateExperienceTypeRequest(
                    experience_type=types_pb.ExperienceType(name=type_name, description="limits bench")
                )
            )
            metadata = (("xproxy-experience-name", type_name), ("xproxy-experience-id", str(uuid.uuid4())))
            keys = Keys()
            limits = lim_grpc.LimitServiceStub(channel)
            print(f"\n{label}: {'scenario':<46} {'rate':>11} {'p50 ms':>8} {'p99 ms':>8}   ratio")
            without = await batch_load(channel, metadata, seconds, 1000, 2, keys)
            print(line(without), "(no limits)")
            have = 0
            for size in sizes:
                started = time.perf_counter()
                await add_limits(limits, type_name, have, size)
                have = size
                print(f"  ({size:,} limits defined; {time.perf_counter() - started:.1f} s to create them)")
                noop_path = "/bench.Noop/Unary"
                noop = await unary_load(channel, noop_path, metadata, seconds, concurrency, keys, "no-op unary")
                pair = await reserve_and_settle(
                    channel, metadata, seconds, concurrency, keys, f"Reserve + settling Ingest ({size:,} limits)"
                )
                print(line(noop))
                print(line(pair, noop))
                if size == 100:
                    with_limits = await batch_load(channel, metadata, seconds, 1000, 2, keys)
                    print(line(with_limits, without), "(100 limits, one of them applying)")
    finally:
        process.terminate()
        process.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", help="also run on PostgreSQL (a fresh database is made there)")
    parser.add_argument("--sizes", default="1,100,10000", help="counts of limits defined, ascending")
    parser.add_argument("--seconds", type=float, default=3.0, help="each scenario's measured time")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    print("Limits benchmark: rate, p50 and p99 of each scenario; ratios to its baseline in the same run")
    with tempfile.TemporaryDirectory() as directory:
        await run("sqlite", f"sqlite+aiosqlite:///{directory}/limits.db", sizes, args.seconds, args.concurrency)
    if args.postgres_url:
        database = await create_postgres_database(args.postgres_url)
        try:
            await run("postgresql", database, sizes, args.seconds, args.concurrency)
        finally:
            await drop_postgres_database(args.postgres_url, database)


if __name__ == "__main__":
    asyncio.run(main())

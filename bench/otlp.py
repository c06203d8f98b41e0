"""OTLP traces in, measured through the wire: events per second through
`TraceService/Export` in requests of 512 GenAI spans (the SDK's BatchSpanProcessor sends
at most 512), beside `IngestBatch` in requests of 512 events of the same usage, on the
same server, alternating, in the same run. Target: Export at 0.8x IngestBatch or better.

Run: python -m bench.otlp [--seconds 3] [--rounds 3] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tally.v1 import experience_type_service_pb2 as types_pb, experience_type_service_pb2_grpc as types_grpc

from .__main__ import (
    CHANNEL_OPTIONS,
    Keys,
    Result,
    batch_load,
    create_postgres_database,
    drop_postgres_database,
    request_load,
    start_server,
)

SPANS_PER_REQUEST = 512
TARGET = 0.8
# The usage of bench's make_event (1,200 text + 800 cached input, 350 output), as the
# conventions count it: input includes the cache reads.
SPAN_ATTRIBUTES = {
    "gen_ai.provider.name": "openai",
    "gen_ai.operation.name": "chat",
    "gen_ai.request.model": "gpt-4o",
    "gen_ai.usage.input_tokens": 2000,
    "gen_ai.usage.cache_read.input_tokens": 800,
    "gen_ai.usage.output_tokens": 350,
}


def export_request(count: int, resource_attributes: dict[str, str]) -> bytes:
    """An ExportTraceServiceRequest of `count` model-call spans of one new trace."""
    request = otlp_pb.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(
        KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in resource_attributes.items()
    )
    spans = resource_spans.scope_spans.add().spans
    attributes = [
        KeyValue(key=k, value=AnyValue(string_value=v) if isinstance(v, str) else AnyValue(int_value=v))
        for k, v in SPAN_ATTRIBUTES.items()
    ]
    trace_id, now = uuid.uuid4().bytes, time.time_ns()
    for index in range(count):
        span = spans.add(
            trace_id=trace_id,
            span_id=(index + 1).to_bytes(8, "big"),
            name="chat gpt-4o",
            start_time_unix_nano=now - 850_000_000,
            end_time_unix_nano=now,
        )
        span.attributes.extend(attributes)
    return request.SerializeToString()


async def export_load(channel: aio.Channel, seconds: float, concurrency: int, resource: dict[str, str]) -> Result:
    call = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=None,
        response_deserializer=otlp_pb.ExportTraceServiceResponse.FromString,
    )

    async def send(request: bytes) -> None:
        response = await call(request)
        assert not response.partial_success.rejected_spans, response.partial_success.error_message

    name = f"Export ({SPANS_PER_REQUEST} spans/request, {concurrency} in flight)"
    return await request_load(
        send, lambda: export_request(SPANS_PER_REQUEST, resource), SPANS_PER_REQUEST, seconds, concurrency, name
    )


async def run_engine(label: str, database_url: str, args: argparse.Namespace) -> tuple[list[Result], list[Result]]:
    print(f"\n== {label}", flush=True)
    process, port, _ = start_server(database_url)
    exports: list[Result] = []
    batches: list[Result] = []
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            name = f"Otlp_{uuid.uuid4().hex[:8]}"
            await types_grpc.ExperienceTypeServiceStub(channel).CreateExperienceType(
                types_pb.CreateExperienceTypeRequest(
                    experience_type=types_pb.ExperienceType(name=name, description="otlp bench")
                )
            )
            metadata = (("xproxy-experience-name", name),)
            keys = Keys()
            for round_number in range(1, args.rounds + 1):
                batch = await batch_load(channel, metadata, args.seconds, SPANS_PER_REQUEST, 2, keys)
                export = await export_load(channel, args.seconds, 2, {"tally.experience.name": name})
                batches.append(batch)
                exports.append(export)
                print(
                    f"   round {round_number}: IngestBatch {batch.rate:,.0f} events/s, "
                    f"Export {export.rate:,.0f} spans/s ({export.rate / batch.rate:.2f}x)",
                    flush=True,
                )
    finally:
        process.terminate()
        process.wait(60)
    return exports, batches


def report(label: str, exports: list[Result], batches: list[Result]) -> None:
    ratios = [e.rate / b.rate for e, b in zip(exports, batches, strict=True)]
    ratio = statistics.median(ratios)
    export, batch = (
        sorted(exports, key=lambda r: r.rate)[len(exports) // 2],
        sorted(batches, key=lambda r: r.rate)[len(batches) // 2],
    )
    print(f"\n{label}: medians of {len(ratios)} rounds")
    print(f"{'scenario':<48}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for result in (batch, export):
        print(f"{result.scenario:<48}{result.rate:>10,.0f}{result.p50_ms:>9.1f}{result.p99_ms:>9.1f}")
    verdict = "meets" if ratio >= TARGET else "MISSES"
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"Export / IngestBatch: {ratio:.2f}x (rounds: {rounds}); target {TARGET}x: {verdict}")


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both loads (default 3)")
    parser.add_argument("--postgres-url", help="also run against this PostgreSQL (a fresh database is created in it)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["SQLite"] = await run_engine("SQLite", f"sqlite+aiosqlite:///{tmp}/otlp.db", args)
    if args.postgres_url:
        url = await create_postgres_database(args.postgres_url)
        try:
            results["PostgreSQL"] = await run_engine("PostgreSQL", url, args)
        finally:
            await drop_postgres_database(args.postgres_url, url)
    for label, (exports, batches) in results.items():
        report(label, exports, batches)


if __name__ == "__main__":
    asyncio.run(main())

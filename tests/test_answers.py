"""Answers that would be too large for the wire, through the wire on both databases: a page
of large events shrinks to fit and says where the next starts; an OTLP refusal never echoes
a span's id whole; a stream ended by an oversized event leaves `tally ingest` saying what was
stored and what was not; the log and metrics carry the code the caller received."""

from __future__ import annotations

import json
import re
import uuid

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb, trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue

from tally.v1 import (
    event_service_pb2 as ev_pb,
    event_service_pb2_grpc as ev_grpc,
    experience_type_service_pb2 as types_pb,
    ingest_service_pb2 as pb,
)

from .server_process import ServerProcess
from .test_cli import tally
from .test_otlp import RECENT

MESSAGE = 4 * 1024 * 1024


async def test_a_page_of_large_events_shrinks_to_fit_and_says_where_the_next_starts(stubs):
    user = f"large-{uuid.uuid4().hex[:8]}"
    properties = {f"p{n:02d}": "x" * 1024 for n in range(64)}  # 64 KiB, the most an event may carry
    event = pb.UsageEvent(category="custom.large", resource="m", units={"text": pb.UnitCounts(input=1)})
    event.properties.update(properties)
    meta = (("xproxy-user-id", user),)
    for _ in range(5):
        await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[event] * 24), metadata=meta, timeout=60)
    events = ev_grpc.EventServiceStub(stubs.channel)
    seen: list[str] = []
    pages = []
    token = ""
    while True:
        page = await events.ListEvents(ev_pb.ListEventsRequest(user_id=user, page_size=100, page_token=token))
        assert page.ByteSize() <= MESSAGE
        pages.append(len(page.events))
        seen += [e.request_id for e in page.events]
        if not (token := page.next_page_token):
            break
    assert len(seen) == len(set(seen)) == 120, pages
    assert pages[0] < 100, f"the first page held {pages[0]} events of 66 KB: it was not shrunk"
    print(f"\n{stubs.backend}: 120 events of 66 KB listed 100 a page: pages of {pages}")


async def test_an_otlp_refusal_never_echoes_an_id_whole(stubs):
    name = f"Otel_Echo_{uuid.uuid4().hex[:6]}"
    await create_type_named(stubs, name)
    request = otlp_pb.ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    call = {"gen_ai.provider.name": "openai", "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    huge = b"\x05" * 1_000_000
    for trace_id, span_id in ((uuid.uuid4().bytes, huge), (huge, b"\x01" * 8), (b"", b""), (b"\0" * 16, b"\0" * 8)):
        span = scope.spans.add(
            trace_id=trace_id, span_id=span_id, name="chat", start_time_unix_nano=RECENT, end_time_unix_nano=RECENT + 1
        )
        span.attributes.extend(KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in call.items())
    # A span whose tags are an array: each element a tag.
    tagged = scope.spans.add(
        trace_id=uuid.uuid4().bytes,
        span_id=b"\x02" * 8,
        name="chat",
        start_time_unix_nano=RECENT,
        end_time_unix_nano=RECENT + 1,
    )
    tags = AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="team-a"), AnyValue(string_value="x")]))
    tagged.attributes.extend(KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in call.items())
    tagged.attributes.extend([KeyValue(key="tally.request_tags", value=tags)])
    answer = await otlp_grpc.TraceServiceStub(stubs.channel).Export(request, timeout=30)
    assert answer.partial_success.rejected_spans == 4, answer.partial_success
    message = answer.partial_success.error_message
    assert len(message) < 4096 and "(1000000 bytes)" in message, message[:300]
    assert "span_id: must be 8 bytes" in message and "trace_id: must be 16 bytes" in message
    stored = await ev_grpc.EventServiceStub(stubs.channel).GetEvent(
        ev_pb.GetEventRequest(idempotency_key=f"otel:{tagged.trace_id.hex()}:{tagged.span_id.hex()}")
    )
    assert list(stored.event.xproxy_result.request_tags) == ["team-a", "x"]


async def create_type_named(stubs, name: str) -> None:
    created = types_pb.ExperienceType(name=name, description="echo")
    await stubs.types.CreateExperienceType(types_pb.CreateExperienceTypeRequest(experience_type=created))


async def test_an_oversized_event_is_refused_by_its_position_and_the_stream_goes_on(tmp_path):
    """The server's bound is 64 KiB here. A 100 KB event is refused by its line (INVALID_ARGUMENT)
    and the stream goes on; a 200 KB one (over twice the bound, where gRPC itself ends the
    call) ends it, and `tally ingest` says which lines were answered, which were sent and
    not answered, and that the rest were not read, and exits 1."""
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'big.db'}", "--max-message-bytes", "65536").start()
    try:
        small = {"category": "custom.s", "resource": "m", "units": {"text": {"input": 1}}}
        source = tmp_path / "events.jsonl"

        def write(size: int, prefix: str) -> None:
            lines = [json.dumps({**small, "idempotencyKey": f"{prefix}{n}"}) for n in range(3)]
            lines.append(json.dumps({**small, "resource": "m" * size, "idempotencyKey": f"{prefix}big"}))
            lines += [json.dumps({**small, "idempotencyKey": f"{prefix}after{n}"}) for n in range(3)]
            source.write_text("\n".join(lines) + "\n")

        write(100_000, "a")
        code, out, err = await tally(server.target, "ingest", str(source))
        assert code == 1 and "accepted 6, duplicates 0, rejected 1" in out, (out, err)
        assert "line 4: event: the message is 100,0" in out and "over the 65,536 bytes" in out, out

        write(200_000, "b")
        code, out, err = await tally(server.target, "ingest", str(source))
        assert code == 1, (out, err)
        # The call ends whole: answers not yet sent for the lines before are lost with it.
        answered = int(re.search(r"the stream ended after (\d+) answers", err).group(1))
        assert answered <= 3 and "RESOURCE_EXHAUSTED" in err and "larger than max" in err, err
        assert re.search(r"sent and not answered: lines? [\d, ]*\b4\b", err), err
        assert "not read" in err and "may have been stored" in err, err
        # What was stored is as said: the lines answered, and perhaps those sent and not answered.
        stored = await count_events(server.target) - 6
        assert answered <= stored <= 3, (answered, stored)
    finally:
        server.terminate()
    log = "".join(server.log)
    assert "code=INTERNAL" not in log


async def count_events(target: str) -> int:
    from grpc import aio

    async with aio.insecure_channel(target) as channel:
        page = await ev_grpc.EventServiceStub(channel).ListEvents(ev_pb.ListEventsRequest(category="custom.s"))
    return len(page.events)


async def test_tally_ingest_rejects_an_event_over_the_message_bound_by_its_line(stubs, tmp_path):
    small = {"category": "custom.s", "resource": "m", "units": {"text": {"input": 1}}}
    run = uuid.uuid4().hex[:8]
    lines = [
        json.dumps({**small, "idempotencyKey": f"{run}-a"}),
        json.dumps({**small, "resource": "m" * (5 * 1024 * 1024), "idempotencyKey": f"{run}-big"}),
        json.dumps({**small, "idempotencyKey": f"{run}-b"}),
    ]
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code, out, err = await tally(stubs.target, "ingest", str(source))
    assert code == 1 and "accepted 2, duplicates 0, rejected 1" in out, (out, err)
    assert "line 2: the event is" in out

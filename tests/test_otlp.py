"""OpenTelemetry in: the real opentelemetry-sdk and its OTLP/gRPC exporter send GenAI spans
to Tally's port (API keys required), and the real OpenAI instrumentation's spans cost what
track_openai records for the same calls. On both databases."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb, trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from prometheus_client import REGISTRY

from tally.v1 import (
    event_service_pb2 as ev_pb,
    event_service_pb2_grpc,
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc,
    ingest_service_pb2 as pb,
    price_catalog_service_pb2 as price_pb,
    price_catalog_service_pb2_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import drop_database_url, make_database_url, unique
from .server_process import ServerProcess

GENAI_CALL = {
    "gen_ai.provider.name": "openai",
    "gen_ai.operation.name": "chat",
    "gen_ai.request.model": "gpt-4o",
    "gen_ai.response.model": "gpt-4o-2024-08-06",
    "gen_ai.usage.input_tokens": 1000,  # includes the 400 cache reads
    "gen_ai.usage.cache_read.input_tokens": 400,
    "gen_ai.usage.output_tokens": 200,  # includes the 50 reasoning tokens
    "gen_ai.usage.reasoning.output_tokens": 50,
}
# The same usage in Tally's disjoint units: each token priced once.
DISJOINT = {"text": (600, 150), "text_cache_read": (400, 0), "reasoning": (0, 50)}


@dataclass
class Secured:
    server: TallyServer
    target: str
    ingest_key: str
    read_key: str


@pytest.fixture(scope="module")
async def secured(backend, tmp_path_factory):
    url = await make_database_url(backend, tmp_path_factory.mktemp(f"otlp-{backend}"))
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required"))
    await server.start()
    _, ingest_key = await server.keys.create("otel-collector", ["ingest"])
    _, read_key = await server.keys.create("reader", ["read", "admin"])
    yield Secured(server, f"127.0.0.1:{server.port}", ingest_key, read_key)
    await server.stop()
    await drop_database_url(url)


def spans_counted(outcome: str) -> float:
    """tally_otlp_spans_total{outcome}: the server runs in this process."""
    return REGISTRY.get_sample_value("tally_otlp_spans_total", {"outcome": outcome}) or 0.0


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def record_spans(resource: dict[str, Any], spans: Sequence[tuple[str, dict[str, Any], bool]]) -> list[ReadableSpan]:
    """Spans made by the real SDK (name, attributes, failed), kept in memory until exported."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests")
    for name, attributes, failed in spans:
        with tracer.start_as_current_span(name, attributes=attributes) as span:
            if failed:
                span.set_status(Status(StatusCode.ERROR, "rate limited"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def export(target: str, key: str, spans: list[ReadableSpan]) -> SpanExportResult:
    """Through the SDK's OTLP/gRPC exporter, as an app or a Collector sends them."""
    exporter = OTLPSpanExporter(endpoint=target, insecure=True, headers=bearer(key) if key else None, timeout=10)
    try:
        return exporter.export(spans)
    finally:
        exporter.shutdown()


async def create_type(secured: Secured) -> str:
    name = unique("Otel")
    async with aio.insecure_channel(secured.target) as channel:
        await experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel).CreateExperienceType(
            et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="spans")),
            metadata=bearer(secured.read_key),
        )
    return name


async def get_experience(secured: Secured, experience_id: str) -> exp_pb.Experience:
    """The run with its stats, read with the read key."""
    async with aio.insecure_channel(secured.target) as channel:
        stub = experience_service_pb2_grpc.ExperienceServiceStub(channel)
        request = exp_pb.GetExperienceRequest(experience_id=experience_id)
        return (await stub.GetExperience(request, metadata=bearer(secured.read_key))).experience


async def test_the_sdk_exporter_sends_genai_spans_priced_once_each_token(secured):
    run = str(uuid.uuid4())
    name = await create_type(secured)
    spans = record_spans(
        {"service.name": "summarizer", "tally.experience.name": name},
        [
            ("chat gpt-4o", {**GENAI_CALL, "tally.experience.id": run, "user.id": "alice"}, False),
            ("GET /documents", {"http.request.method": "GET"}, False),  # not a model call: skipped
            (
                "invoke_agent planner",
                {"gen_ai.provider.name": "openai", "gen_ai.operation.name": "invoke_agent"},
                False,
            ),
        ],
    )
    skipped_before = spans_counted("skipped")
    # Without a key, or with one of another scope: refused, nothing stored.
    assert await asyncio.to_thread(export, secured.target, "", spans) == SpanExportResult.FAILURE
    assert (
        await asyncio.to_thread(export, secured.target, secured.read_key[:-2] + "xx", spans) == SpanExportResult.FAILURE
    )
    assert await asyncio.to_thread(export, secured.target, secured.ingest_key, spans) == SpanExportResult.SUCCESS
    assert spans_counted("skipped") == skipped_before + 2  # the HTTP span and the agent's, counted

    got = await get_experience(secured, run)
    assert got.experience_name == name and got.stats.event_count == 1
    async with aio.insecure_channel(secured.target) as channel:
        prices = price_catalog_service_pb2_grpc.PriceCatalogServiceStub(channel)
        events = event_service_pb2_grpc.EventServiceStub(channel)
        meta = bearer(secured.read_key)
        quote = await prices.QuotePrice(
            price_pb.QuotePriceRequest(
                category="system.openai",
                resource="gpt-4o-2024-08-06",
                units={unit: pb.UnitCounts(input=i, output=o) for unit, (i, o) in DISJOINT.items()},
            ),
            metadata=meta,
        )
        assert got.stats.cost_total == quote.xproxy_result.cost_total and quote.xproxy_result.cost_total.nanos > 0
        listed = await events.ListEvents(ev_pb.ListEventsRequest(experience_id=run), metadata=meta)
        (stored,) = listed.events
        assert {u: (c.input, c.output) for u, c in stored.event.units.items()} == DISJOINT
        assert stored.event.context.user_id == "alice"
        assert stored.event.properties["otel.span_id"] == format(spans[0].context.span_id, "016x")
        assert stored.xproxy_result.price.resource == "gpt-4o"  # the dated snapshot, under its model
    # The same export again: duplicates, nothing new.
    assert await asyncio.to_thread(export, secured.target, secured.ingest_key, spans) == SpanExportResult.SUCCESS
    again = await get_experience(secured, run)
    assert again.stats.event_count == 1 and again.stats.cost_total == quote.xproxy_result.cost_total


async def test_bad_genai_spans_are_refused_one_by_one_and_the_rest_stored(secured):
    run = str(uuid.uuid4())
    good = {**GENAI_CALL, "tally.experience.id": run, "tally.experience.name": await create_type(secured)}
    spans = record_spans(
        {"service.name": "batch"},
        [
            ("chat ok", good, False),
            ("chat no model", {**good, "gen_ai.request.model": "", "gen_ai.response.model": ""}, False),
            ("chat negative", {**good, "gen_ai.usage.output_tokens": -3}, False),
            ("chat cache past input", {**good, "gen_ai.usage.input_tokens": 100}, False),
            (
                "chat failed",
                {
                    **good,
                    "gen_ai.usage.input_tokens": 0,
                    "gen_ai.usage.output_tokens": 0,
                    "gen_ai.usage.cache_read.input_tokens": 0,
                    "gen_ai.usage.reasoning.output_tokens": 0,
                },
                True,
            ),
            ("db query", {"db.system": "postgresql"}, False),
        ],
    )
    request = encode_spans(spans)
    async with aio.insecure_channel(secured.target) as channel:
        stub = otlp_grpc.TraceServiceStub(channel)
        response = await stub.Export(request, metadata=bearer(secured.ingest_key))
        assert response.partial_success.rejected_spans == 3
        message = response.partial_success.error_message
        assert "gen_ai.request.model" in message and "gen_ai.usage.output_tokens" in message, message
        assert "includes the cache reads" in message, message
        stats = (await get_experience(secured, run)).stats
        assert (stats.event_count, stats.failed_event_count) == (2, 1)  # the good one and the failed call
        # Sent again: the refused ones are refused again, nothing is stored twice.
        again = await stub.Export(request, metadata=bearer(secured.ingest_key))
        assert again.partial_success.rejected_spans == 3
        assert (await get_experience(secured, run)).stats.event_count == 2
        # An empty export, and an export of spans that are no model calls, answer OK with nothing refused.
        empty = await stub.Export(otlp_pb.ExportTraceServiceRequest(), metadata=bearer(secured.ingest_key))
        assert not empty.HasField("partial_success")


async def test_openai_instrumentation_costs_what_track_openai_records(secured):
    """The same calls, seen twice: by the OpenTelemetry OpenAI instrumentation (spans to
    Tally's OTLP service) and by Tally's own track_openai. Both costs are equal."""
    openai = pytest.importorskip("openai")
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

    from tally_client import TallyClient
    from tally_client.instrument import track_openai

    from .fake_provider import serve

    provider_server, base_url = serve()
    run = str(uuid.uuid4())
    name = await create_type(secured)
    tracer_provider = TracerProvider(
        resource=Resource.create({"tally.experience.id": run, "tally.experience.name": name})
    )
    exporter = OTLPSpanExporter(endpoint=secured.target, insecure=True, headers=bearer(secured.ingest_key))
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)

    def calls() -> str:
        client = openai.OpenAI(base_url=base_url, api_key="sk-test", default_headers={"x-fake-usage": "plain"})
        with TallyClient(secured.target, api_key=secured.ingest_key) as tally:
            recorder = track_openai(client, tally)
            with tally.experience(name) as tracked:
                for model in ("gpt-4o", "gpt-4o-mini"):
                    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
                stream = client.chat.completions.create(
                    model="gpt-4o",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                for _ in stream:
                    pass
            recorder.flush()
            recorder.close()
            return tracked.experience_id

    try:
        tracked_id = await asyncio.to_thread(calls)
        await asyncio.to_thread(tracer_provider.force_flush)
    finally:
        instrumentor.uninstrument()
        tracer_provider.shutdown()
        provider_server.shutdown()
    from_spans, tracked = await get_experience(secured, run), await get_experience(secured, tracked_id)
    assert from_spans.stats.event_count == tracked.stats.event_count == 3
    assert from_spans.stats.cost_total == tracked.stats.cost_total and tracked.stats.cost_total.nanos > 0
    print(f"\n3 calls: ${from_spans.stats.cost_total.nanos / 1e9:.6f} from spans, the same from track_openai")


# --- property: no span gets INTERNAL or UNKNOWN, and a refused one stores nothing ------------

EXAMPLES = 60
RECENT = time.time_ns() - 60 * 10**9  # a span of a minute ago (a far future one is refused)


def answered(call: Any) -> tuple[Any, grpc.StatusCode]:
    """The call's response and status code (OK, or its error's)."""
    try:
        return call(), grpc.StatusCode.OK
    except grpc.RpcError as error:
        return None, error.code()


_COUNTS = st.one_of(
    st.sampled_from([math.nan, math.inf, 0.5, True]),
    st.integers(-5, 10**6),
    st.sampled_from([0, 2**31, 10**13, -(2**63)]),
    st.floats(-1, 1e6),
    st.text(max_size=5),
)
_ATTRIBUTES = st.fixed_dictionaries(
    {"gen_ai.provider.name": st.sampled_from(["openai", "anthropic", "gcp.gemini", "nobody", ""])},
    optional={
        "gen_ai.operation.name": st.sampled_from(["chat", "embeddings", "invoke_agent", "", "x"]),
        "gen_ai.request.model": st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "", "no-such"]) | st.text(max_size=300),
        "gen_ai.response.model": st.sampled_from(["gpt-4o-mini"]) | st.text(max_size=20),
        "gen_ai.usage.input_tokens": _COUNTS,
        "gen_ai.usage.output_tokens": _COUNTS,
        "gen_ai.usage.cache_read.input_tokens": _COUNTS,
        "gen_ai.usage.reasoning.output_tokens": _COUNTS,
        "gen_ai.response.id": st.text(max_size=300),
        "tally.experience.id": st.sampled_from(["", "not-a-uuid", str(uuid.UUID(int=7))]),
        "tally.experience.name": st.sampled_from(["Otel_Prop", "bad name!", ""]),
        "tally.experience.version": st.integers(-2, 3) | st.text(max_size=3),
        "tally.use_case.name": st.sampled_from(["Otel_Prop", "Other_Name"]),
        "tally.request_tags": st.lists(st.text(max_size=10), max_size=3) | st.text(max_size=20),
        "gen_ai.response.time_to_first_chunk": st.floats(-1, 1e7) | st.sampled_from([math.nan, math.inf, -math.inf]),
        "tally.experience.id ": st.just("a key with a trailing space: not Tally's"),
    },
)


# A well-formed model call, so that examples store spans too (the random ones are mostly refused).
_GOOD = st.fixed_dictionaries(
    {
        "gen_ai.provider.name": st.sampled_from(["openai", "anthropic"]),
        "gen_ai.operation.name": st.just("chat"),
        "gen_ai.request.model": st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "unknown-model"]),
        "gen_ai.usage.input_tokens": st.integers(0, 10**6),
        "gen_ai.usage.output_tokens": st.integers(0, 10**6),
    },
    optional={"tally.experience.name": st.just("Otel_Prop"), "user.id": st.text(max_size=20)},
)


def _otlp_value(value: Any) -> Any:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue

    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=max(-(2**63), min(2**63 - 1, value)))
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[_otlp_value(v) for v in value]))
    return AnyValue(string_value=value)


@pytest.fixture(scope="module")
async def served(backend, tmp_path_factory):
    """A server process of its own: hypothesis drives a blocking client."""
    url = await make_database_url(backend, tmp_path_factory.mktemp(f"otlp-property-{backend}"))
    server = await asyncio.to_thread(ServerProcess(url).start)
    yield server
    server.terminate()
    await drop_database_url(url)


@pytest.mark.slow
def test_export_answers_random_genai_spans_with_a_documented_code(served):
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    channel = grpc.insecure_channel(served.target)
    stub = otlp_grpc.TraceServiceStub(channel)
    events = event_service_pb2_grpc.EventServiceStub(channel)
    experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel).CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name="Otel_Prop", description="p"))
    )

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(_GOOD | _ATTRIBUTES, min_size=1, max_size=4),
        st.sampled_from([RECENT, 0]) | st.integers(0, 2**64 - 10**7),
        st.lists(_BAD_SPAN_IDS, min_size=4, max_size=4),
    )
    def check(spans: list[dict[str, Any]], start: int, bad_ids: list[bytes | None]) -> None:
        trace_id = uuid.uuid4().bytes
        request = otlp_pb.ExportTraceServiceRequest()
        scope = request.resource_spans.add().scope_spans.add()
        # A span's id is its index + 1 (8 bytes), or one OTLP calls invalid: such a span is refused.
        span_ids = [bad if bad is not None else (index + 1).to_bytes(8, "big") for index, bad in enumerate(bad_ids)]
        for index, attributes in enumerate(spans):
            span = scope.spans.add(
                trace_id=trace_id,
                span_id=span_ids[index],
                name="chat",
                start_time_unix_nano=start,
                end_time_unix_nano=start + 1_000_000,
            )
            span.attributes.extend(KeyValue(key=k, value=_otlp_value(v)) for k, v in attributes.items())
        response, code = answered(lambda: stub.Export(request, timeout=30))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
        if code != grpc.StatusCode.OK:
            return
        assert len(response.partial_success.error_message) < 4 * 1024, "refusals never echo a span whole"
        # Every span is stored, skipped or refused; a refused one stores nothing (its key is
        # trace id + span id: GetEvent by it finds nothing).
        refused = response.partial_success.rejected_spans
        assert 0 <= refused <= len(spans)
        found = 0
        for index in range(len(spans)):
            key = f"otel:{trace_id.hex()}:{span_ids[index].hex()}"
            if bad_ids[index] is not None and len(key) > 300:
                continue  # a key no event can have: GetEvent refuses it as too long
            _, code = answered(lambda: events.GetEvent(ev_pb.GetEventRequest(idempotency_key=key), timeout=30))  # noqa: B023
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), code
            found += code == grpc.StatusCode.OK
        model_calls = sum(1 for a in spans if _is_call(a))
        assert found == model_calls - refused, (found, model_calls, refused, response)
        with_bad_id = sum(1 for index, a in enumerate(spans) if _is_call(a) and bad_ids[index] is not None)
        assert refused >= with_bad_id, "a model call with an invalid span id is refused"
        seen["stored"] += found
        seen["refused"] += refused
        seen["skipped"] += len(spans) - model_calls

    seen = {"stored": 0, "refused": 0, "skipped": 0}
    try:
        check()
    finally:
        channel.close()
    print(f"\nspans over {EXAMPLES} exports: {seen}")
    assert all(seen.values()), f"the examples reach every outcome: {seen}"


# Span ids OTLP calls invalid (empty, all zero, not 8 bytes, up to 100 KB), or None for a good one.
_BAD_SPAN_IDS = st.none() | st.sampled_from([b"", b"\0" * 8, b"\x01", b"\x07" * 100, b"\x09" * 100_000])


def _is_call(attributes: dict[str, Any]) -> bool:
    from tally_server.domain.genai_spans import is_model_call

    return is_model_call(attributes)


async def test_baggage_names_the_run_once_for_every_span(secured):
    """The OpenTelemetry way to set a run's experience once: baggage, copied onto every
    span by the SDK's baggage span processor (as docs/callers.md shows)."""
    from opentelemetry import baggage, context
    from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor

    run, name = str(uuid.uuid4()), await create_type(secured)
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests")
    scope = baggage.set_baggage("tally.experience.name", name)
    scope = baggage.set_baggage("tally.experience.id", run, context=scope)
    token = context.attach(scope)
    try:
        for _ in range(2):  # two model calls of one run, named once
            with tracer.start_as_current_span("chat gpt-4o", attributes=GENAI_CALL):
                pass
    finally:
        context.detach(token)
    provider.shutdown()
    spans = list(memory.get_finished_spans())
    assert await asyncio.to_thread(export, secured.target, secured.ingest_key, spans) == SpanExportResult.SUCCESS
    got = await get_experience(secured, run)
    assert got.experience_name == name and got.stats.event_count == 2

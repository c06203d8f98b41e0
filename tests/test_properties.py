"""Nothing a caller can send gets INTERNAL or UNKNOWN: hypothesis sends random and boundary
messages to every RPC of the contract, with strategies built from the messages'
descriptors (strings with NUL and any Unicode, integers at their limits, timestamps
outside protobuf's range, unknown enum values, maps, nested messages). Each answer must
be OK or a documented caller error, on both databases; a refused call changes nothing.

The server runs in its own process (hypothesis drives a blocking client), on a database
of its own. Examples are derandomized: CI sees the same ones every run."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import descriptor as d, message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from sqlalchemy.ext.asyncio import create_async_engine

from tally_server.app import REQUIRED_SCOPES, SERVICES

from .conftest import drop_database_url, make_database_url
from .server_process import ServerProcess

# What a caller may be answered, as the contract documents it. UNAVAILABLE is not here:
# the database is healthy, so it would mean a request broke it.
CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES_PER_RPC = 100
# A server-streaming watch runs until its caller leaves: each example watches this long, on fewer examples.
WATCH_SECONDS = 0.2
WATCH_EXAMPLES = 20
# Tally's services and OTLP's trace service on the same port.
ALL_SERVICES = (*SERVICES, trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"])
METHODS = {f"/{s.full_name}/{m.name}": m for s in ALL_SERVICES for m in s.methods}
TABLES = ("events", "experiences", "experience_types", "custom_prices", "api_keys", "limits", "limit_reservations")

# Values that mean something to Tally, mixed with arbitrary ones.
MEANINGFUL = ["", "system.openai", "gpt-4o", "text", "Doc_Summaries", "00000000-0000-4000-8000-000000000001", "admin"]
INTEGER_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 10**12, 10**12 + 1]


def _integers(field: d.FieldDescriptor) -> st.SearchStrategy[int]:
    signed32 = (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32, d.FieldDescriptor.TYPE_SFIXED32)
    unsigned = (
        d.FieldDescriptor.TYPE_UINT32,
        d.FieldDescriptor.TYPE_UINT64,
        d.FieldDescriptor.TYPE_FIXED32,
        d.FieldDescriptor.TYPE_FIXED64,
    )
    low, high = (-(2**31), 2**31 - 1) if field.type in signed32 else (-(2**63), 2**63 - 1)
    if field.type in unsigned:
        low, high = (
            0,
            2**32 - 1 if field.type in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32) else 2**64 - 1,
        )
    edges = [value for value in INTEGER_EDGES if low <= value <= high]
    return st.sampled_from(edges) | st.integers(low, high)


def _scalar(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == d.FieldDescriptor.TYPE_STRING:
        return st.sampled_from(MEANINGFUL) | st.text(max_size=80) | st.text(alphabet="a\x00é😀,=", max_size=8)
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32 if kind == d.FieldDescriptor.TYPE_FLOAT else 64)
    if kind == d.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-5, 99)
    if kind == d.FieldDescriptor.TYPE_MESSAGE:
        return message_values(field.message_type, depth + 1)
    return _integers(field)


def message_values(descriptor: d.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field values for a message of this type, as a dict (built into the message later)."""
    if descriptor.full_name == "google.protobuf.Timestamp":
        seconds = st.sampled_from([0, 253_402_300_799, 253_402_300_800, -62_135_596_801, 2**62]) | st.integers(
            -(2**40), 2**40
        )
        return st.fixed_dictionaries(
            {"seconds": seconds, "nanos": st.sampled_from([0, -1, 999_999_999, 10**9]) | st.integers(0, 10**9)}
        )
    optional: dict[str, st.SearchStrategy[Any]] = {}
    if depth > 3:
        return st.just({})
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            optional[field.name] = st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=4)
        elif field.is_repeated:
            optional[field.name] = st.lists(_scalar(field, depth), max_size=4)
        else:
            optional[field.name] = _scalar(field, depth)
    return st.fixed_dictionaries({}, optional=optional)


def build(descriptor: d.Descriptor, values: dict[str, Any]) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    _fill(message, values)
    return message


def _fill(message: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if field.type == d.FieldDescriptor.TYPE_MESSAGE or field.is_repeated else None
        try:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                entry_value = field.message_type.fields_by_name["value"]
                for key, item in value.items():
                    if entry_value.type == d.FieldDescriptor.TYPE_MESSAGE:
                        _fill(target[key], item)
                    else:
                        target[key] = item
            elif field.is_repeated:
                for item in value:
                    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                        _fill(target.add(), item)
                    else:
                        target.append(item)
            elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                _fill(target, value)
            else:
                setattr(message, name, value)
        except (ValueError, TypeError):
            pass  # a value protobuf itself refuses to hold (e.g. an unpaired surrogate): not sent


@pytest.fixture(scope="module")
async def served(backend, tmp_path_factory):
    url = await make_database_url(backend, tmp_path_factory.mktemp(f"properties-{backend}"))
    server = await asyncio.to_thread(ServerProcess(url).start)
    yield server, url
    server.terminate()
    await drop_database_url(url)


async def _counts(url: str) -> tuple[int, ...]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return tuple([(await conn.execute(sa.text(f"SELECT count(*) FROM {t}"))).scalar_one() for t in TABLES])
    finally:
        await engine.dispose()


def counts(url: str) -> tuple[int, ...]:
    return asyncio.run(_counts(url))


def answer(channel: grpc.Channel, path: str, requests: list[Message]) -> list[grpc.StatusCode]:
    """The status of the call, and for IngestStream of each of its items."""
    method = METHODS[path]
    response = message_factory.GetMessageClass(method.output_type)
    kwargs = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": response.FromString}
    try:
        if method.client_streaming:
            items = list(channel.stream_stream(path, **kwargs)(iter(requests), timeout=30))
            return [grpc.StatusCode.OK, *(_item_code(item) for item in items)]
        if method.server_streaming:  # a watch: its first answers, or its refusal, then the caller leaves
            watch = channel.unary_stream(path, **kwargs)(requests[0], timeout=WATCH_SECONDS)
            try:
                for _ in itertools.islice(watch, 3):
                    pass
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # the caller's own deadline: it watched
                    raise
            watch.cancel()
            return [grpc.StatusCode.OK]
        result = channel.unary_unary(path, **kwargs)(requests[0], timeout=30)
    except grpc.RpcError as error:
        return [error.code()]
    items = getattr(result, "items", ())
    return [grpc.StatusCode.OK, *(_item_code(item) for item in items)]


def _item_code(item: Message) -> grpc.StatusCode:
    if not item.HasField("error"):
        return grpc.StatusCode.OK
    return next((code for code in grpc.StatusCode if code.value[0] == item.error.code), grpc.StatusCode.UNKNOWN)


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(REQUIRED_SCOPES))
def test_every_rpc_answers_random_messages_with_a_documented_code(served, path):
    server, url = served
    method = METHODS[path]
    requests = st.lists(message_values(method.input_type), min_size=1, max_size=3 if method.client_streaming else 1)
    channel = grpc.insecure_channel(server.target)
    refusals_checked = itertools.count()

    @settings(
        max_examples=WATCH_EXAMPLES if method.server_streaming and not method.client_streaming else EXAMPLES_PER_RPC,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests)
    def check(values: list[dict[str, Any]]) -> None:
        messages = [build(method.input_type, v) for v in values]
        watch = not method.client_streaming and next(refusals_checked) % 4 == 0
        before = counts(url) if watch else ()
        codes = answer(channel, path, messages)
        assert set(codes) <= CALLER_ERRORS, f"{path} answered {codes} to {messages}"
        if watch and codes[0] == grpc.StatusCode.INVALID_ARGUMENT:
            assert counts(url) == before, f"a refused {path} changed the database: {messages}"

    try:
        check()
    finally:
        channel.close()

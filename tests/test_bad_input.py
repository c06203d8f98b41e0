"""Bad input answered cleanly, through the wire on both databases: a message that does not
decode (INVALID_ARGUMENT with a request id; in a stream, answered at its position while
the stream goes on), timestamps outside protobuf's range, error details capped so the
caller always receives them, and start-up errors in one line."""

from __future__ import annotations

import re
import subprocess
import sys

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc import aio

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
    price_catalog_service_pb2 as price_pb,
)

from .helpers import decode, raises

# An IngestRequest whose event's category (field 1 of field 1) is not UTF-8.
UNDECODABLE = b"\x0a\x05\x0a\x03\xff\xfe\xfd"


def good_event() -> pb.UsageEvent:
    return pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=10)})


async def test_an_undecodable_message_is_invalid_argument_with_a_request_id(stubs):
    call = stubs.channel.unary_unary(
        "/tally.v1.IngestService/Ingest", request_serializer=bytes, response_deserializer=pb.IngestResponse.FromString
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await call(UNDECODABLE, timeout=10)
    error = decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_MESSAGE")
    assert "does not decode" in error.fields["request"] and "DecodeError" not in error.message
    assert dict(caught.value.trailing_metadata())["x-request-id"]


async def test_an_undecodable_message_in_a_stream_is_answered_in_place_and_the_stream_goes_on(stubs):
    good = pb.IngestStreamRequest(event=good_event()).SerializeToString()
    stream = stubs.channel.stream_stream(
        "/tally.v1.IngestService/IngestStream",
        request_serializer=bytes,
        response_deserializer=pb.IngestStreamResponse.FromString,
    )
    answers = [answer async for answer in stream(iter([good, UNDECODABLE, good]), timeout=10)]
    assert [a.position for a in answers] == [0, 1, 2]
    assert answers[0].HasField("result") and answers[2].HasField("result")
    assert (
        answers[1].error.reason == "UNDECODABLE_MESSAGE"
        and answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )


def stamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


BAD_STAMPS = [stamp(253_402_300_800), stamp(-62_135_596_801), stamp(0, -1), stamp(0, 1_000_000_000), stamp(2**62)]


@pytest.mark.parametrize("bad", BAD_STAMPS, ids=["after-9999", "before-0001", "negative-nanos", "nanos-1e9", "2^62"])
async def test_timestamps_outside_protobufs_range_are_invalid_argument_everywhere(stubs, bad):
    event = good_event()
    event.event_timestamp.CopyFrom(bad)
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.ingest.Ingest(pb.IngestRequest(event=event))
    assert "event.event_timestamp" in error.fields
    batch = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[good_event(), event]))
    assert batch.accepted_count == 1 and batch.items[1].error.field_violations[0].field == "events[1].event_timestamp"
    rates = {"text": price_pb.UnitPrice(input_per_million="1")}
    price = price_pb.CustomPrice(category="custom.x", resource="y", effective_time=bad, unit_prices=rates)
    some_id = "00000000-0000-4000-8000-000000000000"
    quote = price_pb.QuotePriceRequest(category="c", resource="r", event_timestamp=bad)
    calls = [
        (stubs.prices.QuotePrice, quote, "event_timestamp"),
        (stubs.prices.CreateCustomPrice, price_pb.CreateCustomPriceRequest(price=price), "price.effective_time"),
        (stubs.prices.EndCustomPrice, price_pb.EndCustomPriceRequest(price_id=some_id, end_time=bad), "end_time"),
        (stubs.experiences.ListExperiences, exp_pb.ListExperiencesRequest(create_time_start=bad), "create_time_start"),
        (stubs.types.GetExperienceTypeStats, et_pb.GetExperienceTypeStatsRequest(name="A", end_time=bad), "end_time"),
    ]  # fmt: skip
    for rpc, request, field in calls:
        async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
            await rpc(request)
        assert field in error.fields, (field, error.fields)


@pytest.mark.parametrize("key", ["bad key {n}", "{n}" + "é" * 80], ids=["short", "multibyte"])
async def test_ten_thousand_violations_reach_the_caller_capped(stubs, key):
    event = good_event()
    for n in range(10_000):
        event.properties[key.format(n=n)] = "x"
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT") as error:
        await stubs.ingest.Ingest(pb.IngestRequest(event=event))
    # 10,000 bad keys and the limit of 64 entries: 10,001 violations. The first ones are
    # listed (at most 99, in about 4 KiB), then a count of the rest.
    listed = len(error.fields) - 1
    assert 10 <= listed <= 99, listed
    assert error.fields[""] == f"and {10_001 - listed:,} more violations"
    # gRPC's 8 KiB for trailers: the details, and the message again, percent-encoded.
    assert 0 < error.details_bytes + 3 * len(error.message.encode()) < 7_000
    assert re.fullmatch(r"invalid request: .*; and 9,99\d more", error.message), error.message
    batch = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[event, good_event()]))
    item_violations = batch.items[0].error.field_violations
    assert 10 < len(item_violations) <= 100 and item_violations[-1].description.endswith(" more violations")
    assert batch.accepted_count == 1


MISSING_DIRECTORY = "sqlite+aiosqlite:////nonexistent/dir/tally.db"
UNREACHABLE = "postgresql+asyncpg://tally:s3cret@127.0.0.1:1/tally"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (
            MISSING_DIRECTORY,
            f"cannot use the database {MISSING_DIRECTORY}: the directory /nonexistent/dir does not exist",
        ),
        (UNREACHABLE, "cannot use the database postgresql+asyncpg://tally:***@127.0.0.1:1/tally: "),
        ("mysql://somewhere/db", "cannot use the database URL 'mysql://somewhere/db'"),
        ("not a url", "cannot use the database URL 'not a url': Could not parse"),
    ],
    ids=["missing-directory", "unreachable-postgresql", "unknown-driver", "not-a-url"],
)
def test_start_up_errors_are_one_line_naming_the_url_without_its_password(url, said):
    command = [sys.executable, "-m", "tally_server", "--listen", "127.0.0.1:0", "--database-url", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"tally: {said}"), lines[0]
    assert "s3cret" not in result.stderr


def test_a_read_only_mount_is_one_line_naming_the_file(tmp_path):
    """A read-only file system (a tmpfs mounted ro, so root's privileges do not hide it):
    a new database cannot be created there, an existing one cannot be written."""
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to make it read-only: {made.stderr.strip()}")
    try:
        (mount / "existing.db").write_bytes(b"")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        for name, said in [
            ("new.db", f"cannot create {mount}/new.db: the directory is not writable (read-only mount?)"),
            ("existing.db", f"{mount}/existing.db cannot be read and written (read-only file or mount?)"),
        ]:
            url = f"sqlite+aiosqlite:///{mount}/{name}"
            command = [sys.executable, "-m", "tally_server", "--listen", "127.0.0.1:0", "--database-url", url]
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
            assert lines[0] == f"tally: cannot use the database {url}: {said}"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


async def test_numbers_past_the_bounds_are_refused_and_change_nothing(stubs):
    from .conftest import unique

    huge = good_event()
    huge.units["text"].output = 600_000_000_000_000
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.ingest.Ingest(pb.IngestRequest(event=huge))
    assert "event.units['text'].output" in error.fields
    slow = good_event()
    slow.end_to_end_latency_ms = 2**63 - 1
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.ingest.Ingest(pb.IngestRequest(event=slow))
    assert "event.end_to_end_latency_ms" in error.fields
    # Within the count bound, but $10,000,000 of gpt-4o output: refused before any experience is made.
    name = unique("Costly")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="too costly"))
    )
    costly = good_event()
    costly.units["text"].output = 10**12
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, "COST_OUT_OF_RANGE"):
        await stubs.ingest.Ingest(pb.IngestRequest(event=costly), metadata=(("xproxy-experience-name", name),))
    listed = await stubs.experiences.ListExperiences(exp_pb.ListExperiencesRequest(experience_name=name))
    assert not listed.experiences, "a refused event leaves no experience behind"


@pytest.mark.parametrize(
    "field", ["idempotency_key", "provider_response_id", "user_id", "property", "tag", "experience_id", "description"]
)
async def test_nul_characters_are_invalid_argument_not_a_database_error(stubs, field):
    event = good_event()
    if field == "description":
        request = et_pb.CreateExperienceTypeRequest(
            experience_type=et_pb.ExperienceType(name="Nul", description="a\x00b")
        )
        async with raises(grpc.StatusCode.INVALID_ARGUMENT):
            await stubs.types.CreateExperienceType(request)
        return
    if field in ("idempotency_key", "provider_response_id"):
        setattr(event, field, "key\x00")
    elif field == "property":
        event.properties["note"] = "a\x00b"
    elif field == "tag":
        event.context.request_tags.append("beta\x00")
    else:
        setattr(event.context, field, "x\x00y")
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await stubs.ingest.Ingest(pb.IngestRequest(event=event))


async def test_sums_past_64_bit_nano_dollars_are_exact(stubs):
    """10,000 events of $999,999 in one experience: $9,999,990,000, past 2^63 nano-dollars."""
    from .conftest import unique

    name, resource = unique("Whales"), unique("whale")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="big"))
    )
    rate = {"text": price_pb.UnitPrice(input_per_million="999999")}
    await stubs.prices.CreateCustomPrice(
        price_pb.CreateCustomPriceRequest(
            price=price_pb.CustomPrice(category="custom.big", resource=resource, unit_prices=rate)
        )
    )
    created = await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
    experience_id = created.experience.experience_id
    whale = pb.UsageEvent(category="custom.big", resource=resource, units={"text": pb.UnitCounts(input=1_000_000)})
    metadata = (("xproxy-experience-id", experience_id),)
    for _ in range(10):
        batch = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[whale] * 1000), metadata=metadata)
        assert batch.accepted_count == 1000
    stats = (
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience_id))
    ).experience.stats
    assert (stats.cost_total.units, stats.cost_total.nanos, stats.event_count) == (9_999_990_000, 0, 10_000)
    assert 9_999_990_000 * 10**9 > 2**63
    by_type = await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name))
    assert (
        by_type.total.total_cost.units == 9_999_990_000 and by_type.total.max_cost_per_experience.units == 9_999_990_000
    )


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode().rstrip("=")


FORGED_TOKENS = {
    "unsigned": _b64(b'{"f":"0000000000000000","p":"Zzz"}'),
    "huge position": _b64(b'{"f":"x","p":[1180591620717411303424,"x"]}') + "." + _b64(b"0" * 16),
    "deep nesting": _b64(b"[" * 5000 + b"]" * 5000) + "." + _b64(b"0" * 16),
    "nul": "abc\x00def",
    "too long": "a" * 5000,
    "not base64": "%%%.%%%",
}


@pytest.mark.parametrize("token", FORGED_TOKENS.values(), ids=FORGED_TOKENS.keys())
async def test_forged_page_tokens_are_invalid_argument(stubs, token):
    for rpc, request in (
        (stubs.types.ListExperienceTypes, et_pb.ListExperienceTypesRequest(page_token=token)),
        (stubs.experiences.ListExperiences, exp_pb.ListExperiencesRequest(experience_name="A", page_token=token)),
        (stubs.prices.ListCustomPrices, price_pb.ListCustomPricesRequest(page_token=token)),
    ):
        async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
            await rpc(request)
        assert "page_token" in error.fields


async def test_page_tokens_are_shared_by_the_replicas_of_one_database_only(stubs, tmp_path):
    from tally_server.app import TallyServer
    from tally_server.config import Settings
    from tally_server.domain.errors import TallyError

    from .conftest import unique

    for _ in range(3):
        name = unique("Paged")
        request = et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="p"))
        await stubs.types.CreateExperienceType(request)
    first = await stubs.types.ListExperienceTypes(et_pb.ListExperienceTypesRequest(page_size=1))
    replica = TallyServer(Settings(listen="127.0.0.1:0", database_url=stubs.server.settings.database_url))
    stranger = TallyServer(Settings(listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"))
    await replica.start()
    await stranger.start()
    try:
        page = await replica.types.list(1, first.next_page_token)
        assert page.items and page.items[0].name > first.experience_types[0].name, "the replica reads the token"
        with pytest.raises(TallyError, match="not a page token returned by this list"):
            await stranger.types.list(1, first.next_page_token)
    finally:
        await replica.stop()
        await stranger.stop()


@pytest.mark.parametrize(
    ("field", "set_to"),
    [
        ("properties['note']", lambda e, text: e.properties.update({"note": text})),
        ("context.user_id", lambda e, text: setattr(e.context, "user_id", text[:65])),  # 260 bytes of 256
        ("idempotency_key", lambda e, text: setattr(e, "idempotency_key", text[:65])),
    ],
    ids=["property", "user_id", "idempotency_key"],
)
async def test_string_bounds_are_bytes_of_utf8_not_characters(stubs, field, set_to):
    """A string of 4-byte characters is refused at its bound in bytes: 257 of them are
    1,028 bytes, over a property's 1,024, though only 257 characters."""
    four_bytes = "𝄞" * 257
    too_big = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=1)})
    set_to(too_big, four_bytes)
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT") as error:
        await stubs.ingest.Ingest(pb.IngestRequest(event=too_big))
    [(path, why)] = error.fields.items()
    assert path == f"event.{field}" and "bytes of UTF-8" in why, (path, why)
    fits = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=1)})
    set_to(fits, "𝄞" * 64 if field != "properties['note']" else "𝄞" * 256)
    assert (await stubs.ingest.Ingest(pb.IngestRequest(event=fits))).request_id

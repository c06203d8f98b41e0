"""IngestService over the wire: attribution, exact prices, idempotency, batches, streams."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import grpc
import pytest
from google.protobuf import timestamp_pb2

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
    price_catalog_service_pb2 as price_pb,
)
from tally_client import dollars
from tally_server.domain.resolution import derive_experience_id

from .conftest import unique
from .helpers import raises


def gpt4o(input_tokens=1000, output_tokens=100, **kwargs) -> pb.UsageEvent:
    return pb.UsageEvent(
        category="system.openai",
        resource="gpt-4o",
        units={"text": pb.UnitCounts(input=input_tokens, output=output_tokens)},
        **kwargs,
    )


async def new_type(stubs) -> str:
    name = unique("Document_Summarization")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="one document"))
    )
    return name


async def ingest(stubs, event, **metadata):
    pairs = tuple((f"xproxy-{k.replace('_', '-')}", str(v)) for k, v in metadata.items())
    call = stubs.ingest.Ingest(pb.IngestRequest(event=event), metadata=pairs)
    response = await call
    return response, dict(await call.initial_metadata())


async def test_name_alone_creates_an_experience_returned_in_result_and_metadata(stubs):
    name = await new_type(stubs)
    response, headers = await ingest(stubs, gpt4o(), experience_name=name)
    result = response.xproxy_result
    assert result.experience_created and result.experience_name == name and result.experience_version == 1
    assert headers["xproxy-experience-id"] == result.experience_id
    assert response.request_id == result.request_id
    second, _ = await ingest(stubs, gpt4o(), experience_id=result.experience_id)
    assert second.xproxy_result.experience_id == result.experience_id
    assert not second.xproxy_result.experience_created
    got = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=result.experience_id))
    assert got.experience.stats.event_count == 2


async def test_gpt4o_costs_exactly_what_genai_prices_says(stubs):
    response, _ = await ingest(stubs, gpt4o(1000, 100))
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, output_tokens=100), "gpt-4o", provider_id="openai"
    )
    result = response.xproxy_result
    assert dollars(result.cost_input) == expected.input_price == Decimal("0.0025")
    assert dollars(result.cost_output) == expected.output_price
    assert dollars(result.cost_total) == expected.total_price == Decimal("0.0035")
    assert result.cost_state == pb.COST_STATE_PRICED
    assert result.price.source == pb.PRICE_SOURCE_SYSTEM and result.price.resource == "gpt-4o"
    assert result.price.version.startswith("genai-prices ")
    assert result.experience_id == "" and not result.unknown_units


async def test_cached_input_is_not_counted_twice(stubs):
    # 600 uncached + 400 cache-hit input tokens, 100 output, on gpt-4o:
    # by hand: 600 * $2.50/M + 400 * $1.25/M + 100 * $10/M = $0.0015 + $0.0005 + $0.001.
    event = pb.UsageEvent(
        category="system.openai",
        resource="gpt-4o",
        units={"text": pb.UnitCounts(input=600, output=100), "text_cache_read": pb.UnitCounts(input=400)},
    )
    result = (await ingest(stubs, event))[0].xproxy_result
    assert dollars(result.cost_input) == Decimal("0.002")
    assert dollars(result.cost_total) == Decimal("0.003")


async def test_anthropic_cache_write_and_reasoning(stubs):
    # claude-sonnet-4-5: $3/M input, $0.30/M cache read, $3.75/M cache write, $15/M output.
    event = pb.UsageEvent(
        category="system.anthropic",
        resource="claude-sonnet-4-5",
        units={
            "text": pb.UnitCounts(input=600, output=100),
            "text_cache_read": pb.UnitCounts(input=400),
            "text_cache_write": pb.UnitCounts(input=1000),
            "reasoning": pb.UnitCounts(output=50),
        },
    )
    result = (await ingest(stubs, event))[0].xproxy_result
    assert dollars(result.cost_input) == Decimal("0.00567")  # 0.0018 + 0.00012 + 0.00375
    assert dollars(result.cost_output) == Decimal("0.00225")  # 150 output tokens * $15/M


async def test_a_backfilled_event_gets_the_price_of_its_day(stubs):
    # o3's price dropped on 2025-06-10; genai-prices keeps both.
    before = datetime(2025, 5, 1, tzinfo=UTC)
    after = datetime(2025, 7, 1, tzinfo=UTC)
    costs = {}
    for moment in (before, after):
        event = pb.UsageEvent(
            category="system.openai",
            resource="o3",
            units={"text": pb.UnitCounts(input=1000, output=1000)},
            event_timestamp=timestamp_pb2.Timestamp(seconds=int(moment.timestamp())),
        )
        result = (await ingest(stubs, event))[0].xproxy_result
        expected = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1000, output_tokens=1000),
            "o3",
            provider_id="openai",
            genai_request_timestamp=moment,
        )
        assert dollars(result.cost_total) == expected.total_price
        costs[moment] = dollars(result.cost_total)
    assert costs[before] > costs[after]


async def test_unknown_resource_and_unit_are_visible_never_free(stubs):
    name = await new_type(stubs)
    unknown = pb.UsageEvent(
        category="system.openai", resource="gpt-does-not-exist", units={"text": pb.UnitCounts(input=5)}
    )
    response, _ = await ingest(stubs, unknown, experience_name=name)
    result = response.xproxy_result
    assert result.cost_state == pb.COST_STATE_UNPRICED
    assert [(u.unit_type, u.input) for u in result.unknown_units] == [("text", 5)]
    assert not result.HasField("price")

    partly = gpt4o()
    partly.units["telepathy"].input = 7
    second = (await ingest(stubs, partly, experience_id=result.experience_id))[0].xproxy_result
    assert second.cost_state == pb.COST_STATE_PARTIALLY_PRICED
    assert [u.unit_type for u in second.unknown_units] == ["telepathy"]
    assert dollars(second.cost_total) == Decimal("0.0035")

    stats = (
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=result.experience_id))
    ).experience.stats
    assert stats.event_count == 2 and stats.unpriced_event_count == 2


async def test_custom_price_prices_a_custom_resource_and_overrides_system(stubs):
    category = unique("custom.internal").lower()
    await stubs.prices.CreateCustomPrice(
        price_pb.CreateCustomPriceRequest(
            price=price_pb.CustomPrice(
                category=category,
                resource="Llama-Internal",
                unit_prices={"text": price_pb.UnitPrice(input_per_million="0.123456789", output_per_million="1.5")},
            )
        )
    )
    event = pb.UsageEvent(
        category=category, resource="llama-internal", units={"text": pb.UnitCounts(input=1000, output=2000)}
    )
    result = (await ingest(stubs, event))[0].xproxy_result
    assert result.price.source == pb.PRICE_SOURCE_CUSTOM
    assert dollars(result.cost_input) == Decimal("0.000123457")  # 0.000123456789 rounded half-even to the nano
    assert dollars(result.cost_output) == Decimal("0.003")

    # A newer custom price applies from its effective time on; older events keep the old one.
    override_from = datetime(2030, 1, 1, tzinfo=UTC)
    created = await stubs.prices.CreateCustomPrice(
        price_pb.CreateCustomPriceRequest(
            price=price_pb.CustomPrice(
                category=category,
                resource="llama-internal",
                effective_time=timestamp_pb2.Timestamp(seconds=int(override_from.timestamp())),
                unit_prices={"text": price_pb.UnitPrice(input_per_million="1", output_per_million="1")},
            )
        )
    )
    got = await stubs.prices.GetCustomPrice(price_pb.GetCustomPriceRequest(price_id=created.price.price_id))
    assert got.price == created.price
    listed = await stubs.prices.ListCustomPrices(price_pb.ListCustomPricesRequest(category=category))
    assert listed.prices[0].price_id == created.price.price_id and len(listed.prices) == 2
    still_old = (await ingest(stubs, event))[0].xproxy_result
    assert dollars(still_old.cost_output) == Decimal("0.003")
    quote = await stubs.prices.QuotePrice(
        price_pb.QuotePriceRequest(
            category=category,
            resource="llama-internal",
            units={"text": pb.UnitCounts(input=1000, output=2000)},
            event_timestamp=timestamp_pb2.Timestamp(seconds=int(override_from.timestamp()) + 60),
        )
    )
    assert dollars(quote.xproxy_result.cost_total) == Decimal("0.003")

    async with raises(grpc.StatusCode.ALREADY_EXISTS, "PRICE_ALREADY_EXISTS"):
        await stubs.prices.CreateCustomPrice(price_pb.CreateCustomPriceRequest(price=created.price))
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.prices.CreateCustomPrice(
            price_pb.CreateCustomPriceRequest(
                price=price_pb.CustomPrice(
                    category=category, resource="x", unit_prices={"text": price_pb.UnitPrice(input_per_million="1e-12")}
                )
            )
        )
    assert "price.unit_prices['text'].input_per_million" in error.fields
    async with raises(grpc.StatusCode.NOT_FOUND, "PRICE_NOT_FOUND"):
        await stubs.prices.GetCustomPrice(price_pb.GetCustomPriceRequest(price_id=str(uuid.uuid4())))


async def test_a_custom_price_overrides_the_system_price(stubs):
    resource = "gpt-4o-" + uuid.uuid4().hex[:6]
    # Not a real model: system pricing says unknown; the override makes it priced.
    event = pb.UsageEvent(category="system.openai", resource=resource, units={"text": pb.UnitCounts(input=1000000)})
    assert (await ingest(stubs, event))[0].xproxy_result.cost_state == pb.COST_STATE_UNPRICED
    await stubs.prices.CreateCustomPrice(
        price_pb.CreateCustomPriceRequest(
            price=price_pb.CustomPrice(
                category="system.openai",
                resource=resource,
                unit_prices={"text": price_pb.UnitPrice(input_per_million="7")},
            )
        )
    )
    result = (await ingest(stubs, event))[0].xproxy_result
    assert result.price.source == pb.PRICE_SOURCE_CUSTOM and dollars(result.cost_total) == 7


async def test_own_uuid_and_invalid_id(stubs):
    name = await new_type(stubs)
    own = str(uuid.uuid4())
    first = (await ingest(stubs, gpt4o(), experience_id=own, experience_name=name))[0].xproxy_result
    assert first.experience_id == own and first.experience_created

    raw = "summary-of-" + uuid.uuid4().hex
    derived = (await ingest(stubs, gpt4o(), experience_id=raw, experience_name=name))[0].xproxy_result
    assert derived.experience_id == str(derive_experience_id(raw))
    assert any("not a UUID" in w for w in derived.warnings)
    again = (await ingest(stubs, gpt4o(), experience_id=raw, experience_name=name))[0].xproxy_result
    assert again.experience_id == derived.experience_id and not again.experience_created

    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_NOT_FOUND") as error:
        await ingest(stubs, gpt4o(), experience_id=str(uuid.uuid4()))
    assert "xproxy-experience-name" in error.message


async def test_bad_events_get_field_violations_and_store_nothing(stubs):
    name = await new_type(stubs)
    bad = pb.UsageEvent(
        category="",
        resource="gpt-4o",
        units={"text": pb.UnitCounts(input=-1), "Bad Unit": pb.UnitCounts(input=1)},
        event_timestamp=timestamp_pb2.Timestamp(seconds=int(datetime.now(UTC).timestamp()) + 3600),
        end_to_end_latency_ms=-5,
        http_status_code=42,
        context=pb.EventContext(experience_name="other_name"),
    )
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT") as error:
        await ingest(stubs, bad, experience_name=name)
    assert set(error.fields) == {
        "event.category",
        "event.units['text'].input",
        "event.units['Bad Unit']",
        "event.event_timestamp",
        "event.end_to_end_latency_ms",
        "event.http_status_code",
        "event.context.experience_name",
    }
    listed = await stubs.experiences.ListExperiences(exp_pb.ListExperiencesRequest(experience_name=name))
    assert not listed.experiences, "nothing of a refused event is stored, not even its experience"
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await ingest(stubs, gpt4o(), experience_version="two")
    assert "xproxy-experience-version" in error.fields


async def test_idempotency_same_key_same_content_and_different_content(stubs):
    name = await new_type(stubs)
    key = uuid.uuid4().hex
    event = gpt4o(idempotency_key=key)
    first = (await ingest(stubs, event, experience_name=name))[0]
    again = (await ingest(stubs, event, experience_name=name))[0]
    assert again.xproxy_result.duplicate_request and not first.xproxy_result.duplicate_request
    assert again.request_id == first.request_id
    assert again.xproxy_result.experience_id == first.xproxy_result.experience_id
    assert again.xproxy_result.cost_total == first.xproxy_result.cost_total
    async with raises(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"):
        await ingest(stubs, gpt4o(5, 5, idempotency_key=key), experience_name=name)
    # The provider response id is the key when there is no idempotency key.
    by_response_id = gpt4o(provider_response_id="chatcmpl-" + key)
    one = (await ingest(stubs, by_response_id))[0]
    two = (await ingest(stubs, by_response_id))[0]
    assert two.xproxy_result.duplicate_request and two.request_id == one.request_id
    different = gpt4o(1, 1, provider_response_id="chatcmpl-" + key)
    async with raises(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"):
        await ingest(stubs, different)
    listed = await stubs.experiences.ListExperiences(exp_pb.ListExperiencesRequest(experience_name=name))
    assert len(listed.experiences) == 1, "a retried name-only event does not create a second experience"
    stats = (
        await stubs.experiences.GetExperience(
            exp_pb.GetExperienceRequest(experience_id=first.xproxy_result.experience_id)
        )
    ).experience.stats
    assert stats.event_count == 1


async def test_batch_answers_per_item_in_order(stubs):
    name = await new_type(stubs)
    key = uuid.uuid4().hex
    events = [
        gpt4o(idempotency_key=key),
        pb.UsageEvent(category="system.openai"),  # no resource
        gpt4o(2000, 0),
        gpt4o(idempotency_key=key),  # a repeat inside the batch
    ]
    call = stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=events), metadata=(("xproxy-experience-name", name),))
    response = await call
    assert [item.index for item in response.items] == [0, 1, 2, 3]
    assert [item.WhichOneof("outcome") for item in response.items] == ["result", "error", "result", "result"]
    assert response.items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v.field for v in response.items[1].error.field_violations] == ["events[1].resource"]
    assert response.items[3].result.xproxy_result.duplicate_request
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (2, 1, 1)
    # A name with no id: each event is its own new experience, so there is no single id to report.
    assert "xproxy-experience-id" not in dict(await call.initial_metadata())

    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[gpt4o()] * 1001))
    assert "events" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await stubs.ingest.IngestBatch(pb.IngestBatchRequest())


async def test_stream_answers_every_event_in_order_and_goes_on_after_a_bad_one(stubs):
    name = await new_type(stubs)
    experience = (
        await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
    ).experience
    keys = [uuid.uuid4().hex for _ in range(50)]

    async def requests():
        for i, key in enumerate(keys):
            event = gpt4o(i + 1, 1, idempotency_key=key) if i != 10 else pb.UsageEvent(idempotency_key=key)
            yield pb.IngestStreamRequest(event=event)

    responses = [
        r
        async for r in stubs.ingest.IngestStream(
            requests(), metadata=(("xproxy-experience-id", experience.experience_id),)
        )
    ]
    assert [r.position for r in responses] == list(range(50))
    assert [r.idempotency_key for r in responses] == keys
    assert responses[10].WhichOneof("outcome") == "error"
    assert {f.field for f in responses[10].error.field_violations} == {"event.category", "event.resource"}
    good = [r for r in responses if r.WhichOneof("outcome") == "result"]
    assert len(good) == 49
    stats = (
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience.experience_id))
    ).experience.stats
    assert stats.event_count == 49
    assert dollars(stats.cost_total) == sum(dollars(r.result.xproxy_result.cost_total) for r in good)


async def test_context_field_contradicting_metadata_is_refused(stubs):
    name = await new_type(stubs)
    event = gpt4o(context=pb.EventContext(user_id="alice", request_tags=["a"]))
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await ingest(stubs, event, user_id="bob")
    assert "event.context.user_id" in error.fields
    agreeing = (await ingest(stubs, event, user_id="alice", experience_name=name))[0].xproxy_result
    assert agreeing.user_id == "alice" and list(agreeing.request_tags) == ["a"]
    tagged = (await ingest(stubs, gpt4o(), request_tags="beta, eu-west"))[0].xproxy_result
    assert list(tagged.request_tags) == ["beta", "eu-west"]


async def test_experience_statistics(stubs):
    name = await new_type(stubs)
    experience = (
        await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
    ).experience
    base = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    results = []
    for i, (latency, status) in enumerate([(100, 200), (300, 200), (200, 500), (400, 429), (1000, 200)]):
        event = gpt4o(
            100 * (i + 1),
            10,
            end_to_end_latency_ms=latency,
            http_status_code=status,
            event_timestamp=timestamp_pb2.Timestamp(seconds=base + i * 60),
        )
        results.append((await ingest(stubs, event, experience_id=experience.experience_id))[0].xproxy_result)
    stats = (
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience.experience_id))
    ).experience.stats
    assert stats.event_count == 5 and stats.failed_event_count == 2 and stats.unpriced_event_count == 0
    assert dollars(stats.cost_total) == sum(dollars(r.cost_total) for r in results)
    assert dollars(stats.cost_input) == sum(dollars(r.cost_input) for r in results)
    assert dollars(stats.cost_output) == sum(dollars(r.cost_output) for r in results)
    # The mean is exact; percentiles come from the latency histogram, within 1% (nearest rank).
    assert stats.latency_mean_ms == 400.0
    assert stats.latency_p50_ms == pytest.approx(300.0, rel=0.01)
    assert stats.latency_p95_ms == pytest.approx(1000.0, rel=0.01)
    assert stats.first_event_time.seconds == base and stats.last_event_time.seconds == base + 240


async def test_type_statistics_by_version_and_window(stubs):
    name = await new_type(stubs)
    totals = {}
    for version_runs in ([1000, 3000], [5000]):
        for tokens in version_runs:
            response, _ = await ingest(stubs, gpt4o(tokens, 0), experience_name=name)
            totals[response.xproxy_result.experience_id] = (
                response.xproxy_result.experience_version,
                dollars(response.xproxy_result.cost_total),
            )
        await stubs.types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=name))
    stats = await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name))
    assert stats.total.experience_count == 3 and stats.total.event_count == 3
    assert dollars(stats.total.total_cost) == sum(cost for _, cost in totals.values()) == Decimal("0.0225")
    assert dollars(stats.total.mean_cost_per_experience) == Decimal("0.0075")
    assert dollars(stats.total.p50_cost_per_experience) == Decimal("0.0075")
    assert dollars(stats.total.max_cost_per_experience) == Decimal("0.0125")
    assert [(v.version, v.stats.experience_count) for v in stats.versions] == [(1, 2), (2, 1)]
    assert dollars(stats.versions[0].stats.total_cost) == Decimal("0.01")
    only_v2 = await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name, version=2))
    assert only_v2.total.experience_count == 1
    future = timestamp_pb2.Timestamp(seconds=int(datetime(2100, 1, 1, tzinfo=UTC).timestamp()))
    empty = await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name, start_time=future))
    assert empty.total.experience_count == 0 and dollars(empty.total.total_cost) == 0
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND"):
        await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=unique()))


async def test_deleting_an_experience_keeps_its_events_unattributed(stubs):
    name = await new_type(stubs)
    response, _ = await ingest(stubs, gpt4o(), experience_name=name)
    experience_id = response.xproxy_result.experience_id
    deleted = await stubs.experiences.DeleteExperience(exp_pb.DeleteExperienceRequest(experience_id=experience_id))
    assert deleted.unattributed_event_count == 1
    stats = await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name))
    assert stats.total.event_count == 0


async def test_concurrent_unary_ingests_share_commits_and_all_land(stubs):
    name = await new_type(stubs)
    experience = (
        await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
    ).experience
    metadata = (("xproxy-experience-id", experience.experience_id),)
    responses = await asyncio.gather(
        *(stubs.ingest.Ingest(pb.IngestRequest(event=gpt4o(i + 1, i)), metadata=metadata) for i in range(200))
    )
    stats = (
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience.experience_id))
    ).experience.stats
    assert stats.event_count == 200
    assert dollars(stats.cost_total) == sum(dollars(r.xproxy_result.cost_total) for r in responses)


async def test_a_database_failure_is_unavailable_per_event_and_stores_nothing_half(stubs, monkeypatch):
    import sqlalchemy as sa

    from tally_server.storage import events as stored_events

    name = await new_type(stubs)
    experience = (
        await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
    ).experience
    metadata = (("xproxy-experience-id", experience.experience_id),)
    real_insert = stored_events.insert_events

    async def failing_insert(conn, stored):
        if any(result.cost.total_nanos == 2_500_000 for _, result in stored):  # the event with 1,000 input tokens
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        return await real_insert(conn, stored)

    monkeypatch.setattr(stored_events, "insert_events", failing_insert)
    async with raises(grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE") as error:
        await stubs.ingest.Ingest(pb.IngestRequest(event=gpt4o(1000, 0)), metadata=metadata)
    assert "locked" not in error.message, "no exception text reaches the caller"

    batch = await stubs.ingest.IngestBatch(
        pb.IngestBatchRequest(events=[gpt4o(1000, 0), gpt4o(10, 0), gpt4o(20, 0)]), metadata=metadata
    )
    assert [item.WhichOneof("outcome") for item in batch.items] == ["error", "result", "result"]
    assert batch.items[0].error.reason == "STORAGE_UNAVAILABLE" and batch.items[0].error.code == 14
    stats = (
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience.experience_id))
    ).experience.stats
    assert stats.event_count == 2, "the others were stored, each exactly once"

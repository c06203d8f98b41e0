"""Pay-i's use-case metadata keys (xproxy-usecase-id, -name, -version) attribute events
exactly as the experience keys do, through the wire on both databases: an explicit id,
a name alone, the caller's own id, an id that is not a UUID, a pinned version. Both
families disagreeing is INVALID_ARGUMENT; an unknown xproxy-* key is a warning. And the
price context set for a whole call by metadata."""

from __future__ import annotations

import uuid

import genai_prices
import grpc
import pytest

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
)
from tally_client import create_metadata

from .conftest import unique
from .helpers import raises

FAMILIES = ["experience", "usecase"]


def event(key: str = "") -> pb.UsageEvent:
    return pb.UsageEvent(
        category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=1000, output=100)},
        idempotency_key=key,
    )  # fmt: skip


async def new_type(stubs, versions: int = 1) -> str:
    name = unique("UseCase")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="a use case"))
    )
    for _ in range(versions - 1):
        await stubs.types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=name))
    return name


async def ingest(stubs, metadata, the_event=None):
    call = stubs.ingest.Ingest(pb.IngestRequest(event=the_event or event()), metadata=metadata)
    response = await call
    return response.xproxy_result, dict(await call.initial_metadata())


@pytest.mark.parametrize("family", FAMILIES)
async def test_each_family_attributes_events_the_same_way(stubs, family):
    name = await new_type(stubs, versions=2)

    def meta(**kwargs):
        return create_metadata(family=family, **kwargs)

    # A name alone: a new experience, its id in the result and the response header.
    created, header = await ingest(stubs, meta(experience_name=name))
    assert created.experience_created and created.experience_name == name and created.experience_version == 2
    assert header["xproxy-experience-id"] == created.experience_id
    # An explicit existing id.
    used, _ = await ingest(stubs, meta(experience_id=created.experience_id))
    assert used.experience_id == created.experience_id and not used.experience_created
    # The caller's own id, with a pinned version.
    own = str(uuid.uuid4())
    pinned, _ = await ingest(stubs, meta(experience_id=own, experience_name=name, experience_version=1))
    assert (pinned.experience_id, pinned.experience_version, pinned.experience_created) == (own, 1, True)
    # An id that is not a UUID: the same derived id every time, with a warning.
    raw = f"invoice-{uuid.uuid4().hex[:8]}"
    derived, _ = await ingest(stubs, meta(experience_id=raw, experience_name=name))
    again, _ = await ingest(stubs, meta(experience_id=raw, experience_name=name))
    assert derived.experience_id == again.experience_id and uuid.UUID(derived.experience_id).version == 5
    assert any("is not a UUID" in w for w in derived.warnings)
    got = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=own))
    assert got.experience.stats.event_count == 1


async def test_the_two_families_are_one_context(stubs):
    name = await new_type(stubs)
    agreeing = (("xproxy-usecase-name", name), ("xproxy-experience-name", name))
    result, _ = await ingest(stubs, agreeing)
    assert result.experience_name == name
    other = await new_type(stubs)
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await ingest(stubs, (("xproxy-experience-name", name), ("xproxy-usecase-name", other)))
    assert "xproxy-usecase-name" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await ingest(stubs, (("xproxy-usecase-version", "two"), ("xproxy-usecase-name", name)))


async def test_an_unknown_xproxy_key_is_a_warning_not_silence(stubs):
    name = await new_type(stubs)
    result, _ = await ingest(stubs, (("xproxy-usecase-name", name), ("xproxy-limit-ids", "abc")))
    assert result.experience_name == name
    assert any("'xproxy-limit-ids' is not one Tally reads" in w for w in result.warnings), result.warnings
    batch = await stubs.ingest.IngestBatch(
        pb.IngestBatchRequest(events=[event(), event()]), metadata=(("xproxy-experince-id", "typo"),)
    )
    assert all(any("xproxy-experince-id" in w for w in item.result.xproxy_result.warnings) for item in batch.items)


async def test_a_price_context_for_a_whole_call(stubs):
    o3 = pb.UsageEvent(category="system.openai", resource="o3", units={"text": pb.UnitCounts(input=1000, output=1000)})
    batch, _ = await ingest(stubs, create_metadata(price_context={"processing": "batch"}), o3)
    assert (batch.cost_total.nanos, dict(batch.price.price_context)) == (5_000_000, {"processing": "batch"})
    flex = pb.UsageEvent()
    flex.CopyFrom(o3)
    flex.price_context["service_tier"] = "flex"
    both, _ = await ingest(stubs, create_metadata(price_context={"processing": "batch"}), flex)
    context = {"processing": "batch", "service_tier": "flex"}
    assert dict(both.price.price_context) == context, "the metadata's and the event's, merged"
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, output_tokens=1000), "o3", provider_id="openai", price_context=context
    )
    assert both.cost_total.nanos == int(expected.total_price * 1_000_000_000)
    conflicting = pb.UsageEvent()
    conflicting.CopyFrom(o3)
    conflicting.price_context["processing"] = "interactive"
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await ingest(stubs, create_metadata(price_context={"processing": "batch"}), conflicting)
    assert "event.price_context['processing']" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await ingest(stubs, (("xproxy-price-context", "processing"),), o3)


async def test_recording_the_same_response_with_another_latency_is_a_duplicate(stubs):
    key = f"resp-{uuid.uuid4()}"
    first = event(key)
    first.end_to_end_latency_ms, first.time_to_first_token_ms = 850, 120
    second = event(key)
    second.end_to_end_latency_ms = 910
    one, _ = await ingest(stubs, (), first)
    two, _ = await ingest(stubs, (), second)
    assert two.duplicate_request and two.request_id == one.request_id
    changed = event(key)
    changed.units["text"].output = 101
    async with raises(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"):
        await ingest(stubs, (), changed)

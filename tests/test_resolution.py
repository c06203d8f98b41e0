"""Experience resolution: the five rules, concurrently, on both engines.

The domain function is called directly against the real database (no gRPC in
it), and through the wire with concurrent ingests.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from tally.v1 import experience_service_pb2 as exp_pb, experience_type_service_pb2 as et_pb, ingest_service_pb2 as pb
from tally_server.domain.errors import TallyError
from tally_server.domain.models import EventContext, now_us
from tally_server.domain.resolution import derive_experience_id
from tally_server.services.resolution import resolve_experiences

from .conftest import unique
from .helpers import raises


async def new_type(stubs) -> str:
    name = unique("Chatbot")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="a conversation"))
    )
    return name


async def resolve(stubs, context: EventContext):
    async with stubs.server.db.write() as conn:
        [outcome] = await resolve_experiences(conn, [context], now_us())
    return outcome


async def test_the_five_rules(stubs):
    name = await new_type(stubs)
    other = await new_type(stubs)

    # 4. A name alone: a new experience, UUIDv7.
    created = await resolve(stubs, EventContext(experience_name=name))
    assert created.created and created.experience.experience_id.version == 7

    # 1. An existing id: used; a contradicting name is FAILED_PRECONDITION.
    existing = await resolve(stubs, EventContext(experience_id=str(created.experience.experience_id)))
    assert existing.experience == created.experience and not existing.created
    mismatch = await resolve(
        stubs, EventContext(experience_id=str(created.experience.experience_id), experience_name=other)
    )
    assert isinstance(mismatch, TallyError) and mismatch.reason == "EXPERIENCE_TYPE_MISMATCH"

    # 2. A valid unknown id: created with exactly that id when named, else NOT_FOUND.
    own = uuid.uuid4()
    missing = await resolve(stubs, EventContext(experience_id=str(own)))
    assert isinstance(missing, TallyError) and missing.reason == "EXPERIENCE_NOT_FOUND"
    assert "xproxy-experience-name" in missing.message
    made = await resolve(stubs, EventContext(experience_id=str(own), experience_name=name))
    assert made.created and made.experience.experience_id == own

    # 3. Not a UUID: the derived UUIDv5, with a warning, the same every time.
    derived = await resolve(stubs, EventContext(experience_id="conversation-17", experience_name=name))
    assert derived.experience.experience_id == derive_experience_id("conversation-17")
    assert derived.experience.experience_id.version == 5
    assert derived.warnings and "not a UUID" in derived.warnings[0]
    again = await resolve(stubs, EventContext(experience_id="conversation-17"))
    assert again.experience.experience_id == derived.experience.experience_id and not again.created

    # 5. Neither: unattributed.
    nothing = await resolve(stubs, EventContext())
    assert nothing.experience is None

    # A name of no type; a pinned version that does not exist.
    unknown_type = await resolve(stubs, EventContext(experience_name=unique("nope")))
    assert isinstance(unknown_type, TallyError) and unknown_type.reason == "EXPERIENCE_TYPE_NOT_FOUND"
    bad_pin = await resolve(stubs, EventContext(experience_name=name, experience_version=9))
    assert isinstance(bad_pin, TallyError) and bad_pin.violations[0].field == "experience_version"


@pytest.mark.parametrize("raw_id", ["valid-uuid", "not-a-uuid"])
async def test_concurrent_resolutions_of_one_new_id_make_one_experience(stubs, raw_id):
    name = await new_type(stubs)
    experience_id = str(uuid.uuid4()) if raw_id == "valid-uuid" else f"doc-{uuid.uuid4().hex}"
    metadata = (("xproxy-experience-id", experience_id), ("xproxy-experience-name", name))
    event = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=10)})

    # Separate channels, so the calls really run side by side on the server.
    from grpc import aio

    from tally.v1 import ingest_service_pb2_grpc

    channels = [aio.insecure_channel(stubs.target) for _ in range(8)]
    try:
        calls = [
            ingest_service_pb2_grpc.IngestServiceStub(channels[i % 8]).Ingest(
                pb.IngestRequest(event=event), metadata=metadata
            )
            for i in range(40)
        ]
        responses = await asyncio.gather(*calls)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    resolved = {r.xproxy_result.experience_id for r in responses}
    assert len(resolved) == 1
    assert sum(r.xproxy_result.experience_created for r in responses) == 1
    listed = await stubs.experiences.ListExperiences(exp_pb.ListExperiencesRequest(experience_name=name))
    assert [e.experience_id for e in listed.experiences] == list(resolved)
    got = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=resolved.pop()))
    assert got.experience.stats.event_count == 40


async def test_concurrent_resolutions_across_two_databases_connections(stubs):
    """Two transactions racing on one new id, as two replicas would."""
    name = await new_type(stubs)
    own = str(uuid.uuid4())

    async def one() -> object:
        async with stubs.server.db.write() as conn:
            [outcome] = await resolve_experiences(
                conn, [EventContext(experience_id=own, experience_name=name)], now_us()
            )
            await asyncio.sleep(0.05)  # hold the transaction open while the other one runs
        return outcome

    outcomes = await asyncio.gather(*(one() for _ in range(6)))
    assert all(not isinstance(o, TallyError) for o in outcomes), outcomes
    assert {str(o.experience.experience_id) for o in outcomes} == {own}
    assert sum(o.created for o in outcomes) == 1


async def test_mismatch_over_the_wire(stubs):
    name = await new_type(stubs)
    other = await new_type(stubs)
    experience = (
        await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
    ).experience
    event = pb.UsageEvent(category="system.openai", resource="gpt-4o")
    async with raises(grpc.StatusCode.FAILED_PRECONDITION, "EXPERIENCE_TYPE_MISMATCH"):
        await stubs.ingest.Ingest(
            pb.IngestRequest(event=event),
            metadata=(("xproxy-experience-id", experience.experience_id), ("xproxy-experience-name", other)),
        )

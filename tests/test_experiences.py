"""ExperienceService over the wire, on both engines."""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import timestamp_pb2

from tally.v1 import experience_service_pb2 as pb, experience_type_service_pb2 as et_pb

from .conftest import unique
from .helpers import raises


async def new_type(stubs, name=None) -> str:
    name = name or unique("Document_Summarization")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="one document"))
    )
    return name


async def create(stubs, name, **kwargs):
    return (
        await stubs.experiences.CreateExperience(pb.CreateExperienceRequest(experience_name=name, **kwargs))
    ).experience


async def test_seed_scenario_one_experience_per_document(stubs):
    summarization = await new_type(stubs, unique("Document_Summarization"))
    chatbot = await new_type(stubs, unique("Document_Chatbot"))
    documents = [await create(stubs, summarization) for _ in range(3)]
    conversation = await create(stubs, chatbot)
    ids = {e.experience_id for e in documents} | {conversation.experience_id}
    assert len(ids) == 4
    for experience in documents:
        assert experience.experience_name == summarization
        assert experience.experience_version == 1
        assert uuid.UUID(experience.experience_id).version == 7, "server-generated ids are UUIDv7"
    got = await stubs.experiences.GetExperience(pb.GetExperienceRequest(experience_id=conversation.experience_id))
    assert got.experience.experience_name == chatbot
    stats = got.experience.stats
    assert stats.event_count == 0 and stats.cost_total.currency_code == "USD"
    assert not stats.HasField("first_event_time")


async def test_caller_supplied_uuid_comes_back_unchanged(stubs):
    name = await new_type(stubs)
    own = uuid.uuid4()
    created = await create(stubs, name, experience_id=str(own).upper())
    assert created.experience_id == str(own)
    async with raises(grpc.StatusCode.ALREADY_EXISTS, "EXPERIENCE_ALREADY_EXISTS"):
        await create(stubs, name, experience_id=str(own))


async def test_create_errors(stubs):
    name = await new_type(stubs)
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND"):
        await create(stubs, unique("missing"))
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await create(stubs, name, experience_id="doc-42")
    assert "experience_id" in error.fields, "the explicit API never derives ids"
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await create(stubs, name, experience_version=2)
    assert "experience_version" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await create(stubs, name, experience_version=-1)
    listed = await stubs.experiences.ListExperiences(pb.ListExperiencesRequest(experience_name=name))
    assert list(listed.experiences) == [], "refused creates store nothing"


async def test_get_errors(stubs):
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await stubs.experiences.GetExperience(pb.GetExperienceRequest(experience_id="12345"))
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_NOT_FOUND"):
        await stubs.experiences.GetExperience(pb.GetExperienceRequest(experience_id=str(uuid.uuid4())))


async def test_versions_stamp_new_experiences_and_pins_hold(stubs):
    name = await new_type(stubs)
    old = await create(stubs, name)
    await stubs.types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=name))
    new = await create(stubs, name)
    pinned = await create(stubs, name, experience_version=1)
    assert (old.experience_version, new.experience_version, pinned.experience_version) == (1, 2, 1)
    again = await stubs.experiences.GetExperience(pb.GetExperienceRequest(experience_id=old.experience_id))
    assert again.experience.experience_version == 1, "old experiences keep their version"
    by_version = await stubs.experiences.ListExperiences(
        pb.ListExperiencesRequest(experience_name=name, experience_version=1)
    )
    assert {e.experience_id for e in by_version.experiences} == {old.experience_id, pinned.experience_id}


async def test_list_pages_newest_first_with_filters(stubs):
    name = await new_type(stubs)
    created = [await create(stubs, name) for _ in range(7)]
    seen, token = [], ""
    while True:
        page = await stubs.experiences.ListExperiences(
            pb.ListExperiencesRequest(experience_name=name, page_size=3, page_token=token)
        )
        seen.extend(page.experiences)
        token = page.next_page_token
        if not token:
            break
    assert [e.experience_id for e in seen] == [e.experience_id for e in reversed(created)]
    assert all(e.HasField("stats") and e.stats.event_count == 0 for e in seen)

    middle = created[3].create_time
    window = await stubs.experiences.ListExperiences(
        pb.ListExperiencesRequest(experience_name=name, create_time_start=middle)
    )
    assert [e.experience_id for e in window.experiences] == [e.experience_id for e in reversed(created[3:])]
    before = await stubs.experiences.ListExperiences(
        pb.ListExperiencesRequest(experience_name=name, create_time_end=middle)
    )
    assert {e.experience_id for e in before.experiences} == {e.experience_id for e in created[:3]}
    # A window holding every run is read as none (storage.experiences._created_within): its
    # edges are exact, the end exclusive.
    first, last = created[0].create_time, created[-1].create_time
    just_after = timestamp_pb2.Timestamp()
    just_after.FromMicroseconds(last.ToMicroseconds() + 1)
    for end, expected in ((last, created[:-1]), (just_after, created)):
        held = await stubs.experiences.ListExperiences(
            pb.ListExperiencesRequest(experience_name=name, create_time_start=first, create_time_end=end)
        )
        assert [e.experience_id for e in held.experiences] == [e.experience_id for e in reversed(expected)]

    first_page = await stubs.experiences.ListExperiences(pb.ListExperiencesRequest(experience_name=name, page_size=3))
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.experiences.ListExperiences(
            pb.ListExperiencesRequest(experience_name=name, experience_version=1, page_token=first_page.next_page_token)
        )
    assert "other filters" in error.fields["page_token"]
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.experiences.ListExperiences(pb.ListExperiencesRequest(experience_name=name, page_token="garbage"))
    assert "page_token" in error.fields
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND"):
        await stubs.experiences.ListExperiences(pb.ListExperiencesRequest(experience_name=unique()))
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.experiences.ListExperiences(pb.ListExperiencesRequest(experience_name=""))
    later = timestamp_pb2.Timestamp(seconds=middle.seconds - 1)
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await stubs.experiences.ListExperiences(
            pb.ListExperiencesRequest(experience_name=name, create_time_start=middle, create_time_end=later)
        )


async def test_properties_set_remove_and_bounds(stubs):
    name = await new_type(stubs)
    created = await create(stubs, name, properties={"document": "q3-report.pdf", "pages": "12"})
    assert dict(created.properties) == {"document": "q3-report.pdf", "pages": "12"}
    updated = await stubs.experiences.UpdateExperienceProperties(
        pb.UpdateExperiencePropertiesRequest(
            experience_id=created.experience_id, set_properties={"pages": "13", "lang": "en"}, remove_keys=["document"]
        )
    )
    assert dict(updated.experience.properties) == {"pages": "13", "lang": "en"}
    got = await stubs.experiences.GetExperience(pb.GetExperienceRequest(experience_id=created.experience_id))
    assert dict(got.experience.properties) == {"pages": "13", "lang": "en"}

    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.experiences.UpdateExperienceProperties(
            pb.UpdateExperiencePropertiesRequest(
                experience_id=created.experience_id, set_properties={f"k{i}": "v" for i in range(65)}
            )
        )
    assert "set_properties" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.experiences.UpdateExperienceProperties(
            pb.UpdateExperiencePropertiesRequest(experience_id=created.experience_id, set_properties={"k": "v" * 1025})
        )
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await stubs.experiences.UpdateExperienceProperties(
            pb.UpdateExperiencePropertiesRequest(
                experience_id=created.experience_id, set_properties={"lang": "fr"}, remove_keys=["lang"]
            )
        )
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await create(stubs, name, properties={"bad key": "v"})
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_NOT_FOUND"):
        await stubs.experiences.UpdateExperienceProperties(
            pb.UpdateExperiencePropertiesRequest(experience_id=str(uuid.uuid4()), set_properties={"a": "b"})
        )
    got = await stubs.experiences.GetExperience(pb.GetExperienceRequest(experience_id=created.experience_id))
    assert dict(got.experience.properties) == {"pages": "13", "lang": "en"}, "refused updates change nothing"


async def test_delete_experience(stubs):
    name = await new_type(stubs)
    created = await create(stubs, name)
    response = await stubs.experiences.DeleteExperience(pb.DeleteExperienceRequest(experience_id=created.experience_id))
    assert response.unattributed_event_count == 0
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_NOT_FOUND"):
        await stubs.experiences.GetExperience(pb.GetExperienceRequest(experience_id=created.experience_id))
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_NOT_FOUND"):
        await stubs.experiences.DeleteExperience(pb.DeleteExperienceRequest(experience_id=created.experience_id))
    await stubs.types.DeleteExperienceType(et_pb.DeleteExperienceTypeRequest(name=name))


async def test_create_request_id_is_idempotent(stubs):
    name = await new_type(stubs)
    request = pb.CreateExperienceRequest(experience_name=name, request_id="create-" + name)
    first = await stubs.experiences.CreateExperience(request)
    again = await stubs.experiences.CreateExperience(request)
    assert first.experience.experience_id == again.experience.experience_id
    listed = await stubs.experiences.ListExperiences(pb.ListExperiencesRequest(experience_name=name))
    assert len(listed.experiences) == 1

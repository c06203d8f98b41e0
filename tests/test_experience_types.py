"""ExperienceTypeService over the wire, on both engines."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from tally.v1 import experience_service_pb2 as exp_pb, experience_type_service_pb2 as pb

from .conftest import unique
from .helpers import raises


async def create(stubs, name=None, description="Summarize one document", **settings):
    name = name or unique()
    response = await stubs.types.CreateExperienceType(
        pb.CreateExperienceTypeRequest(
            experience_type=pb.ExperienceType(name=name, description=description, settings=settings)
        )
    )
    return response.experience_type


async def test_create_get_roundtrip(stubs):
    created = await create(stubs, model="gpt-4o")
    assert created.version == 1
    assert created.create_time.seconds > 0
    got = (await stubs.types.GetExperienceType(pb.GetExperienceTypeRequest(name=created.name))).experience_type
    assert got == created
    assert dict(got.settings) == {"model": "gpt-4o"}


async def test_create_duplicate_name_is_already_exists(stubs):
    created = await create(stubs)
    async with raises(grpc.StatusCode.ALREADY_EXISTS, "EXPERIENCE_TYPE_ALREADY_EXISTS") as error:
        await create(stubs, created.name)
    assert error.resource == ("tally.v1.ExperienceType", created.name)


async def test_create_validates_every_field(stubs):
    request = pb.CreateExperienceTypeRequest(
        experience_type=pb.ExperienceType(name="bad name!", description="", settings={"ok": "x" * 2000})
    )
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT") as error:
        await stubs.types.CreateExperienceType(request)
    assert set(error.fields) == {
        "experience_type.name",
        "experience_type.description",
        "experience_type.settings['ok']",
    }
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.types.GetExperienceType(pb.GetExperienceTypeRequest(name="bad name!"))
    assert "name" in error.fields


async def test_name_bounds(stubs):
    await create(stubs, "n" * 64)  # names are unique; 64 characters is the bound
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await create(stubs, "n" * 65)
    assert "experience_type.name" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await create(stubs, unique(), description="d" * 1025)
    assert "1024" in error.fields["experience_type.description"]


async def test_request_id_makes_create_idempotent(stubs):
    name = unique()
    request = pb.CreateExperienceTypeRequest(
        experience_type=pb.ExperienceType(name=name, description="first"), request_id="req-" + name
    )
    first = await stubs.types.CreateExperienceType(request)
    again = await stubs.types.CreateExperienceType(request)
    assert again == first
    request.experience_type.description = "something else"
    async with raises(grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
        await stubs.types.CreateExperienceType(request)


async def test_get_unknown_is_not_found(stubs):
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND") as error:
        await stubs.types.GetExperienceType(pb.GetExperienceTypeRequest(name="no_such_type_" + unique()))
    assert "CreateExperienceType" in error.message


async def test_list_pages_through_everything_in_name_order(stubs):
    prefix = unique("L")
    names = sorted(f"{prefix}_{i:02d}" for i in range(7))
    for name in names:
        await create(stubs, name)
    seen, token, pages = [], "", 0
    while True:
        page = await stubs.types.ListExperienceTypes(pb.ListExperienceTypesRequest(page_size=3, page_token=token))
        assert len(page.experience_types) <= 3
        seen.extend(t.name for t in page.experience_types)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen), "a stable order: ascending names"
    assert [n for n in seen if n.startswith(prefix)] == names
    assert pages >= 3


async def test_list_rejects_bad_token_and_negative_size(stubs):
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.types.ListExperienceTypes(pb.ListExperienceTypesRequest(page_token="not-a-token"))
    assert "page_token" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.types.ListExperienceTypes(pb.ListExperienceTypesRequest(page_size=-1))
    assert "page_size" in error.fields
    other_list_token = (
        await stubs.types.ListExperienceTypeVersions(
            pb.ListExperienceTypeVersionsRequest(name=(await _versioned(stubs, 3)).name, page_size=1)
        )
    ).next_page_token
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await stubs.types.ListExperienceTypes(pb.ListExperienceTypesRequest(page_token=other_list_token))


async def test_update_with_mask_changes_only_masked_fields(stubs):
    created = await create(stubs, description="old", tier="a")
    response = await stubs.types.UpdateExperienceType(
        pb.UpdateExperienceTypeRequest(
            experience_type=pb.ExperienceType(name=created.name, description="new", settings={"tier": "b"}),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    updated = response.experience_type
    assert updated.description == "new"
    assert dict(updated.settings) == {"tier": "a"}
    assert updated.version == 1, "an edit never changes the version"
    assert updated.update_time.ToMicroseconds() >= created.update_time.ToMicroseconds()

    response = await stubs.types.UpdateExperienceType(
        pb.UpdateExperienceTypeRequest(
            experience_type=pb.ExperienceType(name=created.name, description="newer", settings={"tier": "c"})
        )
    )
    assert response.experience_type.description == "newer"
    assert dict(response.experience_type.settings) == {"tier": "c"}


async def test_update_refuses_name_and_version_paths(stubs):
    created = await create(stubs)
    for path in ("name", "version", "bogus"):
        async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
            await stubs.types.UpdateExperienceType(
                pb.UpdateExperienceTypeRequest(
                    experience_type=pb.ExperienceType(name=created.name, description="x"),
                    update_mask=field_mask_pb2.FieldMask(paths=[path]),
                )
            )
        assert "update_mask" in error.fields
    got = (await stubs.types.GetExperienceType(pb.GetExperienceTypeRequest(name=created.name))).experience_type
    assert got == created, "a refused update changes nothing"
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND"):
        await stubs.types.UpdateExperienceType(
            pb.UpdateExperienceTypeRequest(experience_type=pb.ExperienceType(name=unique(), description="x"))
        )


async def _versioned(stubs, versions: int):
    created = await create(stubs, description="v1")
    for number in range(2, versions + 1):
        await stubs.types.UpdateExperienceType(
            pb.UpdateExperienceTypeRequest(
                experience_type=pb.ExperienceType(name=created.name, description=f"v{number - 1} final")
            )
        )
        await stubs.types.IncrementExperienceTypeVersion(pb.IncrementExperienceTypeVersionRequest(name=created.name))
    return created


async def test_increment_version_snapshots_each_version(stubs):
    created = await create(stubs, description="first description")
    response = await stubs.types.IncrementExperienceTypeVersion(
        pb.IncrementExperienceTypeVersionRequest(name=created.name)
    )
    assert response.experience_type.version == 2
    assert response.experience_type_version.version == 2
    assert response.experience_type_version.description == "first description"
    await stubs.types.UpdateExperienceType(
        pb.UpdateExperienceTypeRequest(experience_type=pb.ExperienceType(name=created.name, description="second"))
    )
    versions = await stubs.types.ListExperienceTypeVersions(pb.ListExperienceTypeVersionsRequest(name=created.name))
    assert [(v.version, v.description) for v in versions.experience_type_versions] == [
        (2, "second"),
        (1, "first description"),
    ], "editing changes the current version's snapshot only"


async def test_increment_with_request_id_happens_once(stubs):
    created = await create(stubs)
    request = pb.IncrementExperienceTypeVersionRequest(name=created.name, request_id="inc-" + created.name)
    first = await stubs.types.IncrementExperienceTypeVersion(request)
    again = await stubs.types.IncrementExperienceTypeVersion(request)
    assert first.experience_type_version.version == again.experience_type_version.version == 2
    got = (await stubs.types.GetExperienceType(pb.GetExperienceTypeRequest(name=created.name))).experience_type
    assert got.version == 2


async def test_list_versions_pages_newest_first(stubs):
    created = await _versioned(stubs, 5)
    seen, token = [], ""
    while True:
        page = await stubs.types.ListExperienceTypeVersions(
            pb.ListExperienceTypeVersionsRequest(name=created.name, page_size=2, page_token=token)
        )
        seen.extend(v.version for v in page.experience_type_versions)
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND"):
        await stubs.types.ListExperienceTypeVersions(pb.ListExperienceTypeVersionsRequest(name=unique()))


async def test_delete_refuses_while_experiences_exist_unless_forced(stubs):
    created = await create(stubs)
    experience = (
        await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=created.name))
    ).experience
    async with raises(grpc.StatusCode.FAILED_PRECONDITION, "EXPERIENCE_TYPE_IN_USE") as error:
        await stubs.types.DeleteExperienceType(pb.DeleteExperienceTypeRequest(name=created.name))
    assert "force" in error.message
    still = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience.experience_id))
    assert still.experience.experience_id == experience.experience_id

    response = await stubs.types.DeleteExperienceType(pb.DeleteExperienceTypeRequest(name=created.name, force=True))
    assert response.deleted_experience_count == 1
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND"):
        await stubs.types.GetExperienceType(pb.GetExperienceTypeRequest(name=created.name))
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_NOT_FOUND"):
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience.experience_id))


async def test_delete_unused_type_and_recreate_starts_at_version_1(stubs):
    created = await _versioned(stubs, 2)
    response = await stubs.types.DeleteExperienceType(pb.DeleteExperienceTypeRequest(name=created.name))
    assert response.deleted_experience_count == 0
    again = await create(stubs, created.name)
    assert again.version == 1
    async with raises(grpc.StatusCode.NOT_FOUND, "EXPERIENCE_TYPE_NOT_FOUND"):
        await stubs.types.DeleteExperienceType(pb.DeleteExperienceTypeRequest(name=unique()))

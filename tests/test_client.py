"""The Python client over the wire: the seed's scenario, the experience context, errors."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from tally_client import AsyncTallyClient, InvalidArgument, NotFound, TallyClient, create_metadata, dollars
from tally_client.client import usage_event

from .conftest import unique


def seed_scenario(target: str, name: str) -> list:
    """The seed's story with the Python client: one experience per document."""
    with TallyClient(target) as tally:
        tally.create_experience_type(name, "Summarize one uploaded document")
        costs = []
        for document in ("q3-report.pdf", "contract.docx"):
            with tally.experience(name) as run:
                tally.ingest("system.openai", "gpt-4o", {"text": (1000, 100)}, properties={"document": document})
                tally.ingest("system.openai", "gpt-4o", {"text": (2000, 300)})
            costs.append(tally.get_experience(run.experience_id).stats.cost_total)
        return costs


async def test_the_seed_scenario_in_a_few_lines(stubs):
    costs = await asyncio.to_thread(seed_scenario, stubs.target, unique("Document_Summarization"))
    # (1,000 + 2,000) x $2.50/M + (100 + 300) x $10/M = $0.0075 + $0.004
    assert [dollars(c) for c in costs] == [Decimal("0.0115"), Decimal("0.0115")]


def _count_lines_of_seed_scenario() -> int:
    import inspect

    body = inspect.getsource(seed_scenario).splitlines()[2:]  # without the signature and docstring
    return len([line for line in body if line.strip()])


def test_the_seed_scenario_takes_at_most_15_lines():
    assert _count_lines_of_seed_scenario() <= 15


async def test_async_context_sends_one_experience_even_when_calls_race(stubs):
    name = unique("Chatbot")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "One conversation")
        with tally.experience(name, user_id="alice", tags=["beta"]) as run:
            responses = await asyncio.gather(
                *(tally.ingest("system.anthropic", "claude-sonnet-4-5", {"text": (100, 10)}) for _ in range(10))
            )
        ids = {r.xproxy_result.experience_id for r in responses}
        assert ids == {run.experience_id}
        assert sum(r.xproxy_result.experience_created for r in responses) == 1
        assert {r.xproxy_result.user_id for r in responses} == {"alice"}
        experience = await tally.get_experience(run.experience_id)
        assert experience.stats.event_count == 10
        page = await tally.list_experiences(name)
        assert [e.experience_id for e in page.experiences] == [run.experience_id]


async def test_errors_decode_into_exceptions(stubs):
    async with AsyncTallyClient(stubs.target) as tally:
        with pytest.raises(NotFound) as not_found:
            await tally.get_experience_type(unique("missing"))
        assert not_found.value.reason == "EXPERIENCE_TYPE_NOT_FOUND"
        assert not_found.value.code.name == "NOT_FOUND"
        with pytest.raises(InvalidArgument) as invalid:
            await tally.ingest(usage_event("", "gpt-4o", {"text": (-1, 0)}))
        assert set(invalid.value.field_violations) == {"event.category", "event.units['text'].input"}
        assert invalid.value.request_id, "the request id of the failed call, for the server log"


def test_create_metadata_names_every_key_and_leaves_out_what_is_unset():
    assert create_metadata() == ()
    assert create_metadata(
        experience_id="0b6a8f0e-3c4d-4e5f-8a9b-1c2d3e4f5a6b",
        experience_name="Document_Summarization",
        experience_version=2,
        user_id="alice",
        request_tags=["beta", "eu-west"],
    ) == (
        ("xproxy-experience-id", "0b6a8f0e-3c4d-4e5f-8a9b-1c2d3e4f5a6b"),
        ("xproxy-experience-name", "Document_Summarization"),
        ("xproxy-experience-version", "2"),
        ("xproxy-user-id", "alice"),
        ("xproxy-request-tags", "beta,eu-west"),
    )
    with pytest.raises(ValueError, match="commas"):
        create_metadata(request_tags=["a,b"])


async def test_every_call_has_a_deadline(stubs, monkeypatch):
    from tally_client import TallyError
    from tally_server.services.experience_types import ExperienceTypes

    async def slow(self, name):
        await asyncio.sleep(1)

    monkeypatch.setattr(ExperienceTypes, "get", slow)
    async with AsyncTallyClient(stubs.target, timeout=0.2) as tally:
        with pytest.raises(TallyError) as error:
            await tally.get_experience_type("anything")
    assert error.value.code.name == "DEADLINE_EXCEEDED"


async def test_reads_are_retried_on_unavailable_and_writes_are_not(stubs, monkeypatch):
    from tally_client import Unavailable
    from tally_server.domain.errors import Code, TallyError as ServerError
    from tally_server.services.experience_types import ExperienceTypes

    name = unique("Retry")
    original_get = ExperienceTypes.get
    calls = {"get": 0, "create": 0}

    async def flaky_get(self, type_name):
        calls["get"] += 1
        if calls["get"] <= 2:
            raise ServerError(Code.UNAVAILABLE, "TRY_AGAIN", "briefly unavailable")
        return await original_get(self, type_name)

    async def unavailable_create(self, *args, **kwargs):
        calls["create"] += 1
        raise ServerError(Code.UNAVAILABLE, "TRY_AGAIN", "briefly unavailable")

    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "retries")
        monkeypatch.setattr(ExperienceTypes, "get", flaky_get)
        monkeypatch.setattr(ExperienceTypes, "create", unavailable_create)
        got = await tally.get_experience_type(name)
        assert got.name == name and calls["get"] == 3, "two UNAVAILABLE answers, retried by the channel"
        with pytest.raises(Unavailable):
            await tally.create_experience_type(unique("Retry"), "not retried")
        assert calls["create"] == 1


async def test_async_stream_with_metadata(stubs):
    name = unique("Streamed")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "streamed events")
        events = [usage_event("system.openai", "gpt-4o", {"text": (100 * n, 0)}) for n in range(1, 6)]
        answers = [a async for a in tally.ingest_stream(events, metadata=create_metadata(experience_name=name))]
    assert [a.position for a in answers] == [0, 1, 2, 3, 4]
    assert len({a.result.xproxy_result.experience_id for a in answers}) == 5, "a name alone: a new experience each"

"""Annotations through the wire, on both engines: a stored event is annotated after the
fact, found by its request id or the provider's response id; annotations are kept with who
and when, read back with the event, never part of its content and never a cost; bad
requests change nothing."""

from __future__ import annotations

import uuid

import pytest

from tally_client import AsyncTallyClient, FailedPrecondition, InvalidArgument, NotFound, usage_event

from .conftest import unique


def notes(stored) -> dict[str, str]:
    return {a.key: a.value for a in stored.annotations}


async def test_an_event_is_annotated_later_and_stays_what_it_was(stubs):
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    async with AsyncTallyClient(stubs.target) as tally:
        event = usage_event("system.openai", "gpt-4o", {"text": (1000, 100)}, provider_response_id=response_id)
        first = await tally.ingest(event)
        stored = await tally.annotate_event(first.request_id, set_annotations={"rating": "5", "ticket": "T-1"})
        assert notes(stored) == {"rating": "5", "ticket": "T-1"}
        assert all(a.key_name == "" and a.update_time.seconds > 0 for a in stored.annotations)
        assert stored.xproxy_result.cost_total == first.xproxy_result.cost_total
        again = await tally.annotate_event(
            provider_response_id=response_id, set_annotations={"rating": "4"}, remove_keys=["ticket"]
        )
        assert notes(again) == {"rating": "4"}
        assert notes(await tally.get_event(first.request_id)) == {"rating": "4"}
        listed = await tally.list_events(page_size=50)
        assert notes(next(e for e in listed.events if e.request_id == first.request_id)) == {"rating": "4"}
        # Not content: the same event sent again is its duplicate, its cost as it was.
        repeat = await tally.ingest(
            usage_event("system.openai", "gpt-4o", {"text": (1000, 100)}, provider_response_id=response_id)
        )
        assert repeat.xproxy_result.duplicate_request and repeat.request_id == first.request_id


async def test_bad_annotations_change_nothing(stubs):
    name = unique("Noted")
    shared = f"resp-{uuid.uuid4().hex}"
    async with AsyncTallyClient(stubs.target) as tally:
        sent = usage_event("system.openai", "gpt-4o", {"text": (10, 1)}, provider_response_id=shared)
        first = await tally.ingest(sent)
        await tally.annotate_event(first.request_id, set_annotations={"team": name})
        for kwargs, field, said in (
            ({"set_annotations": {"units": "0"}}, "set_annotations['units']", "never change a cost"),
            ({"set_annotations": {"cost_total": "0"}}, "set_annotations['cost_total']", "never change a cost"),
            ({"set_annotations": {"a": "1"}, "remove_keys": ["a"]}, "remove_keys", "both set and removed"),
            ({}, "set_annotations", "nothing to do"),
            ({"set_annotations": {f"k{i}": "v" for i in range(64)}}, "set_annotations", "at most 64"),
        ):
            with pytest.raises(InvalidArgument) as refused:
                await tally.annotate_event(first.request_id, **kwargs)
            assert said in refused.value.field_violations[field], (kwargs, refused.value.field_violations)
        assert notes(await tally.get_event(first.request_id)) == {"team": name}, "nothing changed"
        with pytest.raises(NotFound):
            await tally.annotate_event(str(uuid.uuid4()), set_annotations={"a": "1"})
        with pytest.raises(NotFound):
            await tally.annotate_event(provider_response_id="nobody-sent-this", set_annotations={"a": "1"})
        # Two events carry one response id (each sent with its own idempotency key): ambiguous.
        second = usage_event("system.openai", "gpt-4o", {"text": (20, 2)}, provider_response_id=shared)
        second.idempotency_key = f"own-{uuid.uuid4()}"
        await tally.ingest(second)
        with pytest.raises(FailedPrecondition) as refused:
            await tally.annotate_event(provider_response_id=shared, set_annotations={"a": "1"})
        assert refused.value.reason == "EVENT_AMBIGUOUS"
        with pytest.raises(ValueError, match="request_id or a provider_response_id"):
            await tally.annotate_event(set_annotations={"a": "1"})

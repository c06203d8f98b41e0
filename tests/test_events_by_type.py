"""ListEvents of a type, newest first, on both databases: on SQLite a type that holds most
events is found by a bounded scan of the newest events (storage.events.TYPE_SCAN), a rare
one through its experiences; either way, and across pages that cross from one way to the
other, the answer is every event of the type (and version) exactly once, newest first."""

from __future__ import annotations

import random
import time

from tally.v1 import (
    event_service_pb2 as ev_pb,
    event_service_pb2_grpc as ev_grpc,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
)
from tally_server.storage.events import TYPE_SCAN

from .conftest import unique


async def test_a_types_events_are_every_one_newest_first_common_or_rare(stubs):
    common, rare, rarest = unique("Common"), unique("Rare"), unique("Rarest")
    for name in (common, rare, rarest):
        created = et_pb.ExperienceType(name=name, description=name)
        await stubs.types.CreateExperienceType(et_pb.CreateExperienceTypeRequest(experience_type=created))
    await stubs.types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=rare))
    rng = random.Random(7)
    now = int(time.time()) - 3_600
    sent: dict[tuple[str, int], list[str]] = {}
    events = []
    for index in range(TYPE_SCAN + 700):  # the rare type's events spread among the common's
        name, version = (rare, rng.choice([1, 2])) if rng.random() < 0.02 else (common, 1)
        if index % 900 == 899:  # three, fewer than a page among any TYPE_SCAN: read the type's way
            name, version = rarest, 1
        event = pb.UsageEvent(
            category="system.openai",
            resource="gpt-4o",
            units={"text": pb.UnitCounts(input=10)},
            idempotency_key=f"{common}-{index}",
            context=pb.EventContext(experience_name=name, experience_version=version),
        )
        event.event_timestamp.seconds = now - rng.randrange(3_000)  # some share a second
        if name == rarest:  # older than any TYPE_SCAN newest: the scan finds none of them
            event.event_timestamp.seconds = now - 3_000 - index
        events.append(event)
    for start in range(0, len(events), 1000):
        answer = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=events[start : start + 1000]))
        assert answer.accepted_count == len(answer.items)
        for item in answer.items:
            event = events[start + item.index]
            key = (event.context.experience_name, event.context.experience_version)
            sent.setdefault(key, []).append(item.result.xproxy_result.request_id)
    client = ev_grpc.EventServiceStub(stubs.channel)
    cases = ((common, 0, 700), (rare, 0, 7), (rare, 2, 5), (common, 1, 1000), (rarest, 0, 5), (rarest, 1, 2))
    for name, version, page_size in cases:
        expected = [i for (n, v), ids in sent.items() if n == name and version in (0, v) for i in ids]
        listed, token, pages = [], "", 0
        while True:
            request = ev_pb.ListEventsRequest(
                experience_name=name, experience_version=version, page_size=page_size, page_token=token
            )
            page = await client.ListEvents(request)
            listed += list(page.events)
            pages += 1
            if not (token := page.next_page_token):
                break
        assert sorted(e.request_id for e in listed) == sorted(expected), (name, version)
        times = [(e.event.event_timestamp.seconds, e.request_id) for e in listed]
        assert times == sorted(times, reverse=True), (name, version)
        assert pages >= len(expected) // page_size

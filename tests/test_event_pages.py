"""An experience's events page newest first, by event time then request id, through ties of
event time (its index orders by time alone since migration 0016: the sort after it puts
ties in id order). Both engines, through the wire."""

from __future__ import annotations

import datetime
import uuid

from tally_client import AsyncTallyClient, EventFilter, usage_event

from .conftest import unique


async def test_an_experiences_events_page_through_ties_of_event_time(stubs):
    async with AsyncTallyClient(stubs.target) as client:
        name = unique("Paged")
        await client.create_experience_type(name, "ties of event time")
        run = str(uuid.uuid4())
        events = []
        for i in range(120):  # three distinct times, forty events each
            event = usage_event(
                "system.openai",
                "gpt-4o",
                {"text": (100 + i, 10)},
                event_time=datetime.datetime.fromtimestamp(1_760_000_000 + (i % 3) * 60, datetime.UTC),
            )
            event.context.experience_id, event.context.experience_name = run, name
            events.append(event)
        await client.ingest_batch(events)
        other = usage_event("system.openai", "gpt-4o", {"text": (1, 1)})  # another run's, same hour
        other.context.experience_name = name
        await client.ingest(other)

        listed, token = [], ""
        while True:
            page = await client.list_events(EventFilter(experience_id=run), page_size=7, page_token=token)
            listed.extend((e.event.event_timestamp.seconds, uuid.UUID(e.request_id)) for e in page.events)
            if not (token := page.next_page_token):
                break
        assert len(listed) == 120 and len(set(listed)) == 120
        assert listed == sorted(listed, reverse=True)

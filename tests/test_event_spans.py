"""A page of events of a model, provider or tag (which no index finds) is read only in the
newest hours the rollups say hold it (reports.spans_holding): the pages are those of every
event of the filter, newest first, for rare and common filters, whole and partial windows,
a cost state, after a prune (the rollups still count the pruned events) and after an
erasure (they count the erased user's events under the tag: the hours hold fewer events
than counted, and the rest of the window must follow). Both engines, through the wire."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tally.v1 import ingest_service_pb2 as ing_pb
from tally_client import AsyncTallyClient, EventFilter, usage_event
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import drop_database_url, make_database_url

NOW = int(time.time()) // 3_600 * 3_600 - 1_800  # half past an hour, in the past
START = NOW - 4 * 86_400
ERASED = "erased-5e2"


def _sent() -> list[dict[str, Any]]:
    """What each event is: its time, provider, model, user and tags (1,200 over four days,
    a few of each rare kind spread over them)."""
    sent = []
    for i in range(1_200):
        category, model = "system.openai", "gpt-4o"
        if i % 251 == 7:
            model = "gtp-4o"  # misspelt: never priced
        elif i % 197 == 3:
            category, model = "system.anthropic", "claude-3-5-sonnet-latest"
        tags = ["red"] if i % 3 else []
        if i % 233 == 11:
            tags.append("rare")
        user = ERASED if i > 900 and i % 2 else f"user-{i % 5}"  # half of the newest quarter
        sent.append({"at": START + i * 283 + i % 7, "category": category, "model": model, "user": user, "tags": tags})
    return sent


@pytest.fixture
async def served(backend: str, tmp_path: Any) -> AsyncIterator[tuple[AsyncTallyClient, list[dict[str, Any]]]]:
    url = await make_database_url(backend, tmp_path)
    tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
    await tally.start()
    try:
        async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
            await client.create_experience_type("Spans", "spans")
            sent = _sent()
            batch = []
            for s in sent:
                event = usage_event(
                    s["category"],
                    s["model"],
                    {"text": (1_000, 100)},
                    event_time=datetime.datetime.fromtimestamp(s["at"], datetime.UTC),
                )
                event.context.experience_name = "Spans"
                event.context.user_id = s["user"]
                event.context.request_tags.extend(s["tags"])
                batch.append(event)
            for first in range(0, len(batch), 500):
                answer = await client.ingest_batch(batch[first : first + 500])
                for item in answer.items:
                    sent[first + item.index]["id"] = item.result.request_id
            yield client, sent
    finally:
        await tally.stop()
        await drop_database_url(url)


def _at(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


CASES: list[tuple[str, dict[str, Any], int]] = [
    ("a misspelt model", {"model": "gtp-4o"}, 2),
    ("a rare provider", {"category": "system.anthropic"}, 2),
    ("a rare tag", {"request_tag": "rare"}, 2),
    ("a common model", {"model": "gpt-4o"}, 100),
    ("a common tag", {"request_tag": "red"}, 100),
    ("a model and a tag", {"model": "gpt-4o", "request_tag": "red"}, 100),
    ("a rare model and a tag", {"model": "gtp-4o", "request_tag": "red"}, 1),
    ("a misspelt model, not priced", {"model": "gtp-4o", "cost_state": ing_pb.COST_STATE_UNPRICED}, 2),
    ("a model of the type", {"model": "gtp-4o", "experience_name": "Spans"}, 2),
    (
        "a common model, partial hours",
        {"model": "gpt-4o", "start": _at(START + 86_400 + 1_234), "end": _at(NOW - 86_400 + 77)},
        60,
    ),
    ("a rare tag, partial hours", {"request_tag": "rare", "start": _at(START + 1_000), "end": _at(NOW - 3_333)}, 1),
]


def _expected(sent: list[dict[str, Any]], filters: dict[str, Any], gone: set[str]) -> list[str]:
    start = filters.get("start", _at(0)).timestamp()
    end = filters.get("end", _at(2**33)).timestamp()
    chosen = [
        s
        for s in sent
        if s["id"] not in gone
        and start <= s["at"] < end
        and s["model"] == filters.get("model", s["model"])
        and s["category"] == filters.get("category", s["category"])
        and (not filters.get("request_tag") or filters["request_tag"] in s["tags"])
    ]
    chosen.sort(key=lambda s: (s["at"], s["id"]), reverse=True)
    return [s["id"] for s in chosen]


async def _listed(client: AsyncTallyClient, filters: dict[str, Any], page_size: int) -> list[str]:
    found, token = [], ""
    while True:
        page = await client.list_events(EventFilter(**filters), page_size=page_size, page_token=token)
        found += [e.request_id for e in page.events]
        if not (token := page.next_page_token):
            return found


async def test_pages_of_a_model_provider_or_tag_are_every_event_of_it_newest_first(served):
    client, sent = served
    for label, filters, page_size in CASES:
        expected = _expected(sent, filters, set())
        assert expected, label
        assert await _listed(client, filters, page_size) == expected, label
    # The erased user's events are gone, and still counted under their tags and models: the
    # hours the rollups name hold fewer than they say.
    erased = {s["id"] for s in sent if s["user"] == ERASED}
    assert (await client.erase_user(ERASED)).deleted_event_count == len(erased) > 5
    # Pruned: every event of about the first day is gone (before the hour the prune says),
    # and still counted.
    pruned = await client.prune_events(_at(START + 86_400))
    gone = erased | {s["id"] for s in sent if s["at"] < pruned.before_time.seconds}
    assert pruned.deleted_event_count == len(gone - erased)
    for label, filters, page_size in CASES:
        assert await _listed(client, filters, page_size) == _expected(sent, filters, gone), f"{label}, after"

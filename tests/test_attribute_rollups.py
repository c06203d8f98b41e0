"""The hourly rollup by user and by request tag (migration 0014): the cost breakdown by user
or tag reads it instead of the events, and answers what the events answer, as the writer
keeps it, as 0014 builds it from events stored before it, and after deletions move events
out of their type. Both engines, through the wire."""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from alembic import command

from tally_client import AsyncTallyClient, usage_event
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.storage.db import Database, alembic_config

from .conftest import drop_database_url, make_database_url

BASE = 1_749_945_600  # a UTC day's start
MODELS = ("gpt-4o", "claude-sonnet-4-0", "made-up-model")  # the last is never priced
USERS = ("", "ann", "bob", "carl")
TAGS: tuple[tuple[str, ...], ...] = ((), ("red",), ("red", "blue"), ("blue",), ("green", "red", "green"))


def _seed_events() -> list[Any]:
    events = []
    for i in range(60):
        units = {"text": (1_000 + 37 * i, 5 * i)}
        if i == 11:  # a costly one: its cost's nanos carry over in the sums
            units["text"] = (2_999_999_999, 1_500_000_001)
        event = usage_event(
            "system.openai" if i % 3 != 1 else "system.anthropic",
            MODELS[i % 3],
            units,
            event_time=datetime.datetime.fromtimestamp(BASE + i * 4_000 + 7, datetime.UTC),  # 2.8 days
            http_status_code=500 if i % 13 == 0 else 200,
        )
        if i % 4:  # every fourth unattributed
            event.context.experience_name = f"Attr{i % 2}"
        event.context.user_id = USERS[i % 4]
        event.context.request_tags.extend(TAGS[i % 5])
        event.context.step = ("", "plan", "write")[i % 3]
        events.append(event)
    return events


def _groups(groups: Iterable[Any], *names: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Each group's sums by the fields named, summed over any other field (in Python)."""
    found: dict[tuple[Any, ...], list[int]] = {}
    for g in groups:
        key = tuple(getattr(g, name) for name in names)
        key = tuple(k.seconds if hasattr(k, "seconds") else k for k in key)
        sums = found.setdefault(key, [0] * 6)
        for i, value in enumerate(
            (
                g.event_count,
                g.unpriced_event_count,
                g.cost_total.units * 1_000_000_000 + g.cost_total.nanos,
                g.cost_input.units * 1_000_000_000 + g.cost_input.nanos,
                g.input_tokens,
                g.output_tokens,
            )
        ):
            sums[i] += value
    return {key: tuple(sums) for key, sums in found.items() if sums[0]}


def _window(start: int, end: int) -> dict[str, datetime.datetime]:
    return {
        "start": datetime.datetime.fromtimestamp(start, datetime.UTC),
        "end": datetime.datetime.fromtimestamp(end, datetime.UTC),
    }


async def _from_events(client: Any, dimensions: list[str], **kw: Any) -> list[Any]:
    """The groups of a breakdown with a provider or model (a dimension or a filter) as the
    events answer them: its window (the seed's days when unbounded) cut at each UTC noon, so
    that no piece holds a whole day, which is all the rollup per day and model answers (the
    hourly rollups keep no user, tag or key with a provider or model)."""
    start = kw.pop("start", None)
    end = kw.pop("end", None)
    first = int(start.timestamp()) if start else BASE - 86_400
    last = int(end.timestamp()) if end else BASE + 4 * 86_400
    cuts = [first, *range(first - first % 86_400 + 43_200, last, 86_400), last]
    groups: list[Any] = []
    for low, high in itertools.pairwise(cuts):
        if low < high:
            piece = await client.break_down_cost(dimensions, page_size=1000, **_window(low, high), **kw)
            groups.extend(piece.groups)
    return groups


async def _answers(client: AsyncTallyClient) -> dict[str, Any]:
    """The breakdowns the rollup answers, and the same sums read from events (a second
    dimension or a filter that no rollup keeps makes the breakdown read events)."""
    start = datetime.datetime.fromtimestamp(BASE, datetime.UTC)
    mid = datetime.datetime.fromtimestamp(BASE + 9_000 + 600, datetime.UTC)  # partial hours at both ends
    end = datetime.datetime.fromtimestamp(BASE + 60 * 4_000 - 3 * 3_600 - 600, datetime.UTC)
    # Partial days at both ends, their hours whole: days from the rows per day, the hours
    # at the edges from the rows per hour.
    day_edges = (BASE + 5 * 3_600, BASE + 2 * 86_400 + 7 * 3_600)
    hours_only = (BASE + 86_400 + 3_600, BASE + 86_400 + 9 * 3_600)  # within one day

    async def both(rollup: list[str], names: tuple[str, ...], **kw: Any) -> tuple[Any, Any]:
        from_rollup = _groups((await client.break_down_cost(rollup, page_size=1000, **kw)).groups, *names)
        from_events: list[Any] = []
        for model in MODELS:  # a model filter, and no whole day: read from events
            from_events += await _from_events(client, rollup, model=model, **kw)
        return from_rollup, _groups(from_events, *names)

    answers = {}
    for label, rollup, names, kw in (
        ("by user", ["user"], ("user_id",), {"start": start}),
        ("by tag", ["tag"], ("request_tag",), {"start": start}),
        ("by user, hour", ["user", "hour"], ("user_id", "period_start"), {"start": start}),
        ("by tag, type", ["tag", "type"], ("request_tag", "experience_name"), {"start": start}),
        ("by user, version", ["user", "version"], ("user_id", "experience_name", "experience_version"), {}),
        ("by user, partial hours", ["user"], ("user_id",), {"start": mid, "end": end}),
        ("by tag, partial days", ["tag"], ("request_tag",), _window(*day_edges)),
        ("by user, type, partial days", ["user", "type"], ("user_id", "experience_name"), _window(*day_edges)),
        ("by user, within a day", ["user"], ("user_id",), _window(*hours_only)),
        ("by day, of one tag, partial days", ["day"], ("period_start",), {**_window(*day_edges), "request_tag": "red"}),
        ("by day, of one user", ["day"], ("period_start",), {"start": start, "user_id": "ann"}),
        ("by type, of one tag", ["type"], ("experience_name",), {"start": start, "request_tag": "red"}),
        ("by tag, of one type", ["tag"], ("request_tag",), {"experience_name": "Attr1"}),
        # A tag's events by user, or one user's of a tag: the rollup of each tag's events
        # per day (migration 0022) for whole days, the events for the rest.
        ("by user, of one tag", ["user"], ("user_id",), {"start": start, "request_tag": "red"}),
        (
            "by user, version, of one tag, partial days",
            ["user", "version"],
            ("user_id", "experience_name", "experience_version"),
            {**_window(*day_edges), "request_tag": "green"},
        ),
        ("by day, of one user and tag", ["day"], ("period_start",), {"user_id": "ann", "request_tag": "red"}),
        (
            "by version, of one user and tag",
            ["version"],
            ("experience_name", "experience_version"),
            {"user_id": "carl", "request_tag": "blue"},
        ),
        # One user's events by tag (its untagged ones under ""), or the events by tag and
        # key: the same rollup (its rows of no tag since 0023).
        ("by tag, of one user", ["tag"], ("request_tag",), {"start": start, "user_id": "ann"}),
        (
            "by tag, version, of one user, partial days",
            ["tag", "version"],
            ("request_tag", "experience_name", "experience_version"),
            {**_window(*day_edges), "user_id": "carl"},
        ),
        ("by tag, day, of one user", ["tag", "day"], ("request_tag", "period_start"), {"user_id": "bob"}),
        ("by tag, user", ["tag", "user"], ("request_tag", "user_id"), {"start": start}),
        (
            "by type, of one user and tag, in a day",
            ["type"],
            ("experience_name",),
            {**_window(*hours_only), "user_id": "bob", "request_tag": "red"},
        ),
    ):
        from_rollup, from_events = await both(rollup, names, **kw)
        assert from_rollup == from_events, label
        assert from_rollup, label
        answers[label] = from_rollup
    # One of user, tag and key beside a provider or model: the rollup per day and model
    # (migration 0021) for whole days, the events for the rest.
    for label, dimensions, names, kw in (
        ("by user, of one model", ["user"], ("user_id",), {"start": start, "model": "gpt-4o"}),
        # Bounded windows of whole days kept to a model: their days read one by one (at most
        # SEEKED_DAYS of them; past that, as a range).
        (
            "by user, of one model, whole days",
            ["user"],
            ("user_id",),
            {**_window(BASE, BASE + 3 * 86_400), "model": "gpt-4o"},
        ),
        ("by tag, of one model, partial days", ["tag"], ("request_tag",), {**_window(*day_edges), "model": "gpt-4o"}),
        (
            "by key, version, of one model, 400 days",
            ["key", "version"],
            ("api_key_name", "experience_name", "experience_version"),
            {**_window(BASE - 397 * 86_400, BASE + 3 * 86_400), "model": "claude-sonnet-4-0"},
        ),
        ("by tag, model", ["tag", "model"], ("request_tag", "model"), {}),
        ("by user, provider, partial days", ["user", "category"], ("user_id", "category"), _window(*day_edges)),
        (
            "by day, of one user and provider",
            ["day"],
            ("period_start",),
            {"user_id": "ann", "category": "system.openai"},
        ),
        ("by model, of one tag", ["model"], ("model",), {"start": start, "request_tag": "red"}),
        (
            "by version, of one user and model",
            ["version"],
            ("experience_name", "experience_version"),
            {"user_id": "bob", "model": "made-up-model"},
        ),
        (
            "by type, of one tag and model, in a day",
            ["type"],
            ("experience_name",),
            {**_window(*hours_only), "request_tag": "red", "model": "gpt-4o"},
        ),
    ):
        from_rollup = _groups((await client.break_down_cost(dimensions, page_size=1000, **kw)).groups, *names)
        assert from_rollup == _groups(await _from_events(client, dimensions, **kw), *names), label
        assert from_rollup, label
        answers[label] = from_rollup
    return answers


async def test_the_breakdown_by_user_and_tag_reads_a_rollup_equal_to_the_events(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)

    async def answers(seed: bool = False, delete: bool = False) -> dict[str, Any]:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                if seed:
                    for name in ("Attr0", "Attr1"):
                        await client.create_experience_type(name, "attributes")
                    for event in _seed_events():
                        await client.ingest(event)
                    # Then each again twice in one batch, a second and two later: one commit
                    # whose events share their groups in pairs (the writer sums them by the
                    # groups they share before it adds them to the rollups).
                    pairs = []
                    for event in _seed_events():
                        for later in (1, 2):
                            copy = type(event)()
                            copy.CopyFrom(event)
                            copy.event_timestamp.seconds += later
                            pairs.append(copy)
                    batch = await client.ingest_batch(pairs)
                    assert batch.accepted_count == len(pairs) == 120
                if delete:  # its events move to the unattributed rows
                    await client.delete_experience_type("Attr0", force=True)
                    runs = (await client.list_experiences("Attr1", page_size=10)).experiences
                    await client.delete_experience(runs[0].experience_id)
                return await _answers(client)
        finally:
            await tally.stop()

    try:
        kept = await answers(seed=True)
        # An event counts once under each tag it has, however often it repeats one (as the
        # filter of a tag counts it).
        assert kept["by tag"][("green",)][0] == 3 * len(range(4, 60, 5))
        assert kept["by tag"][("",)][0] == 3 * len(range(0, 60, 5))
        database = Database(url)
        try:  # back to 0023 (the rollup per day and model keyed by user before model) and up
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0023"))
            await database.migrate()
        finally:
            await database.dispose()
        assert await answers() == kept
        database = Database(url)
        try:  # back to 0013, the rollup gone; 0014 builds it from the events
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0013"))
                assert "attribute_rollups" not in await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            await database.migrate()
        finally:
            await database.dispose()
        assert await answers() == kept
        moved = await answers(delete=True)
        assert ("Attr0",) not in {key[1:] for key in moved["by tag, type"]}
        assert moved["by user"] == kept["by user"]
    finally:
        await drop_database_url(url)


async def test_the_breakdown_by_api_key_reads_the_rollup_and_keeps_it_past_a_prune(backend, tmp_path):
    """Events sent by two API keys (and the breakdown by key, alone and with the type or the
    day, over whole and partial windows) answer what the same events answer; 0019 builds the
    key rows from events stored before it; deleting a type moves its sums to the
    unattributed rows; after every event is pruned the breakdown by key answers the same (it
    reads the rollup, not the events)."""
    url = await make_database_url(backend, tmp_path)
    start = datetime.datetime.fromtimestamp(BASE, datetime.UTC)
    day_edges = _window(BASE + 5 * 3_600, BASE + 2 * 86_400 + 7 * 3_600)
    cases = (
        ("by key", ["key"], ("api_key_name",), {"start": start}),
        ("by key, type", ["key", "type"], ("api_key_name", "experience_name"), {"start": start}),
        ("by key, day, partial days", ["key", "day"], ("api_key_name", "period_start"), day_edges),
        ("by key, of one type", ["key"], ("api_key_name",), {"start": start, "experience_name": "Attr1"}),
        ("by key, model", ["key", "model"], ("api_key_name", "model"), {"start": start}),
        ("by key, of one provider", ["key"], ("api_key_name",), {"start": start, "category": "system.anthropic"}),
        ("by key, type, of one tag", ["key", "type"], ("api_key_name", "experience_name"), {"request_tag": "red"}),
        ("by tag, key", ["tag", "key"], ("request_tag", "api_key_name"), {}),  # untagged ones under ""
        (
            "by key, day, of one tag",  # whole days: the partial ones read events, gone once pruned
            ["key", "day"],
            ("api_key_name", "period_start"),
            {**_window(BASE, BASE + 3 * 86_400), "request_tag": "blue"},
        ),
    )
    secrets: dict[str, str] = {}

    async def answers(seed: bool = False, delete: bool = False, prune: bool = False) -> dict[str, Any]:
        settings = Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required")
        tally = TallyServer(settings)
        await tally.start()
        try:
            address = f"127.0.0.1:{tally.port}"
            if seed:
                for name, scope in (("admin", "admin"), ("svc-a", "ingest"), ("svc-b", "ingest")):
                    _, secrets[name] = await tally.keys.create(name, [scope])
            async with AsyncTallyClient(address, api_key=secrets["admin"]) as admin:
                if seed:
                    for name in ("Attr0", "Attr1"):
                        await admin.create_experience_type(name, "attributes")
                    async with (
                        AsyncTallyClient(address, api_key=secrets["svc-a"]) as a,
                        AsyncTallyClient(address, api_key=secrets["svc-b"]) as b,
                    ):
                        for i, event in enumerate(_seed_events()):
                            await (a if i % 3 else b).ingest(event)
                if delete:  # its events move to the unattributed rows, by key as by type
                    await admin.delete_experience_type("Attr0", force=True)
                if prune:
                    pruned = await admin.prune_events(datetime.datetime.now(datetime.UTC), max_events=1_000)
                    assert pruned.deleted_event_count == 60 and (await admin.list_events(page_size=10)).events == []
                found = {}
                for label, dimensions, names, kw in cases:
                    rollup = (await admin.break_down_cost(dimensions, page_size=1000, **kw)).groups
                    found[label] = _groups(rollup, *names)
                    if not prune:  # the same sums read from events (a model filter, no whole day)
                        from_events: list[Any] = []
                        for model in MODELS:
                            from_events += await _from_events(admin, dimensions, model=model, **kw)
                        assert found[label] == _groups(from_events, *names), label
                    assert found[label], label
                return found
        finally:
            await tally.stop()

    try:
        kept = await answers(seed=True)
        assert {key[0] for key in kept["by key"]} == {"svc-a", "svc-b"}
        assert kept["by key"][("svc-b",)][0] == len(range(0, 60, 3))
        database = Database(url)
        try:  # back to 0018, the key rows gone; 0019 builds them from the events
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0018"))
                rows = await conn.exec_driver_sql("SELECT COUNT(*) FROM attribute_rollups WHERE dimension IN (5, 7)")
                assert rows.scalar_one() == 0
            await database.migrate()
        finally:
            await database.dispose()
        assert await answers() == kept
        moved = await answers(delete=True)
        assert ("svc-a", "Attr0") in kept["by key, type"] and ("svc-a", "Attr0") not in moved["by key, type"]
        assert moved["by key"] == kept["by key"]
        assert await answers(prune=True) == moved
    finally:
        await drop_database_url(url)

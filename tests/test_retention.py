"""Retention and erasure through the wire, on both engines: pruned events are gone while
every statistic, rollup and limit figure stays as it was, ingest keeps answering while a
prune runs, and an erased user is named by no row of any table."""

from __future__ import annotations

import asyncio
import datetime
import json
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.json_format import MessageToDict
from sqlalchemy.ext.asyncio import create_async_engine

from tally.v1 import common_pb2, limit_service_pb2 as lim_pb
from tally_client import AsyncTallyClient, EventFilter, TallyError, usage_event
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.services.retention import Retention
from tally_server.storage.db import Database
from tally_server.storage.partitions import DENSE_WEEK_EVENTS, name_of as partition_name, week_of

from .conftest import drop_database_url, make_database_url
from .test_cli import tally as tally_cli

HOUR = 3_600
NOW = int(time.time())
OLD_START = NOW - 10 * 86_400  # the old events: ten to five days ago
CUTOFF = (NOW - 3 * 86_400) // HOUR * HOUR  # a whole hour between the old and the new
TYPE = "Retained"
ERASED = "erase-me-5c2e9"  # found in no row once erased


def _event(at: int, user: str, tags: tuple[str, ...], typed: bool = True, **kw: Any) -> Any:
    event = usage_event(
        "system.openai",
        "gpt-4o" if at % 2 else "gpt-4o-mini",
        {"text": (1_000 + at % 977, 200 + at % 101)},
        event_time=datetime.datetime.fromtimestamp(at, datetime.UTC),
        **kw,
    )
    if typed:
        event.context.experience_name = TYPE
    event.context.user_id = user
    event.context.request_tags.extend(tags)
    return event


def _limit(name: str, **scope: Any) -> lim_pb.Limit:
    return lim_pb.Limit(
        name=name,
        max=common_pb2.Money(currency_code="USD", units=1_000),
        kind=lim_pb.LIMIT_KIND_ALLOW,
        period=lim_pb.LIMIT_PERIOD_LIFETIME,
        scope=lim_pb.LimitScope(**scope),
    )


@pytest.fixture
async def served(backend: str, tmp_path: Any) -> AsyncIterator[tuple[AsyncTallyClient, str, str]]:
    url = await make_database_url(backend, tmp_path)
    tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
    await tally.start()
    try:
        async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
            await client.create_experience_type(TYPE, "kept and pruned")
            for limit in (
                _limit("everything", everything=True),
                _limit("of-type", experience_type=TYPE),
                _limit("of-tag", request_tag="red"),
                _limit("of-ann", user_id="ann"),
            ):
                await client.create_limit(limit)
            yield client, f"127.0.0.1:{tally.port}", url
    finally:
        await tally.stop()
        await drop_database_url(url)


async def _figures(client: AsyncTallyClient) -> dict[str, Any]:
    """What ingest keeps: type statistics, runs' totals, breakdowns over all time (read
    from the rollups), and the limits' spend."""
    figures: dict[str, Any] = {
        "type": MessageToDict(await client.get_experience_type_stats(TYPE)),
        "runs": sorted(
            str(MessageToDict(run.stats)) for run in (await client.list_experiences(TYPE, page_size=1000)).experiences
        ),
    }
    for group_by in (["type", "day"], ["model", "hour"], ["user"], ["tag"], ["user", "day"], ["tag", "version"]):
        answer = await client.break_down_cost(group_by, page_size=1000)
        figures[" ".join(group_by)] = (MessageToDict(answer.total), sorted(map(str, map(MessageToDict, answer.groups))))
    for group_by in (["user"], ["version"]):  # of one tag: the rollup of each tag's events
        answer = await client.break_down_cost(group_by, page_size=1000, request_tag="red")
        figures[f"{' '.join(group_by)} of red"] = sorted(map(str, map(MessageToDict, answer.groups)))
    for group_by in (["tag"], ["tag", "version"]):  # of one user (untagged events under ""): the same rollup
        answer = await client.break_down_cost(group_by, page_size=1000, user_id="ann")
        figures[f"{' '.join(group_by)} of ann"] = sorted(map(str, map(MessageToDict, answer.groups)))
    for name in ("everything", "of-type", "of-tag"):
        figures[name] = MessageToDict((await client.get_limit(name)).current)
    return figures


async def _events_between(client: AsyncTallyClient, start: int, end: int) -> int:
    filters = EventFilter(
        start=datetime.datetime.fromtimestamp(start, datetime.UTC),
        end=datetime.datetime.fromtimestamp(end, datetime.UTC),
    )
    count, token = 0, ""
    while True:
        page = await client.list_events(filters, page_size=1000, page_token=token)
        count += len(page.events)
        if not (token := page.next_page_token):
            return count


async def test_a_prune_deletes_old_events_and_changes_no_figure(served):
    client, target, _ = served
    users, tags = ("ann", "bob", ""), (("red",), ("red", "blue"), ())
    old = [_event(OLD_START + i * 83, users[i % 3], tags[i % 3], typed=i % 4 != 0) for i in range(5_000)]
    new = [_event(CUTOFF + 600 + i * 60, users[i % 3], tags[i % 3], idempotency_key=f"new-{i}") for i in range(300)]
    for start in range(0, len(old), 1_000):
        await client.ingest_batch(old[start : start + 1_000])
    await client.ingest_batch(new)
    cutoff = datetime.datetime.fromtimestamp(CUTOFF, datetime.UTC)
    pruned_id = (await client.list_events(EventFilter(end=cutoff), page_size=1)).events[0].request_id
    before = await _figures(client)

    answer = await client.prune_events(cutoff + datetime.timedelta(seconds=59), max_events=3_000)
    assert (answer.deleted_event_count, answer.more) == (3_000, True)  # at most max_events a call
    assert answer.before_time.seconds == CUTOFF  # taken down to the hour
    answer = await client.prune_events(cutoff, max_events=3_000)
    assert (answer.deleted_event_count, answer.more) == (2_000, False)

    assert await _events_between(client, 0, CUTOFF) == 0
    assert await _events_between(client, CUTOFF, NOW + 86_400) == len(new)
    with pytest.raises(TallyError) as error:
        await client.get_event(pruned_id)
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert await _figures(client) == before

    # Again through the CLI, with a date: nothing more is older.
    code, out, err = await tally_cli(target, "events", "prune", "--before", cutoff.date().isoformat() + "T00:00Z")
    assert code == 0, err
    assert out.startswith("deleted 0 events before ") and "statistics and limits are unchanged" in out
    code, out, err = await tally_cli(target, "events", "prune", "--before", cutoff.isoformat(), "--json")
    assert code == 0, err
    assert json.loads(out) == {"deletedEventCount": 0, "beforeTime": cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")}
    for bad, field in (({"max_events": -1}, "max_events"), ({"max_events": 100_001}, "max_events")):
        with pytest.raises(TallyError) as error:
            await client.prune_events(cutoff, **bad)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in str(error.value)


async def test_ingest_keeps_answering_while_a_prune_runs(served, capsys):
    client, _, _ = served
    old = [_event(OLD_START + i * 21, "ann", ("red",)) for i in range(20_000)]
    for start in range(0, len(old), 1_000):
        await client.ingest_batch(old[start : start + 1_000])
    cutoff = datetime.datetime.fromtimestamp(CUTOFF, datetime.UTC)
    pruning = asyncio.create_task(client.prune_events(cutoff, max_events=100_000))
    latencies, during = [], 0
    while not pruning.done():  # one event at a time, each timed
        started = time.perf_counter()
        await client.ingest(_event(NOW - 60, "carol", ("late",), idempotency_key=f"during-{during}"))
        latencies.append((time.perf_counter() - started) * 1e3)
        during += 1
    answer = await pruning
    with capsys.disabled():
        print(
            f"\n  prune of 20,000 events: {during} ingests meanwhile, median {statistics.median(latencies):.1f} ms,"
            f" max {max(latencies):.1f} ms"
        )
    assert during >= 3, "the prune ran too fast to show ingest answering meanwhile"
    assert (answer.deleted_event_count, answer.more) == (20_000, False)
    assert await _events_between(client, 0, CUTOFF) == 0
    assert await _events_between(client, CUTOFF, NOW + 86_400) == during
    assert (await client.get_limit("of-ann")).current.event_count == 20_000  # the limit's figure stays


async def _rows_naming(url: str, text: str) -> list[str]:
    """Every row of every table whose values, as text, contain `text`."""
    engine = create_async_engine(url)
    found = []
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert "events" in names and "attribute_rollups" in names
            for name in names:
                for row in await conn.execute(sa.text(f'SELECT * FROM "{name}"')):
                    if any(text in str(value) for value in row):
                        found.append(f"{name}: {tuple(row)}")
    finally:
        await engine.dispose()
    return found


async def _reasons_per_dimension(url: str) -> dict[tuple[int, str], int]:
    """The rollup of reasons' events per dimension and reason."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            query = "SELECT dimension, reason, SUM(event_count) FROM unpriced_reason_days GROUP BY dimension, reason"
            return {(int(d), r): int(n) for d, r, n in await conn.execute(sa.text(query))}
    finally:
        await engine.dispose()


async def test_an_erased_user_is_named_by_no_row_and_every_total_stays(served):
    client, target, url = served
    await client.create_limit(_limit("of-erased", user_id=ERASED))
    users, tags = (ERASED, "ann", ERASED, ""), (("red",), ("blue",), (), ("red", "green"))
    sent = [_event(OLD_START + i * 97, users[i % 4], tags[i % 4], typed=i % 3 != 0) for i in range(5_000)]
    for misspelt in sent[::7]:  # not priced: counted in the rollup of reasons too
        misspelt.resource = "gtp-4o"
    for start in range(0, len(sent), 1_000):
        await client.ingest_batch(sent[start : start + 1_000])
    theirs = (await client.list_events(EventFilter(user_id=ERASED), page_size=1)).events[0].request_id
    await client.annotate_event(theirs, set_annotations={"reviewed": "yes"})
    named = await _rows_naming(url, ERASED)  # the check finds the user where they are
    assert any(row.startswith("unpriced_reason_days:") for row in named), named
    reasons_before = await _reasons_per_dimension(url)

    async def totals() -> dict[str, Any]:
        found: dict[str, Any] = {}
        for group_by in (["type", "day"], ["tag", "version"], ["model"]):
            answer = await client.break_down_cost(group_by, page_size=1000)
            found[" ".join(group_by)] = (
                MessageToDict(answer.total),
                sorted(map(str, map(MessageToDict, answer.groups))),
            )
        for label, kw in (("users", {}), ("users of red", {"request_tag": "red"})):
            by_user = await client.break_down_cost(["user"], page_size=1000, **kw)
            found[label] = {g.user_id: (g.event_count, g.cost_total.units, g.cost_total.nanos) for g in by_user.groups}
        for name in ("everything", "of-type", "of-tag", "of-ann"):
            found[name] = MessageToDict((await client.get_limit(name)).current)
        return found

    before = await totals()
    code, out, err = await tally_cli(target, "events", "erase", "--user", ERASED, "--batch", "1000")
    assert code == 0, err
    assert "deleted 2,000 events of the user so far" in err
    assert out.startswith(f"erased user {ERASED!r}: 2,500 events deleted, ") and "limits deleted: of-erased" in out
    assert await _rows_naming(url, ERASED) == []
    assert await _reasons_per_dimension(url) == reasons_before  # the user's now under no user
    code, out, err = await tally_cli(target, "events", "erase", "--user", ERASED, "--json")  # again: nothing left
    assert code == 0, err
    assert json.loads(out) == {"deletedEventCount": 0, "movedRollupRowCount": 0, "deletedLimitNames": []}
    with pytest.raises(TallyError) as error:
        await client.get_event(theirs)
    assert error.value.code == grpc.StatusCode.NOT_FOUND

    after = await totals()
    nanos = lambda t: t[1] * 10**9 + t[2]  # noqa: E731
    for label in ("users", "users of red"):  # the user's sums now under no user
        users_before, users_after = before.pop(label), after.pop(label)
        erased = users_before.pop(ERASED)
        assert ERASED not in users_after and users_after.get("ann") == users_before.get("ann"), label
        anonymous, now_anonymous = users_before.get("", (0, 0, 0)), users_after[""]
        assert now_anonymous[0] == anonymous[0] + erased[0], label
        assert nanos(now_anonymous) == nanos(anonymous) + nanos(erased), label
    assert after == before
    for bad in ("", "x\x00y"):
        with pytest.raises(TallyError) as error:
            await client.erase_user(bad)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in str(error.value)


async def test_retention_days_prunes_at_start_and_keeps_the_figures(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    today = NOW // 86_400 * 86_400
    times = [today - 9 * 86_400 + i * 600 for i in range(600)] + [today - 2 * 86_400 + i * 60 for i in range(100)]
    try:
        kept: dict[str, Any] = {}
        for days in (0, 4):  # first without retention, then with it
            tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, retention_days=days))
            await tally.start()
            try:
                async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                    if not days:
                        await client.create_experience_type(TYPE, "kept and pruned")
                        await client.ingest_batch([_event(at, "ann", ("red",)) for at in times])
                    else:
                        for _ in range(100):  # the server prunes at start, in the background
                            if not await _events_between(client, 0, today - days * 86_400):
                                break
                            await asyncio.sleep(0.1)
                    remaining = await _events_between(client, 0, NOW + 86_400)
                    stats = MessageToDict(await client.get_experience_type_stats(TYPE))
                    by_user = MessageToDict(await client.break_down_cost(["user"]))
                    if not days:
                        kept = {"stats": stats, "by user": by_user}
                        assert remaining == 700
                    else:
                        assert remaining == 100  # the events of the last four days
                        assert {"stats": stats, "by user": by_user} == kept
            finally:
                await tally.stop()
    finally:
        await drop_database_url(url)


async def _weeks(url: str) -> dict[str, tuple[int, int] | None]:
    """PostgreSQL's partitions of events: name -> (start, end) in microseconds, None for the default."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text(
                    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
                    " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"
                )
            )
            found: dict[str, tuple[int, int] | None] = {}
            for name, bound in rows:
                numbers = [
                    int(n) for n in bound.replace("'", " ").replace("(", " ").replace(")", " ").split() if n.isdigit()
                ]
                found[name] = (numbers[0], numbers[1]) if numbers else None
            return found
    finally:
        await engine.dispose()


async def _execute(url: str, sql: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(sql))
    finally:
        await engine.dispose()


async def _scalar(url: str, sql: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text(sql))).scalar_one())
    finally:
        await engine.dispose()


async def test_a_prune_on_postgresql_drops_whole_weeks(tmp_path, monkeypatch):
    """A database made five weeks ago (its migration's clock set back): the server makes a
    partition for every week since and two ahead, moving the events the default partition
    took meanwhile into them, and one for a backfilled week. A prune drops the weeks wholly
    before its cutoff (one taken out already by a prune that stopped), with their
    idempotency keys and annotations, deletes the rest before it row by row (the cutoff's
    own week, and the default's events older than every week), and changes no figure."""
    url = await make_database_url("postgresql", tmp_path)
    made_at = NOW - 35 * 86_400
    monkeypatch.setattr(time, "time", lambda: made_at)
    database = Database(url)
    await database.migrate()
    await database.dispose()
    monkeypatch.undo()
    week_us = 7 * 86_400_000_000
    assert sorted(bounds for bounds in (await _weeks(url)).values() if bounds) == [
        (week_of(made_at * 1_000_000) + i * week_us, week_of(made_at * 1_000_000) + (i + 1) * week_us) for i in range(2)
    ]

    make_weeks = Retention.make_weeks
    monkeypatch.setattr(Retention, "make_weeks", lambda self: asyncio.sleep(0, []))
    tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
    await tally.start()
    try:
        async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
            await client.create_experience_type(TYPE, "kept and pruned")
            for limit in (_limit("everything", everything=True), _limit("of-type", experience_type=TYPE)):
                await client.create_limit(limit)
            await client.create_limit(_limit("of-tag", request_tag="red"))
            users, tags = ("ann", "bob", ""), (("red",), ("red", "blue"), ())
            # One event every 50 minutes over 34 days, every other one with a key; and ten
            # from 60 days ago, older than every week.
            spread = [
                _event(
                    NOW - 34 * 86_400 + i * 3_000, users[i % 3], tags[i % 3], idempotency_key=f"k-{i}" if i % 2 else ""
                )
                for i in range(34 * 86_400 // 3_000)
            ]
            ancient = [_event(NOW - 80 * 86_400 + i, "ann", ("red",), idempotency_key=f"old-{i}") for i in range(10)]
            # A backfill: as many events of one week, 50 days ago, as make a week of their own.
            backfill_week = week_of((NOW - 50 * 86_400) * 1_000_000)
            backfill = [
                _event(backfill_week // 1_000_000 + 60 * i, users[i % 3], tags[i % 3]) for i in range(DENSE_WEEK_EVENTS)
            ]
            for batch in (spread, backfill):
                for start in range(0, len(batch), 1_000):
                    await client.ingest_batch(batch[start : start + 1_000])
            await client.ingest_batch(ancient)
            in_default = await _scalar(url, "SELECT COUNT(*) FROM events_default")
            assert in_default > len(ancient) + len(backfill)  # the weeks after the first two were not made yet

            made = await make_weeks(tally.retention)
            weeks = await _weeks(url)
            this_week = week_of(NOW * 1_000_000)
            assert set(made) <= set(weeks) and max(b[1] for b in weeks.values() if b) == this_week + 3 * week_us
            assert weeks[made[0]] == (backfill_week, backfill_week + week_us)  # the backfilled week has its own
            assert await _scalar(url, "SELECT COUNT(*) FROM events_default") == len(ancient)  # the rest moved
            assert await make_weeks(tally.retention) == []  # made once

            annotated = (await client.ingest(_event(NOW - 30 * 86_400, "bob", ()))).request_id
            await client.annotate_event(annotated, set_annotations={"rating": "5"})
            before = await _figures(client)
            total = await _events_between(client, 0, NOW + 86_400)

            cutoff = this_week // 1_000_000 - 5 * 86_400  # the Wednesday of last week
            gone_weeks = {name for name, bounds in weeks.items() if bounds and bounds[1] <= cutoff * 1_000_000}
            assert len(gone_weeks) >= 4
            older = await _events_between(client, 0, cutoff)
            # A prune that stopped after taking its oldest week out: the next one drops it too.
            stopped = partition_name(week_of(spread[1].event_timestamp.seconds * 1_000_000))
            assert stopped in gone_weeks
            await _execute(url, f"ALTER TABLE events DETACH PARTITION {stopped}")
            # Its events' keys are still held until it is dropped: a repeat of one is asked to
            # retry (the key goes with the week), not answered INTERNAL or stored twice.
            with pytest.raises(TallyError) as error:
                await client.ingest(spread[1])
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
            answer = await client.prune_events(datetime.datetime.fromtimestamp(cutoff, datetime.UTC), max_events=1_000)
            assert (answer.deleted_event_count, answer.more) == (older, False)
            assert set(await _weeks(url)) == set(weeks) - gone_weeks
            assert await _events_between(client, 0, cutoff) == 0
            assert await _events_between(client, cutoff, NOW + 86_400) == total - older
            assert (
                await _scalar(url, f"SELECT COUNT(*) FROM event_keys WHERE event_time_us < {cutoff * 1_000_000}") == 0
            )
            kept_keys = sum(1 for e in spread if e.idempotency_key and e.event_timestamp.seconds >= cutoff)
            assert await _scalar(url, "SELECT COUNT(*) FROM event_keys") == kept_keys
            assert await _scalar(url, "SELECT COUNT(*) FROM event_annotations") == 0
            assert await _figures(client) == before
            # A pruned event's key is free again; a kept one is still a repeat.
            assert not (await client.ingest(spread[1])).xproxy_result.duplicate_request
            kept = next(e for e in spread if e.idempotency_key and e.event_timestamp.seconds >= cutoff)
            assert (await client.ingest(kept)).xproxy_result.duplicate_request
    finally:
        await tally.stop()
        await drop_database_url(url)

"""The dashboard's panels under its window and filters, on both databases: over a seeded
world (two types, two versions, models, providers, users, tags, unpriced and failed
events, events on several days), every panel's figures for a window and each filter equal
what the gRPC reports (BreakDownCost, ListEvents, GetExperienceTypeStats) say for the same
window and filter; bad windows and filters are a 400 naming them."""

from __future__ import annotations

import datetime
import random
import uuid

import aiohttp
import pytest
from grpc import aio

from tally.v1 import (
    event_service_pb2 as ev_pb,
    event_service_pb2_grpc as event_grpc,
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
    report_service_pb2 as rep_pb,
    report_service_pb2_grpc as rep_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import drop_database_url, make_database_url, stubs_for, unique

DAY = 86_400


@pytest.fixture
async def world(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, web_listen="127.0.0.1:0"))
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stubs = stubs_for(channel, server, backend)
            names = await seed(stubs, random.Random(28))
            yield (
                event_grpc.EventServiceStub(channel),
                rep_grpc.ReportServiceStub(channel),
                f"http://127.0.0.1:{server.web_port}",
                names,
                stubs,
            )
    finally:
        await server.stop()
        await drop_database_url(url)


async def seed(stubs, rng: random.Random) -> list[str]:
    names = [unique("Filtered_A"), unique("Filtered_B")]
    for name in names:
        await stubs.types.CreateExperienceType(
            et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description=name))
        )
    await stubs.types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=names[0]))
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    for _ in range(30):
        name = rng.choice(names)
        version = rng.choice([1, 2]) if name == names[0] else 1
        run = str(uuid.uuid4())
        # In the last ten days, and never in the future whatever the time of day.
        started = now - rng.randint(0, 9) * DAY - rng.randint(600, DAY - 600)
        events = []
        for index in range(rng.randint(1, 4)):
            category, resource = rng.choice(
                [
                    ("system.openai", "gpt-4o"),
                    ("system.openai", "gpt-4o-mini"),
                    ("system.anthropic", "claude-3-5-sonnet-latest"),
                    ("system.openai", "gtp-4o"),
                ]
            )
            event = pb.UsageEvent(
                category=category,
                resource=resource,
                units={"text": pb.UnitCounts(input=rng.randint(100, 9000), output=rng.randint(10, 900))},
                http_status_code=rng.choice([200, 200, 500]),
                end_to_end_latency_ms=rng.choice([0, 120, 900]),
                context=pb.EventContext(
                    experience_id=run,
                    experience_name=name,
                    experience_version=version,
                    user_id=rng.choice(["ann", "bo", ""]),
                    request_tags=rng.sample(["red", "blue"], rng.randint(0, 2)),
                ),
            )
            event.event_timestamp.seconds = started + index * 60
            events.append(event)
        response = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=events))
        assert not response.rejected_count
    return names


async def get(web: str, path: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(web + path) as answer:
        assert answer.status == 200, (path, await answer.text())
        return await answer.json()


def nanos_of(text: str) -> int:
    whole, _, part = text.partition(".")
    return int(whole) * 10**9 + int(part.ljust(9, "0")[:9])


def money_nanos(money) -> int:
    return money.units * 10**9 + money.nanos


async def test_every_panel_equals_the_grpc_reports_for_its_window_and_filter(world):
    events, reports, web, names, stubs = world
    today = datetime.datetime.now(datetime.UTC).date()
    first = today - datetime.timedelta(days=6)
    start = datetime.datetime.combine(first, datetime.time(), datetime.UTC)
    end = datetime.datetime.combine(today + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
    window = f"from={first.isoformat()}&to={today.isoformat()}"
    ranked_among = 0  # filters whose runs panel ranked more runs than it kept
    for query, only in (
        ("", {}),
        (f"&type={names[0]}", {"experience_name": names[0]}),
        (f"&type={names[0]}&version=2", {"experience_name": names[0], "experience_version": 2}),
        ("&provider=system.anthropic", {"category": "system.anthropic"}),
        ("&model=gpt-4o", {"model": "gpt-4o"}),
        ("&user=ann", {"user_id": "ann"}),
        ("&tag=red", {"request_tag": "red"}),
        (f"&type={names[1]}&user=bo&tag=blue", {"experience_name": names[1], "user_id": "bo", "request_tag": "blue"}),
    ):
        request = rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_DAY], page_size=1000, **only)
        request.start_time.FromDatetime(start)
        request.end_time.FromDatetime(end)
        expected = await reports.BreakDownCost(request)
        total = expected.total
        summary = await get(web, f"/api/summary?{window}{query}")
        current = summary["current"]
        assert nanos_of(current["spend"]) == money_nanos(total.cost_total), query
        assert (current["events"], current["unpriced"]) == (total.event_count, total.unpriced_event_count), query
        assert summary["days"] == 7
        spend = await get(web, f"/api/spend?by=experience_name&{window}{query}")
        assert nanos_of(spend["total"]["cost"]) == money_nanos(total.cost_total), query
        by_day = {g["day"] // 1_000_000: nanos_of(g["cost"]) for g in spend["groups"] + spend["other"]}
        days: dict[int, int] = {}
        for g in spend["groups"] + spend["other"]:
            days[g["day"] // 1_000_000] = days.get(g["day"] // 1_000_000, 0) + nanos_of(g["cost"])
        assert days == {g.period_start.seconds: money_nanos(g.cost_total) for g in expected.groups}, query
        assert by_day.keys() <= days.keys()
        # The request log: the same events as ListEvents with the filter (model: BreakDownCost's).
        listed = ev_pb.ListEventsRequest(page_size=1000, **only)
        listed.start_time.FromDatetime(start)
        listed.end_time.FromDatetime(end)
        stored = (await events.ListEvents(listed)).events
        log, page = [], ""
        while True:
            answer = await get(web, f"/api/events?{window}{query}" + (f"&page={page}" if page else ""))
            log += [e["request_id"] for e in answer["events"]]
            if not (page := answer["next"]):
                break
        assert log == [e.request_id for e in stored], query
        assert len(log) == total.event_count, query
        # Spend by user, tag and API key: BreakDownCost's first page by that dimension.
        for by, dimension, field in (
            ("user", rep_pb.COST_DIMENSION_USER_ID, "user_id"),
            ("tag", rep_pb.COST_DIMENSION_REQUEST_TAG, "request_tag"),
            ("key", rep_pb.COST_DIMENSION_API_KEY, "api_key_name"),
        ):
            asked = rep_pb.BreakDownCostRequest(group_by=[dimension], page_size=12, **only)
            asked.start_time.FromDatetime(start)
            asked.end_time.FromDatetime(end)
            grouped = await reports.BreakDownCost(asked)
            shown = await get(web, f"/api/spend_by?by={by}&{window}{query}")
            found = [(g["name"], nanos_of(g["cost"]), g["events"], g["tokens_in"]) for g in shown["groups"]]
            if by == "tag" and "request_tag" in only:  # the tag alone (its total), said
                assert found == [
                    (only["request_tag"], money_nanos(total.cost_total), total.event_count, total.input_tokens)
                ]
                assert "not broken down" in shown["note"], query
                continue
            assert found == [
                (getattr(g, field), money_nanos(g.cost_total), g.event_count, g.input_tokens) for g in grouped.groups
            ], (by, query)
            assert nanos_of(shown["total"]["cost"]) == money_nanos(grouped.total.cost_total), (by, query)
            assert shown["note"] is None, (by, query)
        # Tokens: the tiles are BreakDownCost's, which are the events' units summed.
        tokens = (current["tokens_in"], current["tokens_out"])
        assert tokens == (total.input_tokens, total.output_tokens), query
        units = [u for e in stored for u in e.event.units.values()]
        assert tokens == (sum(u.input for u in units), sum(u.output for u in units)) != (0, 0), query
        # Runs: those whose first event is in the window, by type and version (the type rollup).
        if set(only) <= {"experience_name", "experience_version"}:
            runs = 0
            for name in [only["experience_name"]] if "experience_name" in only else names:
                stats = et_pb.GetExperienceTypeStatsRequest(name=name, version=only.get("experience_version", 0))
                stats.start_time.FromDatetime(start)
                stats.end_time.FromDatetime(end)
                runs += (await stubs.types.GetExperienceTypeStats(stats)).total.experience_count
            assert current["runs"] == runs and current["runs_counted"], query
            # Versions side by side: GetExperienceTypeStats' versions of each type.
            expected_versions = []
            for name in [only["experience_name"]] if "experience_name" in only else names:
                stats = et_pb.GetExperienceTypeStatsRequest(
                    name=name, version=only.get("experience_version", 0), include_outcomes=True
                )
                stats.start_time.FromDatetime(start)
                stats.end_time.FromDatetime(end)
                for v in (await stubs.types.GetExperienceTypeStats(stats)).versions:
                    d = v.stats
                    money = (d.mean_cost_per_experience, d.p50_cost_per_experience, d.p95_cost_per_experience)
                    counts = (d.experience_count, d.event_count, d.unpriced_event_count)
                    expected_versions.append((name, v.version, *counts, *map(money_nanos, money)))
            shown = (await get(web, f"/api/versions?{window}{query}"))["versions"]
            assert [
                (
                    r["type"],
                    r["version"],
                    r["runs"],
                    r["events"],
                    r["unpriced_events"],
                    *map(nanos_of, (r["mean"], r["p50"], r["p95"])),
                )
                for r in shown
            ] == expected_versions, query
            assert expected_versions, query
        elif "user_id" in only:  # counted from the user's events (ix_events_user_time)
            assert current["runs"] == len({e.xproxy_result.experience_id for e in stored}), query
        else:  # a provider, model or tag: no rollup knows their runs
            assert current["runs"] is None and not current["runs_counted"], query
            assert "no rollup knows the runs" in current["runs_not_counted"], query
        if {"category", "model", "user_id", "request_tag"} & set(only):
            # The runs panel: the runs of the filter's events (not only of the type and version).
            shown = await get(web, f"/api/runs?limit=100&{window}{query}")
            assert {r["experience_id"] for r in shown["runs"]} == {e.xproxy_result.experience_id for e in stored}, query
            assert [r["cost"] for r in shown["runs"]] == sorted(
                (r["cost"] for r in shown["runs"]), key=nanos_of, reverse=True
            )
            # Ranked in the database: the first of all those runs by cost, and by events.
            kept = max(1, len(shown["runs"]) - 1)
            ranked_among += kept < len(shown["runs"])
            for sort, key in (("cost", "cost_nanos"), ("events", "events")):
                top = await get(web, f"/api/runs?limit={kept}&sort={sort}&{window}{query}")
                ranked = sorted(shown["runs"], key=lambda r: (-r[key], r["experience_id"]))
                assert [r["experience_id"] for r in top["runs"]] == [r["experience_id"] for r in ranked[:kept]], query
        # Each run shown: its tokens are GetExperience's, its user its first event's.
        shown = await get(web, f"/api/runs?limit=100&{window}{query}")
        assert shown["runs"], query
        for run in shown["runs"]:
            got = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=run["experience_id"]))
            assert (run["tokens_in"], run["tokens_out"]) == (
                got.experience.stats.input_tokens,
                got.experience.stats.output_tokens,
            )
            assert got.experience.stats.input_tokens > 0
            its = ev_pb.ListEventsRequest(experience_id=run["experience_id"], page_size=1000)
            first = min(
                (await events.ListEvents(its)).events,
                key=lambda e: (e.event.event_timestamp.ToNanoseconds(), e.request_id),
            )
            assert run["user"] == first.event.context.user_id, run
    assert ranked_among >= 3


async def test_bad_windows_and_filters_are_a_400_naming_them(world):
    _, _, web, _, _ = world
    async with aiohttp.ClientSession() as session:
        for query, said in (
            ("from=2026-13-01", "from must be a date"),
            ("to=yesterday", "to must be a date"),
            ("from=2026-02-01&to=2026-01-01", "from must not be after to"),
            ("from=2020-01-01&to=2026-01-01", "at most 366 days"),
            ("version=-1", "version must be a whole number"),
            ("version=2", "give experience_name too"),
            ("type=" + "x" * 80, "experience_name"),
            ("user=" + "u" * 300, "user_id"),
        ):
            for panel in (
                "/api/summary",
                "/api/spend",
                "/api/spend_by",
                "/api/events",
                "/api/unpriced",
                "/api/runs",
                "/api/versions",
            ):
                async with session.get(f"{web}{panel}?{query}") as answer:
                    assert answer.status == 400, (panel, query, answer.status)
                    body = await answer.text()
                    if panel in ("/api/summary", "/api/spend"):
                        assert said in body, (panel, query, body)


async def test_the_request_log_finds_events_by_a_property_value(world):
    """A search that is no id finds the view's events with a property of that value, or with
    "key=value" that property, newest first; the view's filters still apply."""
    _, _, web, names, stubs = world
    sent = []
    for index in range(6):
        event = pb.UsageEvent(
            category="system.openai",
            resource="gpt-4o",
            units={"text": pb.UnitCounts(input=10, output=1)},
            properties={"ticket": f"T-{index % 3}", "queue": "billing" if index % 2 else "T-1"},
            context=pb.EventContext(experience_name=names[index % 2]),
        )
        sent.append((await stubs.ingest.Ingest(pb.IngestRequest(event=event))).xproxy_result.request_id)
    keyed = await get(web, "/api/events?q=ticket%3DT-1")
    assert [e["request_id"] for e in keyed["events"]] == [sent[4], sent[1]]
    assert keyed["scanned"] > 0 and all(e["properties"]["ticket"] == "T-1" for e in keyed["events"])
    anywhere = await get(web, "/api/events?q=T-1")  # ticket T-1, or queue T-1 (the even ones)
    assert [e["request_id"] for e in anywhere["events"]] == [sent[4], sent[2], sent[1], sent[0]]
    of_type = await get(web, f"/api/events?q=T-1&type={names[1]}")
    assert [e["request_id"] for e in of_type["events"]] == [sent[1]]
    assert (await get(web, "/api/events?q=T-9"))["events"] == []
    for hostile in ("%00", "a%22b%3Dc", "%27%3B--%3DT-1", "x" * 2000, "%E2%80%AE%3D%00"):  # an answer, never an error
        assert (await get(web, f"/api/events?q={hostile}"))["events"] == []

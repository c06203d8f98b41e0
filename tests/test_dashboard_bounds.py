"""The dashboard's reads are bounded whatever names callers send, on both databases: 20,000
unpriced events with distinct model names make /api/spend answer the costliest groups and
"(all others)", not one series per name; the gRPC callers are served meanwhile; a filter no
index answers reads a bounded scan and says so; a query parameter that is not a number is a
400, not a 500."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid

import aiohttp
import pytest
from grpc import aio

from tally.v1 import (
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
    report_service_pb2 as rep_pb,
    report_service_pb2_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.services.reports import RUNS_COUNTED_EVENTS
from tally_server.web.dashboard import (
    MAX_API_REQUESTS,
    REASON_ROWS,
    SPEND_GROUPS,
    UNPRICED_REASONS,
    UNPRICED_SAMPLE,
    UNPRICED_SCAN,
)

from .conftest import drop_database_url, make_database_url, stubs_for

NAMES = 20_000


@pytest.fixture
async def dashboard_server(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, web_listen="127.0.0.1:0"))
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield stubs_for(channel, server, backend), f"http://127.0.0.1:{server.web_port}"
    finally:
        await server.stop()
        await drop_database_url(url)


async def test_spend_by_model_is_bounded_whatever_names_callers_send(dashboard_server):
    stubs, web = dashboard_server
    priced = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=1000)})
    await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[priced] * 3))
    run = uuid.uuid4().hex[:6]
    for first in range(0, NAMES, 1000):
        batch = [
            pb.UsageEvent(category="custom.misspelt", resource=f"gtp-{run}-{n}", units={"text": pb.UnitCounts(input=1)})
            for n in range(first, first + 1000)
        ]
        answer = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=batch), timeout=120)
        assert answer.accepted_count == 1000
    async with aiohttp.ClientSession() as http:

        async def spend() -> tuple[int, bytes]:
            async with http.get(f"{web}/api/spend?by=model&days=30") as response:
                return response.status, await response.read()

        status, body = await spend()
        assert status == 200
        data = json.loads(body)
        names = {g["model"] for g in data["groups"]}
        assert len(names) <= SPEND_GROUPS and "gpt-4o" in names, sorted(names)[:5]
        assert data["other_groups"] is True
        events = sum(g["events"] for g in data["groups"]) + sum(g["events"] for g in data["other"])
        assert events == data["total"]["events"] >= NAMES + 3
        assert len(body) < 20_000, f"{len(body):,} bytes"
        async with http.get(f"{web}/api/unpriced?days=30") as response:
            unpriced = await response.json()
        assert len(unpriced["reasons"]) <= UNPRICED_REASONS and unpriced["other_reasons"] > 0, unpriced
        # A reason per name: more rows of the rollup of reasons than the panel reads, so it
        # counts the newest events' reasons instead, and says how many.
        assert NAMES > REASON_ROWS
        assert (unpriced["events"], unpriced["sampled"]) == (NAMES, UNPRICED_SAMPLE)

        # gRPC callers meanwhile: 8 dashboards reading at once, one caller ingesting.
        latencies: list[float] = []
        codes: dict[int, int] = {}

        async def reads() -> None:
            for _ in range(3):
                outcomes = await asyncio.gather(*(spend() for _ in range(2 * MAX_API_REQUESTS)))
                for code, _ in outcomes:
                    codes[code] = codes.get(code, 0) + 1

        async def ingest() -> None:
            while not reader.done():
                began = time.perf_counter()
                await stubs.ingest.Ingest(pb.IngestRequest(event=priced), timeout=10)
                latencies.append((time.perf_counter() - began) * 1000)
                await asyncio.sleep(0.01)

        reader = asyncio.ensure_future(reads())
        await asyncio.gather(reader, ingest())
        assert set(codes) <= {200, 429}, codes
        print(
            f"\n{stubs.backend}: /api/spend over {NAMES:,} names: {len(body):,} bytes; under {2 * MAX_API_REQUESTS} "
            f"reads at once {codes}, gRPC Ingest p50 {statistics.median(latencies):.1f} ms, "
            f"max {max(latencies):.1f} ms ({len(latencies)} calls)"
        )


async def test_a_query_parameter_that_is_not_a_number_is_a_400(dashboard_server):
    _, web = dashboard_server
    async with aiohttp.ClientSession() as http:
        for path in ("/api/runs?limit=abc", "/api/runs?limit=0", "/api/spend?days=-1", "/api/unpriced?days=1e9"):
            async with http.get(web + path) as response:
                assert response.status == 400, (path, response.status)
                assert "whole number" in await response.text()


async def test_reads_of_a_filter_no_index_answers_are_bounded_and_say_so(dashboard_server):
    """Three old unpriced events of a rare user, tag and model, then RUNS_COUNTED_EVENTS + 1
    newer unpriced events of a busy user: the unpriced reasons of the rare tag or model are
    looked for among the window's newest UNPRICED_SCAN not priced (none found there, and the
    answer says it looked only there); the rare user's are read whole (an index holds a
    user's events), as are its runs; the busy user's runs are not counted, which the answer
    says; the counts of events come from the rollups either way."""
    stubs, web = dashboard_server
    name = f"Bounded_{uuid.uuid4().hex[:8]}"
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="bounded reads"))
    )
    now = int(time.time())
    rare_run = str(uuid.uuid4())
    rare = pb.UsageEvent(
        category="custom.rare",
        resource="rare-model",
        units={"text": pb.UnitCounts(input=10)},
        context=pb.EventContext(
            experience_id=rare_run, experience_name=name, user_id="rare-user", request_tags=["rare-tag"]
        ),
    )
    rare.event_timestamp.seconds = now - 2 * 86_400
    answer = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[rare] * 3))
    assert answer.accepted_count == 3
    busy = pb.UsageEvent(
        category="custom.busy",
        resource="busy-model",
        units={"text": pb.UnitCounts(input=1)},
        context=pb.EventContext(user_id="busy-user", request_tags=["busy-tag"]),
    )
    busy.event_timestamp.seconds = now - 3600
    for first in range(0, RUNS_COUNTED_EVENTS + 1, 1000):
        size = min(1000, RUNS_COUNTED_EVENTS + 1 - first)
        answer = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[busy] * size), timeout=120)
        assert answer.accepted_count == size
    assert UNPRICED_SCAN < RUNS_COUNTED_EVENTS + 1
    async with aiohttp.ClientSession() as http:

        async def get(path: str) -> dict:
            async with http.get(web + path) as response:
                assert response.status == 200, (path, await response.text())
                return await response.json()

        # With a type, which the rollup of reasons does not keep, the newest events are read.
        for query in (f"type={name}&tag=rare-tag", f"type={name}&model=rare-model"):
            unpriced = await get(f"/api/unpriced?{query}")
            assert (unpriced["events"], unpriced["sampled"], unpriced["among"]) == (3, 0, UNPRICED_SCAN), query
        # The rollup of reasons counts every one, however many newer ones there are; a user
        # and a tag together read the user's events.
        for query in ("tag=rare-tag", "model=rare-model", "user=rare-user", "user=rare-user&tag=rare-tag"):
            unpriced = await get(f"/api/unpriced?{query}")
            assert (unpriced["events"], unpriced["sampled"], unpriced["among"]) == (3, 3, None), query
            assert [r["events"] for r in unpriced["reasons"]] == [3], query
        runs = await get("/api/runs?user=rare-user")
        assert [r["experience_id"] for r in runs["runs"]] == [rare_run]
        assert runs["runs"][0]["user"] == "rare-user"
        summary = (await get("/api/summary?user=rare-user"))["current"]
        assert (summary["events"], summary["runs"], summary["runs_counted"]) == (3, 1, True)
        summary = (await get("/api/summary?user=busy-user"))["current"]
        assert (summary["events"], summary["runs"]) == (RUNS_COUNTED_EVENTS + 1, None)
        assert f"more than {RUNS_COUNTED_EVENTS:,} events" in summary["runs_not_counted"]


async def test_spend_per_day_of_one_user_ranks_the_users_costliest_types(dashboard_server):
    """Spend per day by type, kept to a user over whole days, ranks the user's rows per day:
    the SPEND_GROUPS types shown are the user's costliest (BreakDownCost by type of the user),
    not the house's, the rest "(all others)", and the day's sums are the user's."""
    stubs, web = dashboard_server
    reports = report_service_pb2_grpc.ReportServiceStub(stubs.channel)
    names = [f"Ranked{n:02d}" for n in range(SPEND_GROUPS + 3)]
    events = []
    for n, name in enumerate(names):
        await stubs.types.CreateExperienceType(
            et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="ranked"))
        )
        for user, tokens in (("ranked-user", 1_000 * (n + 1)), ("someone-else", 1_000 * (len(names) - n) * 10)):
            events.append(
                pb.UsageEvent(
                    category="system.openai",
                    resource="gpt-4o",
                    units={"text": pb.UnitCounts(input=tokens)},
                    context=pb.EventContext(experience_name=name, user_id=user),
                )
            )
    assert (await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=events))).accepted_count == len(events)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{web}/api/spend?by=experience_name&days=1&user=ranked-user") as got,
    ):
        assert got.status == 200
        spend = await got.json()
    asked = rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_EXPERIENCE_NAME], user_id="ranked-user")
    ranked = (await reports.BreakDownCost(asked)).groups
    assert {g["experience_name"] for g in spend["groups"]} == {g.experience_name for g in ranked[:SPEND_GROUPS]}
    assert spend["other_groups"] is True and spend["total"]["events"] == len(names)


async def test_the_unpriced_reasons_count_each_event_once_per_reason(dashboard_server):
    """The reasons panel of a user, of a tag and of every event (from the rollup of reasons),
    and of a type, a user's tag and a type's tag (each a different way to the newest events):
    each reason with the events that have it, an event with several units not priced once per
    reason (two units of one reason: once), whatever its units' counts; the same reasons the
    events' own answers give (the database takes them out of the stored units and counts
    them: this is the check that it reads them as the events say)."""
    stubs, web = dashboard_server
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name="Reasons_T", description="why"))
    )

    def event(resource: str, units: dict[str, int]) -> pb.UsageEvent:
        return pb.UsageEvent(
            category="system.openai",
            resource=resource,
            units={unit: pb.UnitCounts(input=count, output=count // 3) for unit, count in units.items()},
            context=pb.EventContext(user_id="reasons-user", experience_name="Reasons_T", request_tags=["why-tag"]),
        )

    events = [
        event("gtp-4o", {"text": 100 + n})
        for n in range(3)  # one reason, counts differing
    ] + [
        event("gpt-4o", {"text": 50, "made_up_unit": 7}),  # partly priced: one unit's reason
        event("gpt-4o", {"text": 51, "made_up_unit": 8, "other_unit": 9}),  # two units' reasons
        event("no-such-model", {"text": 10, "audio": 20}),  # two units, not priced
        event("gpt-4o", {"text": 52}),  # priced: no reason
    ]
    answer = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=events))
    assert answer.accepted_count == len(events)
    expected: dict[str, int] = {}
    not_priced = 0
    for item in answer.items:
        reasons = {u.reason for u in item.result.xproxy_result.unknown_units}
        not_priced += bool(reasons)
        for reason in reasons:
            expected[reason] = expected.get(reason, 0) + 1
    assert len(expected) >= 3 and max(expected.values()) >= 3, expected
    queries = ("user=reasons-user", "tag=why-tag", "", "type=Reasons_T", "user=reasons-user&tag=why-tag")
    for query in (*queries, "type=Reasons_T&tag=why-tag"):
        async with aiohttp.ClientSession() as http, http.get(f"{web}/api/unpriced?{query}") as response:
            assert response.status == 200
            unpriced = await response.json()
        assert (unpriced["events"], unpriced["sampled"]) == (not_priced, not_priced), query
        assert {r["reason"]: r["events"] for r in unpriced["reasons"]} == expected, query

"""Reads at scale, through the wire on both engines: statistics from the rollups equal the
sums of the events' own results to the nano, for random data with duplicates and
deletions; every ordering and page of ListExperiences; events read back with each
filter; the cost breakdown's groups sum to its total; and the migration that builds the
rollups from events already stored."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import pytest
from alembic import command
from google.protobuf import timestamp_pb2

from tally.v1 import (
    event_service_pb2 as ev_pb,
    event_service_pb2_grpc,
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
    report_service_pb2 as rep_pb,
    report_service_pb2_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.services import ingest as ingest_module
from tally_server.storage import events as stored_events
from tally_server.storage.db import Database, alembic_config

from .conftest import drop_database_url, make_database_url, unique
from .helpers import raises

HOUR = 3600
# A window of event time no other test uses: 2021-03-04 10:17:23 UTC, not on an hour.
BASE = int(datetime(2021, 3, 4, 10, 17, 23, tzinfo=UTC).timestamp())
USERS = ["", "alice", "bob"]
TAGS = ["alpha", "beta", "gamma"]
# gpt-4o and gpt-4o-mini are priced; the third is no model the catalog knows (unpriced).
# A dated snapshot: the model dimension counts it under the entry that priced it (gpt-4o).
RESOURCES = ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "no-such-model-x"]


def nanos(money) -> int:
    return money.units * 1_000_000_000 + money.nanos


def nearest_rank(sorted_values: list[int], fraction: float) -> int:
    return sorted_values[max(1, math.ceil(fraction * len(sorted_values))) - 1] if sorted_values else 0


@dataclass
class Sent:
    request_id: str
    experience_id: str
    version: int
    time: int  # seconds
    resource: str
    model: str  # the price entry's resource, or the resource when unpriced
    user: str
    tags: tuple[str, ...]
    latency: int
    failed: bool
    cost: tuple[int, int, int]  # input, output, total nanos
    unpriced: bool
    key: str


@dataclass
class World:
    name: str
    sent: list[Sent] = field(default_factory=list)
    experiences: dict[str, int] = field(default_factory=dict)  # id: version

    def of(self, experience_id: str) -> list[Sent]:
        return [s for s in self.sent if s.experience_id == experience_id]


async def _ingest(stubs, world: World, rng: random.Random, experience_id: str, version: int) -> None:
    user, tags = rng.choice(USERS), tuple(rng.sample(TAGS, rng.randint(0, 2)))
    resource = rng.choice(RESOURCES)
    time = BASE + rng.randint(0, 3 * 24 * HOUR)
    latency, failed = rng.choice([0, 1, 7, 120, 450, 451, 3000, 90_000]), rng.random() < 0.2
    key = f"reads-{uuid.uuid4()}"
    event = pb.UsageEvent(
        category="system.openai",
        resource=resource,
        units={"text": pb.UnitCounts(input=rng.randint(0, 50_000), output=rng.randint(0, 5_000))},
        event_timestamp=timestamp_pb2.Timestamp(seconds=time),
        end_to_end_latency_ms=latency,
        http_status_code=500 if failed else 200,
        idempotency_key=key,
        context=pb.EventContext(experience_id=experience_id, user_id=user, request_tags=tags),
    )
    result = (await stubs.ingest.Ingest(pb.IngestRequest(event=event))).xproxy_result
    # A retry is a duplicate: it must count once.
    again = (await stubs.ingest.Ingest(pb.IngestRequest(event=event))).xproxy_result
    assert again.duplicate_request and again.request_id == result.request_id
    cost = (nanos(result.cost_input), nanos(result.cost_output), nanos(result.cost_total))
    unpriced = result.cost_state != pb.COST_STATE_PRICED
    model = result.price.resource or resource
    world.sent.append(
        Sent(
            result.request_id,
            experience_id,
            version,
            time,
            resource,
            model,
            user,
            tags,
            latency,
            failed,
            cost,
            unpriced,
            key,
        )
    )


async def build_world(stubs, seed: int, experiences: int = 14, events: int = 90) -> World:
    rng = random.Random(seed)
    name = unique("Reads")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="reads"))
    )
    world = World(name)
    for i in range(experiences):
        if i == experiences // 2:
            await stubs.types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=name))
        created = await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
        world.experiences[created.experience.experience_id] = created.experience.experience_version
    ids = list(world.experiences)
    for _ in range(events):
        experience_id = rng.choice(ids[:-1])  # the last stays without events
        await _ingest(stubs, world, rng, experience_id, world.experiences[experience_id])
    return world


def expected_experience(sent: list[Sent]) -> dict:
    latencies = sorted(s.latency for s in sent if s.latency)  # 0: not reported, not counted
    return {
        "cost_input": sum(s.cost[0] for s in sent),
        "cost_output": sum(s.cost[1] for s in sent),
        "cost_total": sum(s.cost[2] for s in sent),
        "event_count": len(sent),
        "failed_event_count": sum(s.failed for s in sent),
        "unpriced_event_count": sum(s.unpriced for s in sent),
        "latencies": latencies,
        "first": min((s.time for s in sent), default=None),
        "last": max((s.time for s in sent), default=None),
    }


def check_experience_stats(stats, sent: list[Sent]) -> None:
    want = expected_experience(sent)
    assert nanos(stats.cost_input) == want["cost_input"]
    assert nanos(stats.cost_output) == want["cost_output"]
    assert nanos(stats.cost_total) == want["cost_total"]
    assert stats.event_count == want["event_count"]
    assert stats.failed_event_count == want["failed_event_count"]
    assert stats.unpriced_event_count == want["unpriced_event_count"]
    latencies = want["latencies"]
    assert stats.latency_reported_event_count == len(latencies)
    if latencies:
        assert stats.latency_mean_ms == pytest.approx(sum(latencies) / len(latencies), abs=1e-9)
        for got, fraction in ((stats.latency_p50_ms, 0.5), (stats.latency_p95_ms, 0.95)):
            assert got == pytest.approx(nearest_rank(latencies, fraction), rel=0.01)
    else:  # none reported: not "0 ms"
        assert stats.latency_p50_ms == stats.latency_mean_ms == 0
    if sent:
        assert stats.first_event_time.seconds == want["first"] and stats.last_event_time.seconds == want["last"]
    else:
        assert not stats.HasField("first_event_time")


def expected_distribution(world: World, version: int = 0, start: int | None = None, end: int | None = None) -> dict:
    costs, events, unpriced = [], 0, 0
    for experience_id, v in world.experiences.items():
        sent = world.of(experience_id)
        if not sent or (version and v != version):
            continue
        first = min(s.time for s in sent)
        if (start is not None and first < start) or (end is not None and first >= end):
            continue
        costs.append(sum(s.cost[2] for s in sent))
        events += len(sent)
        unpriced += sum(s.unpriced for s in sent)
    costs.sort()
    total = sum(costs)
    mean = 0
    if costs:
        quotient, remainder = divmod(total, len(costs))
        mean = quotient + (1 if 2 * remainder > len(costs) or (2 * remainder == len(costs) and quotient % 2) else 0)
    return {
        "experience_count": len(costs),
        "event_count": events,
        "unpriced_event_count": unpriced,
        "total_cost": total,
        "mean_cost_per_experience": mean,
        "p50_cost_per_experience": nearest_rank(costs, 0.5),
        "p95_cost_per_experience": nearest_rank(costs, 0.95),
        "max_cost_per_experience": costs[-1] if costs else 0,
    }


def distribution_of(message) -> dict:
    return {
        "experience_count": message.experience_count,
        "event_count": message.event_count,
        "unpriced_event_count": message.unpriced_event_count,
        **{
            name: nanos(getattr(message, name))
            for name in (
                "total_cost",
                "mean_cost_per_experience",
                "p50_cost_per_experience",
                "p95_cost_per_experience",
                "max_cost_per_experience",
            )
        },
    }


def check_distribution(got, want: dict, where) -> None:
    assert distribution_of(got) == want, where


async def check_type_stats(stubs, world: World) -> None:
    # Windows on day boundaries and off them (BASE is 10:17:23), and within one day.
    day = BASE - BASE % 86400
    windows = [
        (None, None),
        (BASE + 12 * HOUR, None),
        (None, BASE + 36 * HOUR),
        (BASE + 6 * HOUR, BASE + 50 * HOUR),
        (day + 86400, day + 3 * 86400),
        (BASE + HOUR, BASE + 5 * HOUR),
    ]
    for start, end in windows:
        request = et_pb.GetExperienceTypeStatsRequest(name=world.name)
        if start is not None:
            request.start_time.seconds = start
        if end is not None:
            request.end_time.seconds = end
        got = await stubs.types.GetExperienceTypeStats(request)
        check_distribution(got.total, expected_distribution(world, 0, start, end), (start, end))
        assert {v.version for v in got.versions} == {
            v for v in (1, 2) if expected_distribution(world, v, start, end)["experience_count"]
        }
        for entry in got.versions:
            check_distribution(entry.stats, expected_distribution(world, entry.version, start, end), entry.version)
        request.version = 2
        got = await stubs.types.GetExperienceTypeStats(request)
        check_distribution(got.total, expected_distribution(world, 2, start, end), (2, start, end))


async def list_all(stubs, name: str, order_by: str, page_size: int = 4, **filters) -> list:
    seen, token = [], ""
    while True:
        page = await stubs.experiences.ListExperiences(
            exp_pb.ListExperiencesRequest(
                experience_name=name, order_by=order_by, page_size=page_size, page_token=token, **filters
            )
        )
        seen.extend(page.experiences)
        token = page.next_page_token
        if not token:
            return seen


async def check_orderings(stubs, world: World) -> None:
    listed = {e.experience_id: e for e in await list_all(stubs, world.name, "")}
    assert set(listed) == set(world.experiences)
    for experience_id, experience in listed.items():
        check_experience_stats(experience.stats, world.of(experience_id))

    def cost(e) -> int:
        return nanos(e.stats.cost_total)

    def created(e) -> tuple[int, int]:
        return (e.create_time.seconds, e.create_time.nanos)

    orders = {
        "cost_total desc": lambda e: (cost(e), e.experience_id),
        "cost_total": lambda e: (cost(e), e.experience_id),
        "event_count desc": lambda e: (e.stats.event_count, e.experience_id),
        "create_time": lambda e: (created(e), e.experience_id),
        "create_time desc": lambda e: (created(e), e.experience_id),
    }
    for order_by, key in orders.items():
        got = await list_all(stubs, world.name, order_by, page_size=3)
        want = sorted(listed.values(), key=key, reverse=order_by.endswith("desc"))
        assert [e.experience_id for e in got] == [e.experience_id for e in want], order_by
    # The version filter keeps the ordering.
    got = await list_all(stubs, world.name, "cost_total desc", experience_version=2)
    want = sorted(
        (e for e in listed.values() if e.experience_version == 2), key=orders["cost_total desc"], reverse=True
    )
    assert [e.experience_id for e in got] == [e.experience_id for e in want]
    # A token is bound to its ordering.
    first = await stubs.experiences.ListExperiences(
        exp_pb.ListExperiencesRequest(experience_name=world.name, order_by="cost_total desc", page_size=2)
    )
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await stubs.experiences.ListExperiences(
            exp_pb.ListExperiencesRequest(
                experience_name=world.name, order_by="event_count desc", page_size=2, page_token=first.next_page_token
            )
        )
    assert "page_token" in error.fields
    for bad in ("cost", "cost_total up", "cost_total desc desc", "id desc"):
        async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
            await stubs.experiences.ListExperiences(
                exp_pb.ListExperiencesRequest(experience_name=world.name, order_by=bad)
            )
        assert "order_by" in error.fields


def _group_key(s: Sent, dimension: str, name: str) -> list:
    if dimension == "resource":
        return [s.resource]
    if dimension == "model":
        return [s.model]
    if dimension == "user_id":
        return [s.user]
    if dimension == "request_tag":
        return list(s.tags) or [""]
    if dimension == "day":
        return [s.time - s.time % 86400]
    if dimension == "hour":
        return [s.time - s.time % 3600]
    if dimension == "experience_version":
        return [(name, s.version)]
    raise AssertionError(dimension)


def _message_key(group, dimension: str):
    if dimension in ("day", "hour"):
        return group.period_start.seconds
    if dimension == "experience_version":
        return (group.experience_name, group.experience_version)
    return getattr(group, dimension)


DIMENSION_VALUES = {
    "resource": rep_pb.COST_DIMENSION_RESOURCE,
    "model": rep_pb.COST_DIMENSION_MODEL,
    "user_id": rep_pb.COST_DIMENSION_USER_ID,
    "request_tag": rep_pb.COST_DIMENSION_REQUEST_TAG,
    "day": rep_pb.COST_DIMENSION_DAY,
    "hour": rep_pb.COST_DIMENSION_HOUR,
    "experience_version": rep_pb.COST_DIMENSION_EXPERIENCE_VERSION,
}


def _selected(s: Sent, filters: dict) -> bool:
    """Whether a BreakDownCost filter selects the event (every event here is system.openai)."""
    checks = {
        "experience_version": lambda v: s.version == v,
        "category": lambda v: v == "system.openai",
        "model": lambda v: s.model == v,
        "user_id": lambda v: s.user == v,
        "request_tag": lambda v: v in s.tags,
    }
    return all(checks[name](value) for name, value in filters.items())


async def check_breakdown(
    reports, world: World, dimensions: tuple[str, ...], start: int, end: int, **filters: str | int
) -> None:
    want: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    in_window = [
        s
        for s in world.sent
        if start <= s.time < end and s.experience_id in world.experiences and _selected(s, filters)
    ]
    if filters and filters.get("category") != "system.anthropic":
        assert in_window, f"the filter {filters} selects events"
    for s in in_window:
        keys = [[]]
        for dimension in dimensions:
            keys = [[*k, value] for k in keys for value in _group_key(s, dimension, world.name)]
        for key in keys:
            sums = want[tuple(key)]
            for i, value in enumerate((*s.cost, 1, int(s.unpriced))):
                sums[i] += value
    got: dict[tuple, list[int]] = {}
    token, pages = "", 0
    request = rep_pb.BreakDownCostRequest(
        group_by=[DIMENSION_VALUES[d] for d in dimensions], experience_name=world.name, page_size=5, **filters
    )
    request.start_time.seconds, request.end_time.seconds = start, end
    costs_in_order = []
    while True:
        request.page_token = token
        response = await reports.BreakDownCost(request)
        pages += 1
        for group in response.groups:
            key = tuple(_message_key(group, d) for d in dimensions)
            assert key not in got, f"group {key} on two pages"
            got[key] = [
                nanos(group.cost_input),
                nanos(group.cost_output),
                nanos(group.cost_total),
                group.event_count,
                group.unpriced_event_count,
            ]
            costs_in_order.append(got[key][2])
        total = response.total
        assert [nanos(total.cost_input), nanos(total.cost_output), nanos(total.cost_total), total.event_count] == [
            sum(s.cost[0] for s in in_window),
            sum(s.cost[1] for s in in_window),
            sum(s.cost[2] for s in in_window),
            len(in_window),
        ]
        token = response.next_page_token
        if not token:
            break
    assert got == dict(want), dimensions
    assert costs_in_order == sorted(costs_in_order, reverse=True)
    assert pages == max(1, math.ceil(len(want) / 5))
    if "request_tag" not in dimensions:  # an event counts once per tag there
        assert sum(v[2] for v in got.values()) == nanos(total.cost_total)


async def check_events(stubs, world: World) -> None:
    events = event_service_pb2_grpc.EventServiceStub(stubs.channel)

    async def listed(page_size: int = 7, **filters) -> list[str]:
        ids, token = [], ""
        while True:
            request = ev_pb.ListEventsRequest(page_size=page_size, page_token=token, **filters)
            response = await events.ListEvents(request)
            ids.extend(e.request_id for e in response.events)
            token = response.next_page_token
            if not token:
                return ids

    def newest_first(sent: list[Sent]) -> list[str]:
        # Event time descending, then request id descending (ids are UUIDv7, compared as UUIDs).
        ordered = sorted(sent, key=lambda s: (s.time, uuid.UUID(s.request_id)), reverse=True)
        return [s.request_id for s in ordered]

    mine = [s for s in world.sent if s.experience_id in world.experiences]
    assert await listed(experience_name=world.name) == newest_first(mine)
    some = next(iter(world.experiences))
    assert await listed(experience_id=some) == newest_first(world.of(some))
    assert await listed(experience_name=world.name, experience_version=2) == newest_first(
        [s for s in mine if s.version == 2]
    )
    assert await listed(experience_name=world.name, user_id="alice") == newest_first(
        [s for s in mine if s.user == "alice"]
    )
    assert await listed(experience_name=world.name, request_tag="beta") == newest_first(
        [s for s in mine if "beta" in s.tags]
    )
    assert await listed(experience_name=world.name, resource="gpt-4o-mini", category="system.openai") == newest_first(
        [s for s in mine if s.resource == "gpt-4o-mini"]
    )
    assert await listed(experience_name=world.name, cost_state=pb.COST_STATE_UNPRICED) == newest_first(
        [s for s in mine if s.unpriced]
    )
    window = {
        "start_time": timestamp_pb2.Timestamp(seconds=BASE + HOUR),
        "end_time": timestamp_pb2.Timestamp(seconds=BASE + 30 * HOUR),
    }
    assert await listed(experience_name=world.name, **window) == newest_first(
        [s for s in mine if BASE + HOUR <= s.time < BASE + 30 * HOUR]
    )
    # One event read back whole, by request id and by idempotency key.
    s = mine[0]
    by_id = (await events.GetEvent(ev_pb.GetEventRequest(request_id=s.request_id))).event
    by_key = (await events.GetEvent(ev_pb.GetEventRequest(idempotency_key=s.key))).event
    assert by_id == by_key
    assert by_id.request_id == s.request_id and by_id.event.idempotency_key == s.key
    assert by_id.event.resource == s.resource and by_id.event.event_timestamp.seconds == s.time
    assert by_id.event.context.experience_id == s.experience_id and by_id.event.context.user_id == s.user
    assert tuple(by_id.event.context.request_tags) == s.tags
    assert nanos(by_id.xproxy_result.cost_total) == s.cost[2] and not by_id.xproxy_result.duplicate_request
    async with raises(grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND"):
        await events.GetEvent(ev_pb.GetEventRequest(idempotency_key="no-such-key"))
    async with raises(grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND"):
        await events.GetEvent(ev_pb.GetEventRequest(request_id=str(uuid.uuid4())))
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await events.GetEvent(ev_pb.GetEventRequest())
    assert "lookup" in error.fields
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await events.ListEvents(ev_pb.ListEventsRequest(experience_id="not-a-uuid", cost_state=9))
    assert {"experience_id", "cost_state"} <= set(error.fields)


async def test_rollups_equal_the_events_through_duplicates_and_deletions(stubs):
    world = await build_world(stubs, seed=11)
    reports = report_service_pb2_grpc.ReportServiceStub(stubs.channel)
    for experience_id in world.experiences:
        got = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience_id))
        check_experience_stats(got.experience.stats, world.of(experience_id))
    await check_type_stats(stubs, world)
    await check_orderings(stubs, world)
    await check_events(stubs, world)
    start, end = BASE + 1234, BASE + 70 * HOUR + 77  # partial hours at both edges
    snapshots = {s.resource for s in world.sent if s.model == "gpt-4o"}
    assert snapshots == {"gpt-4o", "gpt-4o-2024-08-06"}, snapshots  # one entry priced both
    for dimensions in [
        ("resource", "day"),
        ("model",),
        ("model", "resource"),
        ("user_id",),
        ("request_tag",),
        ("experience_version", "hour"),
    ]:
        await check_breakdown(reports, world, dimensions, start, end)
    await check_breakdown(reports, world, ("resource",), BASE + 60, BASE + 600)  # within one hour
    # Filtered: on the rollup's keys (version, category, model) from the rollup and the
    # partial hours' events; on user or tag from the events alone; combined.
    for dimensions, filters in [
        (("resource", "day"), {"experience_version": 2}),
        (("user_id",), {"model": "gpt-4o"}),
        (("model",), {"category": "system.openai", "experience_version": 1}),
        (("model",), {"category": "system.anthropic"}),
        (("resource", "day"), {"user_id": USERS[2]}),
        (("model",), {"request_tag": TAGS[0]}),
        (("day",), {"user_id": USERS[1], "request_tag": TAGS[1], "experience_version": 1}),
        (("request_tag",), {"model": "gpt-4o-mini", "request_tag": TAGS[0]}),
        (("request_tag",), {"request_tag": TAGS[0]}),  # its events' other tags too
    ]:
        await check_breakdown(reports, world, dimensions, start, end, **filters)

    # Deleting an experience takes its events out of the type's statistics and breakdown.
    heaviest = max(world.experiences, key=lambda e: len(world.of(e)))
    deleted = await stubs.experiences.DeleteExperience(exp_pb.DeleteExperienceRequest(experience_id=heaviest))
    assert deleted.unattributed_event_count == len(world.of(heaviest))
    del world.experiences[heaviest]
    await check_type_stats(stubs, world)
    await check_breakdown(reports, world, ("resource", "day"), start, end)
    await check_breakdown(reports, world, ("model", "day"), start, end)
    await check_orderings(stubs, world)
    # ... and the events stay stored, unattributed.
    events = event_service_pb2_grpc.EventServiceStub(stubs.channel)
    one = world.of(heaviest)[0]
    back = (await events.GetEvent(ev_pb.GetEventRequest(request_id=one.request_id))).event
    assert back.event.context.experience_id == "" and not back.xproxy_result.experience_id
    unattributed = rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_EXPERIENCE_NAME], page_size=1000)
    unattributed.start_time.seconds, unattributed.end_time.seconds = BASE, BASE + 4 * 24 * HOUR
    groups = {g.experience_name: g for g in (await reports.BreakDownCost(unattributed)).groups}
    assert groups[""].event_count >= len(world.of(heaviest))
    assert world.name in groups

    # Deleting the type moves all of its events out of it.
    await stubs.types.DeleteExperienceType(et_pb.DeleteExperienceTypeRequest(name=world.name, force=True))
    groups = {g.experience_name: g for g in (await reports.BreakDownCost(unattributed)).groups}
    assert world.name not in groups
    assert groups[""].event_count >= len(world.sent)


@pytest.mark.parametrize("deleted", ["experience", "type"])
@pytest.mark.parametrize("paused", ["after_resolving", "after_locking"])
async def test_an_event_racing_a_deletion_ends_unattributed(stubs, monkeypatch, deleted, paused):
    """The writer is paused in storing an event for an experience (after resolving it, or
    once it holds the experience's row), and the experience or its whole type is deleted
    meanwhile: the event ends unattributed, counted under no type, whichever transaction
    waits for the other. On PostgreSQL a deletion during the first pause goes first (the
    event's answer says so); during the second it waits for the writer. On SQLite the
    writer holds the file, so the deletion always goes after and unattributes the event."""
    name = unique("Race")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="race"))
    )
    experience_id = (
        await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=name))
    ).experience.experience_id
    time = int(datetime(2021, 6, 7, 8, 9, tzinfo=UTC).timestamp())
    event = pb.UsageEvent(
        category="system.openai",
        resource="gpt-4o",
        units={"text": pb.UnitCounts(input=1000, output=100)},
        event_timestamp=timestamp_pb2.Timestamp(seconds=time),
        context=pb.EventContext(experience_id=experience_id),
    )
    await stubs.ingest.Ingest(pb.IngestRequest(event=event))  # one event stored before

    reached, release = asyncio.Event(), asyncio.Event()
    # Paused once resolution is done, or once the insert is (the experience's row then locked).
    after = {
        "after_resolving": (ingest_module, "resolve_experiences"),
        "after_locking": (stored_events, "insert_events"),
    }
    module, function = after[paused]
    real = getattr(module, function)

    async def then_wait(*args, **kwargs):
        done = await real(*args, **kwargs)
        reached.set()
        await release.wait()
        return done

    monkeypatch.setattr(module, function, then_wait)
    storing = asyncio.ensure_future(stubs.ingest.Ingest(pb.IngestRequest(event=event), timeout=30))
    await asyncio.wait_for(reached.wait(), 10)
    if deleted == "experience":
        request = exp_pb.DeleteExperienceRequest(experience_id=experience_id)
        deleting = asyncio.ensure_future(stubs.experiences.DeleteExperience(request, timeout=30))
    else:
        request = et_pb.DeleteExperienceTypeRequest(name=name, force=True)
        deleting = asyncio.ensure_future(stubs.types.DeleteExperienceType(request, timeout=30))
    deletion_first = stubs.backend == "postgresql" and paused == "after_resolving"
    if deletion_first:
        await asyncio.wait_for(asyncio.shield(deleting), 10)
    else:
        await asyncio.sleep(0.5)
        assert not deleting.done(), "the deletion waits for the writer"
    release.set()
    stored = (await storing).xproxy_result
    await deleting
    if deletion_first:
        assert stored.experience_id == "" and any("was deleted" in w for w in stored.warnings), stored
    else:
        assert stored.experience_id == experience_id and not stored.warnings, stored

    events = event_service_pb2_grpc.EventServiceStub(stubs.channel)
    back = (await events.GetEvent(ev_pb.GetEventRequest(request_id=stored.request_id))).event
    assert not back.xproxy_result.experience_id, "the event must not point at a deleted experience"
    reports = report_service_pb2_grpc.ReportServiceStub(stubs.channel)
    breakdown = rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_EXPERIENCE_NAME], page_size=1000)
    breakdown.start_time.seconds, breakdown.end_time.seconds = time - HOUR, time + HOUR
    groups = {g.experience_name: g.event_count for g in (await reports.BreakDownCost(breakdown)).groups}
    assert name not in groups and groups[""] >= 2, groups
    if deleted == "experience":
        stats = await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name))
        assert stats.total.experience_count == 0 and stats.total.event_count == 0, stats


async def test_breakdown_refuses_bad_requests(stubs):
    reports = report_service_pb2_grpc.ReportServiceStub(stubs.channel)
    bad = [
        (rep_pb.BreakDownCostRequest(), "group_by"),
        (rep_pb.BreakDownCostRequest(group_by=[1, 3, 4]), "group_by"),
        (rep_pb.BreakDownCostRequest(group_by=[4, 4]), "group_by"),
        (rep_pb.BreakDownCostRequest(group_by=[7, 8]), "group_by"),
        (rep_pb.BreakDownCostRequest(group_by=[0]), "group_by[0]"),
        (rep_pb.BreakDownCostRequest(group_by=[99]), "group_by[0]"),
        (rep_pb.BreakDownCostRequest(group_by=[4], page_size=-1), "page_size"),
        (rep_pb.BreakDownCostRequest(group_by=[4], page_token="forged"), "page_token"),
        (rep_pb.BreakDownCostRequest(group_by=[4], experience_version=2), "experience_version"),
        (rep_pb.BreakDownCostRequest(group_by=[4], experience_name="T", experience_version=-1), "experience_version"),
        (rep_pb.BreakDownCostRequest(group_by=[4], user_id="u" * 257), "user_id"),
        (rep_pb.BreakDownCostRequest(group_by=[4], request_tag="t" * 257), "request_tag"),
    ]
    for request, field_path in bad:
        async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
            await reports.BreakDownCost(request)
        assert field_path in error.fields, (request, error.fields)


async def test_the_migration_builds_rollups_from_stored_events(backend, tmp_path, caplog):
    """Events stored before the rollups existed (downgraded to 0004, the rollups dropped)
    come back in them when the migration runs again."""
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(database_url=url, listen="127.0.0.1:0"))
    try:
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            from .conftest import stubs_for

            stubs = stubs_for(channel, server, backend)
            world = await build_world(stubs, seed=5, experiences=6, events=40)
            reports = report_service_pb2_grpc.ReportServiceStub(channel)
            async with server.db.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0004"))
            database = Database(url)
            caplog.set_level(logging.INFO, "tally.migrations")
            try:
                await database.migrate()
            finally:
                await database.dispose()
            assert "building the rollups from 40 stored events" in caplog.text, "the long step says so"
            for experience_id in world.experiences:
                got = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience_id))
                check_experience_stats(got.experience.stats, world.of(experience_id))
            await check_type_stats(stubs, world)
            await check_breakdown(reports, world, ("resource", "day"), BASE + 1234, BASE + 70 * HOUR + 77)
    finally:
        await server.stop()
        await drop_database_url(url)

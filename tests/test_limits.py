"""Limits through the wire, on both databases: reservations granted exactly up to the
maximum under 200 concurrent callers (two replicas on PostgreSQL), settled by the events
that report the calls, freed by expiry; per-experience limits; spend counted at ingest and
equal to the sum of the events, across a period boundary and a reset; bad input refused."""

from __future__ import annotations

import asyncio
import datetime
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status

from tally.v1 import (
    common_pb2,
    event_service_pb2 as ev_pb,
    event_service_pb2_grpc as ev_grpc,
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as types_pb,
    ingest_service_pb2 as pb,
    limit_service_pb2 as lim_pb,
    limit_service_pb2_grpc as lim_grpc,
    price_catalog_service_pb2 as price_pb,
)
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import drop_database_url, make_database_url, stubs_for, unique
from .helpers import decode, raises
from .server_process import ServerProcess

CENT = common_pb2.Money(currency_code="USD", nanos=10_000_000)
# A model of our own at $10 per million input tokens: 1,000 tokens cost exactly $0.01.
CATEGORY, MODEL = "custom.limits", "exact-model"


def nanos(money: common_pb2.Money) -> int:
    return money.units * 1_000_000_000 + money.nanos


def usage(tokens: int, reservation: str = "", **fields) -> pb.UsageEvent:
    return pb.UsageEvent(
        category=CATEGORY,
        resource=MODEL,
        units={"text": pb.UnitCounts(input=tokens)},
        limit_reservation_id=reservation,
        **fields,
    )


async def new_type(stubs) -> str:
    name = unique("Limited")
    created = types_pb.ExperienceType(name=name, description="limited")
    await stubs.types.CreateExperienceType(types_pb.CreateExperienceTypeRequest(experience_type=created))
    return name


async def price_model(stubs) -> None:
    price = price_pb.CustomPrice(
        category=CATEGORY,
        resource=MODEL,
        effective_time=timestamp_pb2.Timestamp(seconds=0),
        unit_prices={"text": price_pb.UnitPrice(input_per_million="10")},
    )
    listed = await stubs.prices.ListCustomPrices(price_pb.ListCustomPricesRequest(category=CATEGORY, resource=MODEL))
    if not listed.prices:  # priced once per server
        await stubs.prices.CreateCustomPrice(price_pb.CreateCustomPriceRequest(price=price))


def type_limit(name: str, type_name: str, max_money=None, **scope) -> lim_pb.Limit:
    return lim_pb.Limit(
        name=name,
        max=max_money or common_pb2.Money(currency_code="USD", units=1),
        kind=lim_pb.LIMIT_KIND_BLOCK,
        period=lim_pb.LIMIT_PERIOD_LIFETIME,
        scope=lim_pb.LimitScope(experience_type=type_name, **scope),
    )


async def reserve_all(stubs_list, count: int, metadata) -> tuple[list[str], list[aio.AioRpcError]]:
    """`count` concurrent Reserve calls of $0.01, spread over the given connections."""
    calls = [
        lim_grpc.LimitServiceStub(stubs_list[n % len(stubs_list)].channel).Reserve(
            lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT)), metadata=metadata, timeout=60
        )
        for n in range(count)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    granted = [o.reservation.reservation_id for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    assert len(granted) + len(refused) == count, [o for o in outcomes if not isinstance(o, aio.AioRpcError)][:1]
    return granted, refused


def quota_subjects(error: aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    found = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            found += [violation.subject for violation in quota.violations]
    return found


@pytest.fixture
async def replicas(backend, tmp_path):
    """Two server processes (each its own clock, pool and caches) on one PostgreSQL
    database; one on SQLite."""
    url = await make_database_url(backend, tmp_path)
    count = 2 if backend == "postgresql" else 1
    servers = await asyncio.gather(*(asyncio.to_thread(ServerProcess(url).start) for _ in range(count)))
    channels = []
    try:
        # Many connections: each replica reached over four.
        channels = [aio.insecure_channel(s.target) for s in servers for _ in range(4)]
        yield [
            stubs_for(channel, None, backend, target)
            for channel, target in zip(channels, [s.target for s in servers] * 4, strict=False)
        ]
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await asyncio.to_thread(server.terminate)
        await drop_database_url(url)


async def test_reservations_are_granted_exactly_up_to_the_maximum_under_concurrency(replicas):
    stubs = replicas[0]
    await price_model(stubs)
    type_name = await new_type(stubs)
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=type_limit("one-dollar", type_name)))
    experience = str(uuid.uuid4())
    context = (("xproxy-experience-id", experience), ("xproxy-experience-name", type_name))
    await stubs.ingest.Ingest(pb.IngestRequest(event=usage(0)), metadata=context)  # creates the experience

    granted, refused = await reserve_all(replicas, 200, context)
    assert len(granted) == 100, len(granted)
    assert all(decode(error).reason == "LIMIT_EXCEEDED" for error in refused)
    assert all(error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for error in refused)
    assert quota_subjects(refused[0]) == ["limits/one-dollar"]

    # Half the calls cost half their estimate: the events naming them settle them.
    half, rest = granted[:50], granted[50:]
    batch = [usage(500, reservation, idempotency_key=f"half-{reservation}") for reservation in half]
    settled = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=batch), metadata=context)
    assert settled.accepted_count == 50
    statuses = [item.result.xproxy_result.limits for item in settled.items]
    assert all(len(s) == 1 and s[0].limit == "one-dollar" for s in statuses)
    got = await limits.GetLimit(lim_pb.GetLimitRequest(name="one-dollar"))
    assert nanos(got.current.spend) == 250_000_000 and nanos(got.current.reserved) == 500_000_000

    # $0.25 was freed: exactly 25 more cents are granted, however many ask at once.
    again, _ = await reserve_all(replicas, 200, context)
    assert len(again) == 25, len(again)

    # The rest of the calls cost a cent each: spend ends exactly at the maximum.
    events = [usage(1000, reservation, idempotency_key=f"full-{reservation}") for reservation in rest + again]
    for start in range(0, len(events), 30):
        await replicas[start % len(replicas)].ingest.IngestBatch(
            pb.IngestBatchRequest(events=events[start : start + 30]), metadata=context
        )
    got = await limits.GetLimit(lim_pb.GetLimitRequest(name="one-dollar"))
    assert nanos(got.current.spend) == 1_000_000_000, got.current
    assert nanos(got.current.reserved) == 0 and got.current.event_count == 1 + 50 + 75
    assert got.current.state == common_pb2.LIMIT_STATE_THRESHOLD  # at the maximum, not past it
    listed = await ev_grpc.EventServiceStub(stubs.channel).ListEvents(
        ev_pb.ListEventsRequest(experience_id=experience, page_size=1000)
    )
    assert sum(nanos(e.xproxy_result.cost_total) for e in listed.events) == 1_000_000_000
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"):
        await limits.Reserve(lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT)), metadata=context)


async def test_a_reservation_never_settled_expires_and_frees_its_amount(replicas):
    stubs = replicas[0]
    type_name = await new_type(stubs)
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=type_limit("two-cents", type_name, CENT_TIMES(2))))
    context = (("xproxy-experience-name", type_name),)
    short = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT_TIMES(2)), ttl_seconds=1)
    held = await limits.Reserve(short, metadata=context)
    assert list(held.reservation.limits) == ["two-cents"]
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"):
        await limits.Reserve(lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT)), metadata=context)
    await asyncio.sleep(1.5)  # a crashed caller: never settled
    again = await limits.Reserve(
        lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT_TIMES(2))), metadata=context
    )
    assert again.reservation.reservation_id != held.reservation.reservation_id
    async with raises(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OUTSTANDING"):
        await limits.Release(lim_pb.ReleaseRequest(reservation_id=held.reservation.reservation_id))
    await limits.Release(lim_pb.ReleaseRequest(reservation_id=again.reservation.reservation_id))
    async with raises(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OUTSTANDING"):
        await limits.Release(lim_pb.ReleaseRequest(reservation_id=again.reservation.reservation_id))
    async with raises(grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"):
        await limits.Release(lim_pb.ReleaseRequest(reservation_id=str(uuid.uuid4())))


def CENT_TIMES(n: int) -> common_pb2.Money:  # noqa: N802 - reads as the constant it scales
    return common_pb2.Money(currency_code="USD", nanos=10_000_000 * n)


async def test_a_per_experience_limit_gives_each_experience_its_own_maximum(replicas):
    stubs = replicas[0]
    type_name = await new_type(stubs)
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    template = type_limit("per-run", type_name, CENT_TIMES(2), per_experience=True)
    template.period = lim_pb.LIMIT_PERIOD_DAY
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=template))
    runs = []
    for _ in range(2):
        created = await stubs.experiences.CreateExperience(exp_pb.CreateExperienceRequest(experience_name=type_name))
        runs.append((("xproxy-experience-id", created.experience.experience_id),))
    estimate = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT_TIMES(2)))
    first = await limits.Reserve(estimate, metadata=runs[0])
    assert list(first.reservation.limits) == ["per-run"]
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED") as refused:
        await limits.Reserve(estimate, metadata=runs[0])
    now = datetime.datetime.now(datetime.UTC)
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    # RetryInfo points at the day's end in UTC, when the run's spend starts again.
    assert abs(refused.retry_delay_seconds - (midnight - now).total_seconds()) < 5, refused.retry_delay_seconds
    second = await limits.Reserve(estimate, metadata=runs[1])  # the other run has its own two cents
    assert list(second.reservation.limits) == ["per-run"]


async def test_a_per_experience_limits_busiest_runs_are_its_current_periods_most_spent_first(replicas):
    """ListLimitPeriods with order_by "spend desc": the periods current now, the most spent
    first and then by experience id, paged without a gap or a repeat; yesterday's periods
    are not among them; any other order is INVALID_ARGUMENT naming order_by."""
    stubs = replicas[0]
    await price_model(stubs)
    type_name = await new_type(stubs)
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    template = type_limit(
        unique("busiest"), type_name, common_pb2.Money(currency_code="USD", units=5), per_experience=True
    )
    template.period = lim_pb.LIMIT_PERIOD_DAY
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=template))
    yesterday = timestamp_pb2.Timestamp()
    yesterday.FromDatetime(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1))
    spent: dict[str, int] = {}
    for index, cents in enumerate([3, 1, 4, 1, 5, 9, 2, 6]):
        run = str(uuid.uuid4())
        context = pb.EventContext(experience_id=run, experience_name=type_name)
        events = [usage(1000, context=context) for _ in range(cents)]
        events.append(usage(1000 * (index + 1), context=context, event_timestamp=yesterday))  # another period
        await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=events))
        spent[run] = cents * 10_000_000
    expected = sorted(spent.items(), key=lambda item: (-item[1], _reversed(item[0])))
    got, token = [], ""
    while True:
        request = lim_pb.ListLimitPeriodsRequest(
            name=template.name, order_by="spend desc", page_size=3, page_token=token
        )
        page = await limits.ListLimitPeriods(request)
        got += [(p.experience_id, nanos(p.spend)) for p in page.periods]
        if not (token := page.next_page_token):
            break
    assert got == expected
    today = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    newest = await limits.ListLimitPeriods(lim_pb.ListLimitPeriodsRequest(name=template.name, page_size=100))
    assert len(newest.periods) == 16 and {p.start_time.ToDatetime(datetime.UTC) for p in newest.periods} == {
        today,
        today - datetime.timedelta(days=1),
    }
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        await limits.ListLimitPeriods(lim_pb.ListLimitPeriodsRequest(name=template.name, order_by="spend"))
    assert "order_by" in refused.fields, refused.fields


def _reversed(subject: str) -> tuple[int, ...]:
    """A key that sorts experience ids descending (ties of spend come in that order)."""
    return tuple(-ord(c) for c in subject)


async def test_spend_is_the_sum_of_its_events_across_a_period_boundary_and_a_reset(replicas):
    stubs = replicas[0]
    await price_model(stubs)
    user = f"user-{uuid.uuid4()}"
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    daily = lim_pb.Limit(
        name=unique("daily"),
        max=CENT_TIMES(5),
        kind=lim_pb.LIMIT_KIND_ALLOW,
        threshold_percent=50,
        period=lim_pb.LIMIT_PERIOD_DAY,
        scope=lim_pb.LimitScope(user_id=user),
    )
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=daily))
    now = datetime.datetime.now(datetime.UTC)
    yesterday = timestamp_pb2.Timestamp()
    yesterday.FromDatetime(now - datetime.timedelta(days=1))
    meta = (("xproxy-user-id", user),)
    old = await stubs.ingest.IngestBatch(
        pb.IngestBatchRequest(events=[usage(1000, event_timestamp=yesterday) for _ in range(2)]), metadata=meta
    )
    today = [await stubs.ingest.Ingest(pb.IngestRequest(event=usage(1000)), metadata=meta) for _ in range(3)]
    # The third cent today passes the 50% threshold: that event says it crossed it.
    states = [(r.xproxy_result.limits[0].state, r.xproxy_result.limits[0].crossed) for r in today]
    assert states == [
        (common_pb2.LIMIT_STATE_OK, False),
        (common_pb2.LIMIT_STATE_OK, False),
        (common_pb2.LIMIT_STATE_THRESHOLD, True),
    ]
    assert old.items[1].result.xproxy_result.limits[0].spend.nanos == 20_000_000  # yesterday's period, on its own
    # ALLOW never refuses: three more cents pass the maximum, and the last says so.
    more = [await stubs.ingest.Ingest(pb.IngestRequest(event=usage(1000)), metadata=meta) for _ in range(3)]
    assert more[-1].xproxy_result.limits[0].state == common_pb2.LIMIT_STATE_EXCEEDED
    assert [m.xproxy_result.limits[0].crossed for m in more] == [False, False, True]

    reset = await limits.ResetLimit(lim_pb.ResetLimitRequest(name=daily.name))
    assert nanos(reset.current.spend) == 0
    after = await stubs.ingest.Ingest(pb.IngestRequest(event=usage(1000)), metadata=meta)
    assert after.xproxy_result.limits[0].spend.nanos == 10_000_000

    periods = (await limits.ListLimitPeriods(lim_pb.ListLimitPeriodsRequest(name=daily.name))).periods
    listed = await ev_grpc.EventServiceStub(stubs.channel).ListEvents(
        ev_pb.ListEventsRequest(user_id=user, page_size=1000)
    )
    assert len(periods) == 3  # after the reset, today before it, yesterday
    for period in periods:
        start = period.start_time.ToMicroseconds()
        end = period.end_time.ToMicroseconds() if period.HasField("end_time") else 2**62
        inside = [e for e in listed.events if start <= e.event.event_timestamp.ToMicroseconds() < end]
        assert nanos(period.spend) == sum(nanos(e.xproxy_result.cost_total) for e in inside), period
        assert period.event_count == len(inside)
    assert [nanos(p.spend) for p in periods] == [10_000_000, 60_000_000, 20_000_000]


EVERYTHING = lim_pb.LimitScope(everything=True)
BAD_LIMITS = {
    "negative": ({"max": common_pb2.Money(units=-1)}, "limit.max"),
    "absurd": ({"max": common_pb2.Money(units=10**12)}, "limit.max"),
    "no-scope": ({"scope": lim_pb.LimitScope()}, "limit.scope"),
    "two-scopes": ({"scope": lim_pb.LimitScope(everything=True, user_id="u")}, "limit.scope"),
    "threshold-100": ({"threshold_percent": 100}, "limit.threshold_percent"),
    "no-kind": ({"kind": 0}, "limit.kind"),
    "euro": ({"max": common_pb2.Money(currency_code="EUR", units=1)}, "limit.max.currency_code"),
    "bad-name": ({"name": "bad name"}, "limit.name"),
}


@pytest.mark.parametrize("case", sorted(BAD_LIMITS))
async def test_bad_limits_are_invalid_argument_and_change_nothing(stubs, case):
    changes, field = BAD_LIMITS[case]
    fields = {"name": f"bad-{case}", "max": CENT, "kind": 1, "period": 1, "scope": EVERYTHING, **changes}
    limit = lim_pb.Limit(**fields)
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    async with raises(grpc.StatusCode.INVALID_ARGUMENT) as error:
        await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=limit))
    assert field in error.fields, error.fields
    async with raises(grpc.StatusCode.NOT_FOUND, "LIMIT_NOT_FOUND"):
        await limits.GetLimit(lim_pb.GetLimitRequest(name=f"bad-{case}"))


async def test_watch_limits_says_the_start_each_crossing_and_a_reset(stubs):
    await price_model(stubs)
    user = f"watched-{uuid.uuid4()}"
    name = unique("watched")
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    watched = lim_pb.Limit(
        name=name,
        max=CENT_TIMES(2),
        kind=lim_pb.LIMIT_KIND_ALLOW,
        threshold_percent=50,
        period=lim_pb.LIMIT_PERIOD_MONTH,
        scope=lim_pb.LimitScope(user_id=user),
    )
    await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=watched))
    watch = limits.WatchLimits(lim_pb.WatchLimitsRequest(names=[name]), timeout=30)
    meta = (("xproxy-user-id", user),)

    async def next_change() -> tuple[str, int, int]:
        change = await watch.read()
        return change.reason, change.period.state, nanos(change.period.spend)

    assert await next_change() == ("initial", common_pb2.LIMIT_STATE_OK, 0)
    await stubs.ingest.Ingest(pb.IngestRequest(event=usage(1000)), metadata=meta)  # $0.01: half of it
    assert await next_change() == ("threshold", common_pb2.LIMIT_STATE_THRESHOLD, 10_000_000)
    await stubs.ingest.Ingest(pb.IngestRequest(event=usage(1500)), metadata=meta)
    assert await next_change() == ("exceeded", common_pb2.LIMIT_STATE_EXCEEDED, 25_000_000)
    await limits.ResetLimit(lim_pb.ResetLimitRequest(name=name))
    assert await next_change() == ("reset", common_pb2.LIMIT_STATE_OK, 0)
    watch.cancel()
    async with raises(grpc.StatusCode.NOT_FOUND, "LIMIT_NOT_FOUND"):
        async for _ in limits.WatchLimits(lim_pb.WatchLimitsRequest(names=["no-such-limit"]), timeout=10):
            pass


async def test_reserve_is_idempotent_with_a_request_id(stubs):
    limits = lim_grpc.LimitServiceStub(stubs.channel)
    request_id = str(uuid.uuid4())
    first = await limits.Reserve(
        lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT), request_id=request_id)
    )
    again = await limits.Reserve(
        lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT), request_id=request_id)
    )
    assert again.reservation.reservation_id == first.reservation.reservation_id
    other = lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT_TIMES(2)), request_id=request_id)
    async with raises(grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
        await limits.Reserve(other)
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await limits.Reserve(lim_pb.ReserveRequest())  # no estimate


async def test_a_reservation_is_released_only_with_the_key_that_made_it(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required"))
    await server.start()
    try:
        _, admin = await server.keys.create("admin", ["admin"])
        _, mine = await server.keys.create("mine", ["ingest"])
        _, theirs = await server.keys.create("theirs", ["ingest"])
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            limits = lim_grpc.LimitServiceStub(channel)
            bearer = lambda secret: (("authorization", f"Bearer {secret}"),)  # noqa: E731
            everything = lim_pb.LimitScope(everything=True)
            limit = lim_pb.Limit(name="all", max=CENT_TIMES(5), kind=1, period=1, scope=everything)
            async with raises(grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"):
                await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=limit), metadata=bearer(mine))
            await limits.CreateLimit(lim_pb.CreateLimitRequest(limit=limit), metadata=bearer(admin))
            async with raises(grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"):
                await limits.ResetLimit(lim_pb.ResetLimitRequest(name="all"), metadata=bearer(mine))
            held = await limits.Reserve(
                lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=CENT)), metadata=bearer(mine)
            )
            release = lim_pb.ReleaseRequest(reservation_id=held.reservation.reservation_id)
            async with raises(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_OF_ANOTHER_KEY"):
                await limits.Release(release, metadata=bearer(theirs))
            got = await limits.GetLimit(lim_pb.GetLimitRequest(name="all"), metadata=bearer(admin))
            assert nanos(got.current.reserved) == 10_000_000, "still held"
            await limits.Release(release, metadata=bearer(mine))
            got = await limits.GetLimit(lim_pb.GetLimitRequest(name="all"), metadata=bearer(admin))
            assert nanos(got.current.reserved) == 0
    finally:
        await server.stop()
        await drop_database_url(url)

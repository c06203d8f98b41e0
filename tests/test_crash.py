"""An acknowledged event is never lost and never counted twice, even through a SIGKILL.

A client streams events with idempotency keys to a server process, the process
is killed mid-stream and restarted, and the client resends everything not
acknowledged (and some that were, as a confused client would).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from grpc import aio

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc,
    report_service_pb2 as rep_pb,
    report_service_pb2_grpc,
)

from .conftest import unique
from .server_process import ServerProcess

EVENTS = 3000


def event(index: int, key: str) -> pb.UsageEvent:
    return pb.UsageEvent(
        category="system.openai",
        resource="gpt-4o",
        units={"text": pb.UnitCounts(input=1000 + index, output=index % 97)},
        idempotency_key=key,
    )


async def stream(target: str, events: list[tuple[int, str]], metadata, acked: dict, stop_after: int | None, on_stop):
    """Streams events and records each acknowledged key's result; calls on_stop after `stop_after` acks."""
    async with aio.insecure_channel(target) as channel:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)

        async def requests():
            for index, key in events:
                yield pb.IngestStreamRequest(event=event(index, key))
                await asyncio.sleep(0)

        received = 0
        try:
            async for response in stub.IngestStream(requests(), metadata=metadata):
                assert response.WhichOneof("outcome") == "result", response.error
                acked[response.idempotency_key] = response.result
                received += 1
                if stop_after is not None and received == stop_after:
                    on_stop()
        except aio.AioRpcError:
            if stop_after is None:
                raise


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(stubs, database_url):
    name = unique("Crash")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="crash test"))
    )
    experience_id = str(uuid.uuid4())
    metadata = (("xproxy-experience-id", experience_id), ("xproxy-experience-name", name))
    keys = [(i, f"crash-{uuid.uuid4().hex}") for i in range(EVENTS)]

    first = ServerProcess(database_url).start()
    acked: dict[str, pb.IngestResponse] = {}
    try:
        await stream(first.target, keys, metadata, acked, stop_after=EVENTS // 3, on_stop=first.kill)
    finally:
        first.kill()
    assert EVENTS // 3 <= len(acked) < EVENTS, "the server died mid-stream"
    before_crash = dict(acked)

    second = ServerProcess(database_url).start()
    try:
        unacknowledged = [(i, k) for i, k in keys if k not in before_crash]
        resend = unacknowledged + [(i, k) for i, k in keys[:50]]  # and some that were acknowledged
        after: dict[str, pb.IngestResponse] = {}
        await stream(second.target, resend, metadata, after, stop_after=None, on_stop=None)
        assert set(after) == {k for _, k in resend}
        for _, key in keys[:50]:
            assert after[key].xproxy_result.duplicate_request
            assert after[key].request_id == before_crash[key].request_id

        async with aio.insecure_channel(second.target) as channel:
            got = await experience_service_pb2_grpc.ExperienceServiceStub(channel).GetExperience(
                exp_pb.GetExperienceRequest(experience_id=experience_id)
            )
            # The type's rollup and the hourly rollup hold the same events, once each.
            type_stats = await experience_type_service_pb2_grpc.ExperienceTypeServiceStub(
                channel
            ).GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name))
            breakdown = await report_service_pb2_grpc.ReportServiceStub(channel).BreakDownCost(
                rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_EXPERIENCE_NAME], page_size=1000)
            )
    finally:
        assert second.terminate() == 0, "SIGTERM shuts down cleanly"

    final = {**before_crash, **{k: r for k, r in after.items() if k not in before_crash}}
    assert len(final) == EVENTS
    stats = got.experience.stats
    assert stats.event_count == EVENTS, "every key stored exactly once"
    expected = sum(r.xproxy_result.cost_total.units * 10**9 + r.xproxy_result.cost_total.nanos for r in final.values())
    assert stats.cost_total.units * 10**9 + stats.cost_total.nanos == expected
    assert type_stats.total.experience_count == 1 and type_stats.total.event_count == EVENTS
    total = type_stats.total.total_cost
    assert total.units * 10**9 + total.nanos == expected
    assert type_stats.total.max_cost_per_experience == type_stats.total.p50_cost_per_experience == total
    (group,) = [g for g in breakdown.groups if g.experience_name == name]
    assert group.event_count == EVENTS and group.cost_total.units * 10**9 + group.cost_total.nanos == expected

"""Steps through the wire, on both engines: an event names the step of its run (metadata
`xproxy-experience-step`, its alias `xproxy-usecase-step`, the event's own field, or the
Python client's nested `tally.step(...)` blocks), and cost is summed per step: per run
(GetExperience), per version (GetExperienceTypeStats) and in the breakdown."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from tally.v1 import ingest_service_pb2 as pb
from tally_client import AsyncTallyClient, EventFilter, InvalidArgument, create_metadata, dollars, usage_event

from .conftest import unique


def nanos(money) -> int:
    return int(dollars(money) * 1_000_000_000)


async def test_steps_sum_per_run_per_version_and_in_the_breakdown(stubs):
    name = unique("Stepped")
    started = datetime.now(UTC) - timedelta(seconds=1)
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Retrieve, then summarize")
        runs = []
        for n in range(3):
            async with tally.experience(name) as run:
                with tally.step("retrieve"):
                    await tally.ingest("system.openai", "text-embedding-3-small", {"text": (2000 + n, 0)})
                    with tally.step("rerank"):  # a nested block names its own step
                        await tally.ingest("system.openai", "gpt-4o-mini", {"text": (500, 20 + n)})
                    await tally.ingest("system.openai", "gpt-4o-mini", {"text": (100, 10)})  # retrieve again
                with tally.step("summarize"):
                    await tally.ingest("system.openai", "gpt-4o", {"text": (3000, 400 + n)})
                await tally.ingest("system.openai", "gpt-4o", {"text": (10, 1)})  # no step
            runs.append(run.experience_id)
        # The metadata key, its use-case alias and the event's own field name a step too.
        async with tally.experience(name) as run:
            await tally.ingest("system.openai", "gpt-4o", {"text": (1000, 100)})
        other = run.experience_id
        metadata = create_metadata(experience_id=other, step="summarize")
        stub = tally._stubs["ingest"]
        await stub.Ingest(
            pb.IngestRequest(event=usage_event("system.openai", "gpt-4o", {"text": (700, 70)})), metadata=metadata
        )
        alias = (("xproxy-usecase-id", other), ("xproxy-usecase-step", "retrieve"))
        await stub.Ingest(
            pb.IngestRequest(event=usage_event("system.openai", "gpt-4o", {"text": (50, 5)})), metadata=alias
        )
        own = usage_event("system.openai", "gpt-4o", {"text": (60, 6)})
        own.context.experience_id, own.context.step = other, "rerank"
        await tally.ingest(own)

        expected_by_run: dict[str, dict[str, list[int]]] = {}
        overall: dict[str, int] = defaultdict(int)
        for experience_id in [*runs, other]:
            stored = (await tally.list_events(EventFilter(experience_id=experience_id), page_size=100)).events
            sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for e in stored:
                overall[e.event.context.step] += nanos(e.xproxy_result.cost_total)
                if e.event.context.step:
                    sums[e.event.context.step][0] += 1
                    sums[e.event.context.step][1] += nanos(e.xproxy_result.cost_total)
            expected_by_run[experience_id] = dict(sums)
            got = (await tally.get_experience(experience_id)).step_costs
            assert {c.step: [c.event_count, nanos(c.cost_total)] for c in got} == expected_by_run[experience_id]
        assert set(expected_by_run[runs[0]]) == {"retrieve", "rerank", "summarize"}
        assert expected_by_run[runs[0]]["retrieve"][0] == 2, "the outer step resumed after the nested one"
        assert set(expected_by_run[other]) == {"retrieve", "rerank", "summarize"}

        stats = await tally.get_experience_type_stats(name)
        per_step: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for sums in expected_by_run.values():
            for step, (events, cost) in sums.items():
                per_step[step][0] += 1
                per_step[step][1] += events
                per_step[step][2] += cost
        assert {
            s.step: [s.experience_count, s.event_count, nanos(s.cost_total)] for s in stats.steps if s.version == 1
        } == dict(per_step)
        runs_of_version = stats.versions[0].stats.experience_count
        for s in stats.steps:  # over every run of the version, rounded half to even
            mean = (Decimal(nanos(s.cost_total)) / runs_of_version).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
            assert nanos(s.cost_per_experience) == int(mean)

        breakdown = await tally.break_down_cost(["step"], start=started, experience_name=name)
        assert {g.step: nanos(g.cost_total) for g in breakdown.groups} == dict(overall)


async def test_a_bad_step_name_is_refused_naming_the_field(stubs):
    name = unique("BadStep")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Steps")
        event = usage_event("system.openai", "gpt-4o", {"text": (1, 1)})
        event.context.experience_name, event.context.step = name, "not a step"
        with pytest.raises(InvalidArgument) as refused:
            await tally.ingest(event)
        assert "[A-Za-z0-9._-]{1,64}" in refused.value.field_violations["event.context.step"]

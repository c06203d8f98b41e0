"""CompareVersions through the wire, on both engines, from a seeded random world: three
versions of a type, runs with failed events, outcomes of every kind, runs never scored.
Every figure of the answer equals what this test computes from the stored events (read
back with ListEvents) and the outcomes it recorded, to the nano for money."""

from __future__ import annotations

import asyncio
import math
import random
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from tally_client import AsyncTallyClient, EventFilter, InvalidArgument, NotFound, dollars, outcome, usage_event
from tally_server.domain.compare import MIN_RUNS

from .conftest import unique

OUTCOMES = [
    outcome("resolved", "boolean"),  # no goal: true is success
    outcome("csat", "likert_5", at_least=4),
    outcome("accuracy", "percentage", at_most=50),  # an error rate: lower is better
    outcome("words", "number"),  # no goal: a mean, no success rate
]


def nearest_rank(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1] if ordered else 0


def half_even(total: int, count: int) -> int:
    return int((Decimal(total) / Decimal(count)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def nanos(money) -> int:
    return int(dollars(money) * 1_000_000_000)


async def seed_world(
    tally: AsyncTallyClient, name: str, rng: random.Random, since: datetime | None = None
) -> dict[int, list[dict]]:
    """Runs of versions 1-3 with 1 to 4 events each (some failed), most of them scored;
    with `since`, each run starts at a random time in the three days after it."""
    await tally.create_experience_type(name, "A seeded world", outcomes=OUTCOMES)
    for _ in range(2):
        await tally.increment_experience_type_version(name)
    runs: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    for version, count in ((1, 12), (2, MIN_RUNS + 5), (3, MIN_RUNS + 8)):
        for _ in range(count):
            run = await tally.create_experience(name, version=version)
            events = []
            began = since + timedelta(seconds=rng.randrange(3 * 86_400)) if since else None
            for index in range(rng.randint(1, 4)):
                event = usage_event(
                    "system.openai",
                    "gpt-4o",
                    {"text": (rng.randint(100, 5000) * version, rng.randint(10, 800))},
                    http_status_code=rng.choice([200, 200, 200, 500]),
                    event_time=began + timedelta(minutes=index) if began else None,
                )
                event.context.experience_id = run.experience_id
                event.context.step = rng.choice(["", "draft", "review"])
                events.append(event)
            await tally.ingest_batch(events)
            scored: dict[str, bool | float] = {}
            if rng.random() < 0.85:
                scored["resolved"] = rng.random() < 0.4 + 0.1 * version
            if rng.random() < 0.7:
                scored["csat"] = rng.randint(1, 5)
            if rng.random() < 0.6:
                scored["accuracy"] = round(rng.uniform(0, 100), 2)
            if rng.random() < 0.5:
                scored["words"] = rng.randint(50, 500)
            if scored:
                await tally.record_outcomes(run.experience_id, scored)
            runs[version].append({"id": run.experience_id, "outcomes": scored})
    return runs


async def with_costs(tally: AsyncTallyClient, runs: list[dict]) -> list[dict]:
    """Each run's cost, events and failed events, from its stored events."""
    for run in runs:
        stored = (await tally.list_events(EventFilter(experience_id=run["id"]), page_size=100)).events
        run["cost"] = sum(nanos(e.xproxy_result.cost_total) for e in stored)
        run["events"] = len(stored)
        run["failed"] = sum(1 for e in stored if e.event.http_status_code >= 400)
        run["steps"] = {}
        run["first"] = min(e.event.event_timestamp.ToDatetime(tzinfo=UTC) for e in stored)
        for e in stored:
            if e.event.context.step:
                step = e.event.context.step
                run["steps"][step] = run["steps"].get(step, 0) + nanos(e.xproxy_result.cost_total)
    return runs


SUCCESS = {
    "resolved": lambda value: value is True,
    "csat": lambda value: value >= 4,
    "accuracy": lambda value: value <= 50,
}


def expected_summary(runs: list[dict], success: dict = SUCCESS) -> dict:
    costs = [run["cost"] for run in runs]
    events = sum(run["events"] for run in runs)
    summary = {
        "runs": len(runs),
        "cost_total": sum(costs),
        "mean": half_even(sum(costs), len(runs)),
        "p50": nearest_rank(costs, 0.5),
        "p95": nearest_rank(costs, 0.95),
        "events_per_run": events / len(runs),
        "failure_rate": sum(run["failed"] for run in runs) / events,
        "outcomes": {},
        "steps": {
            step: (
                sum(1 for run in runs if step in run["steps"]),
                half_even(sum(run["steps"].get(step, 0) for run in runs), len(runs)),
            )
            for step in sorted({step for run in runs for step in run["steps"]})
        },
    }
    for definition in OUTCOMES:
        name = definition.name
        scored = [run for run in runs if name in run["outcomes"]]
        values = [float(run["outcomes"][name]) for run in scored]
        entry = {"scored": len(scored), "mean": sum(values) / len(values) if values else 0.0}
        if name in success:
            wins = [run["cost"] for run in scored if success[name](run["outcomes"][name])]
            losses = [run["cost"] for run in scored if not success[name](run["outcomes"][name])]
            scored_cost = sum(run["cost"] for run in scored)
            entry.update(
                successes=len(wins),
                rate=len(wins) / len(scored) if scored else None,
                per_success=half_even(scored_cost, len(wins)) if wins else None,
                won=(nearest_rank(wins, 0.5), nearest_rank(wins, 0.95)),
                lost=(nearest_rank(losses, 0.5), nearest_rank(losses, 0.95)),
            )
        summary["outcomes"][name] = entry
    return summary


def check_summary(answer, expected: dict) -> None:
    assert answer.runs == expected["runs"]
    assert nanos(answer.cost_total) == expected["cost_total"]
    assert nanos(answer.cost_per_run_mean) == expected["mean"]
    assert (nanos(answer.cost_per_run_p50), nanos(answer.cost_per_run_p95)) == (expected["p50"], expected["p95"])
    assert answer.events_per_run == pytest.approx(expected["events_per_run"], rel=1e-12)
    assert answer.failure_rate == pytest.approx(expected["failure_rate"], rel=1e-12)
    assert {s.step: (s.runs, nanos(s.cost_per_run)) for s in answer.steps} == expected["steps"]
    check_outcomes(answer.outcomes, expected)


def check_outcomes(outcomes, expected: dict) -> None:
    assert [o.name for o in outcomes] == [d.name for d in OUTCOMES]
    for o in outcomes:
        wanted = expected["outcomes"][o.name]
        assert o.scored_runs == wanted["scored"], o.name
        assert o.mean == pytest.approx(wanted["mean"], rel=1e-12), o.name
        if "successes" not in wanted:
            assert not o.HasField("success_rate") and o.successes == 0, o.name
            continue
        assert o.successes == wanted["successes"], o.name
        assert o.success_rate == pytest.approx(wanted["rate"], rel=1e-12), o.name
        assert (nanos(o.cost_per_success) if o.HasField("cost_per_success") else None) == wanted["per_success"]
        assert (nanos(o.succeeded_cost_p50), nanos(o.succeeded_cost_p95)) == wanted["won"], o.name
        assert (nanos(o.failed_cost_p50), nanos(o.failed_cost_p95)) == wanted["lost"], o.name


async def test_every_figure_of_a_comparison_is_what_the_stored_events_and_outcomes_say(stubs):
    rng = random.Random(27)
    name = unique("Compared")
    async with AsyncTallyClient(stubs.target) as tally:
        runs = await seed_world(tally, name, rng)
        for version in runs:
            await with_costs(tally, runs[version])
        answer = await tally.compare_versions(name, baseline=2, candidate=3)
        check_summary(answer.baseline, expected_summary(runs[2]))
        check_summary(answer.candidate, expected_summary(runs[3]))
        by_metric = {d.metric: d for d in answer.differences}
        assert set(by_metric) == {
            "cost_per_run",
            "cost_p50",
            "cost_p95",
            "events_per_run",
            "failure_rate",
            "success_rate:resolved",
            "cost_per_success:resolved",
            "success_rate:csat",
            "cost_per_success:csat",
            "success_rate:accuracy",
            "cost_per_success:accuracy",
            "step_cost:draft",
            "step_cost:review",
        }
        cost = by_metric["cost_per_run"]
        assert cost.delta == pytest.approx(cost.candidate - cost.baseline)
        assert cost.enough_runs and cost.interval.low <= cost.delta <= cost.interval.high
        assert (answer.min_runs, answer.bootstrap_resamples, answer.confidence) == (MIN_RUNS, 1000, 0.95)
        again = await tally.compare_versions(name, baseline=2, candidate=3)
        assert again.differences == answer.differences, "seeded: the same runs give the same intervals"
        # The type's statistics give the same outcome figures per version, over all its runs.
        assert not any(v.outcomes for v in (await tally.get_experience_type_stats(name)).versions), "when asked"
        stats = await tally.get_experience_type_stats(name, include_outcomes=True)
        assert [v.version for v in stats.versions] == [1, 2, 3]
        for version in stats.versions:
            check_outcomes(version.outcomes, expected_summary(runs[version.version]))
        # Version 1 has 12 runs: a difference with it is no evidence.
        small = await tally.compare_versions(name, baseline=1, candidate=3)
        check_summary(small.baseline, expected_summary(runs[1]))
        assert not any(d.enough_runs for d in small.differences)
        assert not any(d.HasField("interval") for d in small.differences)


async def test_the_figures_follow_late_events_new_scores_new_goals_and_deletions_in_any_window(stubs):
    """The rollups move as runs do: events arriving after a run was scored (some a day
    before its first event, moving it to another day, steps and all), values replaced, a
    goal changed (every run's verdict recounted), runs deleted. Whole days come from the
    rollups, a window's partial days from the runs themselves: both agree with the events."""
    rng = random.Random(2727)
    name = unique("Moving")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = today - timedelta(days=4)
    async with AsyncTallyClient(stubs.target) as tally:
        runs = await seed_world(tally, name, rng, since)
        for version in (2, 3):
            await with_costs(tally, runs[version])
            for run in rng.sample(runs[version], 12):
                earlier = rng.random() < 0.5
                late = usage_event(
                    "system.openai",
                    "gpt-4o",
                    {"text": (rng.randint(100, 3000), rng.randint(10, 300))},
                    http_status_code=rng.choice([200, 500]),
                    event_time=run["first"] - timedelta(days=1 if earlier else -1, minutes=1),
                )
                late.context.experience_id = run["id"]
                # One a day earlier names no step: the run's steps move to that day all the same.
                late.context.step = "" if earlier else rng.choice(["", "draft", "late"])
                await tally.ingest(late)
            for run in rng.sample(runs[version], 10):
                run["outcomes"]["csat"] = rng.randint(1, 5)
                run["outcomes"]["resolved"] = rng.random() < 0.5
                await tally.record_outcomes(
                    run["id"], {"csat": run["outcomes"]["csat"], "resolved": run["outcomes"]["resolved"]}
                )
            for run in runs[version][:3]:
                await tally.delete_experience(run["id"])
            runs[version] = runs[version][3:]
        # csat now succeeds from 3: every scored run's verdict is counted again.
        await tally.update_experience_type(
            name, outcomes=[OUTCOMES[0], outcome("csat", "likert_5", at_least=3), *OUTCOMES[2:]]
        )
        success = {**SUCCESS, "csat": lambda value: value >= 3}
        for version in (2, 3):
            await with_costs(tally, runs[version])
        answer = await tally.compare_versions(name, baseline=2, candidate=3)
        check_summary(answer.baseline, expected_summary(runs[2], success))
        check_summary(answer.candidate, expected_summary(runs[3], success))
        # Partial days at both ends (from the runs), then whole days only (from the rollups).
        for start, end in (
            (since + timedelta(hours=30), since + timedelta(days=3, hours=7)),
            (since + timedelta(days=1), since + timedelta(days=3)),
        ):
            inside = {version: [run for run in runs[version] if start <= run["first"] < end] for version in (2, 3)}
            windowed = await tally.compare_versions(name, baseline=2, candidate=3, start=start, end=end)
            assert 0 < windowed.baseline.runs < answer.baseline.runs
            check_summary(windowed.baseline, expected_summary(inside[2], success))
            check_summary(windowed.candidate, expected_summary(inside[3], success))
            stats = await tally.get_experience_type_stats(name, start=start, end=end, include_outcomes=True)
            for version in (2, 3):
                (of_version,) = [v for v in stats.versions if v.version == version]
                wanted = expected_summary(inside[version], success)
                check_outcomes(of_version.outcomes, wanted)
                steps = {s.step: (s.experience_count, nanos(s.cost_total)) for s in stats.steps if s.version == version}
                costs = {step: sum(run["steps"].get(step, 0) for run in inside[version]) for step in wanted["steps"]}
                assert steps == {step: (runs_with, costs[step]) for step, (runs_with, _) in wanted["steps"].items()}


async def test_bad_comparisons_are_refused(stubs):
    name = unique("BadCompare")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Two versions", outcomes=OUTCOMES[:1])
        await tally.increment_experience_type_version(name)
        for baseline, candidate, field, said in (
            (2, 2, "candidate_version", "is the baseline version (2)"),
            (1, 3, "candidate_version", "has versions 1 to 2; got 3"),
            (0, 2, "baseline_version", "must be a version number"),
        ):
            with pytest.raises(InvalidArgument) as refused:
                await tally.compare_versions(name, baseline=baseline, candidate=candidate)
            assert said in refused.value.field_violations[field]
        with pytest.raises(NotFound):
            await tally.compare_versions(unique("Nowhere"), baseline=1, candidate=2)
        empty = await tally.compare_versions(name, baseline=1, candidate=2)
        assert (empty.baseline.runs, empty.candidate.runs) == (0, 0)
        assert not any(d.enough_runs for d in empty.differences)


async def test_scoring_and_ingest_at_once_leave_the_outcome_rollups_exact(stubs):
    """Runs re-scored while their events arrive, from many calls at once: each commit moves
    a run's whole contribution under its lock, so the outcome figures end exact."""
    rng = random.Random(99)
    name = unique("Concurrent")
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Scored while it runs", outcomes=OUTCOMES[:2])
        runs = [{"id": (await tally.create_experience(name)).experience_id, "outcomes": {}} for _ in range(12)]
        plan = [(rng.choice(runs), rng.random() < 0.5, rng.randint(1, 5)) for _ in range(120)]

        async def act(run: dict, resolved: bool, csat: int) -> None:
            event = usage_event("system.openai", "gpt-4o", {"text": (rng.randint(100, 900), 50)})
            event.context.experience_id = run["id"]
            await asyncio.gather(
                tally.ingest(event), tally.record_outcomes(run["id"], {"resolved": resolved, "csat": csat})
            )

        for start in range(0, len(plan), 12):
            await asyncio.gather(*(act(*step) for step in plan[start : start + 12]))
        for run in runs:
            scored = await tally.get_experience(run["id"])
            run["outcomes"] = {
                o.value.name: o.value.bool_value if o.value.name == "resolved" else o.value.number_value
                for o in scored.outcomes
            }
        runs = [run for run in await with_costs(tally, runs) if run["events"]]
        stats = await tally.get_experience_type_stats(name, include_outcomes=True)
        (version,) = stats.versions
        wanted = expected_summary(runs)
        assert [o.name for o in version.outcomes] == ["resolved", "csat"]
        for o in version.outcomes:
            expected = wanted["outcomes"][o.name]
            assert (o.scored_runs, o.successes) == (expected["scored"], expected["successes"]), o.name
            assert (nanos(o.cost_per_success) if o.HasField("cost_per_success") else None) == expected["per_success"]
            assert (nanos(o.succeeded_cost_p50), nanos(o.succeeded_cost_p95)) == expected["won"], o.name
            assert (nanos(o.failed_cost_p50), nanos(o.failed_cost_p95)) == expected["lost"], o.name

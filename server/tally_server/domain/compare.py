"""Two versions of a type compared over their runs: cost per run, events, failures, each
outcome's success rate and cost per success, and a seeded bootstrap interval of the
difference where it tells evidence from noise. Pure: the runs come in, the verdict
goes out."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .money import divide_half_even
from .outcomes import OutcomeDefinition, OutcomeKind, succeeded
from .stats import nearest_rank

NANOS_PER_DOLLAR = 1_000_000_000
MIN_RUNS = 30  # fewer runs on either side: a difference is no evidence
RESAMPLES = 1000
BOOTSTRAP_RUNS = 400  # runs per version the resampling draws from at most (measured: 1,000 took 0.4 s a call)
CONFIDENCE = 0.95
SEED = 20261206  # fixed: the same runs give the same intervals


@dataclass(frozen=True)
class Run:
    cost_nanos: int
    events: int
    failed_events: int
    outcomes: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # the cost of each step it has


@dataclass(frozen=True)
class StepSummary:
    step: str
    runs: int  # with the step
    cost_per_run_nanos: int  # over all the version's runs


@dataclass(frozen=True)
class OutcomeSummary:
    name: str
    scored_runs: int
    successes: int
    success_rate: float | None
    mean: float
    cost_per_success_nanos: int | None
    succeeded_p50_nanos: int
    succeeded_p95_nanos: int
    failed_p50_nanos: int
    failed_p95_nanos: int


@dataclass(frozen=True)
class VersionSummary:
    version: int
    runs: int
    cost_total_nanos: int
    mean_nanos: int
    p50_nanos: int
    p95_nanos: int
    events_per_run: float
    failure_rate: float
    outcomes: tuple[OutcomeSummary, ...]
    steps: tuple[StepSummary, ...] = ()


@dataclass(frozen=True)
class Difference:
    metric: str
    baseline: float
    candidate: float
    interval: tuple[float, float] | None
    enough_runs: bool

    @property
    def delta(self) -> float:
        return self.candidate - self.baseline

    @property
    def relative(self) -> float | None:
        return self.delta / self.baseline if self.baseline else None


@dataclass(frozen=True)
class Comparison:
    baseline: VersionSummary
    candidate: VersionSummary
    differences: tuple[Difference, ...]


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    return sorted_values[nearest_rank(len(sorted_values), fraction) - 1] if sorted_values else 0


def has_success(definition: OutcomeDefinition) -> bool:
    return definition.goal is not None or definition.kind == OutcomeKind.BOOLEAN


def summarize(version: int, runs: Sequence[Run], definitions: Sequence[OutcomeDefinition]) -> VersionSummary:
    costs = sorted(run.cost_nanos for run in runs)
    total = sum(costs)
    events = sum(run.events for run in runs)
    summaries = []
    for definition in definitions:
        scored = [run for run in runs if definition.name in run.outcomes]
        values = [run.outcomes[definition.name] for run in scored]
        verdicts = [succeeded(definition, value) for value in values]
        wins = [run.cost_nanos for run, ok in zip(scored, verdicts, strict=True) if ok]
        losses = sorted(run.cost_nanos for run, ok in zip(scored, verdicts, strict=True) if ok is False)
        wins.sort()
        gated = has_success(definition) and bool(scored)
        scored_cost = sum(run.cost_nanos for run in scored)
        summaries.append(
            OutcomeSummary(
                name=definition.name,
                scored_runs=len(scored),
                successes=len(wins),
                success_rate=len(wins) / len(scored) if gated else None,
                mean=sum(values) / len(values) if values else 0.0,
                cost_per_success_nanos=divide_half_even(scored_cost, len(wins)) if gated and wins else None,
                succeeded_p50_nanos=percentile(wins, 0.50),
                succeeded_p95_nanos=percentile(wins, 0.95),
                failed_p50_nanos=percentile(losses, 0.50),
                failed_p95_nanos=percentile(losses, 0.95),
            )
        )
    step_sums: dict[str, list[int]] = {}
    for run in runs:
        for step, cost in run.steps.items():
            sums = step_sums.setdefault(step, [0, 0])
            sums[0] += 1
            sums[1] += cost
    steps = tuple(
        StepSummary(step, count, divide_half_even(cost, len(runs))) for step, (count, cost) in sorted(step_sums.items())
    )
    return VersionSummary(
        version=version,
        runs=len(runs),
        cost_total_nanos=total,
        mean_nanos=divide_half_even(total, len(runs)) if runs else 0,
        p50_nanos=percentile(costs, 0.50),
        p95_nanos=percentile(costs, 0.95),
        events_per_run=events / len(runs) if runs else 0.0,
        failure_rate=sum(run.failed_events for run in runs) / events if events else 0.0,
        outcomes=tuple(summaries),
        steps=steps,
    )


def _interval(
    rng: random.Random,
    baseline: Sequence[Run],
    candidate: Sequence[Run],
    statistic: Callable[[Sequence[Run]], float | None],
) -> tuple[float, float] | None:
    """The bootstrap percentile interval of statistic(candidate) - statistic(baseline)."""
    a = rng.sample(list(baseline), BOOTSTRAP_RUNS) if len(baseline) > BOOTSTRAP_RUNS else list(baseline)
    b = rng.sample(list(candidate), BOOTSTRAP_RUNS) if len(candidate) > BOOTSTRAP_RUNS else list(candidate)
    deltas = []
    for _ in range(RESAMPLES):
        first, second = statistic(rng.choices(a, k=len(a))), statistic(rng.choices(b, k=len(b)))
        if first is not None and second is not None:
            deltas.append(second - first)
    if not deltas:
        return None
    deltas.sort()
    tail = (1 - CONFIDENCE) / 2
    return deltas[int(tail * (len(deltas) - 1))], deltas[int((1 - tail) * (len(deltas) - 1))]


def _mean_cost(runs: Sequence[Run]) -> float | None:
    return sum(run.cost_nanos for run in runs) / len(runs) / NANOS_PER_DOLLAR if runs else None


def _success_rate(definition: OutcomeDefinition) -> Callable[[Sequence[Run]], float | None]:
    def rate(runs: Sequence[Run]) -> float | None:
        verdicts = [
            succeeded(definition, run.outcomes[definition.name]) for run in runs if definition.name in run.outcomes
        ]
        return sum(1 for ok in verdicts if ok) / len(verdicts) if verdicts else None

    return rate


def compare(
    baseline_version: int,
    baseline_runs: Sequence[Run],
    candidate_version: int,
    candidate_runs: Sequence[Run],
    definitions: Sequence[OutcomeDefinition],
    seed: int = SEED,
) -> Comparison:
    rng = random.Random(seed)
    base = summarize(baseline_version, baseline_runs, definitions)
    cand = summarize(candidate_version, candidate_runs, definitions)
    enough = base.runs >= MIN_RUNS and cand.runs >= MIN_RUNS

    def dollars(nanos: int) -> float:
        return nanos / NANOS_PER_DOLLAR

    cost_interval = _interval(rng, baseline_runs, candidate_runs, _mean_cost) if enough else None
    differences = [
        Difference("cost_per_run", dollars(base.mean_nanos), dollars(cand.mean_nanos), cost_interval, enough),
        Difference("cost_p50", dollars(base.p50_nanos), dollars(cand.p50_nanos), None, enough),
        Difference("cost_p95", dollars(base.p95_nanos), dollars(cand.p95_nanos), None, enough),
        Difference("events_per_run", base.events_per_run, cand.events_per_run, None, enough),
        Difference("failure_rate", base.failure_rate, cand.failure_rate, None, enough),
    ]
    for definition, first, second in zip(definitions, base.outcomes, cand.outcomes, strict=True):
        if first.success_rate is None or second.success_rate is None:
            continue
        scored_enough = first.scored_runs >= MIN_RUNS and second.scored_runs >= MIN_RUNS
        interval = _interval(rng, baseline_runs, candidate_runs, _success_rate(definition)) if scored_enough else None
        differences.append(
            Difference(
                f"success_rate:{definition.name}", first.success_rate, second.success_rate, interval, scored_enough
            )
        )
        if first.cost_per_success_nanos is not None and second.cost_per_success_nanos is not None:
            differences.append(
                Difference(
                    f"cost_per_success:{definition.name}",
                    dollars(first.cost_per_success_nanos),
                    dollars(second.cost_per_success_nanos),
                    None,
                    scored_enough,
                )
            )
    base_steps = {step.step: step for step in base.steps}
    cand_steps = {step.step: step for step in cand.steps}
    for step in sorted(set(base_steps) | set(cand_steps)):
        first_cost = base_steps[step].cost_per_run_nanos if step in base_steps else 0
        second_cost = cand_steps[step].cost_per_run_nanos if step in cand_steps else 0
        differences.append(Difference(f"step_cost:{step}", dollars(first_cost), dollars(second_cost), None, enough))
    return Comparison(base, cand, tuple(differences))

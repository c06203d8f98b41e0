"""Two versions of a type compared over their runs: cost per run, events, failures, each
outcome's success rate and cost per success, and a seeded bootstrap interval of the
difference where it tells evidence from noise. Pure: the versions' rollup sums (and the
exact percentiles the caller found) come in, the verdict goes out."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .money import divide_half_even
from .outcomes import OutcomeDefinition, OutcomeKind
from .rollups import FAILED, SUCCEEDED, OutcomeTotals, StepTotals, TypeDeltas, TypeTotals, bucket_value

NANOS_PER_DOLLAR = 1_000_000_000
MIN_RUNS = 30  # fewer runs on either side: a difference is no evidence
RESAMPLES = 1000
# Runs each resample draws per version at most; beyond it the resampled spread is scaled
# to the version's run count (the spread of a mean of n draws is that of m draws times
# sqrt(m/n)), so the interval's width does not depend on the cap.
BOOTSTRAP_RUNS = 400
CONFIDENCE = 0.95
SEED = 20261206  # fixed: the same runs give the same intervals


@dataclass
class VersionSums:
    """What the type rollups count of one version's runs in a window (days summed)."""

    version: int
    totals: TypeTotals = field(default_factory=TypeTotals)
    buckets: dict[int, int] = field(default_factory=dict)  # the runs' cost histogram
    outcomes: dict[tuple[str, int], OutcomeTotals] = field(default_factory=dict)  # by (name, verdict)
    outcome_buckets: dict[tuple[str, int], dict[int, int]] = field(default_factory=dict)
    steps: dict[str, StepTotals] = field(default_factory=dict)


def version_sums(deltas: TypeDeltas) -> dict[int, VersionSums]:
    """Rollup rows (or experiences counted at a window's edge) summed per version."""
    found: dict[int, VersionSums] = {}

    def of(version: int) -> VersionSums:
        return found.setdefault(version, VersionSums(version))

    for (_, version, _), t in deltas.totals.items():
        into = of(version).totals
        into.experience_count += t.experience_count
        into.event_count += t.event_count
        into.failed_event_count += t.failed_event_count
        into.unpriced_event_count += t.unpriced_event_count
        into.cost_total_nanos += t.cost_total_nanos
    for (_, version, _, bucket), n in deltas.buckets.items():
        buckets = of(version).buckets
        buckets[bucket] = buckets.get(bucket, 0) + n
    for (_, version, _, name, verdict), o in deltas.outcomes.items():
        into_outcome = of(version).outcomes.setdefault((name, verdict), OutcomeTotals())
        into_outcome.run_count += o.run_count
        into_outcome.value_sum += o.value_sum
        into_outcome.cost_total_nanos += o.cost_total_nanos
    for (_, version, _, name, verdict, bucket), n in deltas.outcome_buckets.items():
        histogram = of(version).outcome_buckets.setdefault((name, verdict), {})
        histogram[bucket] = histogram.get(bucket, 0) + n
    for (_, version, _, step), st in deltas.steps.items():
        into_step = of(version).steps.setdefault(step, StepTotals())
        into_step.run_count += st.run_count
        into_step.event_count += st.event_count
        into_step.cost_total_nanos += st.cost_total_nanos
    return {version: sums for version, sums in found.items() if sums.totals.experience_count}


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


def has_success(definition: OutcomeDefinition) -> bool:
    return definition.goal is not None or definition.kind == OutcomeKind.BOOLEAN


# The nearest-rank percentiles a summary needs, found by the caller (exactly, from the
# stored runs): by (outcome name or "" for all runs, verdict or None, fraction).
PercentileKey = tuple[str, int | None, float]
FRACTIONS = (0.50, 0.95)


def percentiles_needed(sums: VersionSums, definitions: Sequence[OutcomeDefinition]) -> list[PercentileKey]:
    needed: list[PercentileKey] = [("", None, fraction) for fraction in FRACTIONS]
    for definition in definitions:
        for verdict in (SUCCEEDED, FAILED):
            if (definition.name, verdict) in sums.outcomes:
                needed += [(definition.name, verdict, fraction) for fraction in FRACTIONS]
    return needed


def summarize(
    sums: VersionSums, definitions: Sequence[OutcomeDefinition], percentiles: Mapping[PercentileKey, int]
) -> VersionSummary:
    """A version's summary from its sums, with the percentiles percentiles_needed names."""
    totals = sums.totals
    runs, events = totals.experience_count, totals.event_count
    summaries = []
    for definition in definitions:
        by_verdict = {verdict: o for (name, verdict), o in sums.outcomes.items() if name == definition.name}
        scored = sum(o.run_count for o in by_verdict.values())
        wins = by_verdict[SUCCEEDED].run_count if SUCCEEDED in by_verdict else 0
        gated = has_success(definition) and bool(scored)
        scored_cost = sum(o.cost_total_nanos for o in by_verdict.values())
        name = definition.name
        summaries.append(
            OutcomeSummary(
                name=name,
                scored_runs=scored,
                successes=wins,
                success_rate=wins / scored if gated else None,
                mean=sum(o.value_sum for o in by_verdict.values()) / scored if scored else 0.0,
                cost_per_success_nanos=divide_half_even(scored_cost, wins) if gated and wins else None,
                succeeded_p50_nanos=percentiles.get((name, SUCCEEDED, 0.50), 0),
                succeeded_p95_nanos=percentiles.get((name, SUCCEEDED, 0.95), 0),
                failed_p50_nanos=percentiles.get((name, FAILED, 0.50), 0),
                failed_p95_nanos=percentiles.get((name, FAILED, 0.95), 0),
            )
        )
    steps = tuple(
        StepSummary(step, st.run_count, divide_half_even(st.cost_total_nanos, runs))
        for step, st in sorted(sums.steps.items())
        if st.run_count
    )
    return VersionSummary(
        version=sums.version,
        runs=runs,
        cost_total_nanos=totals.cost_total_nanos,
        mean_nanos=divide_half_even(totals.cost_total_nanos, runs) if runs else 0,
        p50_nanos=percentiles.get(("", None, 0.50), 0),
        p95_nanos=percentiles.get(("", None, 0.95), 0),
        events_per_run=events / runs if runs else 0.0,
        failure_rate=totals.failed_event_count / events if events else 0.0,
        outcomes=tuple(summaries),
        steps=steps,
    )


def _resampled_means(rng: random.Random, buckets: Mapping[int, int], mean: float) -> list[float]:
    """Bootstrap means (in dollars) of a version's runs, drawn from its cost histogram
    (values within RELATIVE_ERROR of each run's), centred on the exact mean."""
    runs = sum(buckets.values())
    ordered = sorted(b for b in buckets if buckets[b] > 0)
    values = [bucket_value(b) / NANOS_PER_DOLLAR for b in ordered]
    centre = sum(v * buckets[b] for v, b in zip(values, ordered, strict=True)) / runs
    cumulative = list(itertools.accumulate(buckets[b] for b in ordered))
    draws = min(runs, BOOTSTRAP_RUNS)
    scale = math.sqrt(draws / runs)
    return [
        mean + (sum(rng.choices(values, cum_weights=cumulative, k=draws)) / draws - centre) * scale
        for _ in range(RESAMPLES)
    ]


def _resampled_rates(rng: random.Random, successes: int, scored: int) -> list[float]:
    """Bootstrap success rates of a version's scored runs, from its counts."""
    rate = successes / scored
    draws = min(scored, BOOTSTRAP_RUNS)
    scale = math.sqrt(draws / scored)
    return [
        rate + (rng.choices((1, 0), (successes, scored - successes), k=draws).count(1) / draws - rate) * scale
        for _ in range(RESAMPLES)
    ]


def _interval(baseline: Sequence[float], candidate: Sequence[float]) -> tuple[float, float]:
    """The bootstrap percentile interval of candidate - baseline."""
    deltas = sorted(second - first for first, second in zip(baseline, candidate, strict=True))
    tail = (1 - CONFIDENCE) / 2
    return deltas[int(tail * (len(deltas) - 1))], deltas[int((1 - tail) * (len(deltas) - 1))]


def compare(
    base_sums: VersionSums,
    base: VersionSummary,
    cand_sums: VersionSums,
    cand: VersionSummary,
    definitions: Sequence[OutcomeDefinition],
    seed: int = SEED,
) -> Comparison:
    rng = random.Random(seed)
    enough = base.runs >= MIN_RUNS and cand.runs >= MIN_RUNS

    def dollars(nanos: int) -> float:
        return nanos / NANOS_PER_DOLLAR

    cost_interval = None
    if enough:
        cost_interval = _interval(
            _resampled_means(rng, base_sums.buckets, dollars(base.cost_total_nanos) / base.runs),
            _resampled_means(rng, cand_sums.buckets, dollars(cand.cost_total_nanos) / cand.runs),
        )
    differences = [
        Difference("cost_per_run", dollars(base.mean_nanos), dollars(cand.mean_nanos), cost_interval, enough),
        Difference("cost_p50", dollars(base.p50_nanos), dollars(cand.p50_nanos), None, enough),
        Difference("cost_p95", dollars(base.p95_nanos), dollars(cand.p95_nanos), None, enough),
        Difference("events_per_run", base.events_per_run, cand.events_per_run, None, enough),
        Difference("failure_rate", base.failure_rate, cand.failure_rate, None, enough),
    ]
    for first, second in zip(base.outcomes, cand.outcomes, strict=True):
        if first.success_rate is None or second.success_rate is None:
            continue
        scored_enough = first.scored_runs >= MIN_RUNS and second.scored_runs >= MIN_RUNS
        interval = None
        if scored_enough:
            interval = _interval(
                _resampled_rates(rng, first.successes, first.scored_runs),
                _resampled_rates(rng, second.successes, second.scored_runs),
            )
        differences.append(
            Difference(f"success_rate:{first.name}", first.success_rate, second.success_rate, interval, scored_enough)
        )
        if first.cost_per_success_nanos is not None and second.cost_per_success_nanos is not None:
            differences.append(
                Difference(
                    f"cost_per_success:{first.name}",
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

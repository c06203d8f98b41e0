"""Protobuf <-> domain records. The only place that knows both."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any, Literal, cast

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from tally.v1 import (
    access_pb2,
    api_key_service_pb2 as api_key_pb,
    common_pb2,
    event_service_pb2 as event_pb,
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as ing_pb,
    price_catalog_service_pb2 as price_pb,
    report_service_pb2 as report_pb,
)

from ..domain import compare, models as m, outcomes
from ..domain.errors import TallyError, Violation, invalid
from ..domain.money import divide_half_even, nanos_to_units_and_nanos


def set_timestamp(target: timestamp_pb2.Timestamp, time_us: int) -> None:
    target.seconds, micros_part = divmod(time_us, 1_000_000)
    target.nanos = micros_part * 1000


def timestamp(time_us: int | None) -> timestamp_pb2.Timestamp | None:
    if time_us is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    set_timestamp(stamp, time_us)
    return stamp


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def timestamp_problem(stamp: timestamp_pb2.Timestamp) -> str | None:
    """Why a Timestamp is not a valid one, or None: outside protobuf's range, a caller
    could otherwise reach date arithmetic that fails."""
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS:
        return f"seconds must be within years 0001 to 9999, got {stamp.seconds}"
    if not 0 <= stamp.nanos <= 999_999_999:
        return f"nanos must be 0 to 999,999,999, got {stamp.nanos}"
    return None


def micros(message: Message, field: str, path: str = "") -> int | None:
    """A Timestamp field as microseconds, or None when unset; INVALID_ARGUMENT (naming
    `path`, else the field) when it is not a valid Timestamp."""
    if not message.HasField(field):
        return None
    stamp = getattr(message, field)
    problem = timestamp_problem(stamp)
    if problem is not None:
        raise invalid([Violation(path or field, problem)])
    return int(stamp.ToMicroseconds())


def money(total_nanos: int) -> common_pb2.Money:
    result = common_pb2.Money()
    _set_money(result, total_nanos)
    return result


# --- experience types --------------------------------------------------------------


def experience_type(t: m.ExperienceType) -> et_pb.ExperienceType:
    return et_pb.ExperienceType(
        name=t.name,
        description=t.description,
        settings=t.settings,
        version=t.version,
        create_time=timestamp(t.create_time_us),
        update_time=timestamp(t.update_time_us),
        outcomes=[outcome_definition(d) for d in t.outcomes],
    )


# --- outcomes ------------------------------------------------------------------------


def outcome_definition(d: outcomes.OutcomeDefinition) -> et_pb.OutcomeDefinition:
    message = et_pb.OutcomeDefinition(
        name=d.name, kind=cast("et_pb.OutcomeKind.ValueType", int(d.kind)), description=d.description
    )
    if d.goal is not None:
        if d.goal.comparison == outcomes.GoalComparison.EQUALS:
            message.goal.equals = d.goal.value == 1.0
        elif d.goal.comparison == outcomes.GoalComparison.AT_LEAST:
            message.goal.at_least = d.goal.value
        else:
            message.goal.at_most = d.goal.value
    return message


def outcome_definitions(given: Iterable[et_pb.OutcomeDefinition]) -> list[outcomes.OutcomeDefinition]:
    """The declarations as sent; the domain checks them (an unknown kind stays unknown)."""
    found = []
    for d in given:
        goal = None
        which = d.goal.WhichOneof("goal") if d.HasField("goal") else None
        if which == "equals":
            goal = outcomes.Goal(outcomes.GoalComparison.EQUALS, 1.0 if d.goal.equals else 0.0)
        elif which in ("at_least", "at_most"):
            goal = outcomes.Goal(outcomes.GoalComparison(which), getattr(d.goal, which))
        known = int(d.kind) in {k.value for k in outcomes.OutcomeKind}
        kind = outcomes.OutcomeKind(d.kind) if known else cast("outcomes.OutcomeKind", int(d.kind))
        found.append(outcomes.OutcomeDefinition(d.name, kind, goal, d.description))
    return found


def outcome_values(given: Iterable[exp_pb.OutcomeValue]) -> list[outcomes.OutcomeValue]:
    found = []
    for value in given:
        which = value.WhichOneof("value")
        if which == "bool_value":
            found.append(outcomes.OutcomeValue(value.name, 1.0 if value.bool_value else 0.0, True))
        else:  # a number, or nothing: NaN, refused as not finite
            number = value.number_value if which == "number_value" else float("nan")
            found.append(outcomes.OutcomeValue(value.name, number, False))
    return found


def recorded_outcome(o: outcomes.ScoredOutcome) -> exp_pb.RecordedOutcome:
    recorded = o.recorded
    message = exp_pb.RecordedOutcome(record_time=timestamp(recorded.record_time_us), key_name=recorded.key_name)
    message.value.name = recorded.name
    if o.definition is not None and o.definition.kind == outcomes.OutcomeKind.BOOLEAN:
        message.value.bool_value = recorded.value == 1.0
    else:
        message.value.number_value = recorded.value
    if o.succeeded is not None:
        message.succeeded = o.succeeded
    return message


def experience_type_version(v: m.ExperienceTypeVersion) -> et_pb.ExperienceTypeVersion:
    return et_pb.ExperienceTypeVersion(
        name=v.name,
        version=v.version,
        description=v.description,
        settings=v.settings,
        create_time=timestamp(v.create_time_us),
    )


def cost_distribution(d: m.CostDistribution) -> et_pb.CostDistribution:
    return et_pb.CostDistribution(
        experience_count=d.experience_count,
        event_count=d.event_count,
        unpriced_event_count=d.unpriced_event_count,
        total_cost=money(d.total_nanos),
        mean_cost_per_experience=money(d.mean_nanos),
        p50_cost_per_experience=money(d.p50_nanos),
        p95_cost_per_experience=money(d.p95_nanos),
        max_cost_per_experience=money(d.max_nanos),
    )


def type_stats(s: m.TypeStats) -> et_pb.GetExperienceTypeStatsResponse:
    return et_pb.GetExperienceTypeStatsResponse(
        name=s.name,
        total=cost_distribution(s.total),
        versions=[
            et_pb.VersionCostDistribution(
                version=version,
                stats=cost_distribution(d),
                outcomes=[outcome_summary(o) for o in s.outcomes.get(version, ())],
            )
            for version, d in s.by_version.items()
        ],
        steps=[
            et_pb.VersionStepCost(
                version=c.version,
                step=c.step,
                experience_count=c.experience_count,
                event_count=c.event_count,
                cost_total=money(c.cost_nanos),
                cost_per_experience=money(
                    divide_half_even(c.cost_nanos, c.version_experience_count) if c.version_experience_count else 0
                ),
            )
            for c in s.steps
        ],
    )


# --- experiences -------------------------------------------------------------------


def experience(e: m.Experience, stats: m.ExperienceStats | None = None) -> exp_pb.Experience:
    stats = stats or e.stats
    message = exp_pb.Experience(
        experience_id=str(e.experience_id),
        experience_name=e.experience_name,
        experience_version=e.experience_version,
        create_time=timestamp(e.create_time_us),
        properties=e.properties,
        outcomes=[recorded_outcome(o) for o in e.outcomes or ()],
        step_costs=[
            exp_pb.StepCost(step=c.step, event_count=c.event_count, cost_total=money(c.cost_nanos))
            for c in e.step_costs
        ],
        property_updates=[
            exp_pb.PropertyUpdate(key=u.key, update_time=timestamp(u.update_time_us), key_name=u.key_name)
            for u in e.property_updates
        ],
    )
    if stats is not None:
        message.stats.CopyFrom(experience_stats(stats))
    return message


def experience_stats(s: m.ExperienceStats) -> exp_pb.ExperienceStats:
    return exp_pb.ExperienceStats(
        cost_input=money(s.cost_input_nanos),
        cost_output=money(s.cost_output_nanos),
        cost_total=money(s.cost_total_nanos),
        event_count=s.event_count,
        failed_event_count=s.failed_event_count,
        unpriced_event_count=s.unpriced_event_count,
        latency_mean_ms=s.latency_mean_ms,
        latency_p50_ms=s.latency_p50_ms,
        latency_p95_ms=s.latency_p95_ms,
        first_event_time=timestamp(s.first_event_time_us),
        last_event_time=timestamp(s.last_event_time_us),
        latency_reported_event_count=s.latency_reported_event_count,
        input_tokens=s.input_tokens,
        output_tokens=s.output_tokens,
    )


# --- ingest ------------------------------------------------------------------------


def event_context(c: ing_pb.EventContext) -> m.EventContext:
    return m.EventContext(
        experience_id=c.experience_id,
        experience_name=c.experience_name,
        experience_version=c.experience_version,
        user_id=c.user_id,
        request_tags=tuple(c.request_tags),
        step=c.step,
    )


# Not part of an event's content: its context (a retry may have learned its experience
# since) and the latencies (they measure the observer; recording one response twice is a
# duplicate, not a different event).
_NOT_CONTENT: tuple[
    Literal["context", "end_to_end_latency_ms", "time_to_first_token_ms", "limit_reservation_id"], ...
] = ("context", "end_to_end_latency_ms", "time_to_first_token_ms", "limit_reservation_id")


def usage_event(event: ing_pb.UsageEvent, now_us: int) -> m.UsageEvent:
    """The domain event with its own context, not yet merged with the call's (the
    domain's prepare_event does that). Its content hash covers the event as sent (before
    defaults such as the event time), without what _NOT_CONTENT names.

    The message is consumed: those fields are cleared from it once read."""
    has_context = event.HasField("context")
    context = event_context(event.context) if has_context else m.NO_CONTEXT
    if event.limit_reservation_id:  # not content: the retry of a call may hold a new reservation
        context = dataclasses.replace(context, limit_reservation=event.limit_reservation_id)
    latency, first_token = event.end_to_end_latency_ms, event.time_to_first_token_ms
    if has_context or latency or first_token or event.limit_reservation_id:
        for name in _NOT_CONTENT:
            event.ClearField(name)
    properties, price_context = event.properties, event.price_context
    return m.UsageEvent(
        category=event.category,
        resource=event.resource,
        units={unit: (counts.input, counts.output) for unit, counts in event.units.items()},
        event_time_us=event.event_timestamp.ToMicroseconds() if event.HasField("event_timestamp") else now_us,
        end_to_end_latency_ms=latency,
        time_to_first_token_ms=first_token,
        http_status_code=event.http_status_code,
        provider_response_id=event.provider_response_id,
        idempotency_key=event.idempotency_key,
        properties=dict(properties) if properties else {},  # dict() of an empty map costs 10x the test
        context=context,
        content_hash=hashlib.sha256(event.SerializeToString(deterministic=True)).hexdigest(),
        price_context=dict(price_context) if price_context else {},
    )


def price_reference(p: m.PriceReference) -> ing_pb.PriceReference:
    return ing_pb.PriceReference(
        source=cast("ing_pb.PriceSource.ValueType", p.source),
        category=p.category,
        resource=p.resource,
        version=p.version,
        effective_time=timestamp(p.effective_time_us),
        price_context=dict(p.price_context),
    )


def _set_money(target: common_pb2.Money, total_nanos: int) -> None:
    target.currency_code = "USD"
    _set_amount(target, total_nanos)


def _set_amount(target: common_pb2.Money, total_nanos: int) -> None:
    target.units, target.nanos = nanos_to_units_and_nanos(total_nanos)


# An XProxyResult is written in two parts: what the events committed together for
# one caller mostly share (currency, price entry, experience), and what is each
# event's own (amounts, state). IngestResponses encodes the first part once.


def _set_shared_cost(result: ing_pb.XProxyResult, price: m.PriceReference | None) -> None:
    # Fields are set in place: handing sub-messages to constructors copies them.
    for amount in (result.cost_input, result.cost_output, result.cost_total):
        amount.currency_code = "USD"
    if price is not None:
        reference = result.price
        reference.source = cast("ing_pb.PriceSource.ValueType", price.source)
        reference.category = price.category
        reference.resource = price.resource
        reference.version = price.version
        if price.effective_time_us is not None:
            set_timestamp(reference.effective_time, price.effective_time_us)
        if price.price_context:
            reference.price_context.update(price.price_context)


def _set_own_cost(result: ing_pb.XProxyResult, cost: m.Cost) -> None:
    _set_amount(result.cost_input, cost.input_nanos)
    _set_amount(result.cost_output, cost.output_nanos)
    _set_amount(result.cost_total, cost.total_nanos)
    result.cost_state = cast("ing_pb.CostState.ValueType", cost.state)
    for u in cost.unknown_units:
        result.unknown_units.add(unit_type=u.unit_type, input=u.input, output=u.output, reason=u.reason)


def quote_result(cost: m.Cost) -> ing_pb.XProxyResult:
    result = ing_pb.XProxyResult()
    _set_shared_cost(result, cost.price)
    _set_own_cost(result, cost)
    result.warnings.extend(cost.warnings)
    return result


def ingest_response(r: m.IngestResult, response: ing_pb.IngestResponse | None = None) -> ing_pb.IngestResponse:
    """The result as an IngestResponse, written into `response` when given (a batch
    or stream item's field, so that nothing is copied)."""
    if response is None:
        response = ing_pb.IngestResponse()
    _set_shared_fields(response, r)
    _set_own_fields(response, r)
    return response


def _set_shared_fields(response: ing_pb.IngestResponse, r: m.IngestResult) -> None:
    set_timestamp(response.ingest_timestamp, r.ingest_time_us)
    result = response.xproxy_result
    if r.experience_id is not None:
        result.experience_id = str(r.experience_id)
        result.experience_name = r.experience_name
        result.experience_version = r.experience_version
        result.experience_created = r.experience_created
    result.duplicate_request = r.duplicate
    if r.warnings:
        result.warnings.extend(r.warnings)
    if r.user_id:
        result.user_id = r.user_id
    if r.request_tags:
        result.request_tags.extend(r.request_tags)
    _set_shared_cost(result, r.cost.price)


def _set_own_fields(response: ing_pb.IngestResponse, r: m.IngestResult) -> None:
    request_id = str(r.request_id)
    response.request_id = request_id
    set_timestamp(response.event_timestamp, r.event_time_us)
    response.xproxy_result.request_id = request_id
    _set_own_cost(response.xproxy_result, r.cost)
    for applied in r.limits:
        status = response.xproxy_result.limits.add(
            limit=applied.limit.name,
            state=cast("common_pb2.LimitState.ValueType", int(applied.state)),
            crossed=applied.crossed,
            experience_id=applied.subject,
        )
        _set_money(status.spend, applied.spend_nanos)
        _set_money(status.max, applied.limit.max_nanos)


class IngestResponses:
    """Writes the IngestResponses of one call's many events (a batch, a stream).

    The shared part of each answer (ingest time, experience, price entry, user,
    tags) is encoded once per distinct value and merged in as bytes; only each
    event's own fields are set one by one: the same message as ingest_response in
    half the time, and this runs once per ingested event.
    """

    _MAX_ENTRIES = 64

    def __init__(self) -> None:
        self._shared: dict[tuple[Any, ...], bytes] = {}

    def write(self, r: m.IngestResult, response: ing_pb.IngestResponse) -> None:
        # Every input of _set_shared_fields (an experience's name and version follow its id).
        key = (
            r.ingest_time_us,
            r.experience_id,
            r.experience_created,
            r.duplicate,
            r.user_id,
            r.request_tags,
            r.warnings,
            r.cost.price,
        )
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) >= self._MAX_ENTRIES:
                self._shared.clear()
            message = ing_pb.IngestResponse()
            _set_shared_fields(message, r)
            shared = self._shared[key] = message.SerializeToString()
        response.MergeFromString(shared)
        _set_own_fields(response, r)


def item_error(error: TallyError) -> common_pb2.ItemError:
    return common_pb2.ItemError(
        code=error.code.value,
        message=error.message,
        reason=error.reason,
        field_violations=[
            common_pb2.FieldViolation(field=v.field, description=v.description) for v in error.listed_violations()
        ],
    )


# --- prices ------------------------------------------------------------------------


def custom_price(p: m.CustomPrice) -> price_pb.CustomPrice:
    return price_pb.CustomPrice(
        price_id=str(p.price_id),
        category=p.category,
        resource=p.resource,
        effective_time=timestamp(p.effective_time_us),
        unit_prices={
            unit: price_pb.UnitPrice(input_per_million=u.input_per_million, output_per_million=u.output_per_million)
            for unit, u in p.unit_prices.items()
        },
        create_time=timestamp(p.create_time_us),
        create_key=p.create_key,
        end_time=timestamp(p.end_time_us),
        end_key=p.end_key,
        price_context=p.price_context,
    )


# --- API keys ------------------------------------------------------------------------

_SCOPES = {"ingest": access_pb2.SCOPE_INGEST, "read": access_pb2.SCOPE_READ, "admin": access_pb2.SCOPE_ADMIN}
SCOPE_NAMES: dict[int, str] = {number: name for name, number in _SCOPES.items()}


def api_key(k: m.ApiKey) -> api_key_pb.ApiKey:
    return api_key_pb.ApiKey(
        name=k.name,
        scopes=[_SCOPES[scope] for scope in k.scopes],
        create_time=timestamp(k.create_time_us),
        last_use_time=timestamp(k.last_use_time_us),
        revoke_time=timestamp(k.revoke_time_us),
    )


def scope_names(scopes: Iterable[int]) -> list[str]:
    """Scope enum values as the domain's names; an unknown value keeps a name the domain refuses."""
    return [SCOPE_NAMES.get(scope, f"scope {scope}") for scope in scopes]


def stored_event(s: m.StoredEvent) -> event_pb.StoredEvent:
    e, c = s.event, s.event.context
    message = event_pb.StoredEvent(
        request_id=str(s.result.request_id),
        event=ing_pb.UsageEvent(
            category=e.category,
            resource=e.resource,
            units={unit: ing_pb.UnitCounts(input=i, output=o) for unit, (i, o) in e.units.items()},
            end_to_end_latency_ms=e.end_to_end_latency_ms,
            time_to_first_token_ms=e.time_to_first_token_ms,
            http_status_code=e.http_status_code,
            provider_response_id=e.provider_response_id,
            idempotency_key=e.idempotency_key,
            properties=e.properties,
            context=ing_pb.EventContext(
                experience_id=c.experience_id,
                experience_name=c.experience_name,
                experience_version=c.experience_version,
                user_id=c.user_id,
                request_tags=c.request_tags,
                step=c.step,
            ),
            price_context=e.price_context,
        ),
    )
    set_timestamp(message.event.event_timestamp, e.event_time_us)
    response = ingest_response(s.result)
    message.ingest_timestamp.CopyFrom(response.ingest_timestamp)
    message.xproxy_result.CopyFrom(response.xproxy_result)
    for note in s.annotations:
        message.annotations.add(
            key=note.key, value=note.value, update_time=timestamp(note.update_time_us), key_name=note.key_name
        )
    return message


# CostDimension values and the domain's dimension names.
COST_DIMENSIONS = {
    report_pb.COST_DIMENSION_EXPERIENCE_NAME: "experience_name",
    report_pb.COST_DIMENSION_EXPERIENCE_VERSION: "experience_version",
    report_pb.COST_DIMENSION_CATEGORY: "category",
    report_pb.COST_DIMENSION_RESOURCE: "resource",
    report_pb.COST_DIMENSION_MODEL: "model",
    report_pb.COST_DIMENSION_USER_ID: "user_id",
    report_pb.COST_DIMENSION_REQUEST_TAG: "request_tag",
    report_pb.COST_DIMENSION_DAY: "day",
    report_pb.COST_DIMENSION_HOUR: "hour",
    report_pb.COST_DIMENSION_STEP: "step",
    report_pb.COST_DIMENSION_API_KEY: "api_key_name",
}


def cost_dimensions(values: Iterable[int]) -> list[str]:
    """The dimensions by name; an unknown value keeps a name the domain refuses."""
    return [COST_DIMENSIONS.get(cast(Any, value), f"dimension {value}") for value in values]


def cost_group(g: m.CostGroup) -> report_pb.CostGroup:
    t = g.totals
    message = report_pb.CostGroup(
        cost_input=money(t.cost_input_nanos),
        cost_output=money(t.cost_output_nanos),
        cost_total=money(t.cost_total_nanos),
        event_count=t.event_count,
        unpriced_event_count=t.unpriced_event_count,
        input_tokens=t.input_tokens,
        output_tokens=t.output_tokens,
    )
    for name, value in g.keys.items():
        if name in ("day", "hour"):
            set_timestamp(message.period_start, int(value))
        else:
            setattr(message, name, value)
    return message


# --- comparing versions --------------------------------------------------------------


def outcome_summary(o: compare.OutcomeSummary) -> report_pb.OutcomeSummary:
    summary = report_pb.OutcomeSummary(
        name=o.name,
        scored_runs=o.scored_runs,
        successes=o.successes,
        mean=o.mean,
        succeeded_cost_p50=money(o.succeeded_p50_nanos),
        succeeded_cost_p95=money(o.succeeded_p95_nanos),
        failed_cost_p50=money(o.failed_p50_nanos),
        failed_cost_p95=money(o.failed_p95_nanos),
    )
    if o.success_rate is not None:
        summary.success_rate = o.success_rate
    if o.cost_per_success_nanos is not None:
        summary.cost_per_success.CopyFrom(money(o.cost_per_success_nanos))
    return summary


def _version_summary(v: compare.VersionSummary) -> report_pb.VersionSummary:
    message = report_pb.VersionSummary(
        version=v.version,
        runs=v.runs,
        cost_total=money(v.cost_total_nanos),
        cost_per_run_mean=money(v.mean_nanos),
        cost_per_run_p50=money(v.p50_nanos),
        cost_per_run_p95=money(v.p95_nanos),
        events_per_run=v.events_per_run,
        failure_rate=v.failure_rate,
    )
    message.outcomes.extend(outcome_summary(o) for o in v.outcomes)
    for step in v.steps:
        message.steps.add(step=step.step, runs=step.runs, cost_per_run=money(step.cost_per_run_nanos))
    return message


def comparison(experience_name: str, c: compare.Comparison) -> report_pb.CompareVersionsResponse:
    response = report_pb.CompareVersionsResponse(
        experience_name=experience_name,
        baseline=_version_summary(c.baseline),
        candidate=_version_summary(c.candidate),
        min_runs=compare.MIN_RUNS,
        bootstrap_resamples=compare.RESAMPLES,
        bootstrap_seed=compare.SEED,
        confidence=compare.CONFIDENCE,
        bootstrap_runs=compare.BOOTSTRAP_RUNS,
    )
    for d in c.differences:
        item = response.differences.add(
            metric=d.metric, baseline=d.baseline, candidate=d.candidate, delta=d.delta, enough_runs=d.enough_runs
        )
        if d.relative is not None:
            item.relative = d.relative
        if d.interval is not None:
            item.interval.low, item.interval.high = d.interval
    return response

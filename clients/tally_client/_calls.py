"""Each RPC of the client as a typed description: which method, the request, and how the
response becomes what the client method returns. TallyClient and AsyncTallyClient run
the same descriptions, one blocking and one awaiting, so that what a call sends and
returns is written once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar
from uuid import UUID

from google.protobuf import field_mask_pb2, timestamp_pb2

from tally.v1 import (
    common_pb2,
    event_service_pb2 as event_pb,
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as ing_pb,
    limit_service_pb2 as limit_pb,
    price_catalog_service_pb2 as price_pb,
    report_service_pb2 as report_pb,
)

T = TypeVar("T")

# A unit type's counts: (input, output), or {"input": n, "output": n} with either key optional.
UnitCounts = tuple[int, int] | Mapping[str, int]
Units = Mapping[str, UnitCounts]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One unary call: the stub (`types`, `experiences`, `ingest`, `prices`, `events` or
    `reports`), the method,
    the request, and what the client returns of the response."""

    stub: str
    method: str
    request: Any
    unpack: Callable[[Any], T]
    # Calls that may take long (a full batch) get at least this many seconds.
    min_timeout: float = 0.0


def _same(response: T) -> T:
    return response


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def set_units(target: Any, units: Units | None) -> None:
    """Writes `units` into a map<string, UnitCounts> field."""
    for unit_type, counts in (units or {}).items():
        entry = target[unit_type]
        if isinstance(counts, Mapping):
            entry.input = counts.get("input", 0)
            entry.output = counts.get("output", 0)
        else:
            entry.input, entry.output = counts


def usage_event(
    category: str,
    resource: str,
    units: Units | None = None,
    *,
    event_time: datetime | None = None,
    latency_ms: int = 0,
    time_to_first_token_ms: int = 0,
    http_status_code: int = 0,
    provider_response_id: str = "",
    idempotency_key: str = "",
    properties: Mapping[str, str] | None = None,
) -> ing_pb.UsageEvent:
    """A UsageEvent; `units` maps a unit type to (input, output) or {"input": n, "output": n}."""
    event = ing_pb.UsageEvent(
        category=category,
        resource=resource,
        end_to_end_latency_ms=latency_ms,
        time_to_first_token_ms=time_to_first_token_ms,
        http_status_code=http_status_code,
        provider_response_id=provider_response_id,
        idempotency_key=idempotency_key,
        properties=dict(properties or {}),
    )
    set_units(event.units, units)
    if event_time is not None:
        event.event_timestamp.FromDatetime(event_time)
    return event


# --- experience types ---------------------------------------------------------------


def new_outcome(
    name: str,
    kind: str,
    *,
    equals: bool | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    description: str = "",
) -> et_pb.OutcomeDefinition:
    """An outcome a type's runs are scored on: `kind` "boolean", "number", "percentage",
    "likert_5", "likert_7" or "likert_10", and at most one goal (`equals` for a boolean,
    `at_least` or `at_most` for the others)."""
    definition = et_pb.OutcomeDefinition(
        name=name, kind=et_pb.OutcomeKind.Value(f"OUTCOME_KIND_{kind.upper()}"), description=description
    )
    goals = (("equals", equals), ("at_least", at_least), ("at_most", at_most))
    given = [(field, value) for field, value in goals if value is not None]
    if len(given) > 1:
        raise ValueError("an outcome has at most one goal: equals, at_least or at_most")
    for field, value in given:
        setattr(definition.goal, field, value)
    return definition


def outcome_values(values: Mapping[str, bool | float]) -> list[exp_pb.OutcomeValue]:
    """{"resolved": True, "csat": 4} as OutcomeValues: a bool is a BOOLEAN's value, a number the others'."""
    found = []
    for name, value in values.items():
        if isinstance(value, bool):
            found.append(exp_pb.OutcomeValue(name=name, bool_value=value))
        else:
            found.append(exp_pb.OutcomeValue(name=name, number_value=float(value)))
    return found


def record_outcomes(
    experience_id: str | UUID, values: Mapping[str, bool | float]
) -> Call[list[exp_pb.RecordedOutcome]]:
    request = exp_pb.RecordOutcomesRequest(experience_id=str(experience_id), values=outcome_values(values))
    return Call("experiences", "RecordOutcomes", request, lambda r: list(r.outcomes))


def list_outcome_changes(
    experience_id: str | UUID, page_size: int, page_token: str
) -> Call[exp_pb.ListOutcomeChangesResponse]:
    request = exp_pb.ListOutcomeChangesRequest(
        experience_id=str(experience_id), page_size=page_size, page_token=page_token
    )
    return Call("experiences", "ListOutcomeChanges", request, _same)


def create_experience_type(
    name: str,
    description: str,
    settings: Mapping[str, str] | None,
    request_id: str,
    outcomes: Iterable[et_pb.OutcomeDefinition] = (),
) -> Call[et_pb.ExperienceType]:
    experience_type = et_pb.ExperienceType(
        name=name, description=description, settings=dict(settings or {}), outcomes=list(outcomes)
    )
    request = et_pb.CreateExperienceTypeRequest(experience_type=experience_type, request_id=request_id)
    return Call("types", "CreateExperienceType", request, lambda r: r.experience_type)


def get_experience_type(name: str) -> Call[et_pb.ExperienceType]:
    request = et_pb.GetExperienceTypeRequest(name=name)
    return Call("types", "GetExperienceType", request, lambda r: r.experience_type)


def list_experience_types(page_size: int, page_token: str) -> Call[et_pb.ListExperienceTypesResponse]:
    request = et_pb.ListExperienceTypesRequest(page_size=page_size, page_token=page_token)
    return Call("types", "ListExperienceTypes", request, _same)


def update_experience_type(
    name: str,
    description: str | None,
    settings: Mapping[str, str] | None,
    outcomes: Iterable[et_pb.OutcomeDefinition] | None = None,
) -> Call[et_pb.ExperienceType]:
    given = (("description", description), ("settings", settings), ("outcomes", outcomes))
    paths = [path for path, value in given if value is not None]
    if not paths:
        raise ValueError("nothing to update: give a description, settings or outcomes")
    request = et_pb.UpdateExperienceTypeRequest(
        experience_type=et_pb.ExperienceType(
            name=name, description=description or "", settings=dict(settings or {}), outcomes=list(outcomes or ())
        ),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )
    return Call("types", "UpdateExperienceType", request, lambda r: r.experience_type)


def delete_experience_type(name: str, force: bool) -> Call[int]:
    request = et_pb.DeleteExperienceTypeRequest(name=name, force=force)
    return Call("types", "DeleteExperienceType", request, lambda r: r.deleted_experience_count)


def increment_experience_type_version(name: str, request_id: str) -> Call[et_pb.IncrementExperienceTypeVersionResponse]:
    request = et_pb.IncrementExperienceTypeVersionRequest(name=name, request_id=request_id)
    return Call("types", "IncrementExperienceTypeVersion", request, _same)


def list_experience_type_versions(
    name: str, page_size: int, page_token: str
) -> Call[et_pb.ListExperienceTypeVersionsResponse]:
    request = et_pb.ListExperienceTypeVersionsRequest(name=name, page_size=page_size, page_token=page_token)
    return Call("types", "ListExperienceTypeVersions", request, _same)


def get_experience_type_stats(
    name: str, version: int, start: datetime | None, end: datetime | None, include_outcomes: bool = False
) -> Call[et_pb.GetExperienceTypeStatsResponse]:
    request = et_pb.GetExperienceTypeStatsRequest(
        name=name,
        version=version,
        start_time=_timestamp(start),
        end_time=_timestamp(end),
        include_outcomes=include_outcomes,
    )
    return Call("types", "GetExperienceTypeStats", request, _same)


# --- experiences --------------------------------------------------------------------


def create_experience(
    experience_name: str,
    experience_id: str | UUID,
    version: int,
    properties: Mapping[str, str] | None,
    request_id: str,
) -> Call[exp_pb.Experience]:
    request = exp_pb.CreateExperienceRequest(
        experience_name=experience_name,
        experience_id=str(experience_id or ""),
        experience_version=version,
        properties=dict(properties or {}),
        request_id=request_id,
    )
    return Call("experiences", "CreateExperience", request, lambda r: r.experience)


def get_experience(experience_id: str | UUID) -> Call[exp_pb.Experience]:
    request = exp_pb.GetExperienceRequest(experience_id=str(experience_id))
    return Call("experiences", "GetExperience", request, lambda r: r.experience)


def list_experiences(
    experience_name: str, version: int, order_by: str, page_size: int, page_token: str
) -> Call[exp_pb.ListExperiencesResponse]:
    request = exp_pb.ListExperiencesRequest(
        experience_name=experience_name,
        experience_version=version,
        order_by=order_by,
        page_size=page_size,
        page_token=page_token,
    )
    return Call("experiences", "ListExperiences", request, _same)


def delete_experience(experience_id: str | UUID) -> Call[int]:
    request = exp_pb.DeleteExperienceRequest(experience_id=str(experience_id))
    return Call("experiences", "DeleteExperience", request, lambda r: r.unattributed_event_count)


def update_experience_properties(
    experience_id: str | UUID, set_properties: Mapping[str, str] | None, remove_keys: Iterable[str]
) -> Call[exp_pb.Experience]:
    request = exp_pb.UpdateExperiencePropertiesRequest(
        experience_id=str(experience_id), set_properties=dict(set_properties or {}), remove_keys=list(remove_keys)
    )
    return Call("experiences", "UpdateExperienceProperties", request, lambda r: r.experience)


def annotate_event(
    request_id: str | UUID,
    provider_response_id: str,
    set_annotations: Mapping[str, str] | None,
    remove_keys: Iterable[str],
) -> Call[event_pb.StoredEvent]:
    if bool(request_id) == bool(provider_response_id):
        raise ValueError("give a request_id or a provider_response_id")
    request = event_pb.AnnotateEventRequest(set_annotations=dict(set_annotations or {}), remove_keys=list(remove_keys))
    if request_id:
        request.request_id = str(request_id)
    else:
        request.provider_response_id = provider_response_id
    return Call("events", "AnnotateEvent", request, lambda r: r.event)


def prune_events(before: datetime, max_events: int) -> Call[event_pb.PruneEventsResponse]:
    request = event_pb.PruneEventsRequest(before_time=_timestamp(before), max_events=max_events)
    return Call("events", "PruneEvents", request, lambda r: r, min_timeout=60.0)


def erase_user(user_id: str, max_events: int) -> Call[event_pb.EraseUserResponse]:
    request = event_pb.EraseUserRequest(user_id=user_id, max_events=max_events)
    return Call("events", "EraseUser", request, lambda r: r, min_timeout=60.0)


# --- events and reports -------------------------------------------------------------------

# BreakDownCost's dimensions by the names the client takes.
COST_DIMENSIONS = {
    "type": report_pb.COST_DIMENSION_EXPERIENCE_NAME,
    "version": report_pb.COST_DIMENSION_EXPERIENCE_VERSION,
    "category": report_pb.COST_DIMENSION_CATEGORY,
    "model": report_pb.COST_DIMENSION_MODEL,
    "resource": report_pb.COST_DIMENSION_RESOURCE,
    "user": report_pb.COST_DIMENSION_USER_ID,
    "tag": report_pb.COST_DIMENSION_REQUEST_TAG,
    "day": report_pb.COST_DIMENSION_DAY,
    "hour": report_pb.COST_DIMENSION_HOUR,
    "step": report_pb.COST_DIMENSION_STEP,
    "key": report_pb.COST_DIMENSION_API_KEY,
}


@dataclass(frozen=True, slots=True)
class EventFilter:
    """The filters of ListEvents; every one is optional and they apply together."""

    experience_id: str | UUID = ""
    experience_name: str = ""
    experience_version: int = 0
    user_id: str = ""
    request_tag: str = ""
    category: str = ""
    resource: str = ""
    cost_state: ing_pb.CostState.ValueType = ing_pb.COST_STATE_UNSPECIFIED
    start: datetime | None = None
    end: datetime | None = None
    model: str = ""  # the price entry's model (the resource as sent when unpriced)
    provider_response_id: str = ""


def list_events(filters: EventFilter, page_size: int, page_token: str) -> Call[event_pb.ListEventsResponse]:
    request = event_pb.ListEventsRequest(
        experience_id=str(filters.experience_id),
        experience_name=filters.experience_name,
        experience_version=filters.experience_version,
        user_id=filters.user_id,
        request_tag=filters.request_tag,
        category=filters.category,
        resource=filters.resource,
        cost_state=filters.cost_state,
        start_time=_timestamp(filters.start),
        end_time=_timestamp(filters.end),
        page_size=page_size,
        page_token=page_token,
        model=filters.model,
        provider_response_id=filters.provider_response_id,
    )
    return Call("events", "ListEvents", request, _same)


def get_event(request_id: str | UUID, idempotency_key: str) -> Call[event_pb.StoredEvent]:
    request = event_pb.GetEventRequest()
    if idempotency_key:
        request.idempotency_key = idempotency_key
    else:
        request.request_id = str(request_id)
    return Call("events", "GetEvent", request, lambda r: r.event)


def compare_versions(
    experience_name: str, baseline: int, candidate: int, start: datetime | None, end: datetime | None
) -> Call[report_pb.CompareVersionsResponse]:
    request = report_pb.CompareVersionsRequest(
        experience_name=experience_name,
        baseline_version=baseline,
        candidate_version=candidate,
        start_time=_timestamp(start),
        end_time=_timestamp(end),
    )
    return Call("reports", "CompareVersions", request, _same)


@dataclass(frozen=True)
class CostSlice:
    """Which events a breakdown sums ("" and 0: any)."""

    experience_name: str = ""
    experience_version: int = 0
    category: str = ""
    model: str = ""
    user_id: str = ""
    request_tag: str = ""


def break_down_cost(
    group_by: Iterable[str],
    start: datetime | None,
    end: datetime | None,
    only: CostSlice,
    page_size: int,
    page_token: str,
) -> Call[report_pb.BreakDownCostResponse]:
    dimensions = []
    for name in group_by:
        if name not in COST_DIMENSIONS:
            raise ValueError(f"not a cost dimension: {name!r} (one of {', '.join(COST_DIMENSIONS)})")
        dimensions.append(COST_DIMENSIONS[name])
    request = report_pb.BreakDownCostRequest(
        group_by=dimensions,
        start_time=_timestamp(start),
        end_time=_timestamp(end),
        experience_name=only.experience_name,
        experience_version=only.experience_version,
        category=only.category,
        model=only.model,
        user_id=only.user_id,
        request_tag=only.request_tag,
        page_size=page_size,
        page_token=page_token,
    )
    return Call("reports", "BreakDownCost", request, _same)


# --- ingest ---------------------------------------------------------------------------


def ingest(event: ing_pb.UsageEvent) -> Call[ing_pb.IngestResponse]:
    return Call("ingest", "Ingest", ing_pb.IngestRequest(event=event), _same)


def ingest_batch(events: Iterable[ing_pb.UsageEvent]) -> Call[ing_pb.IngestBatchResponse]:
    request = ing_pb.IngestBatchRequest(events=list(events))
    return Call("ingest", "IngestBatch", request, _same, min_timeout=60.0)


# --- prices ---------------------------------------------------------------------------


def create_custom_price(
    category: str,
    resource: str,
    unit_prices: Mapping[str, tuple[str, str]],
    effective_time: datetime | None,
    price_context: Mapping[str, str] | None,
) -> Call[price_pb.CreateCustomPriceResponse]:
    price = price_pb.CustomPrice(
        category=category,
        resource=resource,
        effective_time=_timestamp(effective_time),
        price_context=dict(price_context or {}),
        unit_prices={
            unit: price_pb.UnitPrice(input_per_million=per_input, output_per_million=per_output)
            for unit, (per_input, per_output) in unit_prices.items()
        },
    )
    return Call("prices", "CreateCustomPrice", price_pb.CreateCustomPriceRequest(price=price), _same)


def end_custom_price(price_id: str | UUID, end_time: datetime | None) -> Call[price_pb.CustomPrice]:
    request = price_pb.EndCustomPriceRequest(price_id=str(price_id), end_time=_timestamp(end_time))
    return Call("prices", "EndCustomPrice", request, lambda r: r.price)


def get_custom_price(price_id: str | UUID) -> Call[price_pb.CustomPrice]:
    request = price_pb.GetCustomPriceRequest(price_id=str(price_id))
    return Call("prices", "GetCustomPrice", request, lambda r: r.price)


def list_custom_prices(
    category: str, resource: str, page_size: int, page_token: str
) -> Call[price_pb.ListCustomPricesResponse]:
    request = price_pb.ListCustomPricesRequest(
        category=category, resource=resource, page_size=page_size, page_token=page_token
    )
    return Call("prices", "ListCustomPrices", request, _same)


def quote_price(
    category: str, resource: str, units: Units, event_time: datetime | None, price_context: Mapping[str, str] | None
) -> Call[ing_pb.XProxyResult]:
    request = price_pb.QuotePriceRequest(
        category=category,
        resource=resource,
        event_timestamp=_timestamp(event_time),
        price_context=dict(price_context or {}),
    )
    set_units(request.units, units)
    return Call("prices", "QuotePrice", request, lambda r: r.xproxy_result)


# --- limits ---------------------------------------------------------------------------


def money(amount: Decimal | str | int) -> common_pb2.Money:
    """An exact USD amount (a Decimal or its text; never a float) as Money."""
    value = Decimal(str(amount)) if not isinstance(amount, Decimal) else amount
    nanos_total = int((value * 1_000_000_000).to_integral_exact())
    units, nanos = divmod(abs(nanos_total), 1_000_000_000)
    sign = -1 if nanos_total < 0 else 1
    return common_pb2.Money(currency_code="USD", units=sign * units, nanos=sign * nanos)


def create_limit(limit: limit_pb.Limit) -> Call[limit_pb.Limit]:
    return Call("limits", "CreateLimit", limit_pb.CreateLimitRequest(limit=limit), lambda r: r.limit)


def get_limit(name: str, experience_id: str) -> Call[limit_pb.GetLimitResponse]:
    return Call("limits", "GetLimit", limit_pb.GetLimitRequest(name=name, experience_id=experience_id), _same)


def list_limits(page_size: int, page_token: str) -> Call[limit_pb.ListLimitsResponse]:
    request = limit_pb.ListLimitsRequest(page_size=page_size, page_token=page_token)
    return Call("limits", "ListLimits", request, _same)


def list_limit_periods(
    name: str, experience_id: str, page_size: int, page_token: str, order_by: str = ""
) -> Call[limit_pb.ListLimitPeriodsResponse]:
    request = limit_pb.ListLimitPeriodsRequest(
        name=name, experience_id=experience_id, page_size=page_size, page_token=page_token, order_by=order_by
    )
    return Call("limits", "ListLimitPeriods", request, _same)


def reset_limit(name: str) -> Call[limit_pb.ResetLimitResponse]:
    return Call("limits", "ResetLimit", limit_pb.ResetLimitRequest(name=name), _same)


def delete_limit(name: str) -> Call[None]:
    return Call("limits", "DeleteLimit", limit_pb.DeleteLimitRequest(name=name), lambda r: None)


def reserve(
    amount: Decimal | str | None,
    category: str,
    resource: str,
    units: Units | None,
    request_id: str,
    ttl_seconds: int,
) -> Call[limit_pb.Reservation]:
    estimate = limit_pb.CostEstimate(category=category, resource=resource)
    if amount is not None:
        estimate.amount.CopyFrom(money(amount))
    set_units(estimate.units, units)
    request = limit_pb.ReserveRequest(estimate=estimate, request_id=request_id, ttl_seconds=ttl_seconds)
    return Call("limits", "Reserve", request, lambda r: r.reservation)


def release(reservation_id: str | UUID) -> Call[None]:
    return Call("limits", "Release", limit_pb.ReleaseRequest(reservation_id=str(reservation_id)), lambda r: None)


def new_limit(
    name: str,
    max_usd: Decimal | str | int,
    *,
    kind: str = "block",
    period: str = "lifetime",
    threshold_percent: int = 0,
    everything: bool = False,
    experience_type: str = "",
    experience_version: int = 0,
    per_experience: bool = False,
    experience_id: str | UUID = "",
    user_id: str = "",
    request_tag: str = "",
) -> limit_pb.Limit:
    """A limit to create: `kind` "block" or "allow", `period` "lifetime", "day", "week" or
    "month" (UTC), and one scope: everything, an experience type (optionally one version, or
    per experience of it), an experience, a user id or a request tag."""
    return limit_pb.Limit(
        name=name,
        max=money(max_usd),
        kind=limit_pb.LimitKind.Value(f"LIMIT_KIND_{kind.upper()}"),
        period=limit_pb.LimitPeriod.Value(f"LIMIT_PERIOD_{period.upper()}"),
        threshold_percent=threshold_percent,
        scope=limit_pb.LimitScope(
            everything=everything,
            experience_type=experience_type,
            experience_version=experience_version,
            per_experience=per_experience,
            experience_id=str(experience_id),
            user_id=user_id,
            request_tag=request_tag,
        ),
    )

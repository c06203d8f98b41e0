"""LimitService: limits and reservations, protobuf in and out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from grpc import aio

from tally.v1 import common_pb2, limit_service_pb2 as pb, limit_service_pb2_grpc as limit_grpc

from ..domain import limits as rules
from ..domain.errors import Violations
from ..edges import context as metadata
from ..services.limits import Granted, Limits, PeriodView
from . import convert
from .access import current_key

if TYPE_CHECKING:  # grpc's classes are generic in its type stubs only
    Context = aio.ServicerContext[Any, Any]

_NANOS = 1_000_000_000


def money_nanos(v: Violations, field_path: str, money: common_pb2.Money) -> int:
    """A Money as exact nano-dollars; a violation for another currency or mixed signs."""
    if money.currency_code not in ("", "USD"):
        v.add(f"{field_path}.currency_code", f"limits are in USD, got {money.currency_code[:8]!r}")
    if not -_NANOS < money.nanos < _NANOS or (money.units > 0 > money.nanos) or (money.units < 0 < money.nanos):
        v.add(f"{field_path}.nanos", "must be -999,999,999 to 999,999,999, of the sign of units")
    return money.units * _NANOS + money.nanos


def _scope(v: Violations, scope: pb.LimitScope) -> rules.LimitScope:
    chosen = [
        name
        for name, given in (
            ("everything", scope.everything),
            ("experience_type", scope.experience_type),
            ("experience_id", scope.experience_id),
            ("user_id", scope.user_id),
            ("request_tag", scope.request_tag),
        )
        if given
    ]
    if len(chosen) != 1:
        v.add(
            "limit.scope",
            "set exactly one of everything, experience_type, experience_id, user_id, request_tag; "
            f"got {chosen or 'none'}",
        )
        return rules.LimitScope(rules.ScopeKind.EVERYTHING)
    if (scope.experience_version or scope.per_experience) and not scope.experience_type:
        v.add("limit.scope", "experience_version and per_experience go with experience_type")
    kind = chosen[0]
    if kind == "everything":
        return rules.LimitScope(rules.ScopeKind.EVERYTHING)
    if kind == "experience_type":
        return rules.LimitScope(
            rules.ScopeKind.EXPERIENCE_TYPE, scope.experience_type, scope.experience_version, scope.per_experience
        )
    if kind == "experience_id":
        return rules.LimitScope(rules.ScopeKind.EXPERIENCE, value=scope.experience_id.lower())
    if kind == "user_id":
        return rules.LimitScope(rules.ScopeKind.USER, value=scope.user_id)
    return rules.LimitScope(rules.ScopeKind.REQUEST_TAG, value=scope.request_tag)


def limit_from(message: pb.Limit) -> rules.Limit:
    v = Violations()
    max_nanos = money_nanos(v, "limit.max", message.max)
    scope = _scope(v, message.scope)
    v.raise_if_any()
    kind = int(message.kind)
    period = int(message.period)
    if kind not in set(rules.LimitKind) or period not in set(rules.LimitPeriod):
        bad = Violations("limit.")
        if kind not in set(rules.LimitKind):
            bad.add("kind", "must be LIMIT_KIND_BLOCK or LIMIT_KIND_ALLOW")
        if period not in set(rules.LimitPeriod):
            bad.add("period", "must be LIMIT_PERIOD_LIFETIME, _DAY, _WEEK or _MONTH")
        bad.raise_if_any()
    return rules.Limit(
        name=message.name,
        max_nanos=max_nanos,
        kind=rules.LimitKind(kind),
        threshold_percent=message.threshold_percent,
        scope=scope,
        period=rules.LimitPeriod(period),
    )


def limit_message(limit: rules.Limit) -> pb.Limit:
    scope = limit.scope
    message = pb.Limit(
        name=limit.name,
        max=convert.money(limit.max_nanos),
        kind=cast("pb.LimitKind.ValueType", int(limit.kind)),
        threshold_percent=limit.threshold_percent,
        period=cast("pb.LimitPeriod.ValueType", int(limit.period)),
        create_time=convert.timestamp(limit.create_time_us),
    )
    if scope.kind == rules.ScopeKind.EVERYTHING:
        message.scope.everything = True
    elif scope.kind == rules.ScopeKind.EXPERIENCE_TYPE:
        message.scope.experience_type = scope.experience_type
        message.scope.experience_version = scope.experience_version
        message.scope.per_experience = scope.per_experience
    elif scope.kind == rules.ScopeKind.EXPERIENCE:
        message.scope.experience_id = scope.value
    elif scope.kind == rules.ScopeKind.USER:
        message.scope.user_id = scope.value
    else:
        message.scope.request_tag = scope.value
    return message


def period_message(view: PeriodView) -> pb.LimitPeriodState:
    return pb.LimitPeriodState(
        limit=view.limit.name,
        experience_id=view.spend.key.subject,
        start_time=convert.timestamp(view.spend.key.start_us),
        end_time=convert.timestamp(view.end_us),
        spend=convert.money(view.spend.spend_nanos),
        reserved=convert.money(view.spend.reserved_nanos),
        max=convert.money(view.limit.max_nanos),
        state=cast("common_pb2.LimitState.ValueType", int(view.state)),
        event_count=view.spend.event_count,
    )


def _current(view: PeriodView | None) -> pb.LimitPeriodState | None:
    """A limit's current period; none for a per-experience limit asked without its experience."""
    return None if view is None else period_message(view)


def reservation_message(granted: Granted) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=str(granted.reservation_id),
        amount=convert.money(granted.amount_nanos),
        expire_time=convert.timestamp(granted.expire_time_us),
        limits=list(granted.limits),
    )


def _key_name() -> str:
    key = current_key.get()
    return key.name if key is not None else ""


class LimitServicer(limit_grpc.LimitServiceServicer):
    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def CreateLimit(self, request: pb.CreateLimitRequest, context: Context) -> pb.CreateLimitResponse:
        created = await self.limits.create(limit_from(request.limit))
        return pb.CreateLimitResponse(limit=limit_message(created))

    async def GetLimit(self, request: pb.GetLimitRequest, context: Context) -> pb.GetLimitResponse:
        limit, current = await self.limits.get(request.name, request.experience_id)
        return pb.GetLimitResponse(limit=limit_message(limit), current=_current(current))

    async def ListLimits(self, request: pb.ListLimitsRequest, context: Context) -> pb.ListLimitsResponse:
        items, token = await self.limits.list(request.page_size, request.page_token)
        return pb.ListLimitsResponse(
            limits=[limit_message(limit) for limit, _ in items],
            current=[period_message(view) if view else pb.LimitPeriodState(limit=limit.name) for limit, view in items],
            next_page_token=token,
        )

    async def ListLimitPeriods(
        self, request: pb.ListLimitPeriodsRequest, context: Context
    ) -> pb.ListLimitPeriodsResponse:
        views, token = await self.limits.periods(
            request.name, request.experience_id, request.page_size, request.page_token, request.order_by
        )
        return pb.ListLimitPeriodsResponse(periods=[period_message(view) for view in views], next_page_token=token)

    async def ResetLimit(self, request: pb.ResetLimitRequest, context: Context) -> pb.ResetLimitResponse:
        limit, current = await self.limits.reset(request.name)
        return pb.ResetLimitResponse(limit=limit_message(limit), current=_current(current))

    async def DeleteLimit(self, request: pb.DeleteLimitRequest, context: Context) -> pb.DeleteLimitResponse:
        await self.limits.delete(request.name)
        return pb.DeleteLimitResponse()

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        v = Violations()
        call = metadata.call_context(context.invocation_metadata())
        own = convert.event_context(request.context) if request.HasField("context") else call
        merged = metadata.merge_context(call, own, v)
        estimate = request.estimate
        amount: int | None = None
        usage: tuple[str, str, dict[str, tuple[int, int]]] | None = None
        if estimate.HasField("amount"):
            amount = money_nanos(v, "estimate.amount", estimate.amount)
        if estimate.category or estimate.resource or estimate.units:
            units = {unit: (counts.input, counts.output) for unit, counts in estimate.units.items()}
            usage = (estimate.category, estimate.resource, units)
        v.raise_if_any()
        granted = await self.limits.reserve(merged, amount, usage, request.request_id, request.ttl_seconds, _key_name())
        return pb.ReserveResponse(reservation=reservation_message(granted))

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        await self.limits.release(request.reservation_id, _key_name())
        return pb.ReleaseResponse()

    async def WatchLimits(
        self, request: pb.WatchLimitsRequest, context: Context
    ) -> AsyncIterator[pb.WatchLimitsResponse]:
        async for view, reason in self.limits.watch(list(request.names)):
            yield pb.WatchLimitsResponse(period=period_message(view), reason=reason)

"""The four services: each method unpacks its request, calls the domain, packs the answer.

Errors are not handled here: a TallyError propagates to the interceptor, which
turns it into a rich status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message
from grpc import aio

from tally.v1 import (
    api_key_service_pb2 as key_pb,
    api_key_service_pb2_grpc as key_grpc,
    common_pb2,
    event_service_pb2 as event_pb,
    event_service_pb2_grpc as event_grpc,
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc as exp_grpc,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc as et_grpc,
    ingest_service_pb2 as ing_pb,
    ingest_service_pb2_grpc as ing_grpc,
    price_catalog_service_pb2 as price_pb,
    price_catalog_service_pb2_grpc as price_grpc,
    report_service_pb2 as report_pb,
    report_service_pb2_grpc as report_grpc,
)

from ..domain import events as event_rules
from ..domain.errors import TallyError, Violation, Violations, invalid
from ..domain.models import CostFilter, EventContext, IngestResult, Page, UnitPrice, UsageEvent, now_us
from ..edges import context as metadata
from ..services.events import Events
from ..services.experience_types import ExperienceTypes
from ..services.experiences import Experiences
from ..services.ingest import Ingestor
from ..services.keys import ApiKeys
from ..services.prices import Prices
from ..services.reports import Reports
from ..services.retention import Retention
from . import convert
from .access import current_key
from .interceptor import Undecodable, message_too_large
from .status import as_tally_error, current_call

log = logging.getLogger("tally.rpc")
if TYPE_CHECKING:  # grpc's classes are generic in its type stubs only
    Context = aio.ServicerContext[Any, Any]
# A stream event on its way: refused at once, or waiting for its commit.
_Pending = TallyError | asyncio.Future[IngestResult | TallyError]

# How many events of one stream may be in flight before it stops reading: beyond
# this, gRPC flow control pushes back on the sender. With the limit of concurrent
# streams, it bounds the memory that streams whose clients stop reading can hold.
STREAM_WINDOW = 512


class ExperienceTypeServicer(et_grpc.ExperienceTypeServiceServicer):
    def __init__(self, types: ExperienceTypes) -> None:
        self.types = types

    async def CreateExperienceType(
        self, request: et_pb.CreateExperienceTypeRequest, context: Context
    ) -> et_pb.CreateExperienceTypeResponse:
        t = request.experience_type
        created = await self.types.create(
            t.name, t.description, dict(t.settings), request.request_id, convert.outcome_definitions(t.outcomes)
        )
        return et_pb.CreateExperienceTypeResponse(experience_type=convert.experience_type(created))

    async def GetExperienceType(
        self, request: et_pb.GetExperienceTypeRequest, context: Context
    ) -> et_pb.GetExperienceTypeResponse:
        found = await self.types.get(request.name)
        return et_pb.GetExperienceTypeResponse(experience_type=convert.experience_type(found))

    async def ListExperienceTypes(
        self, request: et_pb.ListExperienceTypesRequest, context: Context
    ) -> et_pb.ListExperienceTypesResponse:
        page = await self.types.list(request.page_size, request.page_token)
        return et_pb.ListExperienceTypesResponse(
            experience_types=[convert.experience_type(t) for t in page.items], next_page_token=page.next_page_token
        )

    async def UpdateExperienceType(
        self, request: et_pb.UpdateExperienceTypeRequest, context: Context
    ) -> et_pb.UpdateExperienceTypeResponse:
        t = request.experience_type
        updated = await self.types.update(
            t.name,
            t.description,
            dict(t.settings),
            list(request.update_mask.paths),
            convert.outcome_definitions(t.outcomes),
        )
        return et_pb.UpdateExperienceTypeResponse(experience_type=convert.experience_type(updated))

    async def DeleteExperienceType(
        self, request: et_pb.DeleteExperienceTypeRequest, context: Context
    ) -> et_pb.DeleteExperienceTypeResponse:
        deleted = await self.types.delete(request.name, request.force)
        return et_pb.DeleteExperienceTypeResponse(deleted_experience_count=deleted)

    async def IncrementExperienceTypeVersion(
        self, request: et_pb.IncrementExperienceTypeVersionRequest, context: Context
    ) -> et_pb.IncrementExperienceTypeVersionResponse:
        current, snapshot = await self.types.increment_version(request.name, request.request_id)
        return et_pb.IncrementExperienceTypeVersionResponse(
            experience_type=convert.experience_type(current),
            experience_type_version=convert.experience_type_version(snapshot),
        )

    async def ListExperienceTypeVersions(
        self, request: et_pb.ListExperienceTypeVersionsRequest, context: Context
    ) -> et_pb.ListExperienceTypeVersionsResponse:
        page = await self.types.list_versions(request.name, request.page_size, request.page_token)
        return et_pb.ListExperienceTypeVersionsResponse(
            experience_type_versions=[convert.experience_type_version(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetExperienceTypeStats(
        self, request: et_pb.GetExperienceTypeStatsRequest, context: Context
    ) -> et_pb.GetExperienceTypeStatsResponse:
        stats = await self.types.stats(
            request.name,
            request.version,
            convert.micros(request, "start_time"),
            convert.micros(request, "end_time"),
            request.include_outcomes,
        )
        return convert.type_stats(stats)


class ExperienceServicer(exp_grpc.ExperienceServiceServicer):
    def __init__(self, experiences: Experiences) -> None:
        self.experiences = experiences

    async def CreateExperience(
        self, request: exp_pb.CreateExperienceRequest, context: Context
    ) -> exp_pb.CreateExperienceResponse:
        created = await self.experiences.create(
            request.experience_name,
            request.experience_id,
            request.experience_version,
            dict(request.properties),
            request.request_id,
            _key_name(),
        )
        return exp_pb.CreateExperienceResponse(experience=convert.experience(created))

    async def GetExperience(
        self, request: exp_pb.GetExperienceRequest, context: Context
    ) -> exp_pb.GetExperienceResponse:
        experience, stats = await self.experiences.get(request.experience_id)
        return exp_pb.GetExperienceResponse(experience=convert.experience(experience, stats))

    async def ListExperiences(
        self, request: exp_pb.ListExperiencesRequest, context: Context
    ) -> exp_pb.ListExperiencesResponse:
        page = await self.experiences.list(
            request.experience_name,
            request.experience_version,
            convert.micros(request, "create_time_start"),
            convert.micros(request, "create_time_end"),
            request.page_size,
            request.page_token,
            request.order_by,
        )
        return exp_pb.ListExperiencesResponse(
            experiences=[convert.experience(e) for e in page.items], next_page_token=page.next_page_token
        )

    async def DeleteExperience(
        self, request: exp_pb.DeleteExperienceRequest, context: Context
    ) -> exp_pb.DeleteExperienceResponse:
        unattributed = await self.experiences.delete(request.experience_id)
        return exp_pb.DeleteExperienceResponse(unattributed_event_count=unattributed)

    async def UpdateExperienceProperties(
        self, request: exp_pb.UpdateExperiencePropertiesRequest, context: Context
    ) -> exp_pb.UpdateExperiencePropertiesResponse:
        updated = await self.experiences.update_properties(
            request.experience_id, dict(request.set_properties), list(request.remove_keys), _key_name()
        )
        return exp_pb.UpdateExperiencePropertiesResponse(experience=convert.experience(updated))

    async def RecordOutcomes(
        self, request: exp_pb.RecordOutcomesRequest, context: Context
    ) -> exp_pb.RecordOutcomesResponse:
        recorded = await self.experiences.record_outcomes(
            request.experience_id, convert.outcome_values(request.values), _key_name()
        )
        return exp_pb.RecordOutcomesResponse(outcomes=[convert.recorded_outcome(o) for o in recorded])

    async def ListOutcomeChanges(
        self, request: exp_pb.ListOutcomeChangesRequest, context: Context
    ) -> exp_pb.ListOutcomeChangesResponse:
        page = await self.experiences.outcome_changes(request.experience_id, request.page_size, request.page_token)
        return exp_pb.ListOutcomeChangesResponse(
            changes=[convert.recorded_outcome(o) for o in page.items], next_page_token=page.next_page_token
        )


class EventServicer(event_grpc.EventServiceServicer):
    def __init__(self, events: Events, retention: Retention, max_answer_bytes: int = 4 * 1024 * 1024) -> None:
        self.events = events
        self.retention = retention
        self.max_answer_bytes = max_answer_bytes  # --max-message-bytes: a page shrinks to fit

    async def ListEvents(self, request: event_pb.ListEventsRequest, context: Context) -> event_pb.ListEventsResponse:
        page = await self.events.list(
            experience_id=request.experience_id,
            experience_name=request.experience_name,
            experience_version=request.experience_version,
            user_id=request.user_id,
            request_tag=request.request_tag,
            category=request.category,
            resource=request.resource,
            cost_state=request.cost_state,
            start_us=convert.micros(request, "start_time"),
            end_us=convert.micros(request, "end_time"),
            page_size=request.page_size,
            page_token=request.page_token,
            model=request.model,
            provider_response_id=request.provider_response_id,
        )
        events = [convert.stored_event(e) for e in page.items]
        return fitted(event_pb.ListEventsResponse(), "events", events, page, self.max_answer_bytes)

    async def GetEvent(self, request: event_pb.GetEventRequest, context: Context) -> event_pb.GetEventResponse:
        found = await self.events.get(request.request_id, request.idempotency_key)
        return event_pb.GetEventResponse(event=convert.stored_event(found))

    async def AnnotateEvent(
        self, request: event_pb.AnnotateEventRequest, context: Context
    ) -> event_pb.AnnotateEventResponse:
        annotated = await self.events.annotate(
            request.request_id,
            request.provider_response_id,
            dict(request.set_annotations),
            list(request.remove_keys),
            _key_name(),
        )
        return event_pb.AnnotateEventResponse(event=convert.stored_event(annotated))

    async def PruneEvents(self, request: event_pb.PruneEventsRequest, context: Context) -> event_pb.PruneEventsResponse:
        pruned = await self.retention.prune(convert.micros(request, "before_time"), request.max_events)
        return event_pb.PruneEventsResponse(
            deleted_event_count=pruned.deleted, more=pruned.more, before_time=convert.timestamp(pruned.before_us)
        )

    async def EraseUser(self, request: event_pb.EraseUserRequest, context: Context) -> event_pb.EraseUserResponse:
        erased = await self.retention.erase_user(request.user_id, request.max_events)
        return event_pb.EraseUserResponse(
            deleted_event_count=erased.deleted,
            more=erased.more,
            moved_rollup_row_count=erased.moved_rows,
            deleted_limit_names=erased.deleted_limits,
        )


class ReportServicer(report_grpc.ReportServiceServicer):
    def __init__(self, reports: Reports) -> None:
        self.reports = reports

    async def BreakDownCost(
        self, request: report_pb.BreakDownCostRequest, context: Context
    ) -> report_pb.BreakDownCostResponse:
        page, total = await self.reports.breakdown(
            convert.cost_dimensions(request.group_by),
            convert.micros(request, "start_time"),
            convert.micros(request, "end_time"),
            CostFilter(
                request.experience_name,
                request.experience_version,
                request.category,
                request.model,
                request.user_id,
                request.request_tag,
            ),
            request.page_size,
            request.page_token,
        )
        return report_pb.BreakDownCostResponse(
            groups=[convert.cost_group(g) for g in page.items],
            next_page_token=page.next_page_token,
            total=convert.cost_group(total),
        )

    async def CompareVersions(
        self, request: report_pb.CompareVersionsRequest, context: Context
    ) -> report_pb.CompareVersionsResponse:
        compared = await self.reports.compare(
            request.experience_name,
            request.baseline_version,
            request.candidate_version,
            convert.micros(request, "start_time"),
            convert.micros(request, "end_time"),
        )
        return convert.comparison(request.experience_name, compared)


def _item_error(outcome: Exception) -> common_pb2.ItemError:
    """An event's refusal or failure as a batch or stream item's error, so that one
    event's fate never decides the others'."""
    return convert.item_error(as_tally_error(outcome, *current_call.get()))


def _prepare(message: ing_pb.UsageEvent, call: EventContext, now: int, prefix: str) -> UsageEvent | TallyError:
    """The validated domain event, or the INVALID_ARGUMENT that refuses it."""
    if message.HasField("event_timestamp") and (problem := convert.timestamp_problem(message.event_timestamp)):
        return invalid([Violation(f"{prefix}event_timestamp", problem)], "INVALID_EVENT")
    event = convert.usage_event(message, now)
    v = Violations(prefix)
    event.context = metadata.merge_context(call, event.context, v)
    event.price_context = metadata.merge_price_context(call, event, v)
    event.key_name = _key_name()
    return event_rules.checked_event(event, now, v)


class _ByteWindow:
    """The bytes of events one stream has taken in and not yet answered. Its reader waits for
    room before it reads on, so a caller that stops reading answers is held back by HTTP/2
    flow control instead of by the server's memory. One event is always let in when the
    window is empty, whatever its size (a message is bounded by --max-message-bytes)."""

    __slots__ = ("_room", "held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._room = asyncio.Event()

    async def take(self, size: int) -> None:
        while self.held and self.held + size > self.limit:
            self._room.clear()
            await self._room.wait()
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size
        self._room.set()


class IngestServicer(ing_grpc.IngestServiceServicer):
    def __init__(
        self, ingestor: Ingestor, stream_window_bytes: int = 256 * 1024, max_message_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.ingestor = ingestor
        self.stream_window_bytes = stream_window_bytes
        self.max_message_bytes = max_message_bytes

    async def Ingest(self, request: ing_pb.IngestRequest, context: Context) -> ing_pb.IngestResponse:
        call = metadata.call_context(context.invocation_metadata())
        prepared = _prepare(request.event, call, now_us(), "event.")
        if isinstance(prepared, TallyError):
            raise prepared
        outcome = await self.ingestor.enqueue(prepared)
        if isinstance(outcome, TallyError):
            raise outcome
        if outcome.experience_id is not None:
            await context.send_initial_metadata(((metadata.EXPERIENCE_ID, str(outcome.experience_id)),))
        return convert.ingest_response(outcome)

    async def IngestBatch(self, request: ing_pb.IngestBatchRequest, context: Context) -> ing_pb.IngestBatchResponse:
        count = len(request.events)
        if not 1 <= count <= event_rules.MAX_BATCH_EVENTS:
            v = Violations()
            v.add("events", f"a batch holds 1 to {event_rules.MAX_BATCH_EVENTS} events, got {count}")
            v.raise_if_any()
        call = metadata.call_context(context.invocation_metadata())
        now = now_us()
        prepared = [_prepare(e, call, now, f"events[{i}].") for i, e in enumerate(request.events)]
        valid = [p for p in prepared if not isinstance(p, TallyError)]
        stored = iter(await self.ingestor.submit(valid))
        response = ing_pb.IngestBatchResponse()
        answers = convert.IngestResponses()
        experience_ids = set()
        for index, item in enumerate(prepared):
            outcome = item if isinstance(item, TallyError) else next(stored)
            if isinstance(outcome, Exception):
                response.items.add(index=index, error=_item_error(outcome))
                response.rejected_count += 1
                continue
            answers.write(outcome, response.items.add(index=index).result)
            experience_ids.add(outcome.experience_id)
            if outcome.duplicate:
                response.duplicate_count += 1
            else:
                response.accepted_count += 1
        if len(experience_ids) == 1 and None not in experience_ids:
            await context.send_initial_metadata(((metadata.EXPERIENCE_ID, str(experience_ids.pop())),))
        return response

    async def IngestStream(
        self, request_iterator: AsyncIterator[ing_pb.IngestStreamRequest | Undecodable], context: Context
    ) -> AsyncIterator[ing_pb.IngestStreamResponse]:
        call = metadata.call_context(context.invocation_metadata())
        in_flight: asyncio.Queue[tuple[int, str, _Pending, int] | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
        window = _ByteWindow(self.stream_window_bytes)
        answers = convert.IngestResponses()

        async def read() -> None:
            position = 0
            try:
                async for request in request_iterator:
                    pending: _Pending
                    size = 0
                    if isinstance(request, Undecodable):  # answered in place; the stream goes on
                        key, pending = "", request.error("event")
                    elif (size := request.ByteSize()) > self.max_message_bytes:  # refused by position, not the stream
                        key, pending = "", message_too_large("event", size, self.max_message_bytes)
                        size = 0
                    else:
                        await window.take(size)
                        prepared = _prepare(request.event, call, now_us(), "event.")
                        key = request.event.idempotency_key or request.event.provider_response_id
                        try:
                            pending = prepared if isinstance(prepared, TallyError) else self.ingestor.enqueue(prepared)
                        except TallyError as refused:  # the writer's queue is full: this event only
                            pending = refused
                    await in_flight.put((position, key, pending, size))
                    position += 1
            finally:
                await in_flight.put(None)  # ends the answers; `await reader` raises what stopped it

        reader = asyncio.create_task(read())
        try:
            while (entry := await in_flight.get()) is not None:
                position, key, pending, size = entry
                outcome: IngestResult | Exception
                try:
                    outcome = pending if isinstance(pending, TallyError) else await pending
                except Exception as error:  # noqa: BLE001 - not stored (the database failed): this event's answer only
                    outcome = error
                if isinstance(outcome, Exception):
                    yield ing_pb.IngestStreamResponse(
                        position=position, idempotency_key=key, error=_item_error(outcome)
                    )
                else:
                    answer = ing_pb.IngestStreamResponse(position=position, idempotency_key=key)
                    answers.write(outcome, answer.result)
                    yield answer
                window.give(size)  # answered: gRPC holds the answer (bounded by STREAM_WINDOW answers)
            await reader
        finally:
            reader.cancel()


class PriceCatalogServicer(price_grpc.PriceCatalogServiceServicer):
    def __init__(self, prices: Prices) -> None:
        self.prices = prices

    async def CreateCustomPrice(
        self, request: price_pb.CreateCustomPriceRequest, context: Context
    ) -> price_pb.CreateCustomPriceResponse:
        p = request.price
        created, warnings = await self.prices.create(
            p.category,
            p.resource,
            convert.micros(p, "effective_time", "price.effective_time"),
            {u: UnitPrice(x.input_per_million, x.output_per_million) for u, x in p.unit_prices.items()},
            create_key=_key_name(),
            price_context=dict(p.price_context),
        )
        return price_pb.CreateCustomPriceResponse(price=convert.custom_price(created), warnings=warnings)

    async def EndCustomPrice(
        self, request: price_pb.EndCustomPriceRequest, context: Context
    ) -> price_pb.EndCustomPriceResponse:
        ended = await self.prices.end(request.price_id, convert.micros(request, "end_time"), end_key=_key_name())
        return price_pb.EndCustomPriceResponse(price=convert.custom_price(ended))

    async def GetCustomPrice(
        self, request: price_pb.GetCustomPriceRequest, context: Context
    ) -> price_pb.GetCustomPriceResponse:
        return price_pb.GetCustomPriceResponse(price=convert.custom_price(await self.prices.get(request.price_id)))

    async def ListCustomPrices(
        self, request: price_pb.ListCustomPricesRequest, context: Context
    ) -> price_pb.ListCustomPricesResponse:
        page = await self.prices.list(request.category, request.resource, request.page_size, request.page_token)
        return price_pb.ListCustomPricesResponse(
            prices=[convert.custom_price(p) for p in page.items], next_page_token=page.next_page_token
        )

    async def QuotePrice(self, request: price_pb.QuotePriceRequest, context: Context) -> price_pb.QuotePriceResponse:
        time_us = convert.micros(request, "event_timestamp") or now_us()
        units = {unit: (c.input, c.output) for unit, c in request.units.items()}
        cost = await self.prices.quote(request.category, request.resource, units, time_us, dict(request.price_context))
        return price_pb.QuotePriceResponse(xproxy_result=convert.quote_result(cost))


class ApiKeyServicer(key_grpc.ApiKeyServiceServicer):
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def CreateApiKey(self, request: key_pb.CreateApiKeyRequest, context: Context) -> key_pb.CreateApiKeyResponse:
        k = request.api_key
        created, secret = await self.keys.create(k.name, convert.scope_names(k.scopes))
        return key_pb.CreateApiKeyResponse(api_key=convert.api_key(created), secret=secret)

    async def ListApiKeys(self, request: key_pb.ListApiKeysRequest, context: Context) -> key_pb.ListApiKeysResponse:
        page = await self.keys.list(request.page_size, request.page_token)
        return key_pb.ListApiKeysResponse(
            api_keys=[convert.api_key(k) for k in page.items], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(self, request: key_pb.RevokeApiKeyRequest, context: Context) -> key_pb.RevokeApiKeyResponse:
        return key_pb.RevokeApiKeyResponse(api_key=convert.api_key(await self.keys.revoke(request.name)))


# Room kept in an answer for its page token and framing, past the items.
_ANSWER_MARGIN_BYTES = 4096


Answer = TypeVar("Answer", bound=Message)


def fitted(response: Answer, field: str, items: Sequence[Any], page: Page, max_bytes: int) -> Answer:
    """`response` with as many of `items` (the page's, as messages) as fit in one message, and
    the token that resumes after the last of them: a page of large events shrinks to fit
    rather than failing on the wire (its token says where the next one starts)."""
    room = max_bytes - _ANSWER_MARGIN_BYTES
    used, sent = 0, 0
    for item in items:
        size = item.ByteSize() + 6  # the field's tag and length
        if sent and used + size > room:
            break
        used += size
        sent += 1
    getattr(response, field).extend(items[:sent])
    token = page.token_after(sent) if sent < len(items) and page.token_after is not None else page.next_page_token
    setattr(response, "next_page_token", token)  # noqa: B010 - every list answer has one; Message types do not say
    return response


def _key_name() -> str:
    """The name of the calling API key; empty with authentication off."""
    key = current_key.get()
    return key.name if key else ""

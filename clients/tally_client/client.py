"""Python clients for Tally: `TallyClient` (blocking) and `AsyncTallyClient` (asyncio).

Both share one channel per client, put a deadline on every call, retry only
idempotent reads on UNAVAILABLE (through the channel's service config), and raise
`TallyError` subclasses that carry the status code, ErrorInfo reason and field
violations. What each method sends and returns is described once, in `_calls`;
the two classes only run those descriptions, blocking or awaiting.

    with TallyClient("127.0.0.1:50051") as tally:
        with tally.experience("Document_Summarization") as run:
            tally.ingest("system.openai", "gpt-4o", {"text": (1000, 100)})
            tally.ingest("system.openai", "gpt-4o", {"text": (500, 80)})
        print(tally.get_experience(run.experience_id).stats.cost_total)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import threading
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, overload
from uuid import UUID

import grpc
from grpc import aio

from tally.v1 import (
    event_service_pb2 as event_pb,
    event_service_pb2_grpc as event_grpc,
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc as exp_grpc,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc as et_grpc,
    ingest_service_pb2 as ing_pb,
    ingest_service_pb2_grpc as ing_grpc,
    limit_service_pb2 as limit_pb,
    limit_service_pb2_grpc as limit_grpc,
    price_catalog_service_pb2 as price_pb,
    price_catalog_service_pb2_grpc as price_grpc,
    report_service_pb2 as report_pb,
    report_service_pb2_grpc as report_grpc,
)

from . import _calls
from ._calls import Call, EventFilter, Units, usage_event
from .errors import AlreadyExists, TallyError, from_rpc_error
from .metadata import EXPERIENCE_STEP, Metadata, create_metadata

T = TypeVar("T")

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0

_READS = {
    "tally.v1.ExperienceTypeService": [
        "GetExperienceType",
        "ListExperienceTypes",
        "ListExperienceTypeVersions",
        "GetExperienceTypeStats",
    ],
    "tally.v1.ExperienceService": ["GetExperience", "ListExperiences"],
    "tally.v1.PriceCatalogService": ["GetCustomPrice", "ListCustomPrices", "QuotePrice"],
    "tally.v1.LimitService": ["GetLimit", "ListLimits", "ListLimitPeriods"],
}
# Reads are retried by gRPC itself when the server is briefly unreachable. Writes
# are not: an ingest is safe to resend only with an idempotency key, which the
# caller decides on.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method} for service, methods in _READS.items() for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
)


class ExperienceScope:
    """The experience context of the calls made inside `client.experience(...)`.

    The first ingest names the type and creates the experience; the id the server
    returns is sent with every later call, so the whole run lands in one experience.
    Calls made concurrently before that wait for the first one.
    """

    def __init__(
        self, name: str, experience_id: str = "", version: int = 0, user_id: str = "", tags: Iterable[str] = ()
    ) -> None:
        self.experience_name = name
        self.experience_id = experience_id
        self.experience_version = version
        self.user_id = user_id
        self.request_tags = tuple(tags)
        # Outcomes staged with outcome(), recorded when the block ends without an error.
        self.outcomes: dict[str, bool | float] = {}
        self._thread_lock = threading.Lock()
        self._async_lock: asyncio.Lock | None = None

    def metadata(self) -> Metadata:
        return create_metadata(
            experience_id=self.experience_id or None,
            experience_name=self.experience_name,
            experience_version=None if self.experience_id else self.experience_version,
            user_id=self.user_id,
            request_tags=self.request_tags,
        )

    def ensure_id(self) -> str:
        """The experience id, made now (a UUID the server creates the experience with) when
        no call has learned one: for events recorded without waiting for the server."""
        if not self.experience_id:
            self.experience_id = str(uuid.uuid4())
        return self.experience_id

    def outcome(self, name: str, value: bool | float) -> None:
        """Scores the run: recorded (RecordOutcomes) when the `with` block ends without an
        error, in one call with the others; a later value of the same outcome replaces it."""
        self.outcomes[name] = value

    def learn(self, response: object) -> None:
        """Takes the experience id the server resolved, from the first ingest's response."""
        if not self.experience_id:
            self.experience_id = _resolved_experience_id(response)

    @property
    def async_lock(self) -> asyncio.Lock:
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        return self._async_lock


_scope: contextvars.ContextVar[ExperienceScope | None] = contextvars.ContextVar("tally_experience", default=None)
# The step of its run the calls made inside `client.step(...)` belong to; nested blocks
# inherit it until one names another.
_step: contextvars.ContextVar[str] = contextvars.ContextVar("tally_step", default="")


def current_step() -> str:
    """The step the current code runs in ("" outside any `client.step(...)`)."""
    return _step.get()


def current_scope() -> ExperienceScope | None:
    """The experience context of the `experience(...)` block the caller is in, if any."""
    return _scope.get()


def _resolved_experience_id(response: object) -> str:
    if isinstance(response, ing_pb.IngestResponse):
        return response.xproxy_result.experience_id
    if isinstance(response, ing_pb.IngestBatchResponse):
        return next((i.result.xproxy_result.experience_id for i in response.items if i.HasField("result")), "")
    return ""


def channel_credentials(
    *,
    secure: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
    ca_file: str | Path | None = None,
    client_cert_file: str | Path | None = None,
    client_key_file: str | Path | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from the options, or None for plaintext. `ca_file` (PEM) replaces the
    system's roots; a client certificate and key (PEM) are for servers that require mTLS."""
    if credentials is not None:
        return credentials
    if (client_cert_file is None) != (client_key_file is None):
        raise ValueError("give both client_cert_file and client_key_file, or neither")
    if not (secure or ca_file or client_cert_file):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(client_key_file).read_bytes() if client_key_file else None,
        certificate_chain=Path(client_cert_file).read_bytes() if client_cert_file else None,
    )


class _ClientBase:
    """What both clients share: the deadline, the API key and the experience scope."""

    timeout: float
    _credentials: Metadata = ()

    def _use_api_key(self, api_key: str | None) -> None:
        """Sends the key with every call, as `authorization: Bearer <key>`."""
        self._credentials = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _metadata(self, scope: ExperienceScope | None, metadata: Metadata = ()) -> Metadata:
        """What a call sends: the API key, the experience scope's keys (else `metadata`) and
        the current step."""
        step = _step.get()
        stepped = create_metadata(step=step) if step and not any(k == EXPERIENCE_STEP for k, _ in metadata) else ()
        return self._credentials + (scope.metadata() if scope else metadata) + stepped

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Every call and recorded event inside the block belongs to this step of its run
        (metadata xproxy-experience-step): cost is summed per step. A plain `with` for both
        clients; a nested block names its own step, and the outer one resumes after it."""
        token = _step.set(name)
        try:
            yield
        finally:
            _step.reset(token)

    def experience(
        self,
        name: str,
        *,
        experience_id: str | UUID = "",
        version: int = 0,
        user_id: str = "",
        tags: Iterable[str] = (),
    ) -> _RunBlock:
        """Attaches an experience context to every call made inside the block. Yields the
        scope; its `experience_id` is known after the first ingest, or at once when given.
        Outcomes staged with `scope.outcome(name, value)` are recorded as the block ends
        without an error: `with` for TallyClient, `async with` for AsyncTallyClient."""
        return _RunBlock(self, ExperienceScope(name, str(experience_id or ""), version, user_id, tags))

    def _timeout(self, call: Call[Any]) -> float:
        return max(self.timeout, call.min_timeout)


class _RunBlock:
    """`client.experience(...)`: the scope set while the block runs; its staged outcomes
    recorded when it ends without an error."""

    def __init__(self, client: _ClientBase, scope: ExperienceScope) -> None:
        self.client, self.scope = client, scope
        self._token: contextvars.Token[ExperienceScope | None] | None = None

    def __enter__(self) -> ExperienceScope:
        self._token = _scope.set(self.scope)
        return self.scope

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._leave()
        if kind is None and self.scope.outcomes:
            if not isinstance(self.client, TallyClient):
                raise RuntimeError(
                    "an AsyncTallyClient run records its outcomes with `async with tally.experience(...)`"
                )
            self.client.record_outcomes(self._scored(), self.scope.outcomes)

    async def __aenter__(self) -> ExperienceScope:
        return self.__enter__()

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._leave()
        if kind is None and self.scope.outcomes:
            if not isinstance(self.client, AsyncTallyClient):
                raise RuntimeError("a TallyClient run records its outcomes with a plain `with`")
            await self.client.record_outcomes(self._scored(), self.scope.outcomes)

    def _leave(self) -> None:
        if self._token is not None:
            _scope.reset(self._token)
            self._token = None

    def _scored(self) -> str:
        if not self.scope.experience_id:
            raise ValueError("the run has no experience yet (nothing was ingested in it): nothing to score")
        return self.scope.experience_id


class TallyClient(_ClientBase):
    """Blocking client. `secure=True` (or `credentials`) for TLS; plaintext otherwise."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        secure: bool = False,
        ca_file: str | Path | None = None,
        client_cert_file: str | Path | None = None,
        client_key_file: str | Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
    ) -> None:
        """`api_key` goes with every call. TLS with `secure=True` (system roots), `ca_file`
        (your CA), a client certificate and key (mTLS), or ready `credentials`."""
        self.timeout = timeout
        self._use_api_key(api_key)
        if channel is None:
            creds = channel_credentials(
                secure=secure,
                credentials=credentials,
                ca_file=ca_file,
                client_cert_file=client_cert_file,
                client_key_file=client_key_file,
            )
            channel = (
                grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
                if creds
                else grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            )
        self.channel = channel
        self._stubs: dict[str, Any] = {
            "types": et_grpc.ExperienceTypeServiceStub(channel),
            "experiences": exp_grpc.ExperienceServiceStub(channel),
            "ingest": ing_grpc.IngestServiceStub(channel),
            "prices": price_grpc.PriceCatalogServiceStub(channel),
            "events": event_grpc.EventServiceStub(channel),
            "reports": report_grpc.ReportServiceStub(channel),
            "limits": limit_grpc.LimitServiceStub(channel),
        }

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        rpc = getattr(self._stubs[call.stub], call.method)
        scope = _scope.get()
        try:
            if scope is None or scope.experience_id:
                return call.unpack(rpc(call.request, timeout=self._timeout(call), metadata=self._metadata(scope)))
            with scope._thread_lock:  # the first call creates the experience; the others wait for its id
                response = rpc(call.request, timeout=self._timeout(call), metadata=self._metadata(scope))
                scope.learn(response)
                return call.unpack(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # --- experience types ---------------------------------------------------------

    def create_experience_type(
        self,
        name: str,
        description: str,
        *,
        settings: Mapping[str, str] | None = None,
        outcomes: Iterable[et_pb.OutcomeDefinition] = (),
        request_id: str = "",
        exist_ok: bool = False,
    ) -> et_pb.ExperienceType:
        """Creates a type at version 1, with the outcomes its runs are scored on
        (`tally_client.outcome(...)`). A `request_id` makes a retry return the first result;
        `exist_ok` returns the type of that name if there is one, as it is (get or create)."""
        try:
            return self._run(_calls.create_experience_type(name, description, settings, request_id, outcomes))
        except AlreadyExists:
            if not exist_ok:
                raise
            return self.get_experience_type(name)

    def get_experience_type(self, name: str) -> et_pb.ExperienceType:
        return self._run(_calls.get_experience_type(name))

    def list_experience_types(self, *, page_size: int = 0, page_token: str = "") -> et_pb.ListExperienceTypesResponse:
        """One page: `experience_types` and `next_page_token` (empty on the last page)."""
        return self._run(_calls.list_experience_types(page_size, page_token))

    def update_experience_type(
        self,
        name: str,
        *,
        description: str | None = None,
        settings: Mapping[str, str] | None = None,
        outcomes: Iterable[et_pb.OutcomeDefinition] | None = None,
    ) -> et_pb.ExperienceType:
        """Changes what is given (settings and outcomes as a whole; the version does not
        move); ValueError if nothing is."""
        return self._run(_calls.update_experience_type(name, description, settings, outcomes))

    def delete_experience_type(self, name: str, *, force: bool = False) -> int:
        """Deletes the type; with `force`, its experiences too. Returns how many were deleted."""
        return self._run(_calls.delete_experience_type(name, force))

    def increment_experience_type_version(
        self, name: str, *, request_id: str = ""
    ) -> et_pb.IncrementExperienceTypeVersionResponse:
        return self._run(_calls.increment_experience_type_version(name, request_id))

    def list_experience_type_versions(
        self, name: str, *, page_size: int = 0, page_token: str = ""
    ) -> et_pb.ListExperienceTypeVersionsResponse:
        return self._run(_calls.list_experience_type_versions(name, page_size, page_token))

    def get_experience_type_stats(
        self,
        name: str,
        *,
        version: int = 0,
        start: datetime | None = None,
        end: datetime | None = None,
        include_outcomes: bool = False,
    ) -> et_pb.GetExperienceTypeStatsResponse:
        """Cost per experience of the type (all versions, or `version`), over events in [start, end);
        with `include_outcomes`, each declared outcome per version."""
        return self._run(_calls.get_experience_type_stats(name, version, start, end, include_outcomes))

    # --- experiences --------------------------------------------------------------

    def create_experience(
        self,
        experience_name: str,
        *,
        experience_id: str | UUID = "",
        version: int = 0,
        properties: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> exp_pb.Experience:
        """A new run of the type: a server UUIDv7, or `experience_id`; `version` pins a type version."""
        return self._run(_calls.create_experience(experience_name, experience_id, version, properties, request_id))

    def get_experience(self, experience_id: str | UUID) -> exp_pb.Experience:
        """The experience with its cost statistics in `.stats`."""
        return self._run(_calls.get_experience(experience_id))

    def list_experiences(
        self,
        experience_name: str,
        *,
        version: int = 0,
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> exp_pb.ListExperiencesResponse:
        """One page of the type's experiences with their statistics, newest first or by
        `order_by` ("cost_total desc": the most expensive runs first)."""
        return self._run(_calls.list_experiences(experience_name, version, order_by, page_size, page_token))

    def list_events(
        self, filters: EventFilter | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> event_pb.ListEventsResponse:
        """One page of stored events matching `filters`, newest first."""
        return self._run(_calls.list_events(filters or EventFilter(), page_size, page_token))

    def get_event(self, request_id: str | UUID = "", *, idempotency_key: str = "") -> event_pb.StoredEvent:
        """A stored event by its request id, or by the idempotency key it was sent with."""
        return self._run(_calls.get_event(request_id, idempotency_key))

    def annotate_event(
        self,
        request_id: str | UUID = "",
        *,
        provider_response_id: str = "",
        set_annotations: Mapping[str, str] | None = None,
        remove_keys: Iterable[str] = (),
    ) -> event_pb.StoredEvent:
        """Annotates a stored event after the fact (found by request id or the provider's
        response id); its content and cost never change. Returns it with its annotations."""
        return self._run(_calls.annotate_event(request_id, provider_response_id, set_annotations, remove_keys))

    def prune_events(self, before: datetime, *, max_events: int = 0) -> event_pb.PruneEventsResponse:
        """Deletes up to `max_events` (0: 10,000) stored events before `before` (taken down to
        a whole hour), the oldest first; call again while the answer's `more` is true. Every
        statistic, rollup and limit figure stays as it was. Needs an admin key."""
        return self._run(_calls.prune_events(before, max_events))

    def erase_user(self, user_id: str, *, max_events: int = 0) -> event_pb.EraseUserResponse:
        """Erases one end user: deletes up to `max_events` (0: 10,000) of their events; once
        none is left, moves their rows of the rollup by user to no user's (totals stay) and
        deletes the limits scoped to them. Call again while `more` is true. Needs an admin key."""
        return self._run(_calls.erase_user(user_id, max_events))

    def compare_versions(
        self,
        experience_name: str,
        *,
        baseline: int,
        candidate: int,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> report_pb.CompareVersionsResponse:
        """Two versions of a type side by side over their runs whose first event is in
        [start, end): cost per run, failures, each outcome's success rate and cost per
        success, with the differences and bootstrap intervals."""
        return self._run(_calls.compare_versions(experience_name, baseline, candidate, start, end))

    def break_down_cost(
        self,
        group_by: Iterable[str],
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        experience_name: str = "",
        experience_version: int = 0,
        category: str = "",
        model: str = "",
        user_id: str = "",
        request_tag: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> report_pb.BreakDownCostResponse:
        """Cost over [start, end) grouped by one or two of type, version, category, model
        (the price entry's), resource (as sent), user, tag, step, key (the API key that sent
        the events), day, hour; the most expensive group first. Only the events of the type
        (and version), category, model, user and tag given, where given."""
        return self._run(
            _calls.break_down_cost(
                group_by,
                start,
                end,
                _calls.CostSlice(experience_name, experience_version, category, model, user_id, request_tag),
                page_size,
                page_token,
            )
        )

    def delete_experience(self, experience_id: str | UUID) -> int:
        """Deletes it; returns how many of its events were kept as unattributed."""
        return self._run(_calls.delete_experience(experience_id))

    def update_experience_properties(
        self,
        experience_id: str | UUID,
        *,
        set_properties: Mapping[str, str] | None = None,
        remove_keys: Iterable[str] = (),
    ) -> exp_pb.Experience:
        return self._run(_calls.update_experience_properties(experience_id, set_properties, remove_keys))

    def record_outcomes(
        self, experience_id: str | UUID, values: Mapping[str, bool | float]
    ) -> list[exp_pb.RecordedOutcome]:
        """Scores a run: {"resolved": True, "csat": 4}, each an outcome its type declares (a
        bool for a BOOLEAN, a number for the others). A value replaces the earlier one.
        Returns the run's outcomes after the call."""
        return self._run(_calls.record_outcomes(experience_id, values))

    def list_outcome_changes(
        self, experience_id: str | UUID, *, page_size: int = 0, page_token: str = ""
    ) -> exp_pb.ListOutcomeChangesResponse:
        """Every change of the run's outcome values, the oldest first, with who and when."""
        return self._run(_calls.list_outcome_changes(experience_id, page_size, page_token))

    # --- ingest -------------------------------------------------------------------

    @overload
    def ingest(self, event: ing_pb.UsageEvent, /) -> ing_pb.IngestResponse: ...

    @overload
    def ingest(
        self,
        category: str,
        /,
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
    ) -> ing_pb.IngestResponse: ...

    def ingest(
        self,
        event_or_category: ing_pb.UsageEvent | str,
        /,
        resource: str = "",
        units: Units | None = None,
        **fields: Any,
    ) -> ing_pb.IngestResponse:
        """Ingests one event: a UsageEvent, or the arguments of `usage_event`."""
        return self._run(_calls.ingest(_event(event_or_category, resource, units, fields)))

    def ingest_batch(self, events: Iterable[ing_pb.UsageEvent]) -> ing_pb.IngestBatchResponse:
        """Ingests up to 1,000 events; the response has one item per event, in order."""
        return self._run(_calls.ingest_batch(events))

    def ingest_stream(
        self, events: Iterable[ing_pb.UsageEvent], metadata: Metadata = ()
    ) -> Iterator[ing_pb.IngestStreamResponse]:
        """Streams events; yields one IngestStreamResponse per event, in order. `metadata`
        (from create_metadata) applies to every event; inside `experience(...)` its context does."""
        scope = _scope.get()
        requests = (ing_pb.IngestStreamRequest(event=event) for event in events)
        call = self._stubs["ingest"].IngestStream(requests, metadata=self._metadata(scope, metadata))
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # left early (Ctrl-C, a break): see watch_limits

    # --- prices -------------------------------------------------------------------

    def create_custom_price(
        self,
        category: str,
        resource: str,
        unit_prices: Mapping[str, tuple[str, str]],
        *,
        effective_time: datetime | None = None,
        price_context: Mapping[str, str] | None = None,
    ) -> price_pb.CreateCustomPriceResponse:
        """Adds a price; `unit_prices` maps a unit type to (input, output) USD per million
        units, as exact decimal strings. It applies to events at or after `effective_time`
        (with `price_context`, only to events whose price context has those pairs). The
        response has the price and the warnings (e.g. that it overrides a system price)."""
        call = _calls.create_custom_price(category, resource, unit_prices, effective_time, price_context)
        return self._run(call)

    def end_custom_price(self, price_id: str | UUID, *, end_time: datetime | None = None) -> price_pb.CustomPrice:
        """Ends a price at `end_time` (default now; its effective time voids it): events from
        then on are priced as if it did not exist. Stored events keep their cost."""
        return self._run(_calls.end_custom_price(price_id, end_time))

    def get_custom_price(self, price_id: str | UUID) -> price_pb.CustomPrice:
        return self._run(_calls.get_custom_price(price_id))

    def list_custom_prices(
        self, *, category: str = "", resource: str = "", page_size: int = 0, page_token: str = ""
    ) -> price_pb.ListCustomPricesResponse:
        return self._run(_calls.list_custom_prices(category, resource, page_size, page_token))

    def quote_price(
        self,
        category: str,
        resource: str,
        units: Units,
        *,
        event_time: datetime | None = None,
        price_context: Mapping[str, str] | None = None,
    ) -> ing_pb.XProxyResult:
        """What this usage costs (at `event_time`, default now; with the price variant
        `price_context` selects), without storing anything."""
        return self._run(_calls.quote_price(category, resource, units, event_time, price_context))

    # --- limits -------------------------------------------------------------------

    def create_limit(self, limit: limit_pb.Limit) -> limit_pb.Limit:
        """Creates a limit (see `tally_client.limit` to build one)."""
        return self._run(_calls.create_limit(limit))

    def get_limit(self, name: str, *, experience_id: str | UUID = "") -> limit_pb.GetLimitResponse:
        return self._run(_calls.get_limit(name, str(experience_id)))

    def list_limits(self, *, page_size: int = 0, page_token: str = "") -> limit_pb.ListLimitsResponse:
        return self._run(_calls.list_limits(page_size, page_token))

    def list_limit_periods(
        self,
        name: str,
        *,
        experience_id: str | UUID = "",
        page_size: int = 0,
        page_token: str = "",
        order_by: str = "",
    ) -> limit_pb.ListLimitPeriodsResponse:
        """A limit's periods, the newest first; `order_by="spend desc"`: its periods current
        now, the most spent first (a per-experience limit's busiest runs)."""
        return self._run(_calls.list_limit_periods(name, str(experience_id), page_size, page_token, order_by))

    def reset_limit(self, name: str) -> limit_pb.ResetLimitResponse:
        return self._run(_calls.reset_limit(name))

    def delete_limit(self, name: str) -> None:
        self._run(_calls.delete_limit(name))

    def reserve(
        self,
        amount: Decimal | str | None = None,
        *,
        category: str = "",
        resource: str = "",
        units: Units | None = None,
        request_id: str = "",
        ttl_seconds: int = 0,
    ) -> limit_pb.Reservation:
        """Reserves an estimate before a model call, against the BLOCK limits of the current
        experience context: an amount in USD, or the usage the call may have (Tally prices it).
        Raises LimitExceeded when a limit has no room; name the reservation in the call's event
        (`limit_reservation_id`) to settle it, or release() it."""
        return self._run(_calls.reserve(amount, category, resource, units, request_id, ttl_seconds))

    def release(self, reservation_id: str | UUID) -> None:
        """Settles a reservation whose call produced no usage."""
        self._run(_calls.release(reservation_id))

    def watch_limits(self, names: Iterable[str] = ()) -> Iterator[limit_pb.WatchLimitsResponse]:
        """Each limit's state now, then each time one crosses its threshold or maximum, or is reset."""
        call = self._stubs["limits"].WatchLimits(
            limit_pb.WatchLimitsRequest(names=list(names)), metadata=self._metadata(None)
        )
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            # Left early (Ctrl-C, a break): cancelled now, before the channel closes. Left to
            # the garbage collector, the call's state waited forever at interpreter exit
            # (`tally limits watch` hung after SIGINT, once in CI: grpc's _ChannelCallState.__del__).
            call.cancel()


class AsyncTallyClient(_ClientBase):
    """asyncio client: the same methods as TallyClient, awaited. Use inside a running event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        secure: bool = False,
        ca_file: str | Path | None = None,
        client_cert_file: str | Path | None = None,
        client_key_file: str | Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """As TallyClient's."""
        self.timeout = timeout
        self._use_api_key(api_key)
        creds = channel_credentials(
            secure=secure,
            credentials=credentials,
            ca_file=ca_file,
            client_cert_file=client_cert_file,
            client_key_file=client_key_file,
        )
        self.channel = (
            aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
            if creds
            else aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        )
        self._stubs: dict[str, Any] = {
            "types": et_grpc.ExperienceTypeServiceStub(self.channel),
            "experiences": exp_grpc.ExperienceServiceStub(self.channel),
            "ingest": ing_grpc.IngestServiceStub(self.channel),
            "prices": price_grpc.PriceCatalogServiceStub(self.channel),
            "events": event_grpc.EventServiceStub(self.channel),
            "reports": report_grpc.ReportServiceStub(self.channel),
            "limits": limit_grpc.LimitServiceStub(self.channel),
        }

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTallyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, call: Call[T]) -> T:
        rpc = getattr(self._stubs[call.stub], call.method)
        scope = _scope.get()
        try:
            metadata = self._metadata(scope)
            if scope is None or scope.experience_id:
                return call.unpack(await rpc(call.request, timeout=self._timeout(call), metadata=metadata))
            async with scope.async_lock:  # the first call creates the experience; the others wait for its id
                response = await rpc(call.request, timeout=self._timeout(call), metadata=self._metadata(scope))
                scope.learn(response)
                return call.unpack(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # --- experience types ---------------------------------------------------------

    async def create_experience_type(
        self,
        name: str,
        description: str,
        *,
        settings: Mapping[str, str] | None = None,
        outcomes: Iterable[et_pb.OutcomeDefinition] = (),
        request_id: str = "",
        exist_ok: bool = False,
    ) -> et_pb.ExperienceType:
        """As TallyClient.create_experience_type."""
        try:
            return await self._run(_calls.create_experience_type(name, description, settings, request_id, outcomes))
        except AlreadyExists:
            if not exist_ok:
                raise
            return await self.get_experience_type(name)

    async def get_experience_type(self, name: str) -> et_pb.ExperienceType:
        return await self._run(_calls.get_experience_type(name))

    async def list_experience_types(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> et_pb.ListExperienceTypesResponse:
        """One page: `experience_types` and `next_page_token` (empty on the last page)."""
        return await self._run(_calls.list_experience_types(page_size, page_token))

    async def update_experience_type(
        self,
        name: str,
        *,
        description: str | None = None,
        settings: Mapping[str, str] | None = None,
        outcomes: Iterable[et_pb.OutcomeDefinition] | None = None,
    ) -> et_pb.ExperienceType:
        """As TallyClient.update_experience_type."""
        return await self._run(_calls.update_experience_type(name, description, settings, outcomes))

    async def delete_experience_type(self, name: str, *, force: bool = False) -> int:
        """Deletes the type; with `force`, its experiences too. Returns how many were deleted."""
        return await self._run(_calls.delete_experience_type(name, force))

    async def increment_experience_type_version(
        self, name: str, *, request_id: str = ""
    ) -> et_pb.IncrementExperienceTypeVersionResponse:
        return await self._run(_calls.increment_experience_type_version(name, request_id))

    async def list_experience_type_versions(
        self, name: str, *, page_size: int = 0, page_token: str = ""
    ) -> et_pb.ListExperienceTypeVersionsResponse:
        return await self._run(_calls.list_experience_type_versions(name, page_size, page_token))

    async def get_experience_type_stats(
        self,
        name: str,
        *,
        version: int = 0,
        start: datetime | None = None,
        end: datetime | None = None,
        include_outcomes: bool = False,
    ) -> et_pb.GetExperienceTypeStatsResponse:
        """Cost per experience of the type (all versions, or `version`), over events in [start, end);
        with `include_outcomes`, each declared outcome per version."""
        return await self._run(_calls.get_experience_type_stats(name, version, start, end, include_outcomes))

    # --- experiences --------------------------------------------------------------

    async def create_experience(
        self,
        experience_name: str,
        *,
        experience_id: str | UUID = "",
        version: int = 0,
        properties: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> exp_pb.Experience:
        """A new run of the type: a server UUIDv7, or `experience_id`; `version` pins a type version."""
        return await self._run(
            _calls.create_experience(experience_name, experience_id, version, properties, request_id)
        )

    async def get_experience(self, experience_id: str | UUID) -> exp_pb.Experience:
        """The experience with its cost statistics in `.stats`."""
        return await self._run(_calls.get_experience(experience_id))

    async def list_experiences(
        self,
        experience_name: str,
        *,
        version: int = 0,
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> exp_pb.ListExperiencesResponse:
        """One page of the type's experiences with their statistics, newest first or by
        `order_by` ("cost_total desc": the most expensive runs first)."""
        return await self._run(_calls.list_experiences(experience_name, version, order_by, page_size, page_token))

    async def list_events(
        self, filters: EventFilter | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> event_pb.ListEventsResponse:
        """One page of stored events matching `filters`, newest first."""
        return await self._run(_calls.list_events(filters or EventFilter(), page_size, page_token))

    async def get_event(self, request_id: str | UUID = "", *, idempotency_key: str = "") -> event_pb.StoredEvent:
        """A stored event by its request id, or by the idempotency key it was sent with."""
        return await self._run(_calls.get_event(request_id, idempotency_key))

    async def annotate_event(
        self,
        request_id: str | UUID = "",
        *,
        provider_response_id: str = "",
        set_annotations: Mapping[str, str] | None = None,
        remove_keys: Iterable[str] = (),
    ) -> event_pb.StoredEvent:
        """As TallyClient.annotate_event."""
        return await self._run(_calls.annotate_event(request_id, provider_response_id, set_annotations, remove_keys))

    async def prune_events(self, before: datetime, *, max_events: int = 0) -> event_pb.PruneEventsResponse:
        """As TallyClient.prune_events."""
        return await self._run(_calls.prune_events(before, max_events))

    async def erase_user(self, user_id: str, *, max_events: int = 0) -> event_pb.EraseUserResponse:
        """As TallyClient.erase_user."""
        return await self._run(_calls.erase_user(user_id, max_events))

    async def compare_versions(
        self,
        experience_name: str,
        *,
        baseline: int,
        candidate: int,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> report_pb.CompareVersionsResponse:
        """As TallyClient.compare_versions."""
        return await self._run(_calls.compare_versions(experience_name, baseline, candidate, start, end))

    async def break_down_cost(
        self,
        group_by: Iterable[str],
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        experience_name: str = "",
        experience_version: int = 0,
        category: str = "",
        model: str = "",
        user_id: str = "",
        request_tag: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> report_pb.BreakDownCostResponse:
        """Cost over [start, end) grouped by one or two of type, version, category, model
        (the price entry's), resource (as sent), user, tag, step, key (the API key that sent
        the events), day, hour; the most expensive group first. Only the events of the type
        (and version), category, model, user and tag given, where given."""
        return await self._run(
            _calls.break_down_cost(
                group_by,
                start,
                end,
                _calls.CostSlice(experience_name, experience_version, category, model, user_id, request_tag),
                page_size,
                page_token,
            )
        )

    async def delete_experience(self, experience_id: str | UUID) -> int:
        """Deletes it; returns how many of its events were kept as unattributed."""
        return await self._run(_calls.delete_experience(experience_id))

    async def update_experience_properties(
        self,
        experience_id: str | UUID,
        *,
        set_properties: Mapping[str, str] | None = None,
        remove_keys: Iterable[str] = (),
    ) -> exp_pb.Experience:
        return await self._run(_calls.update_experience_properties(experience_id, set_properties, remove_keys))

    async def record_outcomes(
        self, experience_id: str | UUID, values: Mapping[str, bool | float]
    ) -> list[exp_pb.RecordedOutcome]:
        """As TallyClient.record_outcomes."""
        return await self._run(_calls.record_outcomes(experience_id, values))

    async def list_outcome_changes(
        self, experience_id: str | UUID, *, page_size: int = 0, page_token: str = ""
    ) -> exp_pb.ListOutcomeChangesResponse:
        """As TallyClient.list_outcome_changes."""
        return await self._run(_calls.list_outcome_changes(experience_id, page_size, page_token))

    # --- ingest -------------------------------------------------------------------

    @overload
    async def ingest(self, event: ing_pb.UsageEvent, /) -> ing_pb.IngestResponse: ...

    @overload
    async def ingest(
        self,
        category: str,
        /,
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
    ) -> ing_pb.IngestResponse: ...

    async def ingest(
        self,
        event_or_category: ing_pb.UsageEvent | str,
        /,
        resource: str = "",
        units: Units | None = None,
        **fields: Any,
    ) -> ing_pb.IngestResponse:
        """Ingests one event: a UsageEvent, or the arguments of `usage_event`."""
        return await self._run(_calls.ingest(_event(event_or_category, resource, units, fields)))

    async def ingest_batch(self, events: Iterable[ing_pb.UsageEvent]) -> ing_pb.IngestBatchResponse:
        """Ingests up to 1,000 events; the response has one item per event, in order."""
        return await self._run(_calls.ingest_batch(events))

    async def ingest_stream(
        self, events: AsyncIterable[ing_pb.UsageEvent] | Iterable[ing_pb.UsageEvent], metadata: Metadata = ()
    ) -> AsyncIterator[ing_pb.IngestStreamResponse]:
        """Streams events; yields one IngestStreamResponse per event, in order. `metadata`
        (from create_metadata) applies to every event; inside `experience(...)` its context does."""
        scope = _scope.get()

        async def requests() -> AsyncIterator[ing_pb.IngestStreamRequest]:
            if isinstance(events, AsyncIterable):
                async for event in events:
                    yield ing_pb.IngestStreamRequest(event=event)
            else:
                for event in events:
                    yield ing_pb.IngestStreamRequest(event=event)

        try:
            call = self._stubs["ingest"].IngestStream(requests(), metadata=self._metadata(scope, metadata))
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # --- prices -------------------------------------------------------------------

    async def create_custom_price(
        self,
        category: str,
        resource: str,
        unit_prices: Mapping[str, tuple[str, str]],
        *,
        effective_time: datetime | None = None,
        price_context: Mapping[str, str] | None = None,
    ) -> price_pb.CreateCustomPriceResponse:
        """Adds a price; `unit_prices` maps a unit type to (input, output) USD per million
        units, as exact decimal strings. It applies to events at or after `effective_time`
        (with `price_context`, only to events whose price context has those pairs). The
        response has the price and the warnings (e.g. that it overrides a system price)."""
        call = _calls.create_custom_price(category, resource, unit_prices, effective_time, price_context)
        return await self._run(call)

    async def end_custom_price(self, price_id: str | UUID, *, end_time: datetime | None = None) -> price_pb.CustomPrice:
        """Ends a price at `end_time` (default now; its effective time voids it): events from
        then on are priced as if it did not exist. Stored events keep their cost."""
        return await self._run(_calls.end_custom_price(price_id, end_time))

    async def get_custom_price(self, price_id: str | UUID) -> price_pb.CustomPrice:
        return await self._run(_calls.get_custom_price(price_id))

    async def list_custom_prices(
        self, *, category: str = "", resource: str = "", page_size: int = 0, page_token: str = ""
    ) -> price_pb.ListCustomPricesResponse:
        return await self._run(_calls.list_custom_prices(category, resource, page_size, page_token))

    async def quote_price(
        self,
        category: str,
        resource: str,
        units: Units,
        *,
        event_time: datetime | None = None,
        price_context: Mapping[str, str] | None = None,
    ) -> ing_pb.XProxyResult:
        """What this usage costs (at `event_time`, default now; with the price variant
        `price_context` selects), without storing anything."""
        return await self._run(_calls.quote_price(category, resource, units, event_time, price_context))

    # --- limits -------------------------------------------------------------------

    async def create_limit(self, limit: limit_pb.Limit) -> limit_pb.Limit:
        return await self._run(_calls.create_limit(limit))

    async def get_limit(self, name: str, *, experience_id: str | UUID = "") -> limit_pb.GetLimitResponse:
        return await self._run(_calls.get_limit(name, str(experience_id)))

    async def list_limits(self, *, page_size: int = 0, page_token: str = "") -> limit_pb.ListLimitsResponse:
        return await self._run(_calls.list_limits(page_size, page_token))

    async def reset_limit(self, name: str) -> limit_pb.ResetLimitResponse:
        return await self._run(_calls.reset_limit(name))

    async def delete_limit(self, name: str) -> None:
        await self._run(_calls.delete_limit(name))

    async def reserve(
        self,
        amount: Decimal | str | None = None,
        *,
        category: str = "",
        resource: str = "",
        units: Units | None = None,
        request_id: str = "",
        ttl_seconds: int = 0,
    ) -> limit_pb.Reservation:
        """As TallyClient.reserve."""
        return await self._run(_calls.reserve(amount, category, resource, units, request_id, ttl_seconds))

    async def release(self, reservation_id: str | UUID) -> None:
        await self._run(_calls.release(reservation_id))


def _event(
    event_or_category: ing_pb.UsageEvent | str, resource: str, units: Units | None, fields: Mapping[str, Any]
) -> ing_pb.UsageEvent:
    if isinstance(event_or_category, ing_pb.UsageEvent):
        return event_or_category
    return usage_event(event_or_category, resource, units, **fields)


__all__ = ["AsyncTallyClient", "ExperienceScope", "TallyClient", "TallyError", "usage_event"]

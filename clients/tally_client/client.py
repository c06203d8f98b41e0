"""Python clients for Tally: `TallyClient` (blocking) and `AsyncTallyClient` (asyncio).

Both share one channel per client, put a deadline on every call, retry only
idempotent reads on UNAVAILABLE (through the channel's service config), and raise
`TallyError` subclasses that carry the status code, ErrorInfo reason and field
violations.

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
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2
from grpc import aio
from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc as exp_grpc,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc as et_grpc,
    ingest_service_pb2 as ing_pb,
    ingest_service_pb2_grpc as ing_grpc,
    price_catalog_service_pb2 as price_pb,
    price_catalog_service_pb2_grpc as price_grpc,
)

from .errors import TallyError, from_rpc_error
from .metadata import Metadata, create_metadata

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0

_READS = {
    "tally.v1.ExperienceTypeService": ["GetExperienceType", "ListExperienceTypes", "ListExperienceTypeVersions", "GetExperienceTypeStats"],
    "tally.v1.ExperienceService": ["GetExperience", "ListExperiences"],
    "tally.v1.PriceCatalogService": ["GetCustomPrice", "ListCustomPrices", "QuotePrice"],
}
# Reads are retried by gRPC itself when the server is briefly unreachable. Writes
# are not: an ingest is safe to resend only with an idempotency key, which the
# caller decides on.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": service, "method": method} for service, methods in _READS.items() for method in methods],
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


def usage_event(
    category: str,
    resource: str,
    units: Mapping[str, tuple[int, int] | Mapping[str, int]] | None = None,
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
    for unit_type, counts in (units or {}).items():
        if isinstance(counts, Mapping):
            event.units[unit_type].input = counts.get("input", 0)
            event.units[unit_type].output = counts.get("output", 0)
        else:
            event.units[unit_type].input, event.units[unit_type].output = counts
    if event_time is not None:
        event.event_timestamp.FromDatetime(event_time)
    return event


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class ExperienceScope:
    """The experience context of the calls made inside `client.experience(...)`.

    The first ingest names the type and creates the experience; the id the server
    returns is sent with every later call, so the whole run lands in one experience.
    Calls made concurrently before that wait for the first one.
    """

    def __init__(self, name: str, experience_id: str = "", version: int = 0, user_id: str = "", tags: Iterable[str] = ()):
        self.experience_name = name
        self.experience_id = experience_id
        self.experience_version = version
        self.user_id = user_id
        self.request_tags = tuple(tags)
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

    def learn(self, experience_id: str) -> None:
        if not self.experience_id and experience_id:
            self.experience_id = experience_id

    @property
    def async_lock(self) -> asyncio.Lock:
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        return self._async_lock


_scope: contextvars.ContextVar[ExperienceScope | None] = contextvars.ContextVar("tally_experience", default=None)


def _result_experience_id(response: Any) -> str:
    if isinstance(response, ing_pb.IngestResponse):
        return response.xproxy_result.experience_id
    if isinstance(response, ing_pb.IngestBatchResponse):
        return next((i.result.xproxy_result.experience_id for i in response.items if i.HasField("result")), "")
    return ""


class _Calls:
    """The RPCs as methods. `_invoke` runs them: at once in TallyClient, as a coroutine in AsyncTallyClient."""

    timeout: float

    def _invoke(self, rpc: Callable, request: Any, unpack: Callable = lambda r: r, timeout: float | None = None) -> Any:
        raise NotImplementedError

    @contextlib.contextmanager
    def experience(self, name: str, *, experience_id: str = "", version: int = 0, user_id: str = "", tags: Iterable[str] = ()) -> Iterator[ExperienceScope]:
        """Attaches an experience context to every call made inside the block (a plain
        `with`, for the async client too). Yields the scope; its `experience_id` is known
        after the first ingest, or at once when given."""
        scope = ExperienceScope(name, str(experience_id or ""), version, user_id, tags)
        token = _scope.set(scope)
        try:
            yield scope
        finally:
            _scope.reset(token)

    # --- experience types ---------------------------------------------------------

    def create_experience_type(self, name: str, description: str, settings: Mapping[str, str] | None = None, request_id: str = ""):  # noqa: ANN201
        request = et_pb.CreateExperienceTypeRequest(
            experience_type=et_pb.ExperienceType(name=name, description=description, settings=dict(settings or {})),
            request_id=request_id,
        )
        return self._invoke(self._types.CreateExperienceType, request, lambda r: r.experience_type)

    def get_experience_type(self, name: str):  # noqa: ANN201
        return self._invoke(self._types.GetExperienceType, et_pb.GetExperienceTypeRequest(name=name), lambda r: r.experience_type)

    def list_experience_types(self, page_size: int = 0, page_token: str = ""):  # noqa: ANN201
        """One page: a ListExperienceTypesResponse with `experience_types` and `next_page_token`."""
        return self._invoke(self._types.ListExperienceTypes, et_pb.ListExperienceTypesRequest(page_size=page_size, page_token=page_token))

    def update_experience_type(self, name: str, description: str | None = None, settings: Mapping[str, str] | None = None):  # noqa: ANN201
        paths = [path for path, value in (("description", description), ("settings", settings)) if value is not None]
        if not paths:
            raise ValueError("nothing to update: give a description, settings or both")
        request = et_pb.UpdateExperienceTypeRequest(
            experience_type=et_pb.ExperienceType(name=name, description=description or "", settings=dict(settings or {})),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        return self._invoke(self._types.UpdateExperienceType, request, lambda r: r.experience_type)

    def delete_experience_type(self, name: str, force: bool = False):  # noqa: ANN201
        request = et_pb.DeleteExperienceTypeRequest(name=name, force=force)
        return self._invoke(self._types.DeleteExperienceType, request, lambda r: r.deleted_experience_count)

    def increment_experience_type_version(self, name: str, request_id: str = ""):  # noqa: ANN201
        request = et_pb.IncrementExperienceTypeVersionRequest(name=name, request_id=request_id)
        return self._invoke(self._types.IncrementExperienceTypeVersion, request)

    def list_experience_type_versions(self, name: str, page_size: int = 0, page_token: str = ""):  # noqa: ANN201
        request = et_pb.ListExperienceTypeVersionsRequest(name=name, page_size=page_size, page_token=page_token)
        return self._invoke(self._types.ListExperienceTypeVersions, request)

    def get_experience_type_stats(self, name: str, version: int = 0, start: datetime | None = None, end: datetime | None = None):  # noqa: ANN201
        request = et_pb.GetExperienceTypeStatsRequest(name=name, version=version, start_time=_timestamp(start), end_time=_timestamp(end))
        return self._invoke(self._types.GetExperienceTypeStats, request)

    # --- experiences --------------------------------------------------------------

    def create_experience(self, experience_name: str, experience_id: str = "", version: int = 0, properties: Mapping[str, str] | None = None, request_id: str = ""):  # noqa: ANN201
        request = exp_pb.CreateExperienceRequest(
            experience_name=experience_name,
            experience_id=str(experience_id or ""),
            experience_version=version,
            properties=dict(properties or {}),
            request_id=request_id,
        )
        return self._invoke(self._experiences.CreateExperience, request, lambda r: r.experience)

    def get_experience(self, experience_id: str):  # noqa: ANN201
        """The experience with its cost statistics in `.stats`."""
        request = exp_pb.GetExperienceRequest(experience_id=str(experience_id))
        return self._invoke(self._experiences.GetExperience, request, lambda r: r.experience)

    def list_experiences(self, experience_name: str, version: int = 0, page_size: int = 0, page_token: str = ""):  # noqa: ANN201
        request = exp_pb.ListExperiencesRequest(
            experience_name=experience_name, experience_version=version, page_size=page_size, page_token=page_token
        )
        return self._invoke(self._experiences.ListExperiences, request)

    def delete_experience(self, experience_id: str):  # noqa: ANN201
        request = exp_pb.DeleteExperienceRequest(experience_id=str(experience_id))
        return self._invoke(self._experiences.DeleteExperience, request, lambda r: r.unattributed_event_count)

    def update_experience_properties(self, experience_id: str, set_properties: Mapping[str, str] | None = None, remove_keys: Iterable[str] = ()):  # noqa: ANN201
        request = exp_pb.UpdateExperiencePropertiesRequest(
            experience_id=str(experience_id), set_properties=dict(set_properties or {}), remove_keys=list(remove_keys)
        )
        return self._invoke(self._experiences.UpdateExperienceProperties, request, lambda r: r.experience)

    # --- ingest -------------------------------------------------------------------

    def ingest(self, event_or_category: ing_pb.UsageEvent | str, resource: str = "", units: Mapping | None = None, **fields: Any):  # noqa: ANN201
        """Ingests one event: a UsageEvent, or the arguments of `usage_event`. Returns the IngestResponse."""
        event = event_or_category if isinstance(event_or_category, ing_pb.UsageEvent) else usage_event(event_or_category, resource, units, **fields)
        return self._invoke(self._ingest.Ingest, ing_pb.IngestRequest(event=event))

    def ingest_batch(self, events: Iterable[ing_pb.UsageEvent]):  # noqa: ANN201
        """Ingests up to 1,000 events; the IngestBatchResponse has one item per event."""
        return self._invoke(self._ingest.IngestBatch, ing_pb.IngestBatchRequest(events=list(events)), timeout=max(self.timeout, 60.0))

    # --- prices -------------------------------------------------------------------

    def create_custom_price(self, category: str, resource: str, unit_prices: Mapping[str, tuple[str, str]], effective_time: datetime | None = None):  # noqa: ANN201
        """Adds a custom price; `unit_prices` maps a unit type to (input, output) USD per million, as decimal strings."""
        price = price_pb.CustomPrice(
            category=category,
            resource=resource,
            effective_time=_timestamp(effective_time),
            unit_prices={u: price_pb.UnitPrice(input_per_million=i, output_per_million=o) for u, (i, o) in unit_prices.items()},
        )
        return self._invoke(self._prices.CreateCustomPrice, price_pb.CreateCustomPriceRequest(price=price), lambda r: r.price)

    def _bind(self, channel: grpc.Channel | aio.Channel) -> None:
        self._types = et_grpc.ExperienceTypeServiceStub(channel)
        self._experiences = exp_grpc.ExperienceServiceStub(channel)
        self._ingest = ing_grpc.IngestServiceStub(channel)
        self._prices = price_grpc.PriceCatalogServiceStub(channel)


def _credentials(secure: bool, credentials: grpc.ChannelCredentials | None) -> grpc.ChannelCredentials | None:
    if credentials is not None:
        return credentials
    return grpc.ssl_channel_credentials() if secure else None


class TallyClient(_Calls):
    """Blocking client. `secure=True` (or `credentials`) for TLS; plaintext otherwise."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        secure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.timeout = timeout
        creds = _credentials(secure, credentials)
        if channel is None:
            channel = (
                grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
                if creds
                else grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            )
        self.channel = channel
        self._bind(channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _invoke(self, rpc: Callable, request: Any, unpack: Callable = lambda r: r, timeout: float | None = None) -> Any:
        scope = _scope.get()
        try:
            if scope is None:
                return unpack(rpc(request, timeout=timeout or self.timeout))
            if scope.experience_id:
                return unpack(rpc(request, timeout=timeout or self.timeout, metadata=scope.metadata()))
            with scope._thread_lock:  # the first call creates the experience; the others wait for its id
                response = rpc(request, timeout=timeout or self.timeout, metadata=scope.metadata())
                scope.learn(_result_experience_id(response))
                return unpack(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def ingest_stream(self, events: Iterable[ing_pb.UsageEvent], metadata: Metadata = ()) -> Iterator[ing_pb.IngestStreamResponse]:
        """Streams events; yields one IngestStreamResponse per event, in order. `metadata`
        (from create_metadata) applies to every event; inside `experience(...)` its context does."""
        scope = _scope.get()
        metadata = scope.metadata() if scope else tuple(metadata)
        requests = (ing_pb.IngestStreamRequest(event=event) for event in events)
        try:
            yield from self._ingest.IngestStream(requests, metadata=metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


class AsyncTallyClient(_Calls):
    """asyncio client: every method returns an awaitable. Use inside a running event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        secure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        creds = _credentials(secure, credentials)
        self.channel = (
            aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
            if creds
            else aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        )
        self._bind(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTallyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _invoke(self, rpc: Callable, request: Any, unpack: Callable = lambda r: r, timeout: float | None = None) -> Any:
        scope = _scope.get()  # read now: the coroutine may be awaited elsewhere

        async def call() -> Any:
            try:
                if scope is None:
                    return unpack(await rpc(request, timeout=timeout or self.timeout))
                if scope.experience_id:
                    return unpack(await rpc(request, timeout=timeout or self.timeout, metadata=scope.metadata()))
                async with scope.async_lock:
                    response = await rpc(request, timeout=timeout or self.timeout, metadata=scope.metadata())
                    scope.learn(_result_experience_id(response))
                    return unpack(response)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None

        return call()

    async def ingest_stream(
        self, events: AsyncIterable[ing_pb.UsageEvent] | Iterable[ing_pb.UsageEvent], metadata: Metadata = ()
    ) -> AsyncIterator[ing_pb.IngestStreamResponse]:
        """Streams events; yields one IngestStreamResponse per event, in order. `metadata`
        (from create_metadata) applies to every event; inside `experience(...)` its context does."""
        scope = _scope.get()
        metadata = scope.metadata() if scope else tuple(metadata)

        async def requests():  # noqa: ANN202
            if hasattr(events, "__aiter__"):
                async for event in events:
                    yield ing_pb.IngestStreamRequest(event=event)
            else:
                for event in events:
                    yield ing_pb.IngestStreamRequest(event=event)

        try:
            async for response in self._ingest.IngestStream(requests(), metadata=metadata):
                yield response
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


__all__ = ["AsyncTallyClient", "ExperienceScope", "TallyClient", "TallyError", "usage_event"]

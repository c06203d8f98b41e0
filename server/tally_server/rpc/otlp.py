"""OTLP traces in: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on Tally's
port, from the opentelemetry-proto package's generated code. Each span of a call to a
model (domain/genai_spans.py says which) becomes a usage event, stored as IngestBatch
stores events; other spans are skipped after a look at their attribute keys.

OTLP's rules for the answer: a span refused for good (a GenAI span without a model,
negative tokens, an idempotency key reused with other content) is counted in
`partial_success.rejected_spans`, with the first reasons in its message, and the rest of
the export is stored. A refusal that a retry can cure (the database unreachable, Tally
overloaded) fails the whole export with its status: exporters retry UNAVAILABLE, and the
spans stored meanwhile come back as duplicates (trace id + span id is their key).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan, Status

from .. import metrics
from ..domain import genai_spans
from ..domain.errors import Code, TallyError
from ..domain.events import MAX_BATCH_EVENTS
from ..domain.models import IngestResult, UsageEvent, now_us
from ..services.ingest import Ingestor
from .access import current_key
from .interceptor import Undecodable
from .status import as_tally_error, current_call

log = logging.getLogger("tally.otlp")

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SERVICE_NAME = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
# The reasons partial_success's message names at most (the count covers them all).
MAX_REASONS = 5
# Characters of one refusal in the answer: what a span sent is never echoed whole.
MAX_REASON_CHARS = 500
# Codes a retry of the export can cure: the export fails with them as a whole.
_RETRYABLE = frozenset({Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED})
_PROVIDER_KEYS = frozenset({"gen_ai.provider.name", "gen_ai.system"})


class TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest | Undecodable, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        if isinstance(request, Undecodable):
            raise request.error()
        now = now_us()
        events: list[UsageEvent] = []
        reasons: list[str] = []
        skipped = 0
        for resource_spans in request.resource_spans:
            resource: Mapping[str, genai_spans.AttributeValue] | None = None  # read at its first GenAI span
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    if not any(kv.key in _PROVIDER_KEYS for kv in span.attributes):
                        skipped += 1
                        continue
                    attributes = _attributes(span.attributes)
                    if not genai_spans.is_model_call(attributes):
                        skipped += 1
                        continue
                    if resource is None:
                        resource = _attributes(resource_spans.resource.attributes)
                    event = genai_spans.usage_event(_span(span, attributes, resource), now)
                    if isinstance(event, TallyError):
                        reasons.append(_reason(span, event))
                    else:
                        key = current_key.get()
                        event.key_name = key.name if key else ""
                        events.append(event)
        stored = duplicates = 0
        for start in range(0, len(events), MAX_BATCH_EVENTS):
            chunk = events[start : start + MAX_BATCH_EVENTS]
            for event, outcome in zip(chunk, await self.ingestor.submit(chunk), strict=True):
                if isinstance(outcome, IngestResult):
                    duplicates += outcome.duplicate
                    stored += not outcome.duplicate
                    continue
                error = as_tally_error(outcome, *current_call.get())
                if error.code in _RETRYABLE:
                    raise error
                reasons.append(f"span {event.properties['otel.span_id'][:16]}: {error.message[:MAX_REASON_CHARS]}")
        _count(stored, duplicates, skipped, len(reasons))
        response = trace_service_pb2.ExportTraceServiceResponse()
        if reasons:
            response.partial_success.rejected_spans = len(reasons)
            more = f" (and {len(reasons) - MAX_REASONS} more)" if len(reasons) > MAX_REASONS else ""
            response.partial_success.error_message = "; ".join(reasons[:MAX_REASONS]) + more
        return response


def _span(
    span: OtlpSpan,
    attributes: Mapping[str, genai_spans.AttributeValue],
    resource: Mapping[str, genai_spans.AttributeValue],
) -> genai_spans.Span:
    return genai_spans.Span(
        trace_id=span.trace_id,
        span_id=span.span_id,
        start_unix_nano=span.start_time_unix_nano,
        end_unix_nano=span.end_time_unix_nano,
        failed=span.status.code == Status.STATUS_CODE_ERROR,
        attributes=attributes,
        resource=resource,
    )


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, genai_spans.AttributeValue]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _value(value: AnyValue) -> genai_spans.AttributeValue:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind is None or kind == "kvlist_value":
        return None
    scalar: genai_spans.AttributeValue = getattr(value, kind)
    return scalar


def _reason(span: OtlpSpan, error: TallyError) -> str:
    """One refusal as the answer says it, bounded: an id or value echoed is cut short, so the
    answer stays small whatever the spans carried (a 1 MB id once made a 6 MB answer)."""
    said = "; ".join(f"{violation.field}: {violation.description[:200]}" for violation in error.violations)
    return f"span {_short_id(span.span_id)}: {(said or error.message)[:MAX_REASON_CHARS]}"


def _short_id(span_id: bytes) -> str:
    return span_id.hex() if len(span_id) <= 8 else f"{span_id[:8].hex()}... ({len(span_id)} bytes)"


def _count(stored: int, duplicates: int, skipped: int, refused: int) -> None:
    for outcome, count in (("stored", stored), ("duplicate", duplicates), ("skipped", skipped), ("refused", refused)):
        if count:
            metrics.OTLP_SPANS.labels(outcome).inc(count)

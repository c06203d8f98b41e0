"""Batch and stream answers are written through a cache of their shared part; they
must be the very message a unary answer is."""

from __future__ import annotations

import uuid

from tally.v1 import ingest_service_pb2 as pb
from tally_server.domain.models import Cost, CostState, IngestResult, PriceReference, PriceSource, UnknownUnit
from tally_server.rpc.convert import IngestResponses, ingest_response

GPT4O = PriceReference(PriceSource.SYSTEM, "system.openai", "gpt-4o", "genai-prices 0.0.1", 1_700_000_000_000_000)
CUSTOM = PriceReference(PriceSource.CUSTOM, "custom.llm", "mine", str(uuid.uuid4()), None)
EXPERIENCE = uuid.uuid4()


def result(cost: Cost, **changes) -> IngestResult:
    fields = {
        "request_id": uuid.uuid4(),
        "event_time_us": 1_764_000_000_123_456,
        "ingest_time_us": 1_764_000_001_000_001,
        "cost": cost,
        "experience_id": EXPERIENCE,
        "experience_name": "Document_Summarization",
        "experience_version": 3,
        "experience_created": False,
        "user_id": "",
        "request_tags": (),
        "warnings": (),
    }
    return IngestResult(**(fields | changes))


def test_batch_answers_equal_unary_answers():
    priced = Cost(2_500_000, 1_000_000, 3_500_000, CostState.PRICED, GPT4O)
    unknown = (UnknownUnit("audio", 10, 0, "no input price for audio"),)
    results = [
        result(priced),
        result(Cost(7, 0, 7, CostState.PRICED, GPT4O)),  # same shared part, other amounts
        result(priced, experience_created=True),
        result(priced, duplicate=True, idempotency_key="k-1"),
        result(priced, user_id="u-7", request_tags=("a", "b"), warnings=("experience id 'x' is not a UUID",)),
        result(Cost(1_000_000_123, 0, 1_000_000_123, CostState.PARTIALLY_PRICED, CUSTOM, unknown)),
        result(Cost(0, 0, 0, CostState.UNPRICED, None, unknown)),
        result(
            Cost(0, 0, 0, CostState.UNPRICED, None, unknown),
            experience_id=None,
            experience_name="",
            experience_version=0,
        ),
        result(priced, ingest_time_us=1_764_000_002_000_000),
    ]
    answers = IngestResponses()
    for r in results * 2:  # the second round meets every shared part cached
        written = pb.IngestResponse()
        answers.write(r, written)
        assert written == ingest_response(r), r

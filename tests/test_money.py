"""Money is exact: 10,000 random events sum, to the nano, to the experience and type totals."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as et_pb,
    ingest_service_pb2 as pb,
    price_catalog_service_pb2 as price_pb,
)

from .conftest import unique

EVENTS = 10_000
MODELS = [
    ("system.openai", "gpt-4o"),
    ("system.openai", "gpt-4o-mini"),
    ("system.openai", "o3"),
    ("system.anthropic", "claude-sonnet-4-5"),
    ("system.anthropic", "claude-3-5-haiku"),
    ("system.google", "gemini-2.5-flash"),
    ("system.deepseek", "deepseek-chat"),
]


def nanos(money) -> int:
    return money.units * 1_000_000_000 + money.nanos


async def test_ten_thousand_random_events_sum_exactly(stubs):
    rng = random.Random(20261128)
    name = unique("Money")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="exactness"))
    )
    custom = unique("custom.odd").lower()
    await stubs.prices.CreateCustomPrice(
        price_pb.CreateCustomPriceRequest(
            price=price_pb.CustomPrice(
                category=custom,
                resource="odd-model",
                unit_prices={
                    "text": price_pb.UnitPrice(input_per_million="0.333333333", output_per_million="7.000000001"),
                    "text_cache_read": price_pb.UnitPrice(input_per_million="0.000000007"),
                    "reasoning": price_pb.UnitPrice(output_per_million="11.1"),
                },
            )
        )
    )
    models = [*MODELS, (custom, "odd-model")]
    experience_ids = [str(uuid.uuid4()) for _ in range(20)]
    start = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp())
    span = int(datetime.now(UTC).timestamp()) - start - 60

    def event() -> pb.UsageEvent:
        category, resource = rng.choice(models)
        units = {"text": pb.UnitCounts(input=rng.randint(0, 200_000), output=rng.randint(0, 20_000))}
        if rng.random() < 0.4:
            units["text_cache_read"] = pb.UnitCounts(input=rng.randint(0, 100_000))
        if rng.random() < 0.2:
            units["reasoning"] = pb.UnitCounts(output=rng.randint(0, 10_000))
        return pb.UsageEvent(
            category=category,
            resource=resource,
            units=units,
            event_timestamp=timestamp_pb2.Timestamp(seconds=start + rng.randint(0, span)),
            context=pb.EventContext(experience_id=rng.choice(experience_ids), experience_name=name),
        )

    per_experience = defaultdict(lambda: [0, 0, 0])
    for batch in range(EVENTS // 1000):
        if batch == 5:
            await stubs.types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=name))
        response = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[event() for _ in range(1000)]))
        assert response.accepted_count == 1000, [i.error for i in response.items if i.HasField("error")][:3]
        for item in response.items:
            result = item.result.xproxy_result
            assert result.cost_state == pb.COST_STATE_PRICED, (result.price, result.unknown_units)
            sums = per_experience[result.experience_id]
            sums[0] += nanos(result.cost_input)
            sums[1] += nanos(result.cost_output)
            sums[2] += nanos(result.cost_total)
            assert nanos(result.cost_total) >= nanos(result.cost_input) + nanos(result.cost_output)

    assert set(per_experience) == set(experience_ids)
    for experience_id, (cost_input, cost_output, cost_total) in per_experience.items():
        stats = (
            await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=experience_id))
        ).experience.stats
        assert (nanos(stats.cost_input), nanos(stats.cost_output), nanos(stats.cost_total)) == (
            cost_input,
            cost_output,
            cost_total,
        )
    type_stats = await stubs.types.GetExperienceTypeStats(et_pb.GetExperienceTypeStatsRequest(name=name))
    assert type_stats.total.event_count == EVENTS
    assert nanos(type_stats.total.total_cost) == sum(s[2] for s in per_experience.values())
    assert sum(nanos(v.stats.total_cost) for v in type_stats.versions) == nanos(type_stats.total.total_cost)


async def test_each_event_cost_is_rounded_half_even_to_the_nano(stubs):
    category = unique("custom.ties").lower()
    await stubs.prices.CreateCustomPrice(
        price_pb.CreateCustomPriceRequest(
            price=price_pb.CustomPrice(
                category=category,
                resource="tiny",
                # $0.0000005 per million units = half a nano-dollar per 1,000 units
                unit_prices={"text": price_pb.UnitPrice(input_per_million="0.0000005")},
            )
        )
    )
    expected = {1000: 0, 3000: 2, 5000: 2, 7000: 4, 1001: 1}  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 0.5005 -> 1
    for tokens, nanos_expected in expected.items():
        event = pb.UsageEvent(category=category, resource="tiny", units={"text": pb.UnitCounts(input=tokens)})
        result = (await stubs.ingest.Ingest(pb.IngestRequest(event=event))).xproxy_result
        assert nanos(result.cost_total) == nanos_expected, tokens

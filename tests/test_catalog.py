"""Tally's prices against genai-prices' own `calc_price`, through the wire (QuotePrice):
every model of the snapshot with random usage, every price variant with the context
that selects it, and cache writes by duration. Equal to the nano, except for the one
nano that separate rounding of input and output may make (documented: total = input +
output, each rounded half-even to the nano)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
from genai_prices import Usage, data_snapshot

from tally.v1 import ingest_service_pb2 as ing_pb, price_catalog_service_pb2 as price_pb

NANO = Decimal("1e-9")
SNAPSHOT = data_snapshot.get_snapshot()
MODELS = [(provider, model) for provider in SNAPSHOT.providers for model in provider.models]


def random_units(rng: random.Random) -> dict[str, tuple[int, int]]:
    """Disjoint buckets, as an event sends them: some text, cache reads and writes, reasoning."""
    units = {"text": (rng.randint(1, 300_000), rng.randint(0, 40_000))}
    if rng.random() < 0.5:
        units["text_cache_read"] = (rng.randint(1, 200_000), 0)
    if rng.random() < 0.3:
        units["text_cache_write"] = (rng.randint(1, 50_000), 0)
    if rng.random() < 0.3:
        units["reasoning"] = (0, rng.randint(1, 20_000))
    return units


def inclusive_usage(units: dict[str, tuple[int, int]]) -> Usage:
    """The same usage as genai-prices counts it: inclusive totals (input_tokens has the cache in it)."""
    text_in, text_out = units.get("text", (0, 0))
    cache_read = units.get("text_cache_read", (0, 0))[0]
    cache_write = sum(
        units.get(u, (0, 0))[0] for u in ("text_cache_write", "text_cache_write_5m", "text_cache_write_1h")
    )
    reasoning = units.get("reasoning", (0, 0))[1]
    usage = {
        "input_tokens": text_in + cache_read + cache_write,
        "cache_read_tokens": cache_read,
        "cache_write_tokens": cache_write,
        "output_tokens": text_out + reasoning,
        "output_reasoning_tokens": reasoning,
    }
    for unit, key in (
        ("text_cache_write_5m", "cache_write_5m_tokens"),
        ("text_cache_write_1h", "cache_write_1h_tokens"),
    ):
        if unit in units:
            usage[key] = units[unit][0]
    return Usage(**{key: value for key, value in usage.items() if value})


def nanos(money) -> int:
    return money.units * 1_000_000_000 + money.nanos


async def quote(stubs, provider_id, model_id, units, when: datetime, context=None):
    request = price_pb.QuotePriceRequest(
        category=f"system.{provider_id}", resource=model_id, price_context=context or {}
    )
    request.event_timestamp.FromDatetime(when)
    for unit, (i, o) in units.items():
        request.units[unit].CopyFrom(ing_pb.UnitCounts(input=i, output=o))
    return (await stubs.prices.QuotePrice(request)).xproxy_result


def expected_nanos(units, model_id, provider_id, when, context=None) -> int:
    calculated = genai_prices.calc_price(
        inclusive_usage(units), model_id, provider_id=provider_id, genai_request_timestamp=when, price_context=context
    )
    return int((calculated.total_price / NANO).to_integral_value(rounding="ROUND_HALF_EVEN"))


async def test_every_model_of_the_snapshot_is_priced_as_genai_prices_prices_it(stubs):
    rng = random.Random(20261129)
    when = datetime.now(UTC)
    compared = exact = 0
    different = []
    for provider, model in MODELS:
        units = random_units(rng)
        result = await quote(stubs, provider.id, model.id, units, when)
        if result.price.resource != model.id:
            continue  # another model of the provider matches this id first: compared under its own id
        compared += 1
        expected = expected_nanos(units, model.id, provider.id, when)
        got = nanos(result.cost_total)
        exact += got == expected
        if abs(got - expected) > 1:
            different.append((provider.id, model.id, units, got, expected, [u.reason for u in result.unknown_units]))
    assert compared >= 0.95 * len(MODELS), f"only {compared} of {len(MODELS)} models compared"
    assert not different, different[:5]
    assert exact >= 0.99 * compared, f"{compared - exact} of {compared} a nano apart: more than rounding explains"


async def test_every_price_variant_is_priced_as_genai_prices_prices_it(stubs):
    rng = random.Random(7)
    when = datetime.now(UTC)
    cases = [
        (provider, model, variant.when)
        for provider, model in MODELS
        for variant in model.price_variants or ()
        if variant.constraint is None or variant.constraint.active(when)
    ]
    assert len(cases) >= 100, "genai-prices has variants across providers (batch, flex, priority, ...)"
    assert {key for *_, when_ in cases for key in when_} >= {"processing", "service_tier"}
    compared = 0
    for provider, model, context in cases:
        units = random_units(rng)
        result = await quote(stubs, provider.id, model.id, units, when, context)
        if result.price.resource != model.id:
            continue
        compared += 1
        standard = await quote(stubs, provider.id, model.id, units, when)
        assert dict(result.price.price_context) == context, (provider.id, model.id, context)
        assert not any("no price variant" in w for w in result.warnings)
        expected = expected_nanos(units, model.id, provider.id, when, context)
        assert abs(nanos(result.cost_total) - expected) <= 1, (provider.id, model.id, context, units)
        assert not standard.price.price_context
    assert compared >= 0.9 * len(cases)


async def test_o3_batch_flex_and_priority_as_the_issue_measured(stubs):
    when = datetime.now(UTC)
    units = {"text": (1000, 1000)}
    costs = {}
    for name, context in (
        ("standard", None),
        ("batch", {"processing": "batch"}),
        ("flex", {"service_tier": "flex"}),
        ("priority", {"service_tier": "priority"}),
    ):
        costs[name] = nanos((await quote(stubs, "openai", "o3", units, when, context)).cost_total)
    assert costs == {"standard": 10_000_000, "batch": 5_000_000, "flex": 5_000_000, "priority": 17_500_000}


async def test_a_context_without_a_variant_is_priced_at_the_standard_rate_with_a_warning(stubs):
    when = datetime.now(UTC)
    units = {"text": (1000, 100)}
    plain = await quote(stubs, "openai", "gpt-4o", units, when)
    batch = await quote(stubs, "openai", "gpt-4o", units, when, {"processing": "overnight"})
    assert nanos(batch.cost_total) == nanos(plain.cost_total) and not batch.price.price_context
    assert batch.warnings and "processing=overnight has no price variant for system.openai/gpt-4o" in batch.warnings[0]


async def test_a_price_for_one_direction_prices_that_direction(stubs):
    """The issue's case: an input price only, tiered. The input is priced; the output alone is unknown."""
    when = datetime.now(UTC)
    units = {"text": (207_480, 12_021)}
    result = await quote(stubs, "openai-decisions", "gpt-6-luna", units, when)
    assert result.cost_state == ing_pb.COST_STATE_PARTIALLY_PRICED
    assert nanos(result.cost_total) == expected_nanos({"text": (207_480, 0)}, "gpt-6-luna", "openai-decisions", when)
    assert nanos(result.cost_total) == 20_748_000, "$0.020748, as genai-prices prices the input"
    assert [(u.unit_type, u.input, u.output) for u in result.unknown_units] == [("text", 0, 12_021)]


async def test_cache_writes_are_priced_by_how_long_they_live(stubs):
    when = datetime.now(UTC)
    # 100,000 tokens: below the 200k-token long-context tier, where both prices double.
    for unit, per_million in (("text_cache_write_5m", Decimal("3.75")), ("text_cache_write_1h", Decimal(6))):
        units = {unit: (100_000, 0)}
        result = await quote(stubs, "anthropic", "claude-sonnet-4-5", units, when)
        assert result.cost_state == ing_pb.COST_STATE_PRICED, unit
        assert Decimal(nanos(result.cost_total)) * NANO == per_million / 10, unit
        assert nanos(result.cost_total) == expected_nanos(units, "claude-sonnet-4-5", "anthropic", when)

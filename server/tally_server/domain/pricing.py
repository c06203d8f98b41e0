"""Prices events exactly from the catalog: genai-prices for `system.*`, custom prices on top.

Event units are disjoint buckets ("text" input is uncached input only). genai-prices
wants inclusive totals ("input_tokens" includes cache reads), so each bucket is
expanded into every usage key it counts towards, and genai-prices' own
decomposition takes the cached tokens out again: nothing is counted twice.

A genai-prices calculation costs ~65 µs, so it is not run per event. For each
price entry in force, a rate card is built once by asking genai-prices the price
of one million units of each bucket alone; prices are linear, so an event's cost
is then a few integer multiplications in atto-dollars (exact for every real
price; Decimal where a rate is not a whole number of atto-dollars), rounded
half-even to the nano once. Tiered prices (which depend on the total input of the
request) are not linear and are computed by genai-prices per event.
"""

from __future__ import annotations

import bisect
import difflib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
from genai_prices import Usage, data_snapshot
from genai_prices.data_units import unit_data
from genai_prices.types import ModelInfo, ModelPrice, TieredPrices
from genai_prices.units import UnitRegistry

from .models import Cost, CostState, CustomPrice, PriceReference, PriceSource, UnknownUnit
from .money import attos_to_nanos, decimal_to_attos, decimal_to_nanos

SYSTEM_PREFIX = "system."
SYSTEM_VERSION = f"genai-prices {genai_prices.__version__}"
INPUT, OUTPUT = "input", "output"
_MILLION = 1_000_000

# Each unit type of an event, per direction: the genai-prices usage keys it counts
# towards, most specific last. A direction absent here cannot be priced.
UNIT_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "text": {INPUT: ("input_tokens",), OUTPUT: ("output_tokens",)},
    "text_cache_read": {INPUT: ("input_tokens", "cache_read_tokens")},
    "text_cache_write": {INPUT: ("input_tokens", "cache_write_tokens")},
    # Anthropic prices cache writes by how long they live; elsewhere both are plain cache writes.
    "text_cache_write_5m": {INPUT: ("input_tokens", "cache_write_tokens", "cache_write_5m_tokens")},
    "text_cache_write_1h": {INPUT: ("input_tokens", "cache_write_tokens", "cache_write_1h_tokens")},
    "reasoning": {OUTPUT: ("output_tokens", "output_reasoning_tokens")},
    "audio": {
        INPUT: ("input_tokens", "input_audio_tokens"),
        OUTPUT: ("output_tokens", "output_audio_tokens"),
    },
    "audio_cache_read": {INPUT: ("input_tokens", "cache_read_tokens", "input_audio_tokens", "cache_audio_read_tokens")},
    "image": {
        INPUT: ("input_tokens", "input_image_tokens"),
        OUTPUT: ("output_tokens", "output_image_tokens"),
    },
    "vision": {INPUT: ("input_tokens", "input_image_tokens")},
    "video": {
        INPUT: ("input_tokens", "input_video_tokens"),
        OUTPUT: ("output_tokens", "output_video_tokens"),
    },
}

_registry = UnitRegistry(unit_data)


def _unit_suggestion(unit_type: str) -> str:
    """ " (did you mean 'text'?)" for a unit type Tally does not know that is near one it does."""
    if unit_type in UNIT_TYPES:
        return ""
    near = difflib.get_close_matches(unit_type, UNIT_TYPES, n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def to_genai_usage(units: dict[str, tuple[int, int]]) -> Usage:
    """The inclusive genai-prices Usage of disjoint event buckets (known unit types only)."""
    totals: dict[str, int] = {}
    for unit_type, counts in units.items():
        for direction, count in zip((INPUT, OUTPUT), counts, strict=True):
            for key in UNIT_TYPES.get(unit_type, {}).get(direction, ()):
                totals[key] = totals.get(key, 0) + count
    return Usage(**totals)


@dataclass
class RateCard:
    """Exact dollars per single unit of each (unit type, direction) of one price entry."""

    reference: PriceReference
    rates: dict[tuple[str, str], Decimal]
    per_request: Decimal = Decimal(0)
    # Set for tiered prices: computed by genai-prices per event instead of by rates.
    model_price: ModelPrice | None = None
    missing_reason: dict[tuple[str, str], str] = field(default_factory=dict)
    # The same rates in integer atto-dollars, when every rate is a whole number of
    # them (all real catalogs): exact like Decimal, several times faster.
    atto_rates: dict[tuple[str, str], int] | None = None
    atto_per_request: int = 0
    # The integer rates by unit type, (input, output), None where not priced: what
    # price_with's fast path reads.
    atto_rates_by_unit: dict[str, tuple[int | None, int | None]] | None = None

    def __post_init__(self) -> None:
        self.refresh_integer_rates()

    def refresh_integer_rates(self) -> None:
        attos = {key: decimal_to_attos(rate) for key, rate in self.rates.items()}
        per_request = decimal_to_attos(self.per_request)
        if self.model_price is None and per_request is not None and None not in attos.values():
            self.atto_rates, self.atto_per_request = attos, per_request  # type: ignore[assignment]
            self.atto_rates_by_unit = {
                unit_type: (attos.get((unit_type, INPUT)), attos.get((unit_type, OUTPUT))) for unit_type, _ in attos
            }
        else:
            self.atto_rates = self.atto_rates_by_unit = None


def _covers(model_price: ModelPrice, usage_key: str) -> bool:
    """Whether some price of the entry applies to this usage key (itself or an ancestor)."""
    unit = _registry.units[usage_key]
    for price_key, value in model_price.__dict__.items():
        if value is None or price_key.startswith("_"):
            continue
        try:
            priced = _registry.unit_for_price_key(price_key)
        except KeyError:
            continue
        if priced.dimensions.get("family") == "tokens" and priced.dimensions.items() <= unit.dimensions.items():
            return True
    return False


def system_rate_card(model_price: ModelPrice, reference: PriceReference) -> RateCard:
    tiered = any(isinstance(value, TieredPrices) for value in model_price.__dict__.values())
    base = model_price.calc_price(Usage())["total_price"]
    card = RateCard(reference, {}, per_request=base, model_price=model_price if tiered else None)
    for unit_type, directions in UNIT_TYPES.items():
        for direction, keys in directions.items():
            if not _covers(model_price, keys[-1]):
                card.missing_reason[(unit_type, direction)] = (
                    f"{reference.resource} has no {direction} price for {unit_type}"
                )
                continue
            if tiered:
                card.rates[(unit_type, direction)] = Decimal(0)  # priced per event
                continue
            probe = model_price.calc_price(Usage(**dict.fromkeys(keys, _MILLION)))
            card.rates[(unit_type, direction)] = (probe["total_price"] - base) / _MILLION
    card.refresh_integer_rates()
    return card


def custom_rate_card(price: CustomPrice) -> RateCard:
    reference = PriceReference(
        PriceSource.CUSTOM,
        price.category,
        price.resource,
        str(price.price_id),
        price.effective_time_us,
        tuple(sorted(price.price_context.items())),
    )
    rates: dict[tuple[str, str], Decimal] = {}
    for unit_type, unit_price in price.unit_prices.items():
        if unit_price.input_per_million:
            rates[(unit_type, INPUT)] = Decimal(unit_price.input_per_million) / _MILLION
        if unit_price.output_per_million:
            rates[(unit_type, OUTPUT)] = Decimal(unit_price.output_per_million) / _MILLION
    return RateCard(reference, rates)


def _dt(time_us: int) -> datetime:
    return datetime.fromtimestamp(time_us / 1_000_000, tz=UTC)


@dataclass
class _CustomSeries:
    """The custom prices of one resource with one price context, by effective time."""

    context: tuple[tuple[str, str], ...]
    starts: list[int]
    cards: list[RateCard]
    ends: list[int | None]

    def card_at(self, event_time_us: int) -> RateCard | None:
        """The latest price in force at the event time; an ended one gives way to the one before."""
        index = bisect.bisect_right(self.starts, event_time_us) - 1
        while index >= 0:
            end = self.ends[index]
            if end is None or event_time_us < end:
                return self.cards[index]
            index -= 1
        return None


class PriceCatalog:
    """Resolves (category, resource, event time, price context) to a rate card, caching
    every step.

    Custom prices live in the database; a replica rereads them when a price is
    added through it (at once) or through another replica (within
    CUSTOM_PRICES_MAX_AGE seconds). A price context selects variants: a custom price
    whose context the event's has, else the system price's variants as genai-prices
    resolves them; each set of variants is its own rate card.
    """

    CUSTOM_PRICES_MAX_AGE = 1.0

    def __init__(self) -> None:
        self._checked_at = float("-inf")
        self._snapshot = data_snapshot.get_snapshot()
        self._suggestions: dict[tuple[str, str], str] = {}
        self._models: dict[tuple[str, str], ModelInfo | None] = {}
        # By (standard price entry, the variants applied to it).
        self._system_cards: dict[tuple[int, tuple[int, ...]], RateCard] = {}
        # Per (category, resource): its series of custom prices, most specific context first.
        self._custom: dict[tuple[str, str], list[_CustomSeries]] = {}
        self.revision: tuple[int, int] | None = None

    def load_custom(self, prices: list[CustomPrice], revision: tuple[int, int]) -> None:
        grouped: dict[tuple[str, str], dict[tuple[tuple[str, str], ...], list[CustomPrice]]] = {}
        for price in prices:
            by_context = grouped.setdefault((price.category, price.resource.lower()), {})
            by_context.setdefault(tuple(sorted(price.price_context.items())), []).append(price)
        custom: dict[tuple[str, str], list[_CustomSeries]] = {}
        for key, by_context in grouped.items():
            series = []
            for context, entries in by_context.items():
                entries.sort(key=lambda p: p.effective_time_us)
                series.append(
                    _CustomSeries(
                        context,
                        [p.effective_time_us for p in entries],
                        [custom_rate_card(p) for p in entries],
                        [p.end_time_us for p in entries],
                    )
                )
            custom[key] = sorted(series, key=lambda s: -len(s.context))
        self._custom = custom
        self.revision = revision

    def due(self) -> bool:
        """Whether the custom prices should be checked for changes now."""
        return time.monotonic() - self._checked_at >= self.CUSTOM_PRICES_MAX_AGE

    def checked(self) -> None:
        self._checked_at = time.monotonic()

    def invalidate(self) -> None:
        """A custom price was added or ended: check before the next event is priced."""
        self._checked_at = float("-inf")

    def suggestion(self, category: str, resource: str) -> str:
        """ " (did you mean ...?)" naming the nearest known provider or model, for a category
        or resource nothing prices (a misspelt `gtp-4o`, `system.opneai`); "" when none is near."""
        key = (category, resource.lower())
        if key not in self._suggestions:
            said = ""
            if category.startswith(SYSTEM_PREFIX):
                providers = {provider.id: provider for provider in self._snapshot.providers}
                provider = providers.get(category[len(SYSTEM_PREFIX) :])
                if provider is None:
                    near = difflib.get_close_matches(category[len(SYSTEM_PREFIX) :], providers, n=1, cutoff=0.6)
                    said = f" (did you mean {SYSTEM_PREFIX}{near[0]}?)" if near else ""
                else:
                    models = [model.id for model in provider.models]
                    near = difflib.get_close_matches(resource.lower(), models, n=1, cutoff=0.6)
                    said = f" (did you mean {near[0]}?)" if near else ""
            if len(self._suggestions) < 10_000:  # bounded: callers choose the names
                self._suggestions[key] = said
            return said
        return self._suggestions[key]

    def _system_model(self, key: tuple[str, str]) -> ModelInfo | None:
        """The genai-prices model of (category, lowercased resource), looked up once."""
        category, resource = key
        if key not in self._models:
            model = None
            if category.startswith(SYSTEM_PREFIX):
                try:
                    _, model = self._snapshot.find_provider_model(resource, None, category[len(SYSTEM_PREFIX) :], None)
                except LookupError:
                    model = None
            self._models[key] = model
        return self._models[key]

    def rate_card(
        self, category: str, resource: str, event_time_us: int, price_context: Mapping[str, str] | None = None
    ) -> RateCard | None:
        key = (category, resource.lower())
        context = price_context or {}
        for series in self._custom.get(key, ()):
            if all(context.get(k) == v for k, v in series.context):
                card = series.card_at(event_time_us)
                if card is not None:
                    return card
        return self._system_card(key, category, event_time_us, context)

    def system_reference(self, category: str, resource: str, event_time_us: int) -> PriceReference | None:
        """The system (genai-prices) entry for this resource at this time, if there is one."""
        card = self._system_card((category, resource.lower()), category, event_time_us, {})
        return None if card is None else card.reference

    def _system_card(
        self, key: tuple[str, str], category: str, event_time_us: int, context: Mapping[str, str]
    ) -> RateCard | None:
        model = self._system_model(key)
        if model is None:
            return None
        # A datetime costs a microsecond: made only for a price that depends on the time.
        moment = _dt(event_time_us) if isinstance(model.prices, list) or context else None
        if isinstance(model.prices, ModelPrice):
            standard, start = model.prices, None
        else:
            assert moment is not None
            # The last conditional price in force wins, as in genai-prices.
            standard, start = model.prices[0].prices, None
            for conditional in reversed(model.prices):
                if conditional.constraint is None or conditional.constraint.active(moment):
                    standard = conditional.prices
                    start = getattr(conditional.constraint, "start_date", None)
                    break
        variants: tuple[int, ...] = ()
        if context and model.price_variants:
            assert moment is not None
            variants = tuple(
                index
                for index, variant in enumerate(model.price_variants)
                if (variant.constraint is None or variant.constraint.active(moment))
                and all(context.get(k) == v for k, v in variant.when.items())
            )
        card = self._system_cards.get((id(standard), variants))
        if card is None:
            effective = None
            if start is not None:
                start_dt = start if isinstance(start, datetime) else datetime.combine(start, datetime.min.time(), UTC)
                effective = int(start_dt.timestamp() * 1_000_000)
            applied: tuple[tuple[str, str], ...] = ()
            model_price = standard
            if variants:
                # genai-prices resolves the variants itself: the same prices as its calc_price.
                assert moment is not None
                model_price = model.get_prices(moment, context)
                whens = (model.price_variants[i].when for i in variants)  # type: ignore[index]
                applied = tuple(sorted({pair for when in whens for pair in when.items()}))
            reference = PriceReference(PriceSource.SYSTEM, category, model.id, SYSTEM_VERSION, effective, applied)
            card = self._system_cards[(id(standard), variants)] = system_rate_card(model_price, reference)
        return card

    def price(
        self,
        category: str,
        resource: str,
        units: dict[str, tuple[int, int]],
        event_time_us: int,
        price_context: Mapping[str, str] | None = None,
    ) -> Cost:
        card = self.rate_card(category, resource, event_time_us, price_context)
        if card is None:
            reason = f"no price for {category}/{resource}{self.suggestion(category, resource)}"
            unknown = tuple(UnknownUnit(unit_type, i, o, reason) for unit_type, (i, o) in units.items() if i or o)
            return Cost(0, 0, 0, CostState.UNPRICED, None, unknown)
        cost = price_with(card, units)
        if price_context:
            unused = sorted(set(price_context.items()) - set(card.reference.price_context))
            if unused:
                named = ", ".join(f"{k}={v}" for k, v in unused)
                cost.warnings = (
                    f"price context {named} has no price variant for {category}/{resource} at this time; "
                    "priced without it (the standard rate)",
                )
        return cost


def price_with(card: RateCard, units: dict[str, tuple[int, int]]) -> Cost:
    """An event's cost by the card's rates: integer atto-dollars where the card has
    them, else exact Decimals; tiered prices are left to genai-prices."""
    by_unit = card.atto_rates_by_unit
    if by_unit is not None:
        # Fast path, the common case: integer rates and every unit priced.
        input_cost = output_cost = 0
        for unit_type, (input_count, output_count) in units.items():
            rates = by_unit.get(unit_type)
            if rates is None:
                break
            input_rate, output_rate = rates
            if input_count:
                if input_rate is None:
                    break
                input_cost += input_rate * input_count
            if output_count:
                if output_rate is None:
                    break
                output_cost += output_rate * output_count
        else:
            input_nanos, output_nanos = attos_to_nanos(input_cost), attos_to_nanos(output_cost)
            total_nanos = input_nanos + output_nanos + attos_to_nanos(card.atto_per_request)
            return Cost(input_nanos, output_nanos, total_nanos, CostState.PRICED, card.reference)
    return _price_with_unknowns(card, units)


def _price_with_unknowns(card: RateCard, units: dict[str, tuple[int, int]]) -> Cost:
    """An event's cost when some (unit type, direction) has no price: every direction that
    has one is priced, and only the others are listed as unknown, with their counts."""
    integer = card.atto_rates is not None
    to_nanos: Callable[[Any], int] = attos_to_nanos if integer else decimal_to_nanos
    # Integer atto-dollars, or exact Decimals where the card has no integer rates.
    rates: Mapping[tuple[str, str], int | Decimal] = (card.atto_rates if integer else card.rates) or {}
    input_cost: int | Decimal = 0
    output_cost: int | Decimal = 0
    unknown: list[UnknownUnit] = []
    priced: dict[str, tuple[int, int]] = {}  # the counts that have a price, for tiered prices
    used = missing_count = 0
    for unit_type, (input_count, output_count) in units.items():
        counts = {INPUT: input_count, OUTPUT: output_count}
        missing: dict[str, str] = {}
        for direction, count in counts.items():
            if not count:
                continue
            used += 1
            rate = rates.get((unit_type, direction))
            if rate is None:
                missing[direction] = (
                    card.missing_reason.get((unit_type, direction))
                    or f"no {direction} price for unit type {unit_type!r}"
                )
            elif direction == INPUT:
                input_cost += rate * count
            else:
                output_cost += rate * count
        if missing:
            missing_count += len(missing)
            shown = {d: (0 if d not in missing else c) for d, c in counts.items()}
            reason = "; ".join(missing.values()) + _unit_suggestion(unit_type)
            unknown.append(UnknownUnit(unit_type, shown[INPUT], shown[OUTPUT], reason))
        priced[unit_type] = (0 if INPUT in missing else input_count, 0 if OUTPUT in missing else output_count)
    per_request = card.atto_per_request if integer else card.per_request
    if card.model_price is not None:
        computed = card.model_price.calc_price(to_genai_usage(priced))
        input_cost, output_cost = computed["input_price"], computed["output_price"]
        per_request = computed["total_price"] - input_cost - output_cost
    input_nanos = to_nanos(input_cost)
    output_nanos = to_nanos(output_cost)
    total_nanos = input_nanos + output_nanos + to_nanos(per_request)
    if not unknown:
        state = CostState.PRICED
    elif missing_count < used:
        state = CostState.PARTIALLY_PRICED
    else:
        state = CostState.UNPRICED
    return Cost(input_nanos, output_nanos, total_nanos, state, card.reference, tuple(unknown))

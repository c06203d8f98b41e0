"""Exact money: integers of nano-dollars everywhere, Decimal only at the catalog edge."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

NANOS_PER_UNIT = 1_000_000_000
ATTOS_PER_NANO = 1_000_000_000
_NANO = Decimal("1e-9")


def divide_half_even(numerator: int, denominator: int) -> int:
    """Integer division rounded half-even: exact, never through a float."""
    if denominator == 0:
        return 0
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def decimal_to_nanos(amount: Decimal | int) -> int:
    """Rounds an exact decimal amount of dollars half-even to whole nano-dollars."""
    return int(Decimal(amount).quantize(_NANO, rounding=ROUND_HALF_EVEN).scaleb(9))


def attos_to_nanos(total_attos: int) -> int:
    """Rounds integer atto-dollars (1e-18) half-even to nano-dollars."""
    return divide_half_even(total_attos, ATTOS_PER_NANO)


def decimal_to_attos(amount: Decimal) -> int | None:
    """The amount in whole atto-dollars, or None when it is not a whole number of them."""
    scaled = amount.scaleb(18)
    return int(scaled) if scaled == scaled.to_integral_value() else None


def nanos_to_units_and_nanos(total_nanos: int) -> tuple[int, int]:
    """Splits nano-dollars into (units, nanos) with the same sign, as google.type.Money wants."""
    sign = -1 if total_nanos < 0 else 1
    units, nanos = divmod(abs(total_nanos), NANOS_PER_UNIT)
    return sign * units, sign * nanos

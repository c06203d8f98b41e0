"""Annotations: what a caller learns about a stored event after the fact (a rating, the
ticket it became). Never part of the event's content, never a cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import Violations
from .validation import check_string_map

MAX_ANNOTATIONS = 64
# Keys naming what prices an event: an annotation so named would read as a change of its
# cost, which annotations never are.
PRICING_FIELDS = frozenset(
    ("category", "resource", "units", "price_context", "cost", "cost_input", "cost_output", "cost_total", "model")
)


@dataclass(frozen=True)
class Annotation:
    key: str
    value: str
    update_time_us: int
    key_name: str


def check_annotations(v: Violations, set_annotations: Mapping[str, str], remove_keys: Sequence[str]) -> None:
    check_string_map(v, "set_annotations", set_annotations, MAX_ANNOTATIONS)
    for key in sorted(set(set_annotations) & PRICING_FIELDS):
        v.add(f"set_annotations[{key!r}]", f"{key!r} names a field that prices events; annotations never change a cost")
    for key in sorted(set(remove_keys) & set(set_annotations)):
        v.add("remove_keys", f"{key[:64]!r} is both set and removed")
    if not set_annotations and not remove_keys:
        v.add("set_annotations", "nothing to do: set or remove at least one annotation")

"""What the writer's sums by user, tag and API key cost per event, by the shape of a commit.

Every commit adds its events to the rollups by user, request tag and API key
(domain.rollups.attribute_rollups_of): each event counts in fourteen or more groups (its
user, each tag and its key, by hour and by day, by provider and by model, and a tag's users
and keys). This times that function alone, in one process, on commits of 1,000 events of
three shapes:

- `shared`: every event of one hour, type, model, user, tag and key, as `python -m bench`
  sends them (one service's calls of one feature);
- `distinct users`: each event with its own user and one of 50 tags (a chat service's
  commit, many end users at once), the case a sum by shared groups cannot help;
- `unpriced`: 20 users, every event not priced for one reason (the reasons are summed too).

    python -m bench.rollups            # a few seconds

It prints the median over 300 calls, in microseconds per event, beside the time of making
the same events (the baseline: what the commit costs before any sum), and the groups made.
"""

from __future__ import annotations

import statistics
import time
import uuid

from tally_server.app import tune_garbage_collector
from tally_server.domain.models import (
    Cost,
    CostState,
    EventContext,
    IngestResult,
    PriceReference,
    PriceSource,
    UnknownUnit,
    UsageEvent,
)
from tally_server.domain.rollups import attribute_rollups_of

EVENTS = 1000
CALLS = 300
START_US = 1_760_000_000_000_000
PRICE = PriceReference(PriceSource.SYSTEM, "system.openai", "gpt-4o", "2025-01-01", 0)


def commit(shape: str) -> list[tuple[UsageEvent, IngestResult]]:
    """A commit's events and results, as the writer hands them to the rollups."""
    stored = []
    for i in range(EVENTS):
        if shape == "shared":
            context = EventContext(experience_name="Summarize", experience_version=1, user_id="u", request_tags=("p",))
        elif shape == "distinct users":
            context = EventContext(
                experience_name="Chat", experience_version=1, user_id=f"user-{i}", request_tags=(f"tag-{i % 50}",)
            )
        else:
            context = EventContext(experience_name="Chat", experience_version=1, user_id=f"user-{i % 20}")
        if shape == "unpriced":
            cost = Cost(0, 0, 0, CostState.UNPRICED, None, (UnknownUnit("text", 1200, 350, "no price for the model"),))
        else:
            cost = Cost(3_000_000, 3_500_000, 6_500_000, CostState.PRICED, PRICE)
        time_us = START_US + i * 1_000
        event = UsageEvent(
            "system.openai",
            "gpt-4o",
            {"text": (1200, 350), "text_cache_read": (800, 0)},
            time_us,
            850,
            120,
            200,
            "",
            "",
            {},
            context,
            "",
            key_name="service-a",
        )
        result = IngestResult(
            uuid.uuid4(), time_us, time_us, cost, uuid.uuid4(), context.experience_name, 1, False,
            context.user_id, context.request_tags, (),
        )  # fmt: skip
        stored.append((event, result))
    return stored


def per_event_us(work, argument) -> float:  # type: ignore[no-untyped-def]
    seconds = []
    for _ in range(CALLS):
        start = time.perf_counter()
        work(argument)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / EVENTS * 1e6


def main() -> None:
    tune_garbage_collector()
    print(f"attribute_rollups_of, commits of {EVENTS:,} events, median of {CALLS} calls (µs per event):")
    print(f"  {'shape':16} {'sums':>6} {'make':>6} {'ratio':>6} {'groups':>7}")
    for shape in ("shared", "distinct users", "unpriced"):
        stored = commit(shape)
        groups = sum(len(rows) for rows in attribute_rollups_of(stored))
        sums = per_event_us(attribute_rollups_of, stored)
        making = per_event_us(commit, shape)  # the same events made anew: the baseline
        print(f"  {shape:16} {sums:6.2f} {making:6.2f} {sums / making:5.2f}x {groups:7,}")


if __name__ == "__main__":
    main()

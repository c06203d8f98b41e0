"""What the server counts, for Prometheus (`tally serve --metrics-listen HOST:PORT`). Every
metric is defined here, and documented in the README's table.

With `--workers N` the parent serves one endpoint for all workers: prometheus-client's
multiprocess mode, where each worker writes its values to files in a directory the parent
made (PROMETHEUS_MULTIPROC_DIR, set before the workers start) and the parent sums them at
each scrape. Each gauge says how workers combine (`multiprocess_mode`)."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

CALLS = Counter("tally_calls", "Calls answered, by method and status code.", ["method", "code"])
CALL_SECONDS = Histogram(
    "tally_call_seconds",
    "How long calls took, by method.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS = Counter("tally_events_ingested", "Events stored (duplicates not counted), by cost state.", ["cost_state"])
WRITER_QUEUE = Gauge(
    "tally_writer_queued_events", "Events waiting for the group-commit writer.", multiprocess_mode="livesum"
)
COMMIT_EVENTS = Histogram(
    "tally_commit_events",
    "Events per group commit.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
COMMIT_SECONDS = Histogram(
    "tally_commit_seconds",
    "How long a group commit's transaction took.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SHED = Counter("tally_shed", "Work refused with RESOURCE_EXHAUSTED, by the limit reached.", ["limit"])
ABANDONED = Counter(
    "tally_events_abandoned", "Events not stored because their caller went away before their commit began."
)
DATABASE_ERRORS = Counter("tally_database_errors", "Database failures answered UNAVAILABLE.")
OTLP_SPANS = Counter(
    "tally_otlp_spans",
    "Spans received by the OTLP trace export: stored, duplicate, skipped (not a model call) or refused.",
    ["outcome"],
)
PROXY_CALLS = Counter(
    "tally_proxy_calls",
    "Calls through the proxy, by upstream and outcome: recorded, unrecorded (the database did not "
    "answer), refused (a limit, a bad request), failed (the upstream could not be reached).",
    ["upstream", "outcome"],
)
# One series per limit (per-experience limits have one period per experience: not exported),
# refreshed every LIMIT_GAUGE_SECONDS while metrics are served.
# Every worker reads the same values from the database: the scrape shows the latest.
LIMIT_SPEND = Gauge(
    "tally_limit_spend_usd", "Spend of each limit's current period, in USD.", ["limit"], multiprocess_mode="mostrecent"
)
LIMIT_RESERVED = Gauge(
    "tally_limit_reserved_usd",
    "Outstanding reservations against each limit, in USD.",
    ["limit"],
    multiprocess_mode="mostrecent",
)
LIMIT_MAX = Gauge("tally_limit_max_usd", "Each limit's maximum, in USD.", ["limit"], multiprocess_mode="mostrecent")
LIMIT_GAUGE_SECONDS = 5.0


# Spend, for charts and alerts: by experience type, version, category, model (the price
# entry's name when one priced the event, so dated snapshots count under their model) and
# cost state. Label sets are bounded per process (SPEND_SERIES_MAX): past it, new ones count
# under experience_type="other", model="other", so a caller cannot grow the scrape.
_SPEND_LABELS = ["experience_type", "version", "category", "model", "cost_state"]
SPEND = Counter("tally_spend_usd", "Cost of the events stored, in USD.", _SPEND_LABELS)
SPEND_EVENTS = Counter("tally_spend_events", "Events stored, as tally_spend_usd counts them.", _SPEND_LABELS)
SPEND_SERIES_MAX = 2000
_spend_series: set[tuple[str, ...]] = set()


def count_spend(labels: tuple[str, str, str, str, str], nanos: int, events: int) -> None:
    if labels not in _spend_series:
        if len(_spend_series) >= SPEND_SERIES_MAX:
            labels = ("other", "", "other", "other", labels[4])
        _spend_series.add(labels)
    SPEND.labels(*labels).inc(nanos / 1e9)
    SPEND_EVENTS.labels(*labels).inc(events)


MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def shared() -> bool:
    """True in a worker of `--workers N`: the parent serves the values this process writes."""
    return bool(os.environ.get(MULTIPROCESS_DIR))


def forget_limit(name: str) -> None:
    """A deleted limit's series go. Multiprocess mode cannot remove a series: there it reads NaN."""
    for gauge in (LIMIT_SPEND, LIMIT_RESERVED, LIMIT_MAX):
        if shared():
            gauge.labels(name).set(float("nan"))
        else:
            gauge.remove(name)


def registry(workers_dir: str | None = None) -> Any:
    """What /metrics shows: this process's metrics, or (workers_dir) the sum of every worker's."""
    if workers_dir is None:
        return REGISTRY
    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed, path=workers_dir)  # type: ignore[no-untyped-call]
    return summed


def worker_exited(pid: int, workers_dir: str) -> None:
    """A dead worker's live gauges (its queue) leave the sum; its counters stay counted."""
    multiprocess.mark_process_dead(pid, workers_dir)  # type: ignore[no-untyped-call]

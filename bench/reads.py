"""Read benchmark: how the reads hold up as events pile up.

Ingests through the wire (IngestBatch, 1,000 events per call) into a fresh database:
one experience per ten events (of versions 1 and 2 of a type that declares one outcome,
a tenth of each load's runs scored after it), each event naming one of three steps or
none, plus one heavy experience that gets one event in twenty, spread over the last 60
days, five models (and a misspelt one in 10,000 events), 200 users and a few request tags.
Each load up to a size sweeps the 60 days oldest first (within an hour), as live calls
arrive, so every size holds events of all 60 days; `--shuffled` sends each event at a random
time of them instead, as a backfill out of order would (each batch then touches a rollup row
per event and hour: a slower load, bound by writes).
At each size it times every read (the median of --calls calls), and prints the
growth from the first size to the last beside the targets:

    python -m bench.reads                               # SQLite, 100,000 and 1,000,000 events
    python -m bench.reads --postgres-url postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python -m bench.reads --sizes 20000,100000          # a quicker look

Targets on a 2-core machine at 1,000,000 events, on SQLite and PostgreSQL alike, each
within 2x of its time at 100,000: GetExperienceTypeStats 100 ms, GetExperience 5 ms,
the 20 most expensive experiences 50 ms, a 30-day breakdown by resource and day 200 ms.
The dashboard's JSON reads (`/api/...`, what the page loads) are timed the same way, over
HTTP from the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from grpc import aio

from tally.v1 import (
    event_service_pb2 as ev_pb,
    event_service_pb2_grpc,
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc,
    report_service_pb2 as rep_pb,
    report_service_pb2_grpc,
)

from .__main__ import CHANNEL_OPTIONS, create_postgres_database, drop_postgres_database, start_server

DAY = 86_400
RESOURCES = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-latest", "o3-mini", "gpt-4.1"]
TAGS = ["checkout", "search", "support", "batch"]
# One event in RARE_EVERY names a misspelt model: the filter of a rare model.
RARE_MODEL, RARE_EVERY = "gtp-4o", 10_000
STEPS = ["", "retrieve", "summarize", "review"]  # the step each event names ("" none)
# (read, target ms at the largest size)
TARGETS = {
    "GetExperienceTypeStats": 100.0,
    "GetExperienceTypeStats with outcomes": 100.0,
    "GetExperience (heavy)": 5.0,
    "GetExperience (typical)": 5.0,
    "ListExperiences top 20 by cost": 50.0,
    "BreakDownCost 30 days by resource, day": 200.0,
    "BreakDownCost 30 days by user": None,
    "ListEvents of the heavy run, page 1": None,
    "dashboard /api/spend by type (30 days)": 200.0,
    "dashboard /api/spend by model (30 days)": 200.0,
    "dashboard /api/runs (top 20)": 50.0,
    "dashboard /api/runs/<heavy run>": None,
    "dashboard /api/versions": 100.0,
    "dashboard /api/unpriced": None,
    "CompareVersions v1, v2": 200.0,
    "dashboard /api/compare": 200.0,
    "dashboard /api/spend_by key (90 days)": 100.0,
    "dashboard /api/events property search (90 days)": 100.0,
}
# The share of each load's runs scored (RecordOutcomes) after it: the type declares one outcome.
SCORED_FRACTION = 0.1


class Loader:
    """Ingests events in batches; remembers the experiences and the heavy one."""

    def __init__(
        self, channel: aio.Channel, name: str, seed: int = 7, versions: int = 1, shuffled: bool = False
    ) -> None:
        """`versions`: the type's versions the runs are spread over (it must have them).
        `shuffled`: each event at a random time of the 60 days (a backfill out of order),
        instead of each load sweeping the 60 days oldest first, as live calls arrive."""
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)
        self.name = name
        self.rng = random.Random(seed)
        self.heavy = str(uuid.uuid4())
        self.typical = ""
        self.sent = 0
        self.made = 0  # events made, sent or not
        self.now = int(time.time())
        self.versions = versions
        self.shuffled = shuffled
        self.stage_first, self.stage_count = 0, 1  # the current load's first event made, and its size
        self.new_runs: list[str] = []  # created since the last scoring
        self.experiences = experience_service_pb2_grpc.ExperienceServiceStub(channel)

    def _event(self, experience_id: str) -> pb.UsageEvent:
        rng = self.rng
        self.made += 1
        resource = rng.choice(RESOURCES)
        if self.made % RARE_EVERY == 0:  # misspelt, never priced: what a filter finds few of
            resource = RARE_MODEL
        return pb.UsageEvent(
            category="system.openai",
            resource=resource,
            units={"text": pb.UnitCounts(input=rng.randint(100, 20_000), output=rng.randint(10, 2_000))},
            event_timestamp=timestamp_pb2.Timestamp(seconds=self.now - self._age()),
            end_to_end_latency_ms=rng.randint(50, 20_000),
            http_status_code=200 if rng.random() > 0.02 else 500,
            context=pb.EventContext(
                experience_id=experience_id,
                experience_name=self.name,
                # Runs of each version alike (pinned as each run is created), to compare.
                experience_version=1 + int(experience_id[-1], 16) % self.versions,
                user_id=f"user-{rng.randint(1, 200)}",
                request_tags=rng.sample(TAGS, rng.randint(0, 2)),
                step=rng.choice(STEPS),
            ),
        )

    def _age(self) -> int:
        """Seconds before now of the next event: anywhere in the 60 days when shuffled, else
        where this load has got to in its sweep of them (oldest first), within an hour (the
        load makes about 5% more events than it stores: the heavy run's replace some)."""
        if self.shuffled:
            return self.rng.randint(60, 60 * DAY)
        progress = min(1.0, (self.made - self.stage_first) / (1.05 * self.stage_count))
        return 60 + int((1 - progress) * (60 * DAY - 3_660)) + self.rng.randint(0, 3_600)

    async def load_to(self, total: int, concurrency: int = 2) -> float:
        """Ingests until `total` events are stored; returns events/s."""
        started, count = time.perf_counter(), total - self.sent
        self.stage_first, self.stage_count = self.made, max(1, count)

        async def one_batch(size: int) -> None:
            events = []
            for start in range(0, size, 10):
                experience_id = str(uuid.uuid4())
                self.typical = self.typical or experience_id
                self.new_runs.append(experience_id)
                events.extend(self._event(experience_id) for _ in range(min(10, size - start)))
            for i in range(0, size, 20):  # one event in twenty goes to the heavy run
                events[i] = self._event(self.heavy)
            response = await self.ingest.IngestBatch(pb.IngestBatchRequest(events=events))
            if response.rejected_count:
                raise SystemExit(f"bench.reads: {response.rejected_count} events refused")

        while self.sent < total:
            sizes = []
            for _ in range(concurrency):
                size = min(1000, total - self.sent - sum(sizes))
                if size > 0:
                    sizes.append(size)
            await asyncio.gather(*(one_batch(size) for size in sizes))
            self.sent += sum(sizes)
            if self.sent % 100_000 < sum(sizes):
                print(f"   {self.sent:,} events stored", flush=True)
        return count / (time.perf_counter() - started)

    async def score(self) -> None:
        """Scores a tenth of the runs created since the last call (resolved or not), 16 at a time."""
        sample = self.rng.sample(self.new_runs, int(len(self.new_runs) * SCORED_FRACTION))
        values = [exp_pb.OutcomeValue(name="resolved", bool_value=self.rng.random() < 0.6) for _ in sample]

        async def one(experience_id: str, value: exp_pb.OutcomeValue) -> None:
            await self.experiences.RecordOutcomes(
                exp_pb.RecordOutcomesRequest(experience_id=experience_id, values=[value])
            )

        pairs = list(zip(sample, values, strict=True))
        for start in range(0, len(pairs), 16):
            await asyncio.gather(*(one(*pair) for pair in pairs[start : start + 16]))
        self.new_runs.clear()


# The panels the page loads (each with the window and filters), and the filters tried.
DASHBOARD_PANELS = (
    ("/api/summary", "/api/summary"),
    ("/api/spend", "/api/spend?by=experience_name"),
    ("/api/runs", "/api/runs?limit=20"),
    ("/api/versions", "/api/versions"),
    ("/api/unpriced", "/api/unpriced"),
    ("/api/events", "/api/events"),
    ("/api/spend_by user", "/api/spend_by?by=user"),
    ("/api/spend_by tag", "/api/spend_by?by=tag"),
)


FILTER_LABELS = ("", "type", "version", "model", "provider", "user", "tag", "rare model")
# The target for each: 100 ms at 1,000,000 events, growth within 2x.
TARGETS.update(
    {
        f"dashboard 90 days {name}{' ' + label if label else ''}": 100.0
        for name, _ in DASHBOARD_PANELS
        for label in FILTER_LABELS
    }
)


def _filters(loader: Loader) -> list[tuple[str, str]]:
    return [
        ("", ""),
        ("type", f"&type={loader.name}"),
        ("version", f"&type={loader.name}&version=2"),
        ("model", "&model=gpt-4o"),
        ("provider", "&provider=system.openai"),
        ("user", "&user=user-7"),
        ("tag", "&tag=search"),
        ("rare model", f"&model={RARE_MODEL}"),
    ]


async def timed(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Median milliseconds of `calls` calls, after one warm-up call."""
    await call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def dashboard_get(web_port: int, path: str) -> Callable[[], Awaitable[Any]]:
    """One GET of the dashboard's JSON, in a thread (urllib), read to its end."""

    def get() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}{path}", timeout=60) as response:
            return bytes(response.read())

    return lambda: asyncio.to_thread(get)


async def measure(channel: aio.Channel, loader: Loader, calls: int, web_port: int) -> dict[str, float]:
    types = experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel)
    experiences = experience_service_pb2_grpc.ExperienceServiceStub(channel)
    reports = report_service_pb2_grpc.ReportServiceStub(channel)
    events = event_service_pb2_grpc.EventServiceStub(channel)
    window = {
        "start_time": timestamp_pb2.Timestamp(seconds=loader.now - 30 * DAY),
        "end_time": timestamp_pb2.Timestamp(seconds=loader.now),
    }
    by_resource_day = rep_pb.BreakDownCostRequest(
        group_by=[rep_pb.COST_DIMENSION_RESOURCE, rep_pb.COST_DIMENSION_DAY], page_size=1000, **window
    )
    by_user = rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_USER_ID], page_size=1000, **window)
    reads: dict[str, Callable[[], Awaitable[Any]]] = {
        "GetExperienceTypeStats": lambda: types.GetExperienceTypeStats(
            et_pb.GetExperienceTypeStatsRequest(name=loader.name)
        ),
        "GetExperienceTypeStats with outcomes": lambda: types.GetExperienceTypeStats(
            et_pb.GetExperienceTypeStatsRequest(name=loader.name, include_outcomes=True)
        ),
        "GetExperience (heavy)": lambda: experiences.GetExperience(
            exp_pb.GetExperienceRequest(experience_id=loader.heavy)
        ),
        "GetExperience (typical)": lambda: experiences.GetExperience(
            exp_pb.GetExperienceRequest(experience_id=loader.typical)
        ),
        "ListExperiences top 20 by cost": lambda: experiences.ListExperiences(
            exp_pb.ListExperiencesRequest(experience_name=loader.name, order_by="cost_total desc", page_size=20)
        ),
        "BreakDownCost 30 days by resource, day": lambda: reports.BreakDownCost(by_resource_day),
        "BreakDownCost 30 days by user": lambda: reports.BreakDownCost(by_user),
        "ListEvents of the heavy run, page 1": lambda: events.ListEvents(
            ev_pb.ListEventsRequest(experience_id=loader.heavy, page_size=50)
        ),
        "dashboard /api/spend by type (30 days)": dashboard_get(web_port, "/api/spend?by=experience_name&days=30"),
        "dashboard /api/spend by model (30 days)": dashboard_get(web_port, "/api/spend?by=model&days=30"),
        "dashboard /api/runs (top 20)": dashboard_get(web_port, "/api/runs?limit=20"),
        "dashboard /api/runs/<heavy run>": dashboard_get(web_port, f"/api/runs/{loader.heavy}"),
        "dashboard /api/versions": dashboard_get(web_port, "/api/versions"),
        "dashboard /api/unpriced": dashboard_get(web_port, "/api/unpriced"),
        "CompareVersions v1, v2": lambda: reports.CompareVersions(
            rep_pb.CompareVersionsRequest(experience_name=loader.name, baseline_version=1, candidate_version=2)
        ),
        "dashboard /api/compare": dashboard_get(web_port, "/api/compare"),
        "dashboard /api/spend_by key (90 days)": dashboard_get(web_port, "/api/spend_by?by=key&days=90"),
        "dashboard /api/events property search (90 days)": dashboard_get(web_port, "/api/events?q=tier%3Dgold&days=90"),
        # The investigating page: every panel over 90 days, plain and with each filter.
        **{
            f"dashboard 90 days {name}{' ' + label if label else ''}": dashboard_get(
                web_port, f"{path}{'&' if '?' in path else '?'}days=90{query}"
            )
            for name, path in DASHBOARD_PANELS
            for label, query in _filters(loader)
        },
    }
    figures = {}
    for label, call in reads.items():
        few = calls if "by user" not in label else max(3, calls // 4)  # the one that reads events
        figures[label] = await timed(call, few)
    return figures


async def make_past_weeks(database_url: str) -> None:
    """PostgreSQL: the weekly partitions of events (migration 0028) of the 60 days the
    benchmark's events are spread over, as a database in service for those 60 days has them
    (the server made each as it came). A new database has this week's and the next ones'
    alone: the events would go to its default partition, and then move to weeks of their
    own as a backfill does (storage.partitions), which is not the state measured here."""
    if not database_url.startswith("postgresql"):
        return
    from tally_server.storage import partitions
    from tally_server.storage.db import Database

    database = Database(database_url)
    try:
        async with database.read() as conn:
            oldest = min(week.start_us for week in await partitions.weeks(conn))
        first = partitions.week_of((int(time.time()) - 61 * DAY) * 1_000_000)
        for start in range(first, oldest, partitions.WEEK_US):
            async with database.write() as conn:
                await partitions.make(conn, start, start + partitions.WEEK_US)
    finally:
        await database.dispose()


async def planner_statistics(database_url: str) -> None:
    """PostgreSQL: VACUUM ANALYZE, as autovacuum does after a load in production (an insert-
    only table is vacuumed since PostgreSQL 13). Without ANALYZE (this kind of machine runs
    PostgreSQL with autovacuum off), the planner, which has never seen the tables'
    statistics, guesses 65 rows where there are 300,000 and sorts them all (ListEvents of a
    provider: 1,045 ms, against 2 ms with statistics, at 300,000 events); without VACUUM, no
    page is marked all-visible and an index-only scan reads every row it finds."""
    if not database_url.startswith("postgresql"):
        return
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("VACUUM ANALYZE"))
    finally:
        await engine.dispose()


async def table_bytes(database_url: str) -> dict[str, int]:
    """Bytes on disk per table, its indexes included: SQLite's dbstat pages (after a WAL
    checkpoint), PostgreSQL's pg_total_relation_size (table, indexes and TOAST; a
    partitioned table's partitions summed under its name)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            if database_url.startswith("postgresql"):
                # The weekly partitions of events (migration 0028) count as events.
                rows = await conn.execute(
                    sa.text(
                        "SELECT COALESCE(p.relname, s.relname), SUM(pg_total_relation_size(s.relid))"
                        " FROM pg_stat_user_tables s LEFT JOIN pg_inherits i ON i.inhrelid = s.relid"
                        " LEFT JOIN pg_class p ON p.oid = i.inhparent GROUP BY 1"
                    )
                )
                return {name: int(size) for name, size in rows}
            await conn.execute(sa.text("PRAGMA wal_checkpoint(TRUNCATE)"))
            rows = await conn.execute(
                sa.text(
                    "SELECT COALESCE(m.tbl_name, d.name), SUM(d.pgsize) FROM dbstat d"
                    " LEFT JOIN sqlite_master m ON m.name = d.name GROUP BY 1"
                )
            )
            return {name: int(size) for name, size in rows}
    finally:
        await engine.dispose()


BYTES_TARGET = 150  # per event, indexes and rollups included (issue 29)


def print_bytes(label: str, size: int, tables: dict[str, int]) -> None:
    total = sum(tables.values())
    print(
        f"   {label} at {size:,} events: {total / 1e6:,.1f} MB, {total / size:,.0f} bytes per event "
        f"(target <= {BYTES_TARGET}); the largest tables, with their indexes:"
    )
    for name, table_size in sorted(tables.items(), key=lambda item: -item[1])[:8]:
        print(f"      {name:<32}{table_size / 1e6:>10,.1f} MB{table_size / size:>8,.0f} B/event")


async def run_engine(
    label: str, database_url: str, sizes: list[int], calls: int, shuffled: bool = False
) -> dict[int, dict[str, float]]:
    print(f"\n== {label}: starting the server", flush=True)
    process, port, web_port = start_server(database_url)
    results: dict[int, dict[str, float]] = {}
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            name = f"Reads_{uuid.uuid4().hex[:8]}"
            types = experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel)
            resolved = et_pb.OutcomeDefinition(name="resolved", kind=et_pb.OUTCOME_KIND_BOOLEAN)
            await types.CreateExperienceType(
                et_pb.CreateExperienceTypeRequest(
                    experience_type=et_pb.ExperienceType(name=name, description="reads", outcomes=[resolved])
                )
            )
            await types.IncrementExperienceTypeVersion(et_pb.IncrementExperienceTypeVersionRequest(name=name))
            loader = Loader(channel, name, versions=2, shuffled=shuffled)
            await make_past_weeks(database_url)
            for size in sizes:
                rate = await loader.load_to(size)
                await loader.score()
                await planner_statistics(database_url)
                print(f"   ingested to {size:,} events at {rate:,.0f} events/s; timing the reads", flush=True)
                results[size] = await measure(channel, loader, calls, web_port)
                tables = await table_bytes(database_url)
                print_bytes(label, size, tables)
                results[size]["bytes per event"] = sum(tables.values()) / size
    finally:
        process.terminate()
        process.wait(60)
    return results


def print_table(label: str, results: dict[int, dict[str, float]]) -> None:
    sizes = sorted(results)
    first, last = sizes[0], sizes[-1]
    print(f"\n{label}: median ms per read")
    header = "".join(f"{size:>12,}" for size in sizes)
    print(f"{'read':<42}{header}   growth   target at {last:,}")
    row = "".join(f"{results[size]['bytes per event']:>12,.0f}" for size in sizes)
    verdict = "meets" if results[last]["bytes per event"] <= BYTES_TARGET else "MISSES"
    print(f"{'bytes per event (indexes, rollups)':<42}{row}            {BYTES_TARGET:>6} B: {verdict}")
    for read, target in TARGETS.items():
        row = "".join(f"{results[size][read]:>12.2f}" for size in sizes)
        growth = results[last][read] / results[first][read]
        verdict = ""
        if target is not None:
            meets = results[last][read] <= target and growth <= 2.0
            verdict = f"{target:>6.0f} ms, growth <= 2x: {'meets' if meets else 'MISSES'}"
        print(f"{read:<42}{row}   {growth:>5.2f}x   {verdict}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reads", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000", help="event counts to time the reads at (ascending)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per read (default 20)")
    parser.add_argument("--postgres-url", help="also run against this PostgreSQL (a fresh database is created in it)")
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument(
        "--shuffled",
        action="store_true",
        help="events at random times of the 60 days, as a backfill out of order would send them "
        "(default: each load sweeps the 60 days oldest first, as live calls arrive)",
    )
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    print(f"Tally read benchmark: Python {sys.version.split()[0]}, sizes {', '.join(f'{s:,}' for s in sizes)}")
    report = {}
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            report["SQLite"] = await run_engine(
                "SQLite", f"sqlite+aiosqlite:///{tmp}/reads.db", sizes, args.calls, args.shuffled
            )
    if args.postgres_url:
        pg_url = await create_postgres_database(args.postgres_url)
        try:
            report["PostgreSQL"] = await run_engine("PostgreSQL", pg_url, sizes, args.calls, args.shuffled)
        finally:
            await drop_postgres_database(args.postgres_url, pg_url)
    for label, results in report.items():
        print_table(label, results)


if __name__ == "__main__":
    asyncio.run(main())

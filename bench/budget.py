"""Where ingest time goes, per event: the server's own stages in one process, without gRPC.

    python -m bench.budget          # SQLite in a temporary file; about a minute
    python -m bench.budget --postgres-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

Batches of 1,000 events go through the real stages: validation and hashing
(IngestServicer's _prepare), the group-commit writer (resolution, pricing, ids, the
insert and the commit), and the answers (IngestResponses). Beside them, the raw
sqlite3 executemany of the same rows, as `python -m bench` measures it. Each figure
is the median over the batches, in microseconds per event.

It also weighs the tricks of storage/hot_path.py: the same run again with each
replaced by its plain SQLAlchemy statement (hot_path.PLAIN), in batches of 1,000 and
of 32 (a commit of unary calls), and prints the time of the insert and of the rest of
the writer beside the plain ones. A trick within 10% of its plain statement goes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from tally.v1 import ingest_service_pb2 as pb
from tally_server.app import run_event_loop, tune_garbage_collector
from tally_server.domain.models import now_us
from tally_server.edges import context as metadata
from tally_server.rpc import convert
from tally_server.rpc.servicers import _prepare
from tally_server.services.experience_types import ExperienceTypes
from tally_server.services.experiences import Experiences
from tally_server.services.ingest import Ingestor
from tally_server.storage import events as stored_events, hot_path
from tally_server.storage.db import Database

from .__main__ import Keys, create_postgres_database, drop_postgres_database, encode_batch, raw_sqlite

BATCH = 1000


async def measure(url: str, batches: int, batch: int = BATCH, plain: bool = False) -> dict[str, float]:
    """Stage times per event; with `plain`, hot_path's tricks replaced by their plain statements."""
    db = Database(url)
    await db.migrate()
    await ExperienceTypes(db).create("Budget", "where ingest time goes", {}, "")
    experience = await Experiences(db).create("Budget", "", 0, {}, "")
    ingestor = Ingestor(db)
    ingestor.start()
    call = metadata.call_context((("xproxy-experience-id", str(experience.experience_id)),))
    tune_garbage_collector()

    # The insert is timed inside the writer's transaction by wrapping it.
    insert_seconds: list[float] = []
    real_insert = stored_events.insert_events

    async def timed_insert(conn, stored):
        start = time.perf_counter()
        try:
            return await real_insert(conn, stored)
        finally:
            insert_seconds.append(time.perf_counter() - start)

    stored_events.insert_events = timed_insert
    tricks = {name: getattr(hot_path, name) for name in hot_path.PLAIN}
    if plain:
        for name, statement in hot_path.PLAIN.items():
            setattr(hot_path, name, statement)
    stages: dict[str, list[float]] = {"validate and hash": [], "writer": [], "answer": []}
    keys = Keys()
    try:
        for _ in range(batches):
            request = pb.IngestBatchRequest.FromString(encode_batch([keys.next() for _ in range(batch)]))
            start = time.perf_counter()
            now = now_us()
            prepared = [_prepare(event, call, now, f"events[{i}].") for i, event in enumerate(request.events)]
            stages["validate and hash"].append(time.perf_counter() - start)
            start = time.perf_counter()
            outcomes = await ingestor.submit(prepared)
            stages["writer"].append(time.perf_counter() - start)
            start = time.perf_counter()
            response, answers = pb.IngestBatchResponse(), convert.IngestResponses()
            for index, outcome in enumerate(outcomes):
                answers.write(outcome, response.items.add(index=index).result)
            response.SerializeToString()
            stages["answer"].append(time.perf_counter() - start)
    finally:
        stored_events.insert_events = real_insert
        for name, trick in tricks.items():
            setattr(hot_path, name, trick)
        await ingestor.stop()
        await db.dispose()

    per_event = {name: statistics.median(seconds) / batch * 1e6 for name, seconds in stages.items()}
    insert = statistics.median(insert_seconds) / batch * 1e6
    per_event["writer: the insert"] = insert
    per_event["writer: resolve, price, ids, commit"] = per_event.pop("writer") - insert
    if db.is_sqlite and not plain and batch == BATCH:
        raw = raw_sqlite(url.split("///", 1)[1], 2.0, experience.experience_id)
        per_event["raw sqlite3 executemany, per row"] = raw.p50_ms * 1e3 / BATCH
    return per_event


async def measure_fresh(url: str, batches: int, batch: int, plain: bool) -> dict[str, float]:
    """measure() on a new, empty database: a file beside the first, or a new PostgreSQL database."""
    if url.startswith("sqlite"):
        return await measure(url.replace(".db", f"-{batch}-{plain}.db"), batches, batch, plain)
    database = await create_postgres_database(url)
    try:
        return await measure(database, batches, batch, plain)
    finally:
        await drop_postgres_database(url, database)


async def weigh_tricks(url: str, batches: int) -> list[tuple[str, int, float, float, float, float]]:
    """Per batch size: (insert, rest of the writer) with the tricks and with the plain statements."""
    rows = []
    rest = "writer: resolve, price, ids, commit"
    for batch in (BATCH, 32):
        count = batches if batch == BATCH else batches * 4
        fast = await measure_fresh(url, count, batch, plain=False)
        slow = await measure_fresh(url, count, batch, plain=True)
        engine = "sqlite" if url.startswith("sqlite") else "postgresql"
        rows.append((engine, batch, fast["writer: the insert"], slow["writer: the insert"], fast[rest], slow[rest]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__)
    parser.add_argument("--batches", type=int, default=40, help="batches of 1,000 events (default 40)")
    parser.add_argument("--postgres-url", help="also weigh the tricks on PostgreSQL (a fresh database per run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/budget.db"
        figures = run_event_loop(measure(url, args.batches))
        weighed = run_event_loop(weigh_tricks(url, args.batches))
        if args.postgres_url:
            weighed += run_event_loop(weigh_tricks(args.postgres_url, args.batches))
    stages = [name for name in figures if not name.startswith("raw")]
    print(f"Per event, medians of {args.batches} batches of {BATCH:,} (microseconds):")
    for name in stages:
        print(f"  {name:<40} {figures[name]:7.1f}")
    total = sum(figures[name] for name in stages)
    raw = figures["raw sqlite3 executemany, per row"]
    print(f"  {'total':<40} {total:7.1f}   (at most {1e6 / total:,.0f} events/s on one core)")
    print(f"  {'raw sqlite3 executemany, per row':<40} {raw:7.1f}   ({1e6 / raw:,.0f} rows/s)")
    others = total - figures["writer: the insert"]
    print(
        f"Half the raw rate is {2 * raw:.1f} µs per event: beside a raw insert, {raw:.1f} µs for all the rest,"
        f" which takes {others:.1f} µs here."
    )
    print("\nThe tricks of storage/hot_path.py against SQLAlchemy's plain statements (µs per event):")
    print(
        f"  {'engine':<11} {'batch':>5}  {'insert':>7} {'plain':>7} {'ratio':>6}  {'rest':>7} {'plain':>7} {'ratio':>6}"
    )
    for engine, batch, insert, plain_insert, rest, plain_rest in weighed:
        print(
            f"  {engine:<11} {batch:>5}  {insert:7.1f} {plain_insert:7.1f} {plain_insert / insert:5.2f}x"
            f"  {rest:7.1f} {plain_rest:7.1f} {plain_rest / rest:5.2f}x"
        )


if __name__ == "__main__":
    main()

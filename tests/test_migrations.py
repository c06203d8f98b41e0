"""The schema Alembic's migrations build is the one the code describes, on both engines."""

from __future__ import annotations

import datetime
import random
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google.protobuf.json_format import MessageToDict
from grpc import aio

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_type_service_pb2 as types_pb,
    limit_service_pb2 as lim_pb,
    report_service_pb2 as report_pb,
    report_service_pb2_grpc as report_grpc,
)
from tally_client import AsyncTallyClient, usage_event
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.storage.db import Database, alembic_config
from tally_server.storage.partitions import include_name, name_of as partition_name, week_of
from tally_server.storage.tables import Uuid, metadata

from .conftest import drop_database_url, make_database_url, stubs_for
from .test_compare import seed_world


def differences(connection):
    """The schema against tables.metadata, PostgreSQL's weekly partitions of events aside."""
    return compare_metadata(MigrationContext.configure(connection, opts={"include_name": include_name}), metadata)


async def test_migrations_match_the_table_definitions(server):
    async with server.db.read() as conn:
        assert await conn.run_sync(differences) == []
        version = await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
        assert [row[0] for row in version] == ["0028"]


async def test_an_upgrade_that_fails_changes_nothing(backend, tmp_path):
    """The rollups' migration fails at its last step (building them from the events): the
    database is left at 0004, without a table or column of 0005."""
    url = await make_database_url(backend, tmp_path)
    database = Database(url)
    try:
        async with database.write() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0004"))

        def fail_at_the_backfill(conn, cursor, statement, *args):
            # The backfill's first statement counts the stored events; 0005's DDL ran before it.
            if statement.lstrip().upper().startswith("SELECT COUNT(*)") and "FROM events" in statement:
                raise RuntimeError("stopped mid-way")

        sa.event.listen(database.engine.sync_engine, "before_cursor_execute", fail_at_the_backfill)
        try:
            with pytest.raises(RuntimeError, match="stopped mid-way"):
                await database.migrate()
        finally:
            sa.event.remove(database.engine.sync_engine, "before_cursor_execute", fail_at_the_backfill)

        def schema(connection):
            inspector = sa.inspect(connection)
            columns = {column["name"] for column in inspector.get_columns("experiences")}
            return inspector.get_table_names(), columns

        async with database.read() as conn:
            version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar_one()
            tables, columns = await conn.run_sync(schema)
        assert version == "0004"
        assert "cost_rollups" not in tables and "experience_latencies" not in tables, tables
        assert "cost_total_nanos" not in columns, columns
    finally:
        await database.dispose()
        await drop_database_url(url)


def _rows_at_0001(connection):
    """A type, one experience with two events (one failed), and one unattributed event,
    written as the first migration's schema had them."""

    def table(name, *columns, uuids=(), json=()):
        typed = [sa.column(c, sa.Uuid) for c in uuids] + [sa.column(c, sa.JSON) for c in json]
        return sa.table(name, *typed, *(sa.column(c) for c in columns))

    times = ("create_time_us", "update_time_us")
    types = table("experience_types", "id", "name", "description", "version", *times, json=["settings"])
    versions = table("experience_type_versions", "type_id", "version", "description", times[0], json=["settings"])
    experiences = table("experiences", "type_id", "version", times[0], uuids=["id"], json=["properties"])
    event_columns = ["content_hash", "experience_created", "category", "resource", "ingest_time_us", "event_time_us"]
    event_columns += ["time_to_first_token_ms", "end_to_end_latency_ms", "http_status_code", "price_source"]
    event_columns += ["cost_state", "cost_input_nanos", "cost_output_nanos", "cost_total_nanos"]
    event_columns += ["price_resource"]
    events = table("events", *event_columns, uuids=["id", "experience_id"], json=["units"])
    connection.execute(
        types.insert().values(
            id=1, name="Old", description="", settings={}, version=1, create_time_us=DAY, update_time_us=DAY
        )
    )
    connection.execute(versions.insert().values(type_id=1, version=1, description="", settings={}, create_time_us=DAY))
    connection.execute(
        experiences.insert().values(id=EXPERIENCE, type_id=1, version=1, create_time_us=DAY, properties={})
    )
    base = {
        "content_hash": "0" * 64,
        "experience_created": False,
        "category": "system.openai",
        "resource": "gpt-4o",
        "units": {"text": [10, 5]},
        "ingest_time_us": DAY,
        "time_to_first_token_ms": 0,
        "price_source": 1,
        "cost_state": 1,
        "cost_input_nanos": 0,
    }
    rows = [
        (EXPERIENCE, DAY + 1, 40, 200, 1_500_000_001, "gpt-4o"),
        (EXPERIENCE, DAY + 3_600_000_000, 60, 500, 2_000_000_000, "gpt-4o"),
        (None, DAY + 2, 10, 200, 7, "gpt-4o-2024-08-06"),  # a dated snapshot the gpt-4o entry priced
    ]
    connection.execute(
        events.insert(),
        [
            {
                **base,
                "id": uuid.uuid4(),
                "experience_id": experience_id,
                "event_time_us": time_us,
                "end_to_end_latency_ms": latency,
                "http_status_code": status,
                "cost_output_nanos": cost,
                "cost_total_nanos": cost,
                "resource": resource,
                "price_resource": "gpt-4o",
            }
            for experience_id, time_us, latency, status, cost, resource in rows
        ],
    )


DAY = 20_000 * 86_400 * 1_000_000
EXPERIENCE = uuid.UUID("0190b5a8-0000-7000-8000-000000000001")


@pytest.mark.parametrize("loaded", [False, True], ids=["empty", "loaded"])
async def test_a_database_upgrades_from_the_first_migration_to_head(backend, tmp_path, loaded):
    """Every migration in turn, on an empty database and on one holding events from the
    first schema: the rollups the frozen 0005 builds answer as the ingest path keeps them."""
    url = await make_database_url(backend, tmp_path)
    database = Database(url)
    try:
        async with database.write() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0001"))
            if loaded:
                await conn.run_sync(_rows_at_0001)
        await database.migrate()
        async with database.read() as conn:
            version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar_one()
            assert version == "0028"
            assert await conn.run_sync(differences) == []
    finally:
        await database.dispose()
    tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
    await tally.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{tally.port}") as channel:
            stubs = stubs_for(channel, tally, backend)
            if not loaded:
                listed = await stubs.types.ListExperienceTypes(types_pb.ListExperienceTypesRequest())
                assert list(listed.experience_types) == []
                return
            got = await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id=str(EXPERIENCE)))
            stats = got.experience.stats
            assert (stats.event_count, stats.failed_event_count) == (2, 1)
            assert (stats.cost_total.units, stats.cost_total.nanos) == (3, 500_000_001)
            assert stats.latency_mean_ms == 50
            assert (stats.input_tokens, stats.output_tokens) == (20, 10)  # 0013 counted the stored units
            type_stats = await stubs.types.GetExperienceTypeStats(types_pb.GetExperienceTypeStatsRequest(name="Old"))
            assert type_stats.total.experience_count == 1
            highest = type_stats.total.max_cost_per_experience
            assert (highest.units, highest.nanos) == (3, 500_000_001)
            reports = report_grpc.ReportServiceStub(channel)
            by_type = report_pb.BreakDownCostRequest(group_by=[report_pb.COST_DIMENSION_EXPERIENCE_NAME])
            breakdown = await reports.BreakDownCost(by_type)
            assert {g.experience_name: g.event_count for g in breakdown.groups} == {"Old": 2, "": 1}
            # 0007 rebuilt the hourly rollup with the model that priced each event.
            by_model = report_pb.BreakDownCostRequest(group_by=[report_pb.COST_DIMENSION_MODEL])
            breakdown = await reports.BreakDownCost(by_model)
            assert [(g.model, g.event_count) for g in breakdown.groups] == [("gpt-4o", 3)]
            assert (breakdown.total.input_tokens, breakdown.total.output_tokens) == (30, 15)
            by_resource = report_pb.BreakDownCostRequest(group_by=[report_pb.COST_DIMENSION_RESOURCE])
            breakdown = await reports.BreakDownCost(by_resource)
            assert {g.resource: g.event_count for g in breakdown.groups} == {"gpt-4o": 2, "gpt-4o-2024-08-06": 1}
    finally:
        await tally.stop()
        await drop_database_url(url)


def _rounded(value: Any) -> Any:
    """A message's dict with its floats to 12 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


async def test_0011_builds_the_outcome_and_step_rollups_the_writer_keeps(backend, tmp_path):
    """A world of scored runs with steps and failed events, kept by the writer; taken back to
    0010 (the outcome and step rollups and the failed-event sums gone) and upgraded again:
    the backfill answers every comparison and statistic as the writer's rollups did."""
    url = await make_database_url(backend, tmp_path)

    async def answers() -> tuple[Any, ...]:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                if not seeded.get("done"):
                    await seed_world(client, "Backfilled", random.Random(11))
                    seeded["done"] = True
                compared = await client.compare_versions("Backfilled", baseline=2, candidate=3)
                stats = await client.get_experience_type_stats("Backfilled", include_outcomes=True)
                return compared, stats
        finally:
            await tally.stop()

    seeded: dict[str, bool] = {}
    try:
        kept = await answers()
        database = Database(url)
        try:
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0010"))
                tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
                assert "type_outcome_rollups" not in tables and "type_step_rollups" not in tables
            await database.migrate()
        finally:
            await database.dispose()
        backfilled = await answers()
        # Means of outcome values are float sums: the backfill adds them in another order.
        assert [_rounded(MessageToDict(m)) for m in backfilled] == [_rounded(MessageToDict(m)) for m in kept]
        compared, stats = backfilled
        assert compared.baseline.failure_rate > 0 and compared.baseline.steps and compared.baseline.outcomes
        assert all(v.outcomes for v in stats.versions) and stats.steps
    finally:
        await drop_database_url(url)


async def test_0013_counts_the_tokens_of_the_events_stored_before_it(backend, tmp_path):
    """Events of many unit types, attributed and not, over several hours, counted by the
    writer; taken back to 0012 (the token sums gone) and upgraded again: every experience
    and every hourly group answers the tokens the writer counted, and the counts past a
    billion carry."""
    url = await make_database_url(backend, tmp_path)
    base = 1_750_000_000

    async def answers() -> tuple[Any, ...]:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                if not seeded:
                    for name in ("Tokens0", "Tokens1"):
                        await client.create_experience_type(name, "tokens")
                    for i in range(40):
                        units = {"text": (1_000 + i, 7 * i), "text_cache_read": (3 * i, 0), "reasoning": (0, 11)}
                        if i == 5:
                            units["text"] = (2_999_999_999, 1_500_000_001)
                        event = usage_event(
                            "system.openai",
                            "gpt-4o" if i % 3 else "claude-sonnet-4-0",
                            units,
                            event_time=datetime.datetime.fromtimestamp(base + i * 1_800, datetime.UTC),
                        )
                        if i % 5:  # every fifth unattributed
                            event.context.experience_name = f"Tokens{i % 2}"
                        await client.ingest(event)
                    seeded.append(True)
                start = datetime.datetime.fromtimestamp(base, datetime.UTC)
                by_type = await client.break_down_cost(["type", "hour"], start=start)
                by_model = await client.break_down_cost(["model", "hour"], start=start)
                runs = []
                for name in ("Tokens0", "Tokens1"):
                    for run in (await client.list_experiences(name, page_size=100)).experiences:
                        runs.append((run.experience_id, run.stats.input_tokens, run.stats.output_tokens))
                groups = sorted(
                    (g.experience_name, g.model, g.period_start.seconds, g.input_tokens, g.output_tokens)
                    for g in [*by_type.groups, *by_model.groups]
                )
                return groups, (by_type.total.input_tokens, by_type.total.output_tokens), sorted(runs)
        finally:
            await tally.stop()

    seeded: list[bool] = []
    try:
        kept = await answers()
        total_in = sum(1_000 + i + 3 * i for i in range(40)) - 1_005 + 2_999_999_999
        total_out = sum(7 * i + 11 for i in range(40)) - 35 + 1_500_000_001
        assert kept[1] == (total_in, total_out)
        assert sum(g[3] for g in kept[0]) == 2 * total_in and len(kept[2]) > 2
        database = Database(url)
        try:
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0012"))
                columns = await conn.run_sync(
                    lambda c: [col["name"] for col in sa.inspect(c).get_columns("experiences")]
                )
                assert "input_tokens_billions" not in columns
            await database.migrate()
        finally:
            await database.dispose()
        assert await answers() == kept
    finally:
        await drop_database_url(url)


# Every UUID column of the schema, by table: what 0017 must convert (read from the table
# definitions, so that a table added later is checked too).
UUID_COLUMNS = {
    table.name: [column.name for column in table.columns if isinstance(column.type, Uuid)]
    for table in metadata.sorted_tables
    if any(isinstance(column.type, Uuid) for column in table.columns) and table.name != "event_keys"  # 0028's
}


async def ingest_into(client: AsyncTallyClient, run: str, *priced: tuple[str, str, dict[str, str]]) -> None:
    """One event of the run per (category, model, price context)."""
    for category, model, context in priced:
        event = usage_event(category, model, {"text": (1_000, 100)})
        event.context.experience_id = run
        event.price_context.update(context)
        await client.ingest(event)


async def test_0017_and_0018_keep_every_answer_in_the_compact_rows(backend, tmp_path):
    """A world that puts a row in every table holding UUIDs (runs with outcomes, steps and
    properties, events with an annotation, custom prices, a reservation held by a block
    limit) and events priced by genai-prices and by a custom price and its variant, taken
    back to 0016 (ids as hex text on SQLite, each event's price as six columns of its own)
    and upgraded again: every read answers as before, the ids are blobs of 16 bytes on
    SQLite, each priced event names one applied price, and the runs, the events, the
    reservation and the writer's lookups work on the converted rows."""
    url = await make_database_url(backend, tmp_path)
    world: dict[str, Any] = {}

    async def answers() -> tuple[Any, ...]:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                if not world:
                    await seed_world(client, "Packed", random.Random(17))
                    runs = (await client.list_experiences("Packed", version=3, page_size=5)).experiences
                    world["run"] = runs[0].experience_id
                    await client.update_experience_properties(world["run"], set_properties={"ticket": "T-1"})
                    listed = await client.list_events(page_size=3)
                    world["event"] = listed.events[0].request_id
                    await client.annotate_event(world["event"], set_annotations={"reviewed": "yes"})
                    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
                    await client.create_custom_price(
                        "packed", "model-p", {"text": ("0.000001", "0.000002")}, effective_time=start
                    )
                    await client.create_custom_price(
                        "packed",
                        "model-p",
                        {"text": ("0.000003", "0.000004")},
                        effective_time=start,
                        price_context={"region": "eu"},
                    )
                    # Events priced by a custom price and by genai-prices, each standard and variant.
                    await ingest_into(
                        client,
                        world["run"],
                        ("packed", "model-p", {}),
                        ("packed", "model-p", {"region": "eu"}),
                        ("system.anthropic", "claude-haiku-4-5", {}),
                        ("system.anthropic", "claude-haiku-4-5", {"processing": "batch"}),
                    )
                    await client.ingest("system.openai", "gpt-4o", {"text": (10, 1)})  # of no run: NULL stays NULL
                    everything = lim_pb.LimitScope(everything=True)
                    limit = lim_pb.Limit(name="packed", max={"units": 100}, kind=1, period=1, scope=everything)
                    await client.create_limit(limit)
                    world["reservation"] = (await client.reserve("0.25", ttl_seconds=3600)).reservation_id
                events, token = [], ""
                while True:
                    page = await client.list_events(page_size=100, page_token=token)
                    events += [MessageToDict(e) for e in page.events]
                    if not (token := page.next_page_token):
                        break
                runs = await client.list_experiences("Packed", order_by="cost_total desc", page_size=100)
                return (
                    events,
                    MessageToDict(await client.get_event(world["event"])),
                    MessageToDict(await client.get_experience(world["run"])),
                    MessageToDict(await client.list_outcome_changes(world["run"])),
                    MessageToDict(runs),
                    MessageToDict(await client.get_experience_type_stats("Packed", include_outcomes=True)),
                    [MessageToDict(p) for p in (await client.list_custom_prices(category="packed")).prices],
                    MessageToDict(await client.get_limit("packed")),
                )
        finally:
            await tally.stop()

    async def stored_as() -> dict[str, set[str]]:
        """Each table's UUID storage classes (SQLite's typeof) over its rows."""
        found: dict[str, set[str]] = {}
        async with database.read() as conn:
            for table, columns in UUID_COLUMNS.items():
                for column in columns:
                    rows = await conn.exec_driver_sql(
                        f"SELECT DISTINCT typeof({column}), length({column}) FROM {table} WHERE {column} IS NOT NULL"
                    )
                    found[f"{table}.{column}"] = {f"{kind}/{length}" for kind, length in rows}
        return found

    try:
        kept = await answers()
        database = Database(url)
        try:
            if backend == "sqlite":
                assert set(map(frozenset, (await stored_as()).values())) == {frozenset({"blob/16"})}
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0016"))
            if backend == "sqlite":
                assert set(map(frozenset, (await stored_as()).values())) == {frozenset({"text/32"})}
            await database.migrate()
            if backend == "sqlite":
                assert set(map(frozenset, (await stored_as()).values())) == {frozenset({"blob/16"})}
            async with database.read() as conn:
                applied = await conn.exec_driver_sql("SELECT source, version FROM applied_prices")
                sources = sorted(source for source, _ in applied)
                unnamed = await conn.exec_driver_sql(
                    "SELECT COUNT(*) FROM events WHERE price_id IS NULL AND cost_state = 1"
                )
                assert unnamed.scalar_one() == 0
        finally:
            await database.dispose()
        # gpt-4o's and claude-haiku-4-5's genai-prices entries, the latter's batch variant;
        # the custom price and its variant.
        assert sources == [1, 1, 1, 2, 2], sources
        assert await answers() == kept
        prices = [e["xproxyResult"]["price"] for e in kept[0] if "price" in e["xproxyResult"]]
        named = {
            (p["source"], p["resource"], p["version"].split()[0], tuple(p.get("priceContext", {}).items()))
            for p in prices
        }
        standard, variant = kept[6][0]["priceId"], kept[6][1]["priceId"]
        assert named == {
            ("PRICE_SOURCE_SYSTEM", "gpt-4o", "genai-prices", ()),
            ("PRICE_SOURCE_SYSTEM", "claude-haiku-4-5", "genai-prices", ()),
            ("PRICE_SOURCE_SYSTEM", "claude-haiku-4-5", "genai-prices", (("processing", "batch"),)),
            ("PRICE_SOURCE_CUSTOM", "model-p", standard, ()),
            ("PRICE_SOURCE_CUSTOM", "model-p", variant, (("region", "eu"),)),
        }
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                before = await client.get_experience(world["run"])
                await ingest_into(
                    client,
                    world["run"],
                    ("system.openai", "gpt-4o", {}),
                    ("system.anthropic", "claude-haiku-4-5", {"processing": "batch"}),
                )
                after = await client.get_experience(world["run"])
                assert after.stats.event_count == before.stats.event_count + 2
                async with tally.db.read() as conn:  # the writer found the prices 0018 made: none made again
                    rows = list(await conn.exec_driver_sql("SELECT * FROM applied_prices"))
                    assert len(rows) == 5, "\n".join(map(str, rows))
                held = (await client.get_limit("packed")).current.reserved
                assert (held.units, held.nanos) == (0, 250_000_000)
                await client.release(world["reservation"])
                held = (await client.get_limit("packed")).current.reserved
                assert (held.units, held.nanos) == (0, 0)
        finally:
            await tally.stop()
    finally:
        await drop_database_url(url)


async def test_0025_packs_each_runs_latency_histogram_and_unpacks_it_back(backend, tmp_path):
    """Runs whose latencies fill many buckets (some more than 127 apart, some with more than
    127 events, some not reported) and a run of one event: GetExperience and ListExperiences
    answer the same after a downgrade to 0024 (a row per bucket, counting every event of
    the runs) and an upgrade again, whose rows the writer then adds to."""
    url = await make_database_url(backend, tmp_path)
    runs: list[str] = []
    # 1 ms to an hour: buckets 1 to over 750; 0 (not reported) counts in bucket 0.
    latencies = [0] * 3 + [1] * 130 + [2, 3, 50, 51, 52, 999, 20_000, 3_600_000] + list(range(100, 6_100, 20))

    async def answers(more: bool = False) -> tuple[Any, ...]:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                if not runs:
                    await client.create_experience_type("Latent", "latencies")
                    for latencies_of_run in (latencies, [42]):
                        first = usage_event(
                            "system.openai", "gpt-4o", {"text": (10, 1)}, latency_ms=latencies_of_run[0]
                        )
                        first.context.experience_name = "Latent"
                        run = (await client.ingest(first)).xproxy_result.experience_id
                        runs.append(run)
                        rest = []
                        for latency in latencies_of_run[1:]:
                            event = usage_event("system.openai", "gpt-4o", {"text": (10, 1)}, latency_ms=latency)
                            event.context.experience_id = run
                            rest.append(event)
                        if rest:
                            await client.ingest_batch(rest)
                if more:  # the writer adds to the packed histogram
                    event = usage_event("system.openai", "gpt-4o", {"text": (10, 1)}, latency_ms=7_000)
                    event.context.experience_id = runs[1]
                    await client.ingest(event)
                listed = await client.list_experiences("Latent", order_by="event_count desc", page_size=10)
                return (
                    MessageToDict(listed),
                    *[MessageToDict(await client.get_experience(run)) for run in runs],
                )
        finally:
            await tally.stop()

    try:
        kept = await answers()
        heavy = kept[1]["stats"]
        assert heavy["eventCount"] == str(len(latencies))
        assert heavy["latencyReportedEventCount"] == str(len(latencies) - 3)
        database = Database(url)
        try:
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0024"))
            async with database.read() as conn:
                rows = list(await conn.exec_driver_sql("SELECT bucket, event_count FROM experience_latencies"))
            assert sum(count for _, count in rows) == len(latencies) + 1
            assert max(count for _, count in rows) == 130 and max(bucket for bucket, _ in rows) > 700
            assert len(rows) > 100
            await database.migrate()
            async with database.read() as conn:
                packed = list(await conn.exec_driver_sql("SELECT latency_buckets FROM experiences"))
                tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert len(packed) == 2 and all(row[0] for row in packed) and "experience_latencies" not in tables
        finally:
            await database.dispose()
        assert await answers() == kept
        added = await answers(more=True)
        assert added[2]["stats"]["eventCount"] == "2"
        assert added[2]["stats"]["latencyP95Ms"] != kept[2]["stats"]["latencyP95Ms"]
    finally:
        await drop_database_url(url)


async def test_0026_counts_the_reasons_of_the_events_stored_before_it(backend, tmp_path):
    """Over 10,000 events not (fully) priced (more than one of the upgrade's batches, many at
    the same time) by users, repeated tags and none, of misspelt and partly priced models:
    after a downgrade to 0025 (the rollup of reasons gone) and an upgrade, it holds the rows
    the writer kept, and the writer adds to them."""
    url = await make_database_url(backend, tmp_path)
    day = datetime.datetime(2026, 11, 2, tzinfo=datetime.UTC)
    sent = []
    for n in range(10_500):
        resource, units = [("gtp-4o", {"text": (10, 1)}), ("gpt-4o", {"text": (10, 1), "made_up": (3, 0)})][n % 2]
        event = usage_event("system.openai", resource, units, event_time=day + datetime.timedelta(hours=n % 50))
        event.context.user_id = ("ann", "bob", "")[n % 3]
        event.context.request_tags.extend((("red", "red", "blue"), (), ("green",))[n % 3 - 1 if n % 7 else 1])
        sent.append(event)

    async def ingest(events: list[Any]) -> None:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                for start in range(0, len(events), 1_000):
                    await client.ingest_batch(events[start : start + 1_000])
        finally:
            await tally.stop()

    async def reasons() -> list[tuple[Any, ...]]:
        database = Database(url)
        try:
            async with database.read() as conn:
                return sorted(tuple(row) for row in await conn.exec_driver_sql("SELECT * FROM unpriced_reason_days"))
        finally:
            await database.dispose()

    try:
        await ingest(sent)
        kept = await reasons()
        assert sum(row[-1] for row in kept if row[0] == 5) == len(sent)  # every event once under its key
        assert {row[1] for row in kept if row[0] == 2} == {"red", "blue", "green", ""}
        database = Database(url)
        try:
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0025"))
                tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert "unpriced_reason_days" not in tables
            await database.migrate()
        finally:
            await database.dispose()
        assert await reasons() == kept
        await ingest(sent[:2])
        added = {row[:-1]: row[-1] for row in await reasons()}
        # Under a user and a key each, and under "" (no tags) or each of "red" and "blue".
        assert sum(added.values()) == sum(row[-1] for row in kept) + 3 + 4
    finally:
        await drop_database_url(url)


async def test_0027_keeps_units_of_text_alone_as_the_tokens_and_writes_them_back(backend, tmp_path):
    """Events of text alone, of text with other units, of other units alone and of none:
    ListEvents and GetEvent answer the same units at head (the rows of text alone hold JSON
    null), after a downgrade to 0026 (every row's units written out again) and after the
    upgrade, which rewrites no row (those stored before keep their units as text); the
    events stored after it hold JSON null again."""
    url = await make_database_url(backend, tmp_path)
    kinds = [
        {"text": (1_200, 80)},
        {"text": (0, 0)},
        {"text": (10, 1), "text_cache_read": (500, 0)},
        {"audio": (7, 3)},
        {},
    ]

    async def answers(more: int = 0) -> list[Any]:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                for n, units in enumerate(kinds * 3 if not sent else kinds[:more]):
                    event = usage_event("system.openai", "gpt-4o", units, idempotency_key=f"units-{len(sent)}-{n}")
                    sent.append((await client.ingest(event)).request_id)
                listed = await client.list_events(page_size=100)
                return [MessageToDict(listed)] + [MessageToDict(await client.get_event(r)) for r in sent]
        finally:
            await tally.stop()

    async def raw_units() -> list[str]:
        database = Database(url)
        try:
            async with database.read() as conn:
                cast = "units::text" if backend == "postgresql" else "units"
                return sorted(row[0] for row in await conn.exec_driver_sql(f"SELECT {cast} FROM events"))
        finally:
            await database.dispose()

    sent: list[str] = []
    try:
        kept = await answers()
        listed_units = [e["event"].get("units", {}) for e in kept[0]["events"]]
        assert {unit for units in listed_units for unit in units} == {"text", "text_cache_read", "audio"}
        assert {"input": "1200", "output": "80"} in [units.get("text") for units in listed_units]
        assert (await raw_units()).count("null") == 2 * 3
        database = Database(url)
        try:
            async with database.write() as conn:
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0026"))
        finally:
            await database.dispose()
        written = await raw_units()
        assert "null" not in written and written.count('{"text":[1200,80]}') == 3 and written.count("{}") == 3
        assert await answers() == kept
        database = Database(url)
        try:
            await database.migrate()
        finally:
            await database.dispose()
        assert await raw_units() == written
        assert await answers() == kept
        added = await answers(more=2)  # text alone, stored after the upgrade
        assert added[: len(kept)][1:] == kept[1:]
        assert (await raw_units()).count("null") == 2
    finally:
        await drop_database_url(url)


async def test_0028_moves_the_keys_to_their_table_and_the_events_into_weeks_and_back(backend, tmp_path):
    """Events old and new, with and without keys, one annotated: ListEvents, GetEvent by
    request id and by key, and a repeat of each key answer the same at head, after a
    downgrade to 0027 (the keys a unique index of events again; on PostgreSQL the weeks
    copied back into one table) and after the upgrade (the keys copied into event_keys; on
    PostgreSQL the stored events attached as one partition, from the week of the oldest)."""
    url = await make_database_url(backend, tmp_path)
    now = int(time.time())
    times = [now - 40 * 86_400 + i * 7_200 for i in range(300)] + [now - 60 * i for i in range(100)]

    async def answers() -> list[Any]:
        tally = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
        await tally.start()
        try:
            async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
                if not sent:
                    events = []
                    for n, at in enumerate(times):
                        event = usage_event(
                            "system.openai",
                            "gpt-4o",
                            {"text": (1_000 + n, 10)},
                            event_time=datetime.datetime.fromtimestamp(at, datetime.UTC),
                            idempotency_key=f"weeks-{n}" if n % 3 else "",
                        )
                        event.context.user_id = f"user-{n % 7}"
                        events.append(event)
                    for start in range(0, len(events), 200):
                        batch = events[start : start + 200]
                        answer = await client.ingest_batch(batch)
                        sent.extend(zip(batch, (item.result.request_id for item in answer.items), strict=True))
                    await client.annotate_event(sent[0][1], set_annotations={"rating": "4"})
                listed, token = [], ""
                while True:
                    page = await client.list_events(page_size=100, page_token=token)
                    listed += [MessageToDict(e) for e in page.events]
                    if not (token := page.next_page_token):
                        break
                found = [MessageToDict(await client.get_event(request_id)) for _, request_id in sent[::9]]
                by_key = [
                    MessageToDict(await client.get_event(idempotency_key=e.idempotency_key))
                    for e, _ in sent[1::9]
                    if e.idempotency_key
                ]
                repeats = [(await client.ingest(e)).xproxy_result for e, _ in sent[1::30] if e.idempotency_key]
                assert repeats and all(r.duplicate_request for r in repeats)
                by_user = MessageToDict(await client.break_down_cost(["user"], page_size=100))
                return [listed, found, by_key, [MessageToDict(r) for r in repeats], by_user]
        finally:
            await tally.stop()

    async def layout() -> tuple[Any, ...]:
        database = Database(url)
        try:
            async with database.read() as conn:
                tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
                if backend == "sqlite":
                    return ("event_keys" in tables,)
                kind = (
                    await conn.exec_driver_sql("SELECT relkind::text FROM pg_class WHERE relname = 'events'")
                ).scalar()
                weeks = await conn.exec_driver_sql(
                    "SELECT c.relname, (SELECT COUNT(*) FROM events e WHERE e.tableoid = c.oid) FROM pg_inherits i"
                    " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass"
                )
                return ("event_keys" in tables, kind, {name: count for name, count in weeks if count})
        finally:
            await database.dispose()

    sent: list[tuple[Any, str]] = []
    keyed = sum(1 for n in range(len(times)) if n % 3)
    try:
        kept = await answers()
        at_head = await layout()
        database = Database(url)
        try:
            async with database.write() as conn:
                assert (await conn.exec_driver_sql("SELECT COUNT(*) FROM event_keys")).scalar() == keyed
                await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0027"))
        finally:
            await database.dispose()
        assert await layout() == ((False,) if backend == "sqlite" else (False, "r", {}))
        assert await answers() == kept
        database = Database(url)
        try:
            await database.migrate()
            async with database.read() as conn:
                assert (await conn.exec_driver_sql("SELECT COUNT(*) FROM event_keys")).scalar() == keyed
        finally:
            await database.dispose()
        upgraded = await layout()
        if backend == "postgresql":
            oldest = partition_name(week_of(min(times) * 1_000_000))
            # At head the new database's weeks began with the week it was made: the old events
            # were in the default partition. Upgraded, the events it held are one partition.
            assert at_head[2].keys() <= {"events_default", partition_name(week_of(now * 1_000_000))}
            assert upgraded[:2] == (True, "p") and upgraded[2] == {oldest: len(times)}
        assert await answers() == kept
    finally:
        await drop_database_url(url)

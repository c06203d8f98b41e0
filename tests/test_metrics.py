"""The Prometheus endpoint (`--metrics-listen`), scraped over HTTP from a server process:
calls by method and code, latency histograms, events by cost state, the writer's queue,
commits and their sizes."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from tally.v1 import (
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc as et_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc as ing_grpc,
)

from .server_process import ServerProcess
from .test_readme import free_port


def value(scraped: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` of a scrape (labels in any order)."""
    for line in scraped.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels}")


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def scrape_until(port: int, seen: str, seconds: float = 5.0) -> str:
    """A scrape that shows `seen` (the last one after `seconds`, for the assertions to say what it lacks)."""
    deadline = time.monotonic() + seconds
    while True:
        scraped = scrape(port)
        if seen in scraped or time.monotonic() > deadline:
            return scraped
        time.sleep(0.05)


def test_metrics_show_calls_events_and_the_writer(tmp_path):
    port = free_port()
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", "--metrics-listen", f"127.0.0.1:{port}").start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            ingest = ing_grpc.IngestServiceStub(channel)
            priced = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=5)})
            unpriced = pb.UsageEvent(category="custom.none", resource="nothing", units={"text": pb.UnitCounts(input=5)})
            ingest.IngestBatch(pb.IngestBatchRequest(events=[priced, priced, unpriced]))
            ingest.Ingest(pb.IngestRequest(event=priced))
            types = et_grpc.ExperienceTypeServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                types.GetExperienceType(et_pb.GetExperienceTypeRequest(name="None"))
        # A call is counted as it ends, just after its caller has the answer: scraped until it is.
        scraped = scrape_until(port, 'method="/tally.v1.ExperienceTypeService/GetExperienceType",code="NOT_FOUND"')
    finally:
        server.terminate()
    batch, unary = "/tally.v1.IngestService/IngestBatch", "/tally.v1.IngestService/Ingest"
    assert value(scraped, "tally_calls_total", method=batch, code="OK") == 1
    assert value(scraped, "tally_calls_total", method=unary, code="OK") == 1
    assert (
        value(
            scraped, "tally_calls_total", method="/tally.v1.ExperienceTypeService/GetExperienceType", code="NOT_FOUND"
        )
        == 1
    )
    assert value(scraped, "tally_call_seconds_count", method=batch) == 1
    assert value(scraped, "tally_events_ingested_total", cost_state="PRICED") == 3
    assert value(scraped, "tally_events_ingested_total", cost_state="UNPRICED") == 1
    assert value(scraped, "tally_writer_queued_events") == 0
    assert value(scraped, "tally_commit_events_count") >= 2 and value(scraped, "tally_commit_events_sum") == 4
    assert value(scraped, "tally_commit_seconds_count") >= 2
    assert value(scraped, "tally_database_errors_total") == 0


async def test_calls_are_logged_and_counted_with_the_code_their_caller_saw(tmp_path):
    """Calls whose deadline passed, calls and a stream the caller cancelled, and a call refused
    for load: each logged and counted with the code the caller received, not OK."""
    import asyncio
    import sqlite3

    from grpc import aio

    port = free_port()
    path = tmp_path / "codes.db"
    server = ServerProcess(
        f"sqlite+aiosqlite:///{path}", "--metrics-listen", f"127.0.0.1:{port}", "--max-calls", "8"
    ).start()
    unary = "/tally.v1.IngestService/Ingest"
    stream = "/tally.v1.IngestService/IngestStream"
    event = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=5)})
    try:
        async with aio.insecure_channel(server.target) as channel:
            ingest = ing_grpc.IngestServiceStub(channel)
            await ingest.Ingest(pb.IngestRequest(event=event))
            holder = sqlite3.connect(path, isolation_level=None)  # the writer waits on the file's lock
            holder.execute("BEGIN IMMEDIATE")
            try:
                late = [ingest.Ingest(pb.IngestRequest(event=event), timeout=0.5) for _ in range(3)]
                cancelled = [ingest.Ingest(pb.IngestRequest(event=event), timeout=30) for _ in range(2)]
                opened = ingest.IngestStream(timeout=30)
                await opened.write(pb.IngestStreamRequest(event=event))
                refused = [ingest.Ingest(pb.IngestRequest(event=event), timeout=30) for _ in range(10)]
                await asyncio.sleep(0.3)
                for call in (*cancelled, opened):
                    call.cancel()
                outcomes = await asyncio.gather(*late, *refused, return_exceptions=True)
                await asyncio.sleep(1)
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            codes = [o.code() for o in outcomes if isinstance(o, aio.AioRpcError)]
            assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 3, codes
            shed = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert shed >= 1, codes
        await asyncio.sleep(1)
        scraped = await asyncio.to_thread(scrape, port)
        log = "".join(server.log)
    finally:
        server.terminate()
    assert value(scraped, "tally_calls_total", method=unary, code="DEADLINE_EXCEEDED") == 3
    assert value(scraped, "tally_calls_total", method=unary, code="CANCELLED") == 2
    assert value(scraped, "tally_calls_total", method=stream, code="CANCELLED") == 1
    assert value(scraped, "tally_calls_total", method=unary, code="RESOURCE_EXHAUSTED") == shed
    assert log.count(f"method={unary} code=DEADLINE_EXCEEDED") == 3, log[-3000:]
    assert log.count(f"method={unary} code=CANCELLED") == 2
    assert log.count(f"method={stream} code=CANCELLED") == 1
    assert log.count(f"method={unary} code=RESOURCE_EXHAUSTED") == shed


def test_limit_gauges_show_spend_reservations_and_maximum(tmp_path):
    from tally.v1 import common_pb2, limit_service_pb2 as lim_pb, limit_service_pb2_grpc as lim_grpc

    port = free_port()
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'g.db'}", "--metrics-listen", f"127.0.0.1:{port}").start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            limits = lim_grpc.LimitServiceStub(channel)
            everything = lim_pb.LimitScope(everything=True)
            limit = lim_pb.Limit(name="all", max=common_pb2.Money(units=2), kind=1, period=4, scope=everything)
            limits.CreateLimit(lim_pb.CreateLimitRequest(limit=limit))
            priced = pb.UsageEvent(
                category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=1000)}
            )
            ing_grpc.IngestServiceStub(channel).Ingest(pb.IngestRequest(event=priced))
            cent = common_pb2.Money(nanos=10_000_000)
            limits.Reserve(lim_pb.ReserveRequest(estimate=lim_pb.CostEstimate(amount=cent)))
        deadline = time.monotonic() + 15
        while True:  # the gauges are read every 5 s
            scraped = scrape(port)
            if "tally_limit_spend_usd{" in scraped or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        server.terminate()
    assert value(scraped, "tally_limit_spend_usd", limit="all") == 0.0025
    assert value(scraped, "tally_limit_reserved_usd", limit="all") == 0.01
    assert value(scraped, "tally_limit_max_usd", limit="all") == 2


def test_spend_counters_sum_to_the_breakdown_and_group_snapshots_under_their_model(tmp_path):
    from tally.v1 import report_service_pb2 as rep_pb, report_service_pb2_grpc as rep_grpc

    port = free_port()
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 's.db'}", "--metrics-listen", f"127.0.0.1:{port}").start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            types = et_grpc.ExperienceTypeServiceStub(channel)
            types.CreateExperienceType(
                et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name="Spend", description="s"))
            )
            ingest = ing_grpc.IngestServiceStub(channel)
            events = []
            for n, model in enumerate(["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "no-such-model"] * 5):
                units = {"text": pb.UnitCounts(input=1000 + n, output=100)}
                events.append(pb.UsageEvent(category="system.openai", resource=model, units=units))
            ingest.IngestBatch(pb.IngestBatchRequest(events=events), metadata=(("xproxy-experience-name", "Spend"),))
            ingest.IngestBatch(pb.IngestBatchRequest(events=events[:4]))  # unattributed
            breakdown = rep_grpc.ReportServiceStub(channel).BreakDownCost(
                rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_EXPERIENCE_NAME])
            )
        scraped = scrape(port)
    finally:
        server.terminate()
    samples = [
        (dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(number))
        for labels, number in re.findall(r"^tally_spend_usd_total\{(.*)\} (\S+)$", scraped, re.M)
    ]
    total = breakdown.total.cost_total.units + breakdown.total.cost_total.nanos / 1e9
    assert round(sum(v for _, v in samples), 2) == round(total, 2) and total > 0
    models = {labels["model"] for labels, _ in samples}
    assert "gpt-4o" in models and "gpt-4o-2024-08-06" not in models, models  # one price entry priced both
    unpriced = [labels for labels, _ in samples if labels["cost_state"] == "UNPRICED"]
    assert unpriced and all(labels["model"] == "no-such-model" for labels in unpriced)
    counted = sum(float(n) for n in re.findall(r"^tally_spend_events_total\{.*\} (\S+)$", scraped, re.M))
    assert counted == 24


MONITORING = Path(__file__).resolve().parent.parent / "docs" / "monitoring"


def _exported_names(scraped: str) -> set[str]:
    names = set()
    for line in scraped.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(f"{name}_total")
            if kind == "histogram":
                names.update(f"{name}_{part}" for part in ("bucket", "sum", "count"))
    return names


def test_the_example_alerts_and_dashboard_use_only_exported_metrics(tmp_path):
    """The alert rules pass promtool (Debian's prometheus package; skipped without it, failed
    under CI=true), and every metric the rules and the Grafana dashboard query is one a
    server exports."""
    import json
    import shutil
    import subprocess

    from .conftest import IN_CI

    port = free_port()
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", "--metrics-listen", f"127.0.0.1:{port}").start()
    try:
        exported = _exported_names(scrape(port))
    finally:
        server.terminate()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = (MONITORING / "alerts.yml").read_text()
    used = set(re.findall(r"\btally_[a-z_]+", " ".join(queries) + rules))
    assert used and used <= exported, used - exported
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("CI=true: promtool is needed (Debian's prometheus package)")
        pytest.skip("promtool is not installed (Debian's prometheus package)")
    checked = subprocess.run(
        [promtool, "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0 and "SUCCESS: 3 rules found" in checked.stdout, checked.stdout + checked.stderr

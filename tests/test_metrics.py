"""The Prometheus endpoint (`--metrics-listen`), scraped over HTTP from a server process:
calls by method and code, latency histograms, events by cost state, the writer's queue,
commits and their sizes."""

from __future__ import annotations

import re
import urllib.request

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
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
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

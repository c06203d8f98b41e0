"""The dashboard's reads are bounded whatever names callers send, on both databases: 20,000
unpriced events with distinct model names make /api/spend answer the costliest groups and
"(all others)", not one series per name; the gRPC callers are served meanwhile; a query
parameter that is not a number is a 400, not a 500."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid

import aiohttp
import pytest
from grpc import aio

from tally.v1 import ingest_service_pb2 as pb
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.web.dashboard import MAX_API_REQUESTS, SPEND_GROUPS, UNPRICED_REASONS

from .conftest import drop_database_url, make_database_url, stubs_for

NAMES = 20_000


@pytest.fixture
async def dashboard_server(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, web_listen="127.0.0.1:0"))
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield stubs_for(channel, server, backend), f"http://127.0.0.1:{server.web_port}"
    finally:
        await server.stop()
        await drop_database_url(url)


async def test_spend_by_model_is_bounded_whatever_names_callers_send(dashboard_server):
    stubs, web = dashboard_server
    priced = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=1000)})
    await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=[priced] * 3))
    run = uuid.uuid4().hex[:6]
    for first in range(0, NAMES, 1000):
        batch = [
            pb.UsageEvent(category="custom.misspelt", resource=f"gtp-{run}-{n}", units={"text": pb.UnitCounts(input=1)})
            for n in range(first, first + 1000)
        ]
        answer = await stubs.ingest.IngestBatch(pb.IngestBatchRequest(events=batch), timeout=120)
        assert answer.accepted_count == 1000
    async with aiohttp.ClientSession() as http:

        async def spend() -> tuple[int, bytes]:
            async with http.get(f"{web}/api/spend?by=model&days=30") as response:
                return response.status, await response.read()

        status, body = await spend()
        assert status == 200
        data = json.loads(body)
        names = {g["model"] for g in data["groups"]}
        assert len(names) <= SPEND_GROUPS and "gpt-4o" in names, sorted(names)[:5]
        assert data["other_groups"] is True
        events = sum(g["events"] for g in data["groups"]) + sum(g["events"] for g in data["other"])
        assert events == data["total"]["events"] >= NAMES + 3
        assert len(body) < 20_000, f"{len(body):,} bytes"
        async with http.get(f"{web}/api/unpriced?days=30") as response:
            unpriced = await response.json()
        assert len(unpriced["reasons"]) <= UNPRICED_REASONS and unpriced["other_reasons"] > 0, unpriced
        assert unpriced["events"] == NAMES

        # gRPC callers meanwhile: 8 dashboards reading at once, one caller ingesting.
        latencies: list[float] = []
        codes: dict[int, int] = {}

        async def reads() -> None:
            for _ in range(3):
                outcomes = await asyncio.gather(*(spend() for _ in range(2 * MAX_API_REQUESTS)))
                for code, _ in outcomes:
                    codes[code] = codes.get(code, 0) + 1

        async def ingest() -> None:
            while not reader.done():
                began = time.perf_counter()
                await stubs.ingest.Ingest(pb.IngestRequest(event=priced), timeout=10)
                latencies.append((time.perf_counter() - began) * 1000)
                await asyncio.sleep(0.01)

        reader = asyncio.ensure_future(reads())
        await asyncio.gather(reader, ingest())
        assert set(codes) <= {200, 429}, codes
        print(
            f"\n{stubs.backend}: /api/spend over {NAMES:,} names: {len(body):,} bytes; under {2 * MAX_API_REQUESTS} "
            f"reads at once {codes}, gRPC Ingest p50 {statistics.median(latencies):.1f} ms, "
            f"max {max(latencies):.1f} ms ({len(latencies)} calls)"
        )


async def test_a_query_parameter_that_is_not_a_number_is_a_400(dashboard_server):
    _, web = dashboard_server
    async with aiohttp.ClientSession() as http:
        for path in ("/api/runs?limit=abc", "/api/runs?limit=0", "/api/spend?days=-1", "/api/unpriced?days=1e9"):
            async with http.get(web + path) as response:
                assert response.status == 400, (path, response.status)
                assert "whole number" in await response.text()

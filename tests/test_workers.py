"""`tally serve --workers 2`: two processes on one port, on both engines. Calls reach both,
every acknowledged event is stored once, a killed worker is restarted, SIGTERM drains
them all, and one /metrics endpoint counts every worker's events."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid

import grpc
import pytest

from tally.v1 import (
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc,
)
from tally_server.workers import RESTART_DELAY_SECONDS

from .conftest import drop_database_url, make_database_url, unique
from .server_process import ServerProcess
from .test_metrics import scrape
from .test_readme import free_port

PIDS = re.compile(r"with 2 workers \(pids (\d+), (\d+)\)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ingest_on_new_connections(target: str, name: str, connections: int, per_connection: int) -> set[str]:
    """Each connection is a new TCP connection: the kernel spreads them over the workers.
    (Each channel with a subchannel pool of its own: from gRPC's global pool, a channel
    opened as the last one closes may take over its connection, and with it its worker:
    once in CI, all 16 reached one worker.)"""
    keys = set()
    for _ in range(connections):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
            events = []
            for _ in range(per_connection):
                key = f"w-{uuid.uuid4()}"
                keys.add(key)
                events.append(
                    pb.UsageEvent(
                        category="system.openai",
                        resource="gpt-4o",
                        units={"text": pb.UnitCounts(input=100, output=10)},
                        idempotency_key=key,
                        context=pb.EventContext(experience_name=name),
                    )
                )
            response = stub.IngestBatch(pb.IngestBatchRequest(events=events), timeout=30, wait_for_ready=True)
            assert response.accepted_count == per_connection
    return keys


def event_count(target: str, name: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stats = experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel).GetExperienceTypeStats(
            et_pb.GetExperienceTypeStatsRequest(name=name), timeout=30
        )
    return stats.total.event_count


def scraped_sum(port: int, name: str, experience_type: str) -> float:
    """The sum of a spend counter's samples for one experience type, over its other labels."""
    total = 0.0
    for line in scrape(port).splitlines():
        if line.startswith(name + "{") and f'experience_type="{experience_type}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# The README's bound on how long a dead worker's place stays empty.
RESTART_BOUND_SECONDS = 10


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_two_workers_share_the_port_restart_and_drain(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    metrics_port = free_port()
    server = ServerProcess(url, "--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}").start()
    try:
        pids = [int(pid) for pid in PIDS.search("".join(server.lines)).groups()]
        name = unique("Workers")
        with grpc.insecure_channel(server.target) as channel:
            experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel).CreateExperienceType(
                et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="w"))
            )
        keys = ingest_on_new_connections(server.target, name, connections=16, per_connection=25)
        assert event_count(server.target, name) == len(keys) == 400
        # Both workers answered calls (each names itself in its log lines).
        log = "".join(server.log)
        assert "worker-1 tally.rpc" in log and "worker-2 tally.rpc" in log, log[-2000:]
        # One scrape, served by the parent, counts both workers' events.
        assert scraped_sum(metrics_port, "tally_spend_events_total", name) == 400

        # A worker killed as in a crash is replaced (README: the parent waits a second, then
        # starts a new one, serving within RESTART_BOUND_SECONDS); the other serves meanwhile.
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        deadline = time.monotonic() + 30
        while alive(pids[0]):  # until the supervisor reaps it: its socket has left the port's group
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        keys |= ingest_on_new_connections(server.target, name, connections=4, per_connection=25)
        deadline = time.monotonic() + 30
        while "tally worker 1 ready" not in "".join(server.log):
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            await asyncio.sleep(0.05)
        replaced = time.monotonic() - killed
        print(f"\na killed worker served again {replaced:.2f} s after its death")
        assert RESTART_DELAY_SECONDS <= replaced < RESTART_BOUND_SECONDS, replaced
        keys |= ingest_on_new_connections(server.target, name, connections=8, per_connection=25)
        assert event_count(server.target, name) == len(keys) == 700
        # The killed worker's counts stay counted beside its successor's.
        assert scraped_sum(metrics_port, "tally_spend_events_total", name) == 700
        spend = scraped_sum(metrics_port, "tally_spend_usd_total", name)
        assert spend == pytest.approx(700 * (100 * 2.5 + 10 * 10) / 1e6), spend

        # SIGTERM drains every worker and the parent exits 0.
        assert server.terminate() == 0
        assert not alive(pids[1])
        assert "tally stopped: 2 workers" in "".join(server.log)
    finally:
        server.kill()
        await drop_database_url(url)

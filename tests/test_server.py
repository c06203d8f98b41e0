"""The server as a whole: reflection, health, the error edge, shutdown, binding."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tally.v1 import experience_service_pb2 as exp_pb, experience_type_service_pb2 as pb
from tally_server.app import TallyServer
from tally_server.config import Settings
from tally_server.services.experience_types import ExperienceTypes

from .conftest import unique
from .helpers import decode


async def test_reflection_lists_every_service(stubs):
    stub = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {service.name for service in response.list_services_response.service}
        break
    assert {
        "tally.v1.ExperienceTypeService",
        "tally.v1.ExperienceService",
        "tally.v1.IngestService",
        "tally.v1.PriceCatalogService",
        "grpc.health.v1.Health",
    } <= names


async def test_health_reports_serving(stubs):
    stub = health_pb2_grpc.HealthStub(stubs.channel)
    for service in ("", "tally.v1.IngestService", "tally.v1.ExperienceTypeService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_call_gets_its_own_request_id_and_a_log_line(stubs, caplog):
    """The request id is the server's own; a caller's x-request-id is logged beside it, never instead."""
    caplog.set_level(logging.INFO, logger="tally.rpc")
    forged = "245e25841bd7-1"  # shaped like a server's id: it must not become this call's
    call = stubs.types.GetExperienceType(
        pb.GetExperienceTypeRequest(name=unique()), metadata=(("x-request-id", forged),)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    returned = dict(await call.trailing_metadata())["x-request-id"]
    assert returned and returned != forged

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if forged in r.getMessage()]

    # The line is written as the call ends, which the caller may see first (the server runs
    # in this process): wait for it, up to a second.
    for _ in range(100):
        if logged():
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # and a moment more, for a second line that must not come
    lines = logged()
    assert len(lines) == 1, lines
    assert "method=/tally.v1.ExperienceTypeService/GetExperienceType code=NOT_FOUND" in lines[0]
    assert f"request_id={returned} " in lines[0] and f"caller_request_id='{forged}'" in lines[0]
    assert "duration_ms=" in lines[0]


async def test_an_internal_error_reaches_the_caller_without_its_text(stubs, monkeypatch, caplog):
    async def broken(self, name):
        raise RuntimeError("secret database password in a stack trace")

    monkeypatch.setattr(ExperienceTypes, "get", broken)
    caplog.set_level(logging.ERROR, logger="tally.rpc")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.types.GetExperienceType(pb.GetExperienceTypeRequest(name="anything"))
    error = decode(caught.value)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "INTERNAL"
    assert "secret" not in error.message and "RuntimeError" not in error.message
    assert "request id" in error.message
    request_id = error.message.rsplit(" ", 1)[-1]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "secret database password" in str(logged[0].exc_info[1]), "the details are logged"


@pytest.fixture
async def own_server(tmp_path):
    server = TallyServer(
        Settings(listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{tmp_path / 'own.db'}", grace_seconds=5)
    )
    await server.start()
    yield server
    await server.stop(0)


async def test_graceful_shutdown_lets_an_in_flight_call_finish(own_server, monkeypatch):
    entered = asyncio.Event()
    original = ExperienceTypes.get

    async def slow(self, name):
        entered.set()
        await asyncio.sleep(0.5)
        return await original(self, name)

    async with aio.insecure_channel(f"127.0.0.1:{own_server.port}") as channel:
        from tally.v1 import experience_type_service_pb2_grpc

        types = experience_type_service_pb2_grpc.ExperienceTypeServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        name = unique()
        await types.CreateExperienceType(
            pb.CreateExperienceTypeRequest(experience_type=pb.ExperienceType(name=name, description="d"))
        )
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        monkeypatch.setattr(ExperienceTypes, "get", slow)
        in_flight = asyncio.ensure_future(types.GetExperienceType(pb.GetExperienceTypeRequest(name=name)))
        await entered.wait()
        stopping = asyncio.create_task(own_server.stop(grace=5))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        response = await in_flight
        assert response.experience_type.name == name
        await stopping
    own_server.server = None  # already stopped


async def test_a_second_server_on_a_taken_port_fails_loudly(stubs, tmp_path):
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "tally_server",
            "--listen",
            stubs.target,
            "--database-url",
            f"sqlite+aiosqlite:///{tmp_path / 'second.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"cannot listen on {stubs.target}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_unknown_method_is_unimplemented(stubs):
    call = stubs.channel.unary_unary("/tally.v1.ExperienceService/NoSuchMethod")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_malformed_experience_id_is_invalid_argument(stubs):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.experiences.GetExperience(exp_pb.GetExperienceRequest(experience_id="nope"))
    assert decode(caught.value).fields == {"experience_id": "not a UUID: 'nope'"}


async def test_calls_cancelled_mid_transaction_leave_no_connection_dirty(backend, tmp_path):
    """Bursts of reads cancelled by 1-5 ms deadlines, each followed by a write: every write
    succeeds (a read cancelled as its BEGIN ran once left a pooled SQLite connection inside
    a transaction, and the next write on it was refused UNAVAILABLE)."""
    import asyncio
    import uuid

    import grpc
    from grpc import aio

    from tally.v1 import experience_type_service_pb2 as et_pb, experience_type_service_pb2_grpc as et_grpc

    from .conftest import drop_database_url, make_database_url

    url = await make_database_url(backend, tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1))
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            types = et_grpc.ExperienceTypeServiceStub(channel)
            for _ in range(30):
                reads = [
                    types.ListExperienceTypes(et_pb.ListExperienceTypesRequest(), timeout=0.001 * (n % 5 + 1))
                    for n in range(20)
                ]
                outcomes = await asyncio.gather(*reads, return_exceptions=True)
                codes = {o.code() for o in outcomes if isinstance(o, grpc.RpcError)}
                assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
                new = et_pb.ExperienceType(name=f"T_{uuid.uuid4().hex[:8]}", description="after a burst")
                await types.CreateExperienceType(et_pb.CreateExperienceTypeRequest(experience_type=new), timeout=10)
    finally:
        await server.stop()
        await drop_database_url(url)

"""A revoked key stops working on streams already open: revoked through one replica, a
stream open on another is ended with UNAUTHENTICATED within the documented 10 s, whether it
goes on sending or sits idle. What it sent before is answered and stored; nothing after."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from grpc import aio

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc as exp_grpc,
    experience_type_service_pb2 as types_pb,
    experience_type_service_pb2_grpc as types_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc as ing_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import drop_database_url, make_database_url, unique
from .helpers import decode
from .test_load_shedding import event

REVOCATION_BOUND_SECONDS = 10  # docs/guarantees.md, "Who may call what"


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def active_stream(stub, metadata, acknowledged: list[int], revoked: asyncio.Event) -> tuple[float, str, str]:
    """Sends an event every 0.2 s and reads its answer, until the call ends; returns the
    seconds from the revocation to the end, and the end's code and reason."""
    call = stub.IngestStream(metadata=metadata, timeout=60)
    n = 0
    try:
        while True:
            await call.write(pb.IngestStreamRequest(event=event(n)))
            answer = await call.read()
            assert answer is not aio.EOF and answer.HasField("result"), answer
            acknowledged.append(n)
            n += 1
            await asyncio.sleep(0.2)
    except aio.AioRpcError as error:
        return revoked_for(revoked), error.code().name, decode(error).reason


async def idle_stream(stub, metadata, revoked: asyncio.Event) -> tuple[float, str, str]:
    """Sends one event, reads its answer, then waits without sending."""
    call = stub.IngestStream(metadata=metadata, timeout=60)
    await call.write(pb.IngestStreamRequest(event=event()))
    assert (await call.read()).HasField("result")
    try:
        answer = await call.read()
        raise AssertionError(f"the idle stream was answered {answer}")
    except aio.AioRpcError as error:
        return revoked_for(revoked), error.code().name, decode(error).reason


_REVOKED_AT: dict[int, float] = {}


def revoked_for(revoked: asyncio.Event) -> float:
    assert revoked.is_set(), "the stream ended before the key was revoked"
    return time.monotonic() - _REVOKED_AT[id(revoked)]


async def test_a_revoked_key_ends_open_streams_on_another_replica(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)
    replicas = [
        TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required"))
        for _ in range(2)
    ]
    try:
        for replica in replicas:
            await replica.start()
        first, second = replicas
        _, admin = await first.keys.create("admin", ["admin"])
        _, ingest = await first.keys.create("streamer", ["ingest"])
        name = unique("Revoked")
        async with aio.insecure_channel(f"127.0.0.1:{first.port}") as admin_channel:
            await types_grpc.ExperienceTypeServiceStub(admin_channel).CreateExperienceType(
                types_pb.CreateExperienceTypeRequest(
                    experience_type=types_pb.ExperienceType(name=name, description="r")
                ),
                metadata=bearer(admin),
            )
            experience_id = str(uuid.uuid4())
            context = (("xproxy-experience-id", experience_id), ("xproxy-experience-name", name))
            async with aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
                stub = ing_grpc.IngestServiceStub(channel)
                revoked = asyncio.Event()
                acknowledged: list[int] = []
                streams = asyncio.gather(
                    active_stream(stub, (*context, *bearer(ingest)), acknowledged, revoked),
                    idle_stream(stub, (*context, *bearer(ingest)), revoked),
                )
                await asyncio.sleep(3)  # both open and checked at least once
                await first.keys.revoke("streamer")  # through the other replica
                _REVOKED_AT[id(revoked)] = time.monotonic()
                revoked.set()
                (active_after, active_code, active_reason), (idle_after, idle_code, idle_reason) = await streams
            print(
                f"\n{backend}: after the revocation the sending stream ended in {active_after:.1f} s, "
                f"the idle one in {idle_after:.1f} s"
            )
            assert (active_code, active_reason) == ("UNAUTHENTICATED", "API_KEY_INVALID")
            assert (idle_code, idle_reason) == ("UNAUTHENTICATED", "API_KEY_INVALID")
            assert active_after < REVOCATION_BOUND_SECONDS and idle_after < REVOCATION_BOUND_SECONDS
            # New calls with the key are refused at once on either replica.
            with_key = ing_grpc.IngestServiceStub(admin_channel)
            with pytest.raises(aio.AioRpcError) as refused:
                await with_key.Ingest(pb.IngestRequest(event=event()), metadata=bearer(ingest), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Everything acknowledged is stored, and nothing else: the idle stream's one
            # event and the active stream's acknowledged ones.
            got = await exp_grpc.ExperienceServiceStub(admin_channel).GetExperience(
                exp_pb.GetExperienceRequest(experience_id=experience_id), metadata=bearer(admin)
            )
        assert acknowledged, "the active stream was served before the revocation"
        assert got.experience.stats.event_count == len(acknowledged) + 1
    finally:
        for replica in replicas:
            await replica.stop()
        await drop_database_url(url)

"""Calls cancelled mid-statement on PostgreSQL (deadlines of a few milliseconds) never leave
a connection that the next call meets half-way through an operation: no call after them,
nor any of them, answers INTERNAL. Before, asyncpg's "cannot switch to state 12; another
operation (2) is in progress" reached a caller as INTERNAL."""

from __future__ import annotations

import asyncio
import random

import grpc
from asyncpg import exceptions as asyncpg_exceptions
from grpc import aio

from tally.v1 import (
    experience_service_pb2 as exp_pb,
    experience_service_pb2_grpc as exp_grpc,
    experience_type_service_pb2 as types_pb,
    experience_type_service_pb2_grpc as types_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc as ing_grpc,
    limit_service_pb2 as lim_pb,
    limit_service_pb2_grpc as lim_grpc,
)
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import drop_database_url, make_database_url
from .helpers import decode

# What a call cut short by its deadline, or by a database the burst keeps busy, may answer.
EXPECTED_UNDER_BURST = {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}


async def test_calls_cancelled_mid_statement_never_answer_internal(tmp_path):
    url = await make_database_url("postgresql", tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, database_connections=4))
    await server.start()
    random.seed(25)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            type_stub = types_grpc.ExperienceTypeServiceStub(channel)
            experiences = exp_grpc.ExperienceServiceStub(channel)
            ingest = ing_grpc.IngestServiceStub(channel)
            limits = lim_grpc.LimitServiceStub(channel)
            name = "Cancelled"
            await type_stub.CreateExperienceType(
                types_pb.CreateExperienceTypeRequest(
                    experience_type=types_pb.ExperienceType(name=name, description="cut short")
                )
            )
            scope = lim_pb.LimitScope(experience_type=name)
            await limits.CreateLimit(
                lim_pb.CreateLimitRequest(
                    limit=lim_pb.Limit(name="cap", max={"units": 100}, kind=1, period=2, scope=scope)
                )
            )
            meta = (("xproxy-experience-name", name),)

            def call(timeout: float | None):
                choice = random.randrange(4)
                if choice == 0:
                    return experiences.CreateExperience(
                        exp_pb.CreateExperienceRequest(experience_name=name), timeout=timeout
                    )
                if choice == 1:
                    estimate = lim_pb.CostEstimate(amount={"nanos": 1000})
                    return limits.Reserve(lim_pb.ReserveRequest(estimate=estimate), metadata=meta, timeout=timeout)
                if choice == 2:
                    return experiences.ListExperiences(
                        exp_pb.ListExperiencesRequest(experience_name=name), timeout=timeout
                    )
                event = pb.UsageEvent(category="custom.x", resource="m", units={"text": pb.UnitCounts(input=1)})
                return ingest.Ingest(pb.IngestRequest(event=event), metadata=meta, timeout=timeout)

            seen: dict[grpc.StatusCode, int] = {}
            for _ in range(25):
                burst = [call(random.uniform(0.002, 0.08)) for _ in range(40)]
                for outcome in await asyncio.gather(*burst, return_exceptions=True):
                    code = outcome.code() if isinstance(outcome, aio.AioRpcError) else grpc.StatusCode.OK
                    seen[code] = seen.get(code, 0) + 1
                    assert code in EXPECTED_UNDER_BURST, f"{code}: {outcome}"
                # Then every call with time enough succeeds, on whatever connection the pool hands it.
                for outcome in await asyncio.gather(*(call(None) for _ in range(8)), return_exceptions=True):
                    assert not isinstance(outcome, BaseException), outcome
            assert seen.get(grpc.StatusCode.DEADLINE_EXCEEDED, 0) > 100, seen
            print(f"\ncancelled-call bursts: {seen}")
    finally:
        await server.stop()
        await drop_database_url(url)


class MidOperation:
    """An asyncpg connection whose protocol is left mid-operation: each statement raises."""

    def __init__(self, real: object) -> None:
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    async def prepare(self, *args: object, **kwargs: object) -> None:
        raise asyncpg_exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress")

    fetchrow = execute = executemany = prepare


async def test_a_connection_left_mid_operation_is_discarded_and_the_call_is_unavailable(tmp_path):
    """The state asyncpg reported in issue 25, forced on the one pooled connection: every
    operation on it raises InternalClientError, as a connection whose protocol is left
    mid-operation does. The call that meets it answers UNAVAILABLE with RetryInfo, and it is
    never handed out again: every later call succeeds on a new connection."""
    url = await make_database_url("postgresql", tmp_path)
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, database_connections=1))
    await server.start()
    try:
        async with server.db.engine.connect() as conn:  # the pool's only connection
            adapter = (await conn.get_raw_connection()).dbapi_connection
            real = adapter._connection
            adapter._connection = MidOperation(real)
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            types = types_grpc.ExperienceTypeServiceStub(channel)
            answers = []
            for _ in range(5):
                try:
                    await types.ListExperienceTypes(types_pb.ListExperienceTypesRequest(), timeout=10)
                    answers.append((grpc.StatusCode.OK, None))
                except aio.AioRpcError as error:
                    answers.append((error.code(), decode(error).retry_delay_seconds))
            refused = [answer for answer in answers if answer[0] != grpc.StatusCode.OK]
            # Met at checkout (the pool's ping), it is replaced unseen; met by a statement, one call is refused.
            assert all(code == grpc.StatusCode.UNAVAILABLE and retry for code, retry in refused), answers
            assert len(refused) <= 1 and answers[-4:] == [(grpc.StatusCode.OK, None)] * 4, answers
        assert real.is_closed(), "the broken connection was closed, not pooled again"
    finally:
        await server.stop()
        await drop_database_url(url)

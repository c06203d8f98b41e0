"""Two replicas racing on one idempotency key leave no empty experience: name-only events
sharing a key, sent to two servers of one database at once, end with exactly one
experience per key, each holding its event."""

from __future__ import annotations

import asyncio
import uuid

import sqlalchemy as sa
from grpc import aio

from tally.v1 import experience_type_service_pb2 as et_pb, ingest_service_pb2 as pb, ingest_service_pb2_grpc as ing_grpc
from tally_server.app import TallyServer
from tally_server.config import Settings

from .conftest import unique


async def test_racing_replicas_leave_no_empty_experience(stubs):
    name = unique("Raced")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="raced"))
    )
    replica = TallyServer(Settings(listen="127.0.0.1:0", database_url=stubs.server.settings.database_url))
    await replica.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{replica.port}") as other:
            one, two = stubs.ingest, ing_grpc.IngestServiceStub(other)
            metadata = (("xproxy-experience-name", name),)
            calls = []
            for n in range(60):
                event = pb.UsageEvent(
                    category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=n + 1)},
                    idempotency_key=f"race-{uuid.uuid4()}",
                )  # fmt: skip
                calls += [one.Ingest(pb.IngestRequest(event=event), metadata=metadata)]
                calls += [two.Ingest(pb.IngestRequest(event=event), metadata=metadata)]
            answers = await asyncio.gather(*calls)
        assert sum(a.xproxy_result.duplicate_request for a in answers) == 60, "one of each pair stored"
        async with stubs.server.db.read() as conn:
            query = sa.text(
                "SELECT count(*), count(DISTINCT e.id), sum(CASE WHEN ev.id IS NULL THEN 1 ELSE 0 END) "
                "FROM experiences e JOIN experience_types t ON t.id = e.type_id "
                "LEFT JOIN events ev ON ev.experience_id = e.id WHERE t.name = :name"
            )
            total, distinct, empty = (await conn.execute(query, {"name": name})).one()
        assert (distinct, empty) == (60, 0), f"{distinct} experiences, {empty} of them empty"
        assert total == 60
    finally:
        await replica.stop()

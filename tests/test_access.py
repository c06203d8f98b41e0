"""API keys and scopes, through the wire on both databases, against a server with
`--auth required`: every RPC of the contract is called without a key, with an unknown
key, with a revoked key and with a key of each scope, and answers as the README's scope
table says. A new RPC is walked as soon as it is in the contract; without a scope in its
proto the server does not start, and without a row in the README this test fails."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import subprocess
import time
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import message_factory, timestamp_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tally.v1 import (
    api_key_service_pb2 as key_pb,
    api_key_service_pb2_grpc as key_grpc,
    ingest_service_pb2 as ing_pb,
    ingest_service_pb2_grpc as ing_grpc,
    price_catalog_service_pb2 as price_pb,
    price_catalog_service_pb2_grpc as price_grpc,
)
from tally_server.app import REQUIRED_SCOPES, SERVICES, TallyServer
from tally_server.config import Settings
from tally_server.domain import keys as domain_keys
from tally_server.rpc import convert

from .conftest import drop_database_url, make_database_url
from .helpers import decode, raises
from .readme import BIN, ROOT

SCOPES = ("ingest", "read", "admin")
OTLP_TRACES = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"]


def readme_scope_table() -> dict[str, str]:
    """'/tally.v1.Service/Method' -> scope, from the README's table of RPCs and scopes."""
    text = (ROOT / "README.md").read_text()
    table: dict[str, str] = {}
    for cell, scope in re.findall(r"^\| (`[A-Za-z.0-9]+Service/.+`) \| (ingest|read|admin) \|$", text, re.M):
        service = ""
        for name in re.findall(r"`([^`]+)`", cell):
            if "/" in name:
                service, name = name.split("/")
            package = "" if "." in service else "tally.v1."  # OTLP's service is named in full
            table[f"/{package}{service}/{name}"] = scope
    return table


def test_the_readme_states_the_scope_of_every_rpc_as_the_contract_does():
    assert readme_scope_table() == REQUIRED_SCOPES


def test_the_scope_names_are_the_same_everywhere():
    from tally_server import cli

    assert domain_keys.SCOPES == SCOPES == cli.SCOPES == tuple(convert.SCOPE_NAMES.values())


@dataclass
class Secured:
    server: TallyServer
    target: str
    secrets: dict[str, str]  # key name -> secret: one key per scope, "revoked" and "unknown"


@pytest.fixture(scope="module")
async def secured(backend, tmp_path_factory):
    url = await make_database_url(backend, tmp_path_factory.mktemp(f"secured-{backend}"))
    server = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required"))
    await server.start()
    secrets = {}
    for scope in SCOPES:
        _, secrets[scope] = await server.keys.create(scope, [scope])
    _, secrets["revoked"] = await server.keys.create("revoked", ["admin"])
    await server.keys.revoke("revoked")
    secrets["unknown"] = domain_keys.new_secret()
    yield Secured(server, f"127.0.0.1:{server.port}", secrets)
    await server.stop()
    await drop_database_url(url)


def _call(channel: aio.Channel, path: str, metadata: tuple[tuple[str, str], ...]):
    """Calls the RPC at `path` with an empty request (an empty stream for a streaming one)."""
    service_name, method_name = path.strip("/").split("/")
    service = next(s for s in (*SERVICES, OTLP_TRACES) if s.full_name == service_name)
    method = service.methods_by_name[method_name]
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    kwargs = {"request_serializer": request.SerializeToString, "response_deserializer": response.FromString}
    if method.client_streaming:

        async def consume():
            async for _ in channel.stream_stream(path, **kwargs)(iter(()), metadata=metadata, timeout=10):
                pass

        return consume()
    if method.server_streaming:  # a watch: admitted, it answers its first change or waits for one

        async def first():
            async for _ in channel.unary_stream(path, **kwargs)(request(), metadata=metadata, timeout=1):
                return

        return first()
    return channel.unary_unary(path, **kwargs)(request(), metadata=metadata, timeout=10)


async def outcome(channel: aio.Channel, path: str, metadata: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(code name, ErrorInfo reason) of the call; ("OK", "") when it succeeded."""
    try:
        await _call(channel, path, metadata)
    except aio.AioRpcError as error:
        return error.code().name, decode(error).reason
    return "OK", ""


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def test_every_rpc_refuses_a_call_without_a_valid_key(secured):
    async with aio.insecure_channel(secured.target) as channel:
        for path in REQUIRED_SCOPES:
            assert await outcome(channel, path, ()) == ("UNAUTHENTICATED", "API_KEY_MISSING"), path
            for name in ("unknown", "revoked"):
                got = await outcome(channel, path, bearer(secured.secrets[name]))
                assert got == ("UNAUTHENTICATED", "API_KEY_INVALID"), (path, name, got)
            wrong_scheme = (("authorization", f"Basic {secured.secrets['admin']}"),)
            assert (await outcome(channel, path, wrong_scheme))[0] == "UNAUTHENTICATED", path


async def test_every_rpc_answers_each_scope_as_the_table_says(secured):
    async with aio.insecure_channel(secured.target) as channel:
        for path, needed in REQUIRED_SCOPES.items():
            for scope in SCOPES:
                code, reason = await outcome(channel, path, bearer(secured.secrets[scope]))
                if scope in (needed, "admin"):
                    # Admitted: what follows is the RPC's own answer to an empty request.
                    assert code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"), (path, scope, code, reason)
                else:
                    assert (code, reason) == ("PERMISSION_DENIED", "SCOPE_MISSING"), (path, scope, code, reason)


async def test_pay_i_header_carries_a_key_too(secured):
    async with aio.insecure_channel(secured.target) as channel:
        read = "/tally.v1.ExperienceTypeService/ListExperienceTypes"
        assert await outcome(channel, read, (("xproxy-api-key", secured.secrets["read"]),)) == ("OK", "")
        assert (await outcome(channel, read, (("xproxy-api-key", secured.secrets["ingest"]),)))[0] == (
            "PERMISSION_DENIED"
        )


async def test_health_stays_open_and_reflection_needs_a_valid_key(secured):
    async with aio.insecure_channel(secured.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING

    def listed(*headers: str) -> subprocess.CompletedProcess[str]:
        command = [str(BIN / "grpcurl"), "-plaintext", *headers, secured.target, "list"]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    refused = await asyncio.to_thread(listed)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr
    allowed = await asyncio.to_thread(listed, "-H", f"authorization: Bearer {secured.secrets['read']}")
    assert allowed.returncode == 0 and "tally.v1.IngestService" in allowed.stdout, allowed.stderr


async def test_keys_over_grpc_and_a_revoked_key_stops_on_every_replica_within_ten_seconds(secured):
    url = secured.server.db.url.render_as_string(hide_password=False)
    other = TallyServer(Settings(listen="127.0.0.1:0", database_url=url, grace_seconds=1, auth="required"))
    await other.start()
    try:
        async with aio.insecure_channel(secured.target) as one, aio.insecure_channel(f"127.0.0.1:{other.port}") as two:
            admin = key_grpc.ApiKeyServiceStub(one)
            created = await admin.CreateApiKey(
                key_pb.CreateApiKeyRequest(api_key=key_pb.ApiKey(name="replicated", scopes=[2])),
                metadata=bearer(secured.secrets["admin"]),
            )
            assert created.secret.startswith("tally_") and list(created.api_key.scopes) == [2]
            read = "/tally.v1.ExperienceTypeService/ListExperienceTypes"
            assert await outcome(two, read, bearer(created.secret)) == ("OK", "")  # cached on replica two
            listed = await admin.ListApiKeys(key_pb.ListApiKeysRequest(), metadata=bearer(secured.secrets["admin"]))
            replicated = next(k for k in listed.api_keys if k.name == "replicated")
            assert replicated.HasField("last_use_time") and not replicated.HasField("revoke_time")
            await admin.RevokeApiKey(
                key_pb.RevokeApiKeyRequest(name="replicated"), metadata=bearer(secured.secrets["admin"])
            )
            assert (await outcome(one, read, bearer(created.secret)))[0] == "UNAUTHENTICATED", "at once on its replica"
            revoked_at = time.monotonic()
            while (await outcome(two, read, bearer(created.secret)))[0] != "UNAUTHENTICATED":
                assert time.monotonic() - revoked_at < 10, "replica two still takes the revoked key after 10 s"
                await asyncio.sleep(0.25)
    finally:
        await other.stop()


async def test_custom_prices_are_governed(secured):
    """Admin only, recorded with their key, a warning for a system override, and a mistaken
    price undone by ending it: new events are priced as before it, stored ones keep their cost."""

    def at(year: int) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=int(datetime.datetime(year, 1, 1, tzinfo=datetime.UTC).timestamp()))

    def price(effective_year: int, input_per_million: str) -> price_pb.CreateCustomPriceRequest:
        return price_pb.CreateCustomPriceRequest(
            price=price_pb.CustomPrice(
                category="system.openai",
                resource="gpt-4o",
                effective_time=at(effective_year),
                unit_prices={"text": price_pb.UnitPrice(input_per_million=input_per_million)},
            )
        )

    admin, ingest_key = bearer(secured.secrets["admin"]), bearer(secured.secrets["ingest"])
    async with aio.insecure_channel(secured.target) as channel:
        prices, ingest = price_grpc.PriceCatalogServiceStub(channel), ing_grpc.IngestServiceStub(channel)
        quote = price_pb.QuotePriceRequest(
            category="system.openai", resource="gpt-4o", units={"text": ing_pb.UnitCounts(input=1_000_000)}
        )

        async def dollars_now() -> int:
            return (await prices.QuotePrice(quote, metadata=admin)).xproxy_result.cost_total.units

        assert await dollars_now() == 2, "gpt-4o input: $2.50 per million by genai-prices"
        async with raises(grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"):
            await prices.CreateCustomPrice(price(2020, "1"), metadata=ingest_key)
        good = await prices.CreateCustomPrice(price(2020, "1"), metadata=admin)
        assert good.price.create_key == "admin"
        assert len(good.warnings) == 1 and "overrides the system price of system.openai/gpt-4o" in good.warnings[0]
        mistaken = await prices.CreateCustomPrice(price(2021, "0"), metadata=admin)
        assert await dollars_now() == 0, "the mistaken price makes gpt-4o free"
        event = ing_pb.UsageEvent(
            category="system.openai",
            resource="gpt-4o",
            units={"text": ing_pb.UnitCounts(input=1_000_000)},
            idempotency_key="during-the-mistake",
        )
        stored = await ingest.Ingest(ing_pb.IngestRequest(event=event), metadata=ingest_key)
        assert stored.xproxy_result.cost_total.units == 0

        async with raises(grpc.StatusCode.INVALID_ARGUMENT):
            await prices.EndCustomPrice(
                price_pb.EndCustomPriceRequest(price_id=mistaken.price.price_id, end_time=at(2020)), metadata=admin
            )
        void = price_pb.EndCustomPriceRequest(price_id=mistaken.price.price_id, end_time=mistaken.price.effective_time)
        ended = await prices.EndCustomPrice(void, metadata=admin)
        assert ended.price.end_key == "admin" and ended.price.end_time == mistaken.price.effective_time
        assert await dollars_now() == 1, "voided: the price before it applies again"
        async with raises(grpc.StatusCode.FAILED_PRECONDITION, "PRICE_ALREADY_ENDED"):
            await prices.EndCustomPrice(void, metadata=admin)
        again = await ingest.Ingest(ing_pb.IngestRequest(event=event), metadata=ingest_key)
        assert again.xproxy_result.duplicate_request and again.xproxy_result.cost_total.units == 0, "never repriced"

        await prices.EndCustomPrice(price_pb.EndCustomPriceRequest(price_id=good.price.price_id), metadata=admin)
        assert await dollars_now() == 2, "both ended: the system price again"
        listed = await prices.ListCustomPrices(
            price_pb.ListCustomPricesRequest(category="system.openai"), metadata=admin
        )
        assert all(p.HasField("end_time") and p.create_key == "admin" for p in listed.prices)


async def test_tally_keys_commands_work_from_a_fresh_database(backend, tmp_path):
    url = await make_database_url(backend, tmp_path)

    async def tally(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(BIN / "tally"), "keys", *args, "--database-url", url]
        return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)

    try:
        if backend == "sqlite":  # a file that does not exist is not silently made
            refused = await tally("list")
            assert refused.returncode == 1 and "there is no database at" in refused.stderr, refused.stderr
            assert not (tmp_path / "tally.db").exists()
        created = await tally("create", "--name", "first-admin", "--scope", "admin", "--create")
        assert created.returncode == 0, created.stderr
        assert created.stderr.startswith("database: "), "it says which database it opened"
        secret = created.stdout.strip()
        assert created.stdout == secret + "\n" and secret.startswith("tally_") and len(secret) == 49
        again = await tally("create", "--name", "first-admin", "--scope", "read")
        said = again.stderr.strip().splitlines()[-1]
        assert again.returncode == 1 and said == "tally: an API key named 'first-admin' exists", again.stderr
        listed = await tally("list", "--json")
        assert [k["name"] for k in json.loads(listed.stdout)] == ["first-admin"] and secret not in listed.stdout
        revoked = await tally("revoke", "first-admin")
        assert revoked.returncode == 0 and "revoked API key first-admin" in revoked.stdout
        table = await tally("list")
        assert re.search(r"^first-admin\s+admin\s+\S+ \S+\s+-\s+\d{4}-", table.stdout, re.M), table.stdout
    finally:
        await drop_database_url(url)

"""The proxy in server processes of its own: a BLOCK limit held exactly by two replicas on
PostgreSQL under 200 concurrent calls, and a provider key that never reaches the server's
logs, metrics, errors or database."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa

from tally_client import AsyncTallyClient, create_headers, dollars, limit

from . import fake_provider
from .conftest import drop_database_url, make_database_url
from .fake_provider import PLAIN_CHAT_USAGE, Provider
from .server_process import ServerProcess
from .test_dashboard import keys

PROXY = re.compile(r"proxy at https?://127\.0\.0\.1:(\d+)/")
# 3,000 characters: the proxy's estimate is 1,000 input tokens, the fake's plain usage.
PROMPT = "Summarize this. " * 187 + "abcdefgh"
assert len(PROMPT) == 3000


def proxy_port(server: ServerProcess) -> int:
    match = PROXY.search("".join(server.lines))
    assert match, server.lines
    return int(match.group(1))


@pytest.fixture(scope="module")
def provider():
    server, url = fake_provider.serve()
    yield url
    server.shutdown()


async def test_a_block_limit_lets_through_exactly_what_fits_across_two_replicas(postgres_url, provider, tmp_path):
    """200 calls at once of known cost, half to each replica, under a BLOCK limit that fits
    100: the fake receives exactly 100, the spend is the sum of their events, and the other
    100 are 429 naming the limit, in OpenAI's error shape."""
    url = await make_database_url("postgresql", tmp_path)
    replicas: list[ServerProcess] = []
    try:
        for _ in range(2):
            replicas.append(
                ServerProcess(url, "--proxy-listen", "127.0.0.1:0", "--proxy-upstream", f"openai={provider}/v1").start()
            )
        tag = f"exact-{uuid.uuid4().hex[:8]}"
        async with AsyncTallyClient(f"127.0.0.1:{replicas[0].port}") as client:
            cost = dollars((await client.quote_price("system.openai", "gpt-4o", {"text": (1000, 200)})).cost_total)
            await client.create_limit(limit("hundred-calls", cost * 100, request_tag=tag))
            headers = {"x-fake-usage": "plain", **create_headers(request_tags=[tag])}
            marker = f"{PROMPT[:-8]}{uuid.uuid4().hex[:8]}"
            body = {"model": "gpt-4o", "max_tokens": 200, "messages": [{"role": "user", "content": marker}]}

            async def call(session: aiohttp.ClientSession, port: int) -> tuple[int, dict]:
                async with session.post(
                    f"http://127.0.0.1:{port}/openai/v1/chat/completions", json=body, headers=headers
                ) as answer:
                    return answer.status, await answer.json()

            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
                ports = [proxy_port(replica) for replica in replicas]
                answers = await asyncio.gather(*(call(session, ports[i % 2]) for i in range(200)))
            forwarded = [b for b in Provider.requests if b.get("messages", [{}])[0].get("content") == marker]
            statuses = sorted(status for status, _ in answers)
            assert len(forwarded) == 100, f"the upstream received {len(forwarded)}"
            assert statuses == [200] * 100 + [429] * 100
            for status, answer in answers:
                if status == 429:
                    assert "hundred-calls" in answer["error"]["message"]
                    assert answer["error"]["type"] == "rate_limit_error"
                    assert [entry["limit"] for entry in answer["xproxy_result"]["limits"]] == ["hundred-calls"]
            charged = sum(Decimal(a["xproxy_result"]["cost_total"]["amount"]) for s, a in answers if s == 200)
            current = (await client.get_limit("hundred-calls")).current
            assert dollars(current.spend) == charged == cost * 100, "the spend is the sum of the events"
            assert current.event_count == 100 and dollars(current.reserved) == 0
            quoted = dollars((await client.quote_price("system.openai", "gpt-4o", PLAIN_CHAT_USAGE_UNITS)).cost_total)
            assert quoted == cost
    finally:
        for replica in replicas:
            replica.terminate()
        await drop_database_url(url)


PLAIN_CHAT_USAGE_UNITS = {"text": (PLAIN_CHAT_USAGE["prompt_tokens"], PLAIN_CHAT_USAGE["completion_tokens"])}
PLANTED = "sk-planted-" + uuid.uuid4().hex


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_provider_key_is_never_stored_logged_or_echoed(backend, provider, tmp_path):
    """Calls that succeed, fail upstream, cannot reach their upstream, are refused by a limit
    or lack Tally's key, all with a planted provider key, at debug logging: the key is in no
    log line, no metric, no answer of Tally's own, and no byte of the database."""
    url = await make_database_url(backend, tmp_path)
    admin_secret = await asyncio.to_thread(keys, url, "admin", "admin")
    caller_secret = await asyncio.to_thread(keys, url, "proxy-caller", "ingest")
    server = ServerProcess(
        url,
        "--proxy-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--auth",
        "required",
        "--log-level",
        "debug",
        "--proxy-upstream",
        f"openai={provider}/v1",
        "--proxy-upstream",
        "gone=http://127.0.0.1:9/v1",
    )
    server.start()
    try:
        port = proxy_port(server)
        metrics_port = int(re.search(r"metrics at http://127\.0\.0\.1:(\d+)/", "".join(server.lines)).group(1))
        async with AsyncTallyClient(f"127.0.0.1:{server.port}", api_key=admin_secret) as client:
            await client.create_limit(limit("nothing-left", "0.000000001", request_tag="capped"))
        secret = caller_secret
        provider_auth = {"Authorization": f"Bearer {PLANTED}", "x-api-key": PLANTED}
        ours = create_headers(api_key=secret)
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        Provider.headers_seen.clear()
        answers = []
        async with aiohttp.ClientSession() as session:
            for route, headers, payload in (
                ("openai", {**provider_auth, **ours}, body),
                ("openai", {**provider_auth, **ours}, {**body, "stream": True}),
                ("openai", {**provider_auth, **ours}, {**body, "model": "bad-request"}),
                ("gone", {**provider_auth, **ours}, body),
                ("openai", {**provider_auth, **ours, **create_headers(request_tags=["capped"])}, body),
                ("openai", provider_auth, body),
                ("openai", {**provider_auth, "xProxy-Api-Key": "not-a-key"}, body),
            ):
                async with session.post(
                    f"http://127.0.0.1:{port}/{route}/v1/chat/completions?api_key={PLANTED}",
                    json=payload,
                    headers=headers,
                ) as answer:
                    answers.append((answer.status, await answer.read(), dict(answer.headers)))
            async with session.get(
                f"http://127.0.0.1:{metrics_port}/metrics", headers={"Authorization": f"Bearer {admin_secret}"}
            ) as answer:
                scraped = await answer.read()
        assert [status for status, _, _ in answers] == [200, 200, 400, 502, 429, 401, 401]
        for headers_seen in Provider.headers_seen:
            assert secret not in str(headers_seen) and "xproxy" not in str(headers_seen).lower()
        # Tally's own answers (all but the provider's three) never echo the key.
        for status, answer_body, answer_headers in answers[3:]:
            assert PLANTED.encode() not in answer_body and PLANTED not in str(answer_headers), status
        assert b"tally_proxy_calls_total" in scraped and PLANTED.encode() not in scraped
    finally:
        server.terminate()
    logged = "".join(server.lines) + "".join(server.log)
    assert "proxied" in logged or "tally ready" in logged
    assert PLANTED not in logged, "not in the server's log"
    assert PLANTED.encode() not in await _database_bytes(url, tmp_path), "not in the database"
    await drop_database_url(url)


async def _database_bytes(url: str, tmp_path: Path) -> bytes:
    """Every byte the database holds: the SQLite files, or every row of every PostgreSQL table as text."""
    if url.startswith("sqlite"):
        path = Path(sa.make_url(url).database or "")
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(FULL)")
        files = [path, *(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))]
        return b"".join(f.read_bytes() for f in files if f.exists())
    parsed = sa.make_url(url)
    conn = await asyncpg.connect(
        user=parsed.username, host=parsed.host, port=parsed.port or 5432, database=parsed.database
    )
    try:
        tables = [
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        rows = []
        for table in tables:
            rows += [r[0] for r in await conn.fetch(f'SELECT t::text FROM "{table}" t')]
        return "\n".join(rows).encode()
    finally:
        await conn.close()


async def test_workers_share_the_proxy_port(provider, tmp_path):
    """`--workers 2 --proxy-listen` on a fixed port: calls on new connections reach both
    workers (each names itself in its log) and every one is recorded once."""
    from .test_readme import free_port

    port = free_port()
    url = f"sqlite+aiosqlite:///{tmp_path / 'workers.db'}"
    server = ServerProcess(
        url,
        "--workers",
        "2",
        "--proxy-listen",
        f"127.0.0.1:{port}",
        "--proxy-upstream",
        f"openai={provider}/v1",
        "--log-level",
        "debug",
    ).start()
    try:
        assert f"proxy at http://127.0.0.1:{port}/" in "".join(server.lines)
        tag = f"workers-{uuid.uuid4().hex[:8]}"
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each: the kernel spreads them
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(40):
                async with session.post(
                    f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                    json=body,
                    headers=create_headers(request_tags=[tag]),
                ) as answer:
                    assert answer.status == 200
        async with AsyncTallyClient(server.target) as client:
            grouped = await client.break_down_cost(["tag"])
        deadline = asyncio.get_running_loop().time() + 10
        log = "".join(server.log)
        while not ("worker-1 tally.proxy" in log and "worker-2 tally.proxy" in log):
            assert asyncio.get_running_loop().time() < deadline, "both workers served proxied calls"
            await asyncio.sleep(0.1)
            log = "".join(server.log)
        counted = {group.request_tag: group.event_count for group in grouped.groups}
        assert counted.get(tag) == 40, counted
    finally:
        server.terminate()


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("groq", "--proxy-upstream takes NAME=BASE_URL[,CATEGORY]"),
        ("groq=ftp://api.groq.com/openai/v1", "the base URL must be http(s)://HOST[:PORT][/PATH]"),
        ("groq=https://user@api.groq.com/v1", "the base URL must be http(s)://HOST[:PORT][/PATH]"),
        ("groq=https://api.groq.com/openai/v1,bad category", "the category must match"),
    ],
)
def test_a_bad_upstream_flag_refuses_to_start_in_one_line(tmp_path, flag, said):
    import subprocess
    import sys

    command = [sys.executable, "-m", "tally_server", "--listen", "127.0.0.1:0"]
    command += ["--database-url", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", "--proxy-listen", "127.0.0.1:0"]
    refused = subprocess.run([*command, "--proxy-upstream", flag], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert said in lines[-1] and lines[-1].startswith("tally: "), lines

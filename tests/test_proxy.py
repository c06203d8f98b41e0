"""Requests through Tally: the official openai and anthropic SDKs with `base_url` at the
proxy and a fake provider upstream (tests/fake_provider.py), on SQLite and PostgreSQL.
Each call returns what the fake sent plus `xproxy_result`, is priced to the nano as
QuotePrice prices the fake's usage, and lands in the experience its xProxy headers name;
the fake never sees an xProxy header. Streams pass each event on as it comes; a caller that
goes away cancels the upstream call; bad routes, bodies and headers forward nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
import uuid
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import sqlalchemy as sa
from grpc import aio

from tally.v1 import event_service_pb2 as event_pb, event_service_pb2_grpc, ingest_service_pb2 as ing_pb
from tally_client import AsyncTallyClient, EventFilter, create_headers, dollars, limit, outcome
from tally_client.usage import anthropic_units, openai_units
from tally_server.app import TallyServer
from tally_server.config import Settings

from . import fake_provider
from .conftest import drop_database_url, make_database_url, unique
from .fake_provider import CHAT_USAGE, MESSAGE_USAGE, RESPONSES_USAGE, Provider

pytestmark = pytest.mark.filterwarnings("ignore:The model:DeprecationWarning")
MESSAGES = [{"role": "user", "content": "Summarize"}]
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def provider():
    server, url = fake_provider.serve()
    yield url
    server.shutdown()


@pytest.fixture(scope="module")
async def tally(database_url, provider):
    """A server with the proxy, its upstreams at the fake provider."""
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        grace_seconds=2,
        proxy_listen="127.0.0.1:0",
        proxy_upstreams=(
            f"openai={provider}/v1",
            f"anthropic={provider}/v1",
            f"compatible={provider}/v1,system.openai",
        ),
        proxy_max_body_bytes=MAX_BODY,
        proxy_read_timeout_seconds=3,
    )
    server = TallyServer(settings)
    await server.start()
    yield server
    await server.stop()


def proxy_url(server: TallyServer, route: str = "openai") -> str:
    assert server.proxy is not None
    base = f"http://127.0.0.1:{server.proxy.port}/{route}"
    return base if route == "anthropic" else f"{base}/v1"


async def quote(client: AsyncTallyClient, category: str, model: str, units: dict[str, tuple[int, int]]) -> Decimal:
    return dollars((await client.quote_price(category, model, units)).cost_total)


def result_of(response: Any) -> dict[str, Any]:
    result = response.model_extra["xproxy_result"]
    assert isinstance(result, dict)
    return result


async def test_the_sdks_through_the_proxy_are_priced_and_attributed(tally, backend):
    """Every metered call of both SDKs, sync and async, plain and streamed, in one experience
    named by the xProxy headers: each result's cost is QuotePrice's of the fake's usage, and
    the experience's total is their sum."""
    name = unique("Proxied")
    target = f"127.0.0.1:{tally.port}"
    async with AsyncTallyClient(target) as client:
        await client.create_experience_type(name, "Calls through the proxy")
        run = await client.create_experience(name)
        chat = await quote(client, "system.openai", "gpt-4o", openai_units(CHAT_USAGE))
        responses = await quote(client, "system.openai", "gpt-4o", openai_units(RESPONSES_USAGE))
        embedding = await quote(client, "system.openai", "text-embedding-3-small", {"text": (1000, 0)})
        message = await quote(client, "system.anthropic", "claude-sonnet-4-5", anthropic_units(MESSAGE_USAGE))
        headers = create_headers(experience_id=run.experience_id, user_id="u-1", request_tags=["proxy"])
        Provider.headers_seen.clear()

        def blocking_calls() -> list[tuple[str, dict[str, Any], Decimal]]:
            oai = openai.OpenAI(base_url=proxy_url(tally), api_key="sk-test", max_retries=0)
            claude = anthropic.Anthropic(base_url=proxy_url(tally, "anthropic"), api_key="sk-ant", max_retries=0)
            seen = []
            answer = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
            assert answer.choices[0].message.content == "A summary."
            seen.append(("chat", result_of(answer), chat))
            chunks = list(
                oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers)
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == "A summary."
            assert all(c.choices for c in chunks), "the usage chunk the proxy asked for is not shown"
            seen.append(("chat stream", chunks[-1].model_extra["xproxy_result"], chat))
            answer2 = oai.responses.create(model="gpt-4o", input="Summarize", extra_headers=headers)
            seen.append(("responses", result_of(answer2), responses))
            events = list(oai.responses.create(model="gpt-4o", input="Summarize", stream=True, extra_headers=headers))
            assert events[-1].type == "response.completed"
            seen.append(("responses stream", events[-1].model_extra["xproxy_result"], responses))
            vectors = oai.embeddings.create(model="text-embedding-3-small", input="Summarize", extra_headers=headers)
            assert vectors.data[0].embedding == [0.5, 0.25]
            seen.append(("embeddings", result_of(vectors), embedding))
            reply = claude.messages.create(
                model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES, extra_headers=headers
            )
            assert reply.content[0].text == "A summary."  # type: ignore[union-attr]
            seen.append(("messages", result_of(reply), message))
            streamed = list(
                claude.messages.create(
                    model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES, stream=True, extra_headers=headers
                )
            )
            assert streamed[-1].type == "message_stop"
            seen.append(("messages stream", streamed[-1].model_extra["xproxy_result"], message))  # type: ignore[index]
            return seen

        seen = await asyncio.to_thread(blocking_calls)
        oai = openai.AsyncOpenAI(base_url=proxy_url(tally), api_key="sk-test", max_retries=0)
        claude = anthropic.AsyncAnthropic(base_url=proxy_url(tally, "anthropic"), api_key="sk-ant", max_retries=0)
        answer = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
        seen.append(("async chat", result_of(answer), chat))
        stream = await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 1000, "asked for: shown"
        seen.append(("async chat stream, usage asked", chunks[-1].model_extra["xproxy_result"], chat))
        reply = await claude.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES, extra_headers=headers
        )
        seen.append(("async messages", result_of(reply), message))
        events = [
            e
            async for e in await claude.messages.create(
                model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES, stream=True, extra_headers=headers
            )
        ]
        seen.append(("async messages stream", events[-1].model_extra["xproxy_result"], message))  # type: ignore[index]

        for what, result, expected in seen:
            assert result["experience_id"] == run.experience_id, what
            assert Decimal(result["cost_total"]["amount"]) == expected, what
            assert result["cost_state"] == "COST_STATE_PRICED", what
            assert result["user_id"] == "u-1" and result["request_tags"] == ["proxy"], what
        stats = (await client.get_experience(run.experience_id)).stats
        assert stats.event_count == len(seen)
        assert dollars(stats.cost_total) == sum(expected for _, _, expected in seen), "to the nano"
    for headers_seen in Provider.headers_seen:
        assert not [h for h in headers_seen if h.lower().startswith("xproxy-")], "no xProxy header reaches the provider"
    # (This anthropic SDK sends its key as a bearer token to a base URL of one's own.)
    keys = {header(h, "authorization") or header(h, "x-api-key") for h in Provider.headers_seen}
    assert keys == {"Bearer sk-test", "Bearer sk-ant"}, "the provider's keys, as the SDKs sent them"


def header(headers: dict[str, str], name: str) -> str | None:
    return next((value for key, value in headers.items() if key.lower() == name), None)


async def test_the_seeds_snippet_runs_against_the_proxy(tally):
    """The seed's code, with only base_url pointing at the proxy: an experience created
    first and its id passed with each call, then a type name alone, which creates a run and
    returns its id in xproxy_result and in the response header."""
    from tally_client import TallyClient

    name = unique("Document_Summarization")

    def seed() -> tuple[str, list[dict[str, Any]], str, str]:
        tally_client = TallyClient(f"127.0.0.1:{tally.port}")
        tally_client.create_experience_type(name, "Summarize one uploaded document")
        experience = tally_client.create_experience(name)
        oai_client = openai.OpenAI(base_url=proxy_url(tally), api_key="sk-test", max_retries=0)
        results = []
        for _ in range(2):
            response = oai_client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "Summarize this document"}],
                extra_headers=create_headers(experience_id=experience.experience_id),
            )
            results.append(response.model_extra["xproxy_result"])
        raw = oai_client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Summarize this document"}],
            extra_headers=create_headers(experience_name=name),
        )
        created = raw.parse().model_extra["xproxy_result"]
        header = raw.headers["xproxy-experience-id"]
        count = tally_client.get_experience(experience.experience_id).stats.event_count
        tally_client.close()
        assert count == 2
        return experience.experience_id, results, created["experience_id"], header

    experience_id, results, created, header = await asyncio.to_thread(seed)
    assert [r["experience_id"] for r in results] == [experience_id, experience_id]
    assert created == header and created != experience_id
    assert uuid.UUID(created).version == 7


async def test_a_non_streamed_body_is_the_fakes_bytes_plus_the_result(tally):
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o", "messages": MESSAGES}
        async with session.post(f"{proxy_url(tally)}/chat/completions", json=body) as answer:
            received = await answer.read()
            request_id = answer.headers["xproxy-request-id"]
    sent = Provider.sent[-1]
    assert received[: len(sent) - 1] == sent[:-1], "every byte of the provider's body, in order"
    added = json.loads(received)["xproxy_result"]
    assert added["request_id"] == request_id
    assert received == sent[:-1] + b',"xproxy_result":' + received[len(sent) - 1 + 17 : -1] + b"}"


async def test_a_stream_is_passed_on_as_each_event_arrives(tally):
    """A fake that waits 1 s between events: the first reaches the caller before the fake
    has produced the second."""
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy_url(tally)}/chat/completions", json=body, headers={"x-fake-delay": "1"}) as answer,
    ):
        assert answer.headers["X-Accel-Buffering"] == "no"
        first = await answer.content.readuntil(b"\n\n")
        first_at = time.monotonic()
        rest = await answer.content.read()
    number = int(json.loads(first[len(b"data: ") :])["id"].split("-")[1])
    second_at = next(at for at, n, index in Provider.produced if n == number and index == 1)
    assert first_at < second_at, f"the first event came {first_at - second_at:+.2f} s after the second was produced"
    assert b"xproxy_result" in rest and rest.endswith(b"data: [DONE]\n\n")


async def test_a_caller_that_goes_away_cancels_the_upstream_and_is_recorded_once(tally):
    """Anthropic's stream reports its input usage first: a caller that leaves after it
    cancels the upstream call (the fake's next write fails), and that usage is stored once."""
    name = unique("Abandoned")
    async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
        await client.create_experience_type(name, "A caller that leaves")
        run = await client.create_experience(name)
        body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": MESSAGES, "stream": True}
        headers = {"x-fake-delay": "0.5", **create_headers(experience_id=run.experience_id)}
        async with aiohttp.ClientSession() as session:
            answer = await session.post(f"{proxy_url(tally, 'anthropic')}/v1/messages", json=body, headers=headers)
            first = await answer.content.readuntil(b"\n\n")
            assert b"message_start" in first
            number = int(json.loads(first.split(b"data: ", 1)[1])["message"]["id"].split("_")[1])
            answer.close()  # the caller goes away
        await until(lambda: number in Provider.cancelled)
        assert number in Provider.cancelled, "the upstream call was cancelled"
        produced = [index for _, n, index in Provider.produced if n == number]
        assert len(produced) < 6, "the fake stopped before the end of its stream"
        await asyncio.sleep(1.5)
        stats = (await client.get_experience(run.experience_id)).stats
        assert stats.event_count == 1, "recorded once"
        partial = {**MESSAGE_USAGE, "output_tokens": 1}
        assert dollars(stats.cost_total) == await quote(
            client, "system.anthropic", "claude-sonnet-4-5", anthropic_units(partial)
        ), "priced from what the stream reported before the caller left"


async def test_a_caller_that_leaves_before_the_answer_is_recorded_once_not_priced(tally):
    """The upstream takes 1.5 s; the caller gives up after 0.3 s: the upstream request is
    closed, and the call (sent, maybe billed) is stored once as failed (499) and not priced."""
    name = unique("Impatient")
    async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
        await client.create_experience_type(name, "A caller that does not wait")
        run = await client.create_experience(name)
        headers = {"x-fake-wait": "1.5", **create_headers(experience_id=run.experience_id)}
        body = {"model": "gpt-4o", "messages": MESSAGES}
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(TimeoutError):
                await session.post(f"{proxy_url(tally)}/chat/completions", json=body, headers=headers)
        await asyncio.sleep(2.5)
        events = await client.list_events(EventFilter(experience_id=run.experience_id))
        assert [(e.event.http_status_code, e.xproxy_result.cost_state) for e in events.events] == [
            (499, ing_pb.COST_STATE_UNPRICED)
        ]
        assert "went away before the upstream answered" in events.events[0].xproxy_result.unknown_units[0].reason


async def test_upstream_errors_pass_through_and_are_recorded_as_failed(tally):
    name = unique("Failing")
    async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
        await client.create_experience_type(name, "Calls that fail")
        run = await client.create_experience(name)
        headers = create_headers(experience_id=run.experience_id)
        async with aiohttp.ClientSession() as session:
            body = {"model": "bad-request", "messages": MESSAGES}
            async with session.post(f"{proxy_url(tally)}/chat/completions", json=body, headers=headers) as answer:
                assert answer.status == 400
                assert await answer.read() == Provider.sent[-1], "the provider's error, as it was"
            oai = openai.AsyncOpenAI(base_url=proxy_url(tally), api_key="sk-test", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await oai.chat.completions.create(model="rate-limited", messages=MESSAGES, extra_headers=headers)
            # Compressed by the upstream: read decoded, priced, passed on decoded.
            body = {"model": "gpt-4o", "messages": MESSAGES}
            gzip_headers = {**headers, "x-fake-gzip": "1"}
            async with session.post(f"{proxy_url(tally)}/chat/completions", json=body, headers=gzip_headers) as answer:
                assert answer.status == 200 and "Content-Encoding" not in answer.headers
                priced = (await answer.json())["xproxy_result"]
            assert Decimal(priced["cost_total"]["amount"]) == await quote(
                client, "system.openai", "gpt-4o", openai_units(CHAT_USAGE)
            )
            # A compatible server that reports no usage: stored as not priced, with the reason.
            none_headers = {**headers, "x-fake-usage": "none"}
            async with session.post(f"{proxy_url(tally)}/chat/completions", json=body, headers=none_headers) as answer:
                unread = (await answer.json())["xproxy_result"]
            assert unread["cost_state"] == "COST_STATE_UNPRICED"
            assert unread["unknown_units"][0]["reason"] == "the response reported no usage"
            # A usage no event may hold (10^13 tokens): stored as not priced, saying why.
            huge_headers = {**headers, "x-fake-usage": "huge"}
            async with session.post(f"{proxy_url(tally)}/chat/completions", json=body, headers=huge_headers) as answer:
                assert answer.status == 200
                huge = (await answer.json())["xproxy_result"]
            assert huge["cost_state"] == "COST_STATE_UNPRICED"
            assert "the response's usage is not valid (units['text'].input" in huge["unknown_units"][0]["reason"]
        stats = (await client.get_experience(run.experience_id)).stats
        # The fake fails calls for models it names "bad-request" and "rate-limited", which no
        # price covers: those two are not priced either.
        assert (stats.event_count, stats.failed_event_count, stats.unpriced_event_count) == (5, 2, 4)


async def test_an_unreachable_or_silent_upstream_is_502_or_504(database_url, provider):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        grace_seconds=1,
        proxy_listen="127.0.0.1:0",
        proxy_upstreams=(f"openai={provider}/v1", f"gone=http://127.0.0.1:{closed}/v1"),
        proxy_read_timeout_seconds=0.5,
    )
    server = TallyServer(settings)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.proxy.port}"
        body = {"model": "gpt-4o", "messages": MESSAGES}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/gone/v1/chat/completions", json=body) as answer:
                assert answer.status == 502
                assert "upstream gone could not be reached" in (await answer.json())["error"]["message"]
            # An upstream that answers after 1 s, past the 0.5 s read timeout: the call was sent
            # (and may be billed), so it is stored, failed and not priced, with the reason.
            name = unique("Silent")
            async with AsyncTallyClient(f"127.0.0.1:{server.port}") as client:
                await client.create_experience_type(name, "Calls to a silent upstream")
                run = await client.create_experience(name)
                slow = {"x-fake-wait": "1", **create_headers(experience_id=run.experience_id)}
                async with session.post(f"{base}/openai/v1/chat/completions", json=body, headers=slow) as answer:
                    assert answer.status == 504
                    assert "did not answer in time" in (await answer.json())["error"]["message"]
                stats = (await client.get_experience(run.experience_id)).stats
                assert (stats.event_count, stats.failed_event_count, stats.unpriced_event_count) == (1, 1, 1)
    finally:
        await server.stop()


async def test_bad_requests_forward_nothing_and_store_nothing(tally):
    async with aio.insecure_channel(f"127.0.0.1:{tally.port}") as channel:
        events = event_service_pb2_grpc.EventServiceStub(channel)
        before = len((await events.ListEvents(event_pb.ListEventsRequest(page_size=1000))).events)
        forwarded = len(Provider.paths)
        port = tally.proxy.port
        body = {"model": "gpt-4o", "messages": MESSAGES}
        for path, status in (
            ("/nowhere/v1/chat/completions", 404),
            ("/openai/v2/chat/completions", 400),
            ("/openai/v1/../../admin", 400),
            ("/openai/v1/%2e%2e/%2e%2e/admin", 400),
            ("/openai/v1//evil.example/v1/chat/completions", 400),
            ("/openai/v1/@evil.example/chat/completions", 400),
            ("/openai/v1/chat\\completions", 400),
            ("http://evil.example/v1/chat/completions", 404),
        ):
            status_line, answer_body = await raw_request(port, path, json.dumps(body).encode())
            assert f" {status} ".encode() in status_line, (path, status_line)
            assert b"Tally proxy" in answer_body, path
        async with aiohttp.ClientSession() as session:
            # A foreign Host on a loopback bind (DNS rebinding): 421.
            async with session.post(
                f"http://127.0.0.1:{port}/openai/v1/chat/completions", json=body, headers={"Host": "evil.example"}
            ) as answer:
                assert answer.status == 421
            # Over the body bound: 413, in the provider's shape.
            big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
            async with session.post(f"http://127.0.0.1:{port}/openai/v1/chat/completions", json=big) as answer:
                assert answer.status == 413
                assert f"{MAX_BODY:,} bytes" in (await answer.json())["error"]["message"]
            # A malformed xProxy header: 400 naming it.
            bad = {"xProxy-Experience-Version": "seven"}
            async with session.post(
                f"http://127.0.0.1:{port}/openai/v1/chat/completions", json=body, headers=bad
            ) as answer:
                assert answer.status == 400
                assert "xproxy-experience-version" in (await answer.json())["error"]["message"]
        # A header carrying a bare CR (header injection): refused by the parser.
        status_line, _ = await raw_request(port, "/openai/v1/chat/completions", b"{}", b"X-Evil: a\rInjected: yes\r\n")
        assert b" 400 " in status_line, status_line
        assert len(Provider.paths) == forwarded, "nothing was forwarded"
        after = len((await events.ListEvents(event_pb.ListEventsRequest(page_size=1000))).events)
        assert after == before, "nothing was stored"


async def raw_request(port: int, path: str, body: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
    """A request written byte for byte (an HTTP client would normalize the path): the
    answer's status line and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
        + extra
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, answer_body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], answer_body


async def until(condition: Any, seconds: float = 10) -> None:
    """Returns once `condition()` holds, or after `seconds` (the caller asserts it then)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - another thread's list
        await asyncio.sleep(0.1)


async def test_other_routes_pass_through_unmetered(tally):
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy_url(tally)}/models", params={"limit": "5"}) as answer,
    ):
        assert answer.status == 200
        assert (await answer.json())["data"][0]["id"] == "gpt-4o"
        assert "xproxy-request-id" not in answer.headers
    assert Provider.paths[-1] == "/v1/models?limit=5", "the path and query as sent"


async def test_a_named_compatible_upstream_prices_in_its_category(tally):
    oai = openai.AsyncOpenAI(base_url=proxy_url(tally, "compatible"), api_key="sk-test", max_retries=0)
    answer = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    result = result_of(answer)
    assert result["price"]["category"] == "system.openai"
    assert Provider.paths[-1] == "/v1/chat/completions"


async def test_a_database_that_does_not_answer_forwards_and_counts_or_fails_closed(provider, tmp_path):
    """SQLite locked by another process: a call is still forwarded and answered, its result
    saying it was not recorded (and limits not checked), and counted as unrecorded; with
    --proxy-fail-closed it is refused 503 and the upstream receives nothing."""
    from tally_server import metrics

    url = f"sqlite+aiosqlite:///{tmp_path / 'sick.db'}"
    common = {
        "listen": "127.0.0.1:0",
        "database_url": url,
        "grace_seconds": 1,
        "database_timeout_seconds": 1,
        "proxy_listen": "127.0.0.1:0",
        "proxy_upstreams": (f"openai={provider}/v1",),
    }
    open_server, closed_server = (
        TallyServer(Settings(**common)),
        TallyServer(Settings(**common, proxy_fail_closed=True)),
    )
    await open_server.start()
    await closed_server.start()
    try:
        async with AsyncTallyClient(f"127.0.0.1:{open_server.port}") as client:
            await client.create_limit(limit("roomy", 1000, request_tag="metered"))
        unrecorded = metrics.PROXY_CALLS.labels("openai", "unrecorded")
        before = unrecorded._value.get()
        body = {"model": "gpt-4o", "messages": MESSAGES}
        tagged = create_headers(request_tags=["metered"])
        locker = sqlite3.connect(tmp_path / "sick.db", isolation_level=None)  # as another process would
        locker.execute("BEGIN IMMEDIATE")
        try:
            forwarded = len(Provider.paths)
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{open_server.proxy.port}/openai/v1"
                results = []
                for headers in ({}, tagged):  # no BLOCK limit applies; one does
                    async with session.post(f"{base}/chat/completions", json=body, headers=headers) as answer:
                        assert answer.status == 200
                        answered = await answer.json()
                    assert answered["choices"][0]["message"]["content"] == "A summary."
                    results.append(answered["xproxy_result"])
                assert all(result["recorded"] is False for result in results)
                assert all(any("not recorded" in w for w in result["warnings"]) for result in results)
                checked = [any("limits were not checked" in w for w in result["warnings"]) for result in results]
                assert checked == [False, True], "a call no BLOCK limit applies to reserves nothing"
                assert len(Provider.paths) == forwarded + 2
                closed = f"http://127.0.0.1:{closed_server.proxy.port}/openai/v1"
                async with session.post(f"{closed}/chat/completions", json=body, headers=tagged) as answer:
                    assert answer.status == 503
                    assert "limits cannot be checked" in (await answer.json())["error"]["message"]
                assert len(Provider.paths) == forwarded + 2, "fail-closed: nothing forwarded"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert unrecorded._value.get() == before + 2
    finally:
        await open_server.stop()
        await closed_server.stop()


async def test_fail_closed_refuses_every_call_while_the_database_is_down(provider, tmp_path):
    """PostgreSQL refusing connections: once health says so, --proxy-fail-closed refuses
    calls no limit applies to as well (they could not be recorded), and serves again once
    the database is back."""
    from .test_sick_database import admin

    url = await make_database_url("postgresql", tmp_path)
    name = sa.make_url(url).database
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=url,
        grace_seconds=1,
        database_timeout_seconds=1,
        proxy_listen="127.0.0.1:0",
        proxy_upstreams=(f"openai={provider}/v1",),
        proxy_fail_closed=True,
    )
    server = TallyServer(settings)
    server.HEALTH_INTERVAL_SECONDS = 0.5
    await server.start()
    body = {"model": "gpt-4o", "messages": MESSAGES}
    base = f"http://127.0.0.1:{server.proxy.port}/openai/v1"
    try:
        async with aiohttp.ClientSession() as session:
            await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            await until(lambda: not server.database_serving)
            forwarded = len(Provider.paths)
            async with session.post(f"{base}/chat/completions", json=body) as answer:
                assert answer.status == 503
                assert "calls are refused (--proxy-fail-closed)" in (await answer.json())["error"]["message"]
            assert len(Provider.paths) == forwarded, "nothing forwarded"
            await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await until(lambda: server.database_serving)
            async with session.post(f"{base}/chat/completions", json=body) as answer:
                assert answer.status == 200 and (await answer.json())["xproxy_result"]["cost_state"]
    finally:
        await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await server.stop()
        await drop_database_url(url)


async def test_a_call_carries_its_runs_outcomes_checked_before_it_is_forwarded(tally):
    """xProxy-Experience-Outcomes: the run's outcome values, checked against the type's
    declarations before the call goes out (a bad one: 400, nothing forwarded, nothing
    stored) and recorded once its event is."""
    name = unique("Proxied_Outcomes")
    async with AsyncTallyClient(f"127.0.0.1:{tally.port}") as client:
        await client.create_experience_type(
            name, "Scored through the proxy", outcomes=[outcome("resolved", "boolean"), outcome("csat", "likert_5")]
        )
        body = {"model": "gpt-4o", "messages": MESSAGES}
        url = f"{proxy_url(tally)}/chat/completions"
        async with aiohttp.ClientSession() as session:
            forwarded = len(Provider.paths)
            for header, said in (
                ("not json", "must be a JSON object"),
                ('{"resolved": "yes"}', "must be true, false or a number"),
                ('{"unknown": 1}', "declares no outcome 'unknown'"),
                ('{"csat": 9}', "a whole number from 1 to 5"),
                ('{"resolved": 1}', "give bool_value"),
            ):
                headers = {"xProxy-Experience-Name": name, "xProxy-Experience-Outcomes": header}
                async with session.post(url, json=body, headers=headers) as answer:
                    assert answer.status == 400, header
                    message = (await answer.json())["error"]["message"]
                    assert said in message and "xproxy-experience-outcomes" in message, message
            headers = {"xProxy-Experience-Outcomes": '{"resolved": true}'}  # no run named
            async with session.post(url, json=body, headers=headers) as answer:
                assert answer.status == 400
                assert "outcomes need the run" in (await answer.json())["error"]["message"]
            assert len(Provider.paths) == forwarded, "nothing was forwarded"
            assert not (await client.list_experiences(name)).experiences, "nothing was stored"
            headers = {"xProxy-Experience-Name": name, "xProxy-Experience-Outcomes": '{"resolved": true, "csat": 4}'}
            async with session.post(url, json=body, headers=headers) as answer:
                assert answer.status == 200
                run = answer.headers["xproxy-experience-id"]
                assert not (await answer.json())["xproxy_result"]["warnings"]
        got = await client.get_experience(run)
        assert {o.value.name: (o.value.bool_value or o.value.number_value) for o in got.outcomes} == {
            "resolved": True,
            "csat": 4,
        }
        assert got.stats.event_count == 1

"""Provider SDK instrumentation with the real openai and anthropic packages talking to a
fake provider on loopback (tests/fake_provider.py): every kind of call recorded in the
background (chat completions, the Responses API, Anthropic messages; sync and async;
streaming or not), the app's results unchanged, nothing raised into the app, events kept
while Tally is down and sent once it is back, and a bounded queue."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from decimal import Decimal

import anthropic
import genai_prices
import openai
import pytest

from tally_client import AsyncTallyClient, TallyClient, dollars
from tally_client.instrument import record_anthropic, record_openai, track_anthropic, track_openai
from tally_client.recorder import Recorder, RecorderLimits

from . import fake_provider
from .conftest import unique
from .server_process import ServerProcess
from .test_readme import free_port

# The SDK warns of models it knows to be retiring; prices are what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:The model:DeprecationWarning")

# Per call, from the fake provider's usage: gpt-4o with 600 uncached and 400 cached input
# tokens, 150 output and 50 reasoning tokens: $0.002 + $0.002.
GPT_4O = Decimal("0.004")
# claude-sonnet-4-5: 600 input, 400 cache reads, 600 + 400 cache writes for 5 minutes and
# 1 hour, 100 output: $0.0018 + $0.00012 + $0.00225 + $0.0024 + $0.0015.
SONNET = Decimal("0.00807")
O3_FLEX = genai_prices.calc_price(
    genai_prices.Usage(input_tokens=1000, cache_read_tokens=400, output_tokens=200, output_reasoning_tokens=50),
    "o3",
    provider_id="openai",
    price_context={"service_tier": "flex"},
).total_price
MESSAGES = [{"role": "user", "content": "Summarize"}]


@pytest.fixture(scope="module")
def provider():
    server, url = fake_provider.serve()
    yield url
    server.shutdown()


def clients(provider: str, asynchronous: bool = False):
    if asynchronous:
        return (
            openai.AsyncOpenAI(base_url=f"{provider}/v1", api_key="test", max_retries=0),
            anthropic.AsyncAnthropic(base_url=provider, api_key="test", max_retries=0),
        )
    return (
        openai.OpenAI(base_url=f"{provider}/v1", api_key="test", max_retries=0),
        anthropic.Anthropic(base_url=provider, api_key="test", max_retries=0),
    )


def every_kind_of_call(target: str, provider: str, name: str):
    """In a thread: the blocking SDKs, tracked, inside one experience."""
    oai, claude = clients(provider)
    with TallyClient(target) as tally:
        tally.create_experience_type(name, "Summarize one document")
        recorder = Recorder(tally)
        assert track_openai(oai, recorder) is recorder and track_anthropic(claude, recorder) is recorder
        seen = []
        with tally.experience(name) as run:
            seen.append(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content)
            with oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
                seen.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
            flex = oai.chat.completions.create(model="o3", messages=MESSAGES, service_tier="flex")
            seen.append(oai.responses.create(model="gpt-4o", input="Summarize").id)
            seen.append([e.type for e in oai.responses.create(model="gpt-4o", input="Summarize", stream=True)])
            seen.append(
                claude.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES).content[0].text
            )
            streamed = claude.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES, stream=True)
            seen.append([event.type for event in streamed])
        assert recorder.flush(timeout=20), "everything recorded reached Tally"
        again = record_openai(tally, flex)  # the same response recorded by hand: a duplicate
        experience = tally.get_experience(run.experience_id)
        recorder.close()
        return seen, recorder.stats, experience, again


async def test_every_kind_of_call_is_recorded_in_the_background(stubs, provider):
    fake_provider.Provider.requests.clear()
    seen, stats, experience, again = await asyncio.to_thread(
        every_kind_of_call, stubs.target, provider, unique("Calls")
    )
    assert seen[:2] == ["A summary.", "A summary."], "the app's answers, unchanged"
    assert seen[3][-1] == "response.completed" and seen[5][0] == "message_start"
    stream_request = fake_provider.Provider.requests[1]
    assert stream_request["stream_options"] == {"include_usage": True}, "usage asked for, as the caller did not say"
    assert (stats.accepted, stats.dropped, stats.rejected) == (7, 0, 0)
    assert experience.stats.event_count == 7, "one experience for the run, though nothing waited for Tally"
    expected = 4 * GPT_4O + 2 * SONNET + O3_FLEX
    assert dollars(experience.stats.cost_total) == expected, "o3 priced at its flex rate, from the response's tier"
    assert again.xproxy_result.duplicate_request


async def test_async_clients_are_recorded_by_a_task(stubs, provider):
    name = unique("AsyncCalls")
    oai, claude = clients(provider, asynchronous=True)
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Summarize, asynchronously")
        recorder = track_openai(oai, tally)
        track_anthropic(claude, recorder)
        with tally.experience(name) as run:
            answer = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            stream = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            events = [e.type async for e in await oai.responses.create(model="gpt-4o", input="x", stream=True)]
            message = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES)
            async with await claude.messages.create(
                model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES, stream=True
            ) as streamed:
                kinds = [event.type async for event in streamed]
        await asyncio.wait_for(recorder.flush(), 20)
        experience = await tally.get_experience(run.experience_id)
        await recorder.aclose()
    assert (answer.choices[0].message.content, text, message.content[0].text) == ("A summary.",) * 3
    assert events[-1] == "response.completed" and kinds[-1] == "message_stop"
    assert recorder.stats.accepted == 5
    assert experience.stats.event_count == 5
    assert dollars(experience.stats.cost_total) == 3 * GPT_4O + 2 * SONNET


def calls_while_tally_is_down(provider: str, tmp_path) -> tuple[list[str], Recorder, str]:
    """The app runs while nothing listens at Tally's address; then Tally starts there."""
    target = f"127.0.0.1:{free_port()}"
    oai, claude = clients(provider)
    tally = TallyClient(target, timeout=2)
    limits = RecorderLimits(first_retry_seconds=0.2, max_retry_seconds=1.0)
    recorder = track_openai(oai, Recorder(tally, limits))
    track_anthropic(claude, recorder)
    answers = [oai.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content]
    with oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
        answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    answers.append(claude.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES).content[0].text)
    assert not recorder.flush(timeout=1.5), "Tally is down: nothing can be sent yet"
    assert recorder.stats.retries >= 1 and recorder.stats.accepted == 0
    database = tmp_path / "late.db"
    server = ServerProcess(f"sqlite+aiosqlite:///{database}", "--listen", target).start()
    try:
        assert recorder.flush(timeout=20), "sent once Tally is back"
    finally:
        server.terminate()
    recorder.close()
    return answers, recorder, str(database)


async def test_with_tally_stopped_the_app_is_unaffected_and_events_arrive_once_it_is_back(provider, tmp_path):
    started = time.monotonic()
    answers, recorder, database = await asyncio.to_thread(calls_while_tally_is_down, provider, tmp_path)
    assert answers == ["A summary."] * 3
    assert (recorder.stats.accepted, recorder.stats.duplicates, recorder.stats.dropped) == (3, 0, 0)
    with sqlite3.connect(database) as stored:
        rows = stored.execute("SELECT count(*), count(DISTINCT provider_response_id) FROM events").fetchone()
    assert rows == (3, 3), "each call stored once"
    assert time.monotonic() - started < 60


def failing_provider_call(target: str, provider: str, name: str):
    oai, _ = clients(provider)
    with TallyClient(target) as tally:
        tally.create_experience_type(name, "Calls that fail")
        recorder = track_openai(oai, tally)
        with tally.experience(name) as run, pytest.raises(openai.RateLimitError):
            oai.chat.completions.create(model="rate-limited", messages=MESSAGES)
        assert isinstance(recorder, Recorder) and recorder.flush(timeout=20)
        recorder.close()
        return tally.get_experience(run.experience_id)


async def test_a_failed_provider_call_raises_as_before_and_is_recorded_as_failed(stubs, provider):
    experience = await asyncio.to_thread(failing_provider_call, stubs.target, provider, unique("Failures"))
    assert (experience.stats.event_count, experience.stats.failed_event_count) == (1, 1)


def test_a_full_queue_drops_and_counts_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="tally_client.recorder")
    tally = TallyClient(f"127.0.0.1:{free_port()}", timeout=0.5)  # nothing listens there
    recorder = Recorder(tally, RecorderLimits(max_queue=5, batch_size=5, linger_seconds=5.0))
    from tally_client import usage_event

    taken = [recorder.record(usage_event("system.openai", "gpt-4o", {"text": (1, 1)})) for _ in range(20)]
    assert taken.count(False) >= 10 and recorder.stats.dropped == taken.count(False)
    assert any("dropped" in r.getMessage() and "queue is full" in r.getMessage() for r in caplog.records)
    recorder.close(timeout=0.2)
    tally.close()


def recorded_by_hand(target: str, provider: str, name: str):
    _, claude = clients(provider)
    with TallyClient(target) as tally:
        tally.create_experience_type(name, "One conversation")
        with tally.experience(name):
            message = claude.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES)
            return record_anthropic(tally, message, latency_ms=300)


async def test_record_anthropic_prices_cache_writes_by_duration(stubs, provider):
    recorded = await asyncio.to_thread(recorded_by_hand, stubs.target, provider, unique("Chats"))
    result = recorded.xproxy_result
    assert dollars(result.cost_total) == SONNET
    assert not result.unknown_units


async def test_with_tally_stopped_an_async_app_is_unaffected_and_events_arrive_once_it_is_back(provider, tmp_path):
    from tally_client.recorder import AsyncRecorder

    target = f"127.0.0.1:{free_port()}"
    oai, claude = clients(provider, asynchronous=True)
    async with AsyncTallyClient(target, timeout=2) as tally:
        recorder = AsyncRecorder(tally, RecorderLimits(first_retry_seconds=0.2, max_retry_seconds=1.0))
        track_openai(oai, recorder)
        track_anthropic(claude, recorder)
        answer = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stream = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        kinds = [
            e.type
            async for e in await claude.messages.create(
                model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES, stream=True
            )
        ]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(recorder.flush(), 1.0)  # Tally is down: nothing can be sent yet
        database = tmp_path / "late-async.db"
        server = await asyncio.to_thread(ServerProcess(f"sqlite+aiosqlite:///{database}", "--listen", target).start)
        try:
            await asyncio.wait_for(recorder.flush(), 20)
        finally:
            server.terminate()
        await recorder.aclose()
    assert (answer.choices[0].message.content, text, kinds[-1]) == ("A summary.", "A summary.", "message_stop")
    assert (recorder.stats.accepted, recorder.stats.duplicates, recorder.stats.dropped) == (3, 0, 0)
    assert recorder.stats.retries >= 1
    with sqlite3.connect(database) as stored:
        assert stored.execute("SELECT count(DISTINCT provider_response_id) FROM events").fetchone() == (3,)


def over_the_limit(target: str, provider: str, name: str) -> dict:
    """In a thread: OpenAI tracked with enforce_limits, inside one run of a type limited to
    $0.005 per run; each call reserves ~$0.002 (3 prompt tokens in, max_tokens=200 out) and
    really costs $0.004."""
    from tally_client import LimitExceeded, limit

    oai, _ = clients(provider)
    with TallyClient(target) as tally:
        tally.create_experience_type(name, "limited runs")
        tally.create_limit(limit(f"{name}-run", "0.005", experience_type=name, per_experience=True))
        recorder = Recorder(tally)
        track_openai(oai, recorder, enforce_limits=True)
        sent = len(fake_provider.Provider.requests)
        outcome: dict = {}
        with tally.experience(name) as run:
            oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=200)
            recorder.flush()  # the event settles the reservation with the real $0.004
            try:
                oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=200)
            except LimitExceeded as refused:
                outcome["refused"] = refused
        outcome["provider_requests"] = len(fake_provider.Provider.requests) - sent
        current = tally.get_limit(f"{name}-run", experience_id=run.experience_id).current
        outcome["spend"] = dollars(current.spend)
        outcome["reserved"] = dollars(current.reserved)
        outcome["cost"] = dollars(tally.get_experience(run.experience_id).stats.cost_total)
        recorder.close()
    return outcome


async def test_enforce_limits_refuses_a_call_over_its_limit_without_calling_the_provider(stubs, provider):
    outcome = await asyncio.to_thread(over_the_limit, stubs.target, provider, unique("Limited"))
    refused = outcome.get("refused")
    assert refused is not None, "the second call was refused"
    assert refused.reason == "LIMIT_EXCEEDED" and refused.limits, refused
    assert outcome["provider_requests"] == 1, "the refused call never reached the provider"
    assert outcome["spend"] == outcome["cost"] == GPT_4O
    assert outcome["reserved"] == 0


def test_with_tally_unreachable_the_recorder_says_so_and_closes_within_its_bound(caplog):
    """Nothing listens at the target: the recorder says once that it cannot reach Tally, the
    app's close waits at most exit_wait_seconds, and the dropped events are said with why."""
    from tally_client import usage_event

    caplog.set_level(logging.WARNING, logger="tally_client.recorder")
    with TallyClient("127.0.0.1:1", timeout=1) as tally:
        recorder = Recorder(tally, RecorderLimits(exit_wait_seconds=1.0, first_retry_seconds=0.1))
        for n in range(3):
            recorder.record(usage_event("system.openai", "gpt-4o", {"text": (10 + n, 1)}))
        time.sleep(1.0)  # a send or two failed
        started = time.monotonic()
        recorder.close()
        took = time.monotonic() - started
    said = [r.getMessage() for r in caplog.records]
    assert took < 1.0 + 1.5, took  # the wait, and the sender's last attempt
    assert sum("cannot reach Tally" in line for line in said) == 1, said
    assert any("dropped 3 event(s)" in line and "could not be reached" in line for line in said), said
    assert recorder.stats.dropped == 3


async def test_xproxy_extra_headers_are_the_calls_context_and_never_reach_the_provider(stubs, provider):
    """The seed's call, `extra_headers=create_headers(...)`, on a tracked client: the event
    lands in the experience the headers name (a new run of the type, with its user and tag),
    and the provider never sees an xProxy header (other extra headers still go)."""
    from tally_client import create_headers

    name = unique("Headers")
    oai, claude = clients(provider, asynchronous=True)
    async with AsyncTallyClient(stubs.target) as tally:
        await tally.create_experience_type(name, "Context from headers")
        run = await tally.create_experience(name)
        recorder = track_openai(oai, tally)
        track_anthropic(claude, recorder)
        fake_provider.Provider.headers_seen.clear()
        headers = {**create_headers(experience_id=run.experience_id, user_id="u-7"), "x-custom": "kept"}
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MESSAGES, extra_headers=headers)
        await recorder.flush()
        stats = (await tally.get_experience(run.experience_id)).stats
        assert stats.event_count == 2 and dollars(stats.cost_total) == GPT_4O + SONNET
    for seen in fake_provider.Provider.headers_seen:
        assert not [h for h in seen if h.lower().startswith("xproxy-")]
        assert {k.lower(): v for k, v in seen.items()}["x-custom"] == "kept"

"""Provider SDK instrumentation, with the real openai and anthropic packages talking to a
fake provider that this test serves on loopback: nothing reaches the network."""

from __future__ import annotations

import asyncio
import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import openai
import pytest

from tally_client import TallyClient, dollars
from tally_client.instrument import record_anthropic, record_openai, track_openai

from .conftest import unique

CHAT_COMPLETION = {
    "id": "chatcmpl-fake-",
    "object": "chat.completion",
    "created": 1764300000,
    "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A summary."}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "total_tokens": 1200,
        "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 50, "audio_tokens": 0},
    },
}
MESSAGE = {
    "id": "msg_fake_",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "A summary."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 600,
        "output_tokens": 100,
        "cache_read_input_tokens": 400,
        "cache_creation_input_tokens": 1000,
    },
}


class FakeProvider(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        FakeProvider.calls += 1
        if self.path.endswith("/chat/completions"):
            body = {**CHAT_COMPLETION, "id": f"chatcmpl-fake-{FakeProvider.calls}-{id(self)}"}
        elif self.path.endswith("/messages"):
            body = {**MESSAGE, "id": f"msg_fake_{FakeProvider.calls}_{id(self)}"}
        else:
            self.send_error(404)
            return
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def provider():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeProvider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run_openai(target: str, provider_url: str, name: str):
    client = openai.OpenAI(base_url=f"{provider_url}/v1", api_key="test-key", max_retries=0)
    with TallyClient(target) as tally:
        tally.create_experience_type(name, "Summarize one document")
        with tally.experience(name) as run:
            response = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Summarize"}]
            )
            recorded = record_openai(tally, response, latency_ms=120)
            again = record_openai(tally, response, latency_ms=120)  # a retry of the same record
            track_openai(client, tally)
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "More"}])
        return recorded, again, tally.get_experience(run.experience_id)


async def test_openai_chat_completion_usage_with_cached_and_reasoning_tokens(stubs, provider):
    recorded, again, experience = await asyncio.to_thread(run_openai, stubs.target, provider, unique("Summaries"))
    result = recorded.xproxy_result
    # 600 uncached x $2.50/M + 400 cached x $1.25/M = $0.002; (150 + 50 reasoning) x $10/M = $0.002.
    assert dollars(result.cost_input) == Decimal("0.002")
    assert dollars(result.cost_output) == Decimal("0.002")
    assert not result.unknown_units
    assert again.xproxy_result.duplicate_request, "the provider response id is the idempotency key"
    stats = experience.stats
    assert stats.event_count == 2, "one recorded by hand, one by track_openai; the retry not counted"
    assert dollars(stats.cost_total) == Decimal("0.008")


def run_anthropic(target: str, provider_url: str, name: str):
    client = anthropic.Anthropic(base_url=provider_url, api_key="test-key", max_retries=0)
    with TallyClient(target) as tally:
        tally.create_experience_type(name, "One conversation")
        with tally.experience(name):
            message = client.messages.create(
                model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "Hello"}]
            )
            return record_anthropic(tally, message, latency_ms=300)


# The SDK warns of models it knows to be retiring; prices are what this test is about.
@pytest.mark.filterwarnings("ignore:The model:DeprecationWarning")
async def test_anthropic_message_usage_with_cache_reads_and_writes(stubs, provider):
    recorded = await asyncio.to_thread(run_anthropic, stubs.target, provider, unique("Chatbot"))
    result = recorded.xproxy_result
    # 600 x $3/M + 400 x $0.30/M + 1,000 x $3.75/M = $0.00567; 100 x $15/M = $0.0015.
    assert dollars(result.cost_input) == Decimal("0.00567")
    assert dollars(result.cost_output) == Decimal("0.0015")
    assert result.experience_created

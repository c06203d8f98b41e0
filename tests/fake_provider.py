"""A fake OpenAI and Anthropic API on loopback, for the real SDKs to talk to: chat
completions, the Responses API and messages, each as JSON or as a server-sent event
stream. Nothing reaches the network."""

from __future__ import annotations

import gzip
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

CHAT_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 200,
    "total_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 50, "audio_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 400},
    "output_tokens": 200,
    "output_tokens_details": {"reasoning_tokens": 50},
    "total_tokens": 1200,
}
# Usage without the details (cached, reasoning), as a model without caching reports it;
# asked for with the request header `x-fake-usage: plain`.
PLAIN_CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
MESSAGE_USAGE = {
    "input_tokens": 600,
    "output_tokens": 100,
    "cache_read_input_tokens": 400,
    "cache_creation_input_tokens": 1000,
    "cache_creation": {"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 400},
}
_ids = itertools.count(1)


class Provider(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []  # every request body, in order
    headers_seen: ClassVar[list[dict[str, str]]] = []  # every request's headers, in order
    paths: ClassVar[list[str]] = []  # every request's path, in order
    # Streamed events as produced: (time.monotonic(), response number, index of the event).
    produced: ClassVar[list[tuple[float, int, int]]] = []
    cancelled: ClassVar[list[int]] = []  # responses whose caller went away mid-stream
    sent: ClassVar[list[bytes]] = []  # every JSON body answered, as sent (before any compression)

    def do_GET(self) -> None:
        Provider.headers_seen.append(dict(self.headers))
        Provider.paths.append(self.path)
        if self.path.split("?")[0].endswith("/models"):
            self._json({"object": "list", "data": [{"id": "gpt-4o", "object": "model", "owned_by": "openai"}]})
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        Provider.requests.append(body)
        Provider.headers_seen.append(dict(self.headers))
        Provider.paths.append(self.path)
        number = next(_ids)
        path = self.path.split("?")[0]
        if body.get("model") == "bad-request":
            self._json({"error": {"message": "no such thing", "type": "invalid_request_error"}}, status=400)
        elif body.get("model") == "rate-limited":
            self._json({"error": {"message": "slow down", "type": "rate_limit_error"}}, status=429)
        elif path.endswith("/chat/completions"):
            self._chat(body, number)
        elif path.endswith("/responses"):
            self._responses(body, number)
        elif path.endswith("/messages"):
            self._messages(body, number)
        elif path.endswith("/embeddings"):
            usage = {"prompt_tokens": 1000, "total_tokens": 1000}
            data = [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}]
            self._json({"object": "list", "data": data, "model": body["model"], "usage": usage})
        else:
            self.send_error(404)

    def _chat(self, body: dict[str, Any], number: int) -> None:
        usage = PLAIN_CHAT_USAGE if self.headers.get("x-fake-usage") == "plain" else CHAT_USAGE
        if self.headers.get("x-fake-usage") == "huge":  # a count no real call has
            usage = {"prompt_tokens": 10**13, "completion_tokens": 1, "total_tokens": 10**13 + 1}
        base = {
            "id": f"chatcmpl-{number}",
            "created": 1764300000,
            "model": body["model"],
            "service_tier": body.get("service_tier", "default"),
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": "A summary."}
            choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
            completion = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
            if self.headers.get("x-fake-usage") == "none":  # a compatible server that reports none
                del completion["usage"]
            self._json(completion)
            return
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {
                **chunk,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "A "}, "finish_reason": None}],
            },
            {**chunk, "choices": [{"index": 0, "delta": {"content": "summary."}, "finish_reason": "stop"}]},
        ]
        if (body.get("stream_options") or {}).get("include_usage"):  # as OpenAI: usage only when asked
            events.append({**chunk, "choices": [], "usage": usage})
        self._sse([(None, e) for e in events], done=True, number=number)

    def _responses(self, body: dict[str, Any], number: int) -> None:
        response = {
            "id": f"resp_{number}",
            "object": "response",
            "created_at": 1764300000,
            "model": body["model"],
            "status": "completed",
            "output": [],
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "service_tier": body.get("service_tier", "default"),
            "usage": RESPONSES_USAGE,
        }
        if not body.get("stream"):
            self._json(response)
            return
        started = {**response, "status": "in_progress", "usage": None}
        self._sse(
            [
                ("response.created", {"type": "response.created", "sequence_number": 0, "response": started}),
                ("response.completed", {"type": "response.completed", "sequence_number": 1, "response": response}),
            ]
        )

    def _messages(self, body: dict[str, Any], number: int) -> None:
        message = {
            "id": f"msg_{number}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "A summary."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": MESSAGE_USAGE,
        }
        if not body.get("stream"):
            self._json(message)
            return
        started = {**message, "content": [], "usage": {**MESSAGE_USAGE, "output_tokens": 1}}
        events = [
            {"type": "message_start", "message": started},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A summary."}},
            {"type": "content_block_stop", "index": 0},
            # The output tokens so far: cumulative, as Anthropic sends them.
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 100}},
            {"type": "message_stop"},
        ]
        self._sse([(event["type"], event) for event in events], number=number)

    def _json(self, body: dict[str, Any], status: int = 200) -> None:
        """The body as JSON; with `x-fake-wait: SECONDS`, after that long (a slow provider)."""
        time.sleep(float(self.headers.get("x-fake-wait", "0")))
        payload = json.dumps(body).encode()
        Provider.sent.append(payload)
        compressed = self.headers.get("x-fake-gzip") == "1"
        if compressed:  # as a provider behind a compressing front end
            payload = gzip.compress(payload)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if compressed:
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _sse(self, events: list[tuple[str | None, dict[str, Any]]], done: bool = False, number: int = 0) -> None:
        """The events, each flushed on its own; with `x-fake-delay: SECONDS`, that long before
        each event after the first (a caller that goes away is noticed at the next write, and noted)."""
        delay = float(self.headers.get("x-fake-delay", "0"))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        lines = [(f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n" for name, data in events]
        if done:
            lines.append("data: [DONE]\n\n")
        try:
            for index, line in enumerate(lines):
                if index and delay:
                    time.sleep(delay)
                Provider.produced.append((time.monotonic(), number, index))
                self.wfile.write(line.encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            Provider.cancelled.append(number)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of calls at once (http.server's default backlog is 5)
    daemon_threads = True


def serve() -> tuple[ThreadingHTTPServer, str]:
    server = _Server(("127.0.0.1", 0), Provider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"

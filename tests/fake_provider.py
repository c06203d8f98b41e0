"""A fake OpenAI and Anthropic API on loopback, for the real SDKs to talk to: chat
completions, the Responses API and messages, each as JSON or as a server-sent event
stream. Nothing reaches the network."""

from __future__ import annotations

import itertools
import json
import threading
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

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        Provider.requests.append(body)
        number = next(_ids)
        if body.get("model") == "rate-limited":
            self._json({"error": {"message": "slow down", "type": "rate_limit_error"}}, status=429)
        elif self.path.endswith("/chat/completions"):
            self._chat(body, number)
        elif self.path.endswith("/responses"):
            self._responses(body, number)
        elif self.path.endswith("/messages"):
            self._messages(body, number)
        else:
            self.send_error(404)

    def _chat(self, body: dict[str, Any], number: int) -> None:
        usage = PLAIN_CHAT_USAGE if self.headers.get("x-fake-usage") == "plain" else CHAT_USAGE
        base = {
            "id": f"chatcmpl-{number}",
            "created": 1764300000,
            "model": body["model"],
            "service_tier": body.get("service_tier", "default"),
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": "A summary."}
            choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
            self._json({**base, "object": "chat.completion", "choices": choices, "usage": usage})
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
        self._sse([(None, e) for e in events], done=True)

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
        self._sse([(event["type"], event) for event in events])

    def _json(self, body: dict[str, Any], status: int = 200) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _sse(self, events: list[tuple[str | None, dict[str, Any]]], done: bool = False) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for name, data in events:
            if name:
                self.wfile.write(f"event: {name}\n".encode())
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        if done:
            self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def serve() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"

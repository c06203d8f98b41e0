"""The proxy's reading of a stream, cut at every byte: whatever the reads, the events come
out whole, their bytes exactly as sent, and the usage read is the same (Envoy AI Gateway
and higress lost usage to SSE events split across reads)."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, strategies as st

from tally_client.usage import StreamUsage
from tally_server.proxy import sse

# A chat completion stream as a compatible provider sends it: a heartbeat comment, CRLF
# line endings on one event, a data field over two lines, the usage on the last chunk
# that still carries a choice (as Mistral and DeepSeek do), then [DONE].
CHUNK = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "gpt-4o"}
STREAM = (
    b": keep-alive\n\n"
    + b"data: "
    + json.dumps({**CHUNK, "choices": [{"index": 0, "delta": {"content": "A"}}]}).encode()
    + b"\r\n\r\n"
    + b'data: {"id": "chatcmpl-9", "object": "chat.completion.chunk",\ndata: "model": "gpt-4o", "choices": []}\n\n'
    + b"data: "
    + json.dumps(
        {
            **CHUNK,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 10}},
        }
    ).encode()
    + b"\n\n"
    + b"data: [DONE]\n\n"
)


def read(cuts: list[int]) -> tuple[bytes, list[sse.Event], object]:
    splitter, usage, events = sse.Splitter(1 << 20), StreamUsage("openai"), []
    bounds = [0, *sorted(set(cuts)), len(STREAM)]
    for start, end in itertools.pairwise(bounds):
        for event in splitter.feed(STREAM[start:end]):
            events.append(event)
            if isinstance(item := event.json(), dict):
                usage.observe(item)
    return b"".join(e.raw for e in events) + splitter.rest(), events, usage.reading()


def test_the_stream_read_whole():
    raw, events, reading = read([])
    assert raw == STREAM
    assert [e.data for e in events][-1] == "[DONE]" and events[0].data == ""  # the comment: no data
    assert json.loads(events[2].data)["choices"] == [], "a data field over two lines is joined"
    assert reading is not None and reading.units == {"text": (20, 7), "text_cache_read": (10, 0)}


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=40))
def test_any_cuts_give_the_same_events_and_usage(cuts):
    whole = read([])
    raw, events, reading = read(cuts)
    assert raw == STREAM
    assert [e.raw for e in events] == [e.raw for e in whole[1]]
    assert reading == whole[2]


def test_an_event_over_the_bound_is_passed_on_raw_and_not_read():
    splitter = sse.Splitter(16)
    first = splitter.feed(b"data: " + b"x" * 40)
    assert splitter.overflowed and b"".join(e.raw for e in first) == b"data: " + b"x" * 40
    assert [e.raw for e in splitter.feed(b"\n\ndata: more\n\n")] == [b"\n\ndata: more\n\n"]

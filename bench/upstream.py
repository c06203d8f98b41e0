"""A fast fake OpenAI-compatible upstream for bench.proxy: aiohttp, one process, a fixed
chat completion (or a stream of `--chunks` events) after `--latency-ms`. Prints
`PORT n` once it listens."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

from aiohttp import web

USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
_ids = itertools.count(1)


def application(latency_ms: float, chunks: int) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        number = next(_ids)
        base = {"id": f"chatcmpl-{number}", "created": 1764300000, "model": body.get("model", "gpt-4o")}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "A summary."}
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": USAGE,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        for index in range(chunks):
            finish = "stop" if index == chunks - 1 else None
            choice = {"index": 0, "delta": {"content": "word "}, "finish_reason": finish}
            await response.write(f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(f"data: {json.dumps({**chunk, 'choices': [], 'usage': USAGE})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def main(latency_ms: float, chunks: int) -> None:
    runner = web.AppRunner(application(latency_ms, chunks), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.latency_ms, args.chunks))
    except ImportError:
        asyncio.run(main(args.latency_ms, args.chunks))

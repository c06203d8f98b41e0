"""The proxy's cost, measured in one run beside direct calls to the same fake upstream.

Three processes share the machine: a fast fake OpenAI upstream (bench/upstream.py, aiohttp),
`tally serve --proxy-listen` with that upstream, and this client (aiohttp, `--concurrency`
calls in flight). Each scenario runs right after its direct baseline, for several rounds;
the table gives medians over the rounds:

- non-streamed chat completions: rate, p50 and p99, direct and through the proxy, and the
  latency the proxy adds (proxied minus direct, at p50 and p99);
- the same with a BLOCK limit on every call (each call reserved before it is forwarded and
  settled by its event);
- streamed, one call at a time: the time to the first byte of the body, direct and
  proxied, without and with the limit.

With `--latency-ms` the fake answers after that long, as a provider does: the proxy's
share of a call then shows beside a realistic one.

    python -m bench.proxy [--postgres-url URL] [--seconds 3] [--rounds 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tally_client import AsyncTallyClient, limit

from .__main__ import create_postgres_database, drop_postgres_database, percentile

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "gpt-4o", "max_tokens": 200, "messages": [{"role": "user", "content": "Summarize this. " * 40}]}


@dataclass
class Run:
    name: str
    rate: float
    p50_ms: float
    p99_ms: float


def start(command: list[str], ready: re.Pattern[str]) -> tuple[subprocess.Popen[str], re.Match[str]]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert process.stdout is not None
    for line in process.stdout:
        if match := ready.search(line):
            return process, match
    raise SystemExit(f"bench.proxy: {command[2]} did not start")


async def load(session: aiohttp.ClientSession, url: str, seconds: float, concurrency: int, name: str) -> Run:
    latencies: list[float] = []
    measuring = False
    deadline = 0.0

    async def worker() -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            async with session.post(url, json=BODY) as answer:
                await answer.read()
                if answer.status != 200:
                    raise SystemExit(f"bench.proxy: {name} answered {answer.status}")
            if measuring:
                latencies.append(time.perf_counter() - began)

    deadline = time.perf_counter() + 0.5  # warm-up
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    measuring = True
    began = time.perf_counter()
    deadline = began + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return Run(name, len(latencies) / elapsed, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3)


async def first_byte(session: aiohttp.ClientSession, url: str, calls: int) -> float:
    """The median time to the first byte of a streamed body, one call at a time."""
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        async with session.post(url, json={**BODY, "stream": True}) as answer:
            await answer.content.readany()
            times.append(time.perf_counter() - began)
            await answer.read()
    return statistics.median(times) * 1e3


def median_run(runs: list[Run]) -> Run:
    return Run(
        runs[0].name,
        statistics.median(r.rate for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
    )


async def engine(label: str, url: str, args: argparse.Namespace) -> None:
    upstream, port = start(
        [sys.executable, "-m", "bench.upstream", "--latency-ms", str(args.latency_ms)], re.compile(r"PORT (\d+)")
    )
    server, ready = start(
        [
            sys.executable,
            "-m",
            "tally_server",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            url,
            "--proxy-listen",
            "127.0.0.1:0",
            "--proxy-upstream",
            f"openai=http://127.0.0.1:{port.group(1)}/v1",
            "--log-level",
            "info",
        ],
        re.compile(r"tally ready: serving on [^:]+:(\d+).*proxy at http://127\.0\.0\.1:(\d+)/"),
    )
    try:
        direct = f"http://127.0.0.1:{port.group(1)}/v1/chat/completions"
        proxied = f"http://127.0.0.1:{ready.group(2)}/openai/v1/chat/completions"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            rows: dict[str, list[Run]] = {}
            first: dict[str, tuple[float, float]] = {}
            for with_limit in (False, True):
                suffix = " (BLOCK limit on every call)" if with_limit else ""
                if with_limit:
                    async with AsyncTallyClient(f"127.0.0.1:{ready.group(1)}") as client:
                        await client.create_limit(limit("bench-every-call", 1_000_000, everything=True))
                for _ in range(args.rounds):
                    rows.setdefault("direct" + suffix, []).append(
                        await load(session, direct, args.seconds, args.concurrency, "direct")
                    )
                    rows.setdefault("proxied" + suffix, []).append(
                        await load(session, proxied, args.seconds, args.concurrency, "proxied")
                    )
                first["first streamed byte" + suffix] = (
                    await first_byte(session, direct, args.stream_calls),
                    await first_byte(session, proxied, args.stream_calls),
                )
        print(f"\n{label}: {'scenario':<40} {'rate':>9} {'p50 ms':>8} {'p99 ms':>8}   ratio  added p50/p99 ms")
        baseline: Run | None = None
        for name, runs in rows.items():
            run = median_run(runs)
            if name.startswith("direct"):
                baseline = run
                print(f"  {name:<40} {run.rate:>7,.0f}/s {run.p50_ms:>8.2f} {run.p99_ms:>8.2f}")
            else:
                assert baseline is not None
                ratios = [p.rate / d.rate for p, d in zip(runs, rows[name.replace("proxied", "direct")], strict=True)]
                added = f"{run.p50_ms - baseline.p50_ms:+.2f} / {run.p99_ms - baseline.p99_ms:+.2f}"
                print(
                    f"  {name:<40} {run.rate:>7,.0f}/s {run.p50_ms:>8.2f} {run.p99_ms:>8.2f}"
                    f"   {statistics.median(ratios):.2f}x  {added}"
                )
        for name, (first_direct, first_proxied) in first.items():
            print(
                f"  {name}: direct {first_direct:.2f} ms, proxied {first_proxied:.2f} ms"
                f" (added {first_proxied - first_direct:+.2f} ms)"
            )
    finally:
        for process in (server, upstream):
            process.terminate()
            process.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", help="also run on PostgreSQL (a fresh database is made there)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="the fake upstream's own latency")
    parser.add_argument("--stream-calls", type=int, default=50, help="streamed calls timed to their first byte")
    args = parser.parse_args()
    print(
        f"Proxy benchmark: concurrency {args.concurrency}, upstream latency {args.latency_ms:g} ms, "
        "medians of the rounds; ratios to direct calls in the same run"
    )
    with tempfile.TemporaryDirectory() as directory:
        await engine("sqlite", f"sqlite+aiosqlite:///{directory}/proxy.db", args)
    if args.postgres_url:
        database = await create_postgres_database(args.postgres_url)
        try:
            await engine("postgresql", database, args)
        finally:
            await drop_postgres_database(args.postgres_url, database)


if __name__ == "__main__":
    asyncio.run(main())

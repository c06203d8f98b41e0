"""The Node.js example of docs/callers.md, verbatim, against a real server's proxy with a
fake provider upstream: plain HTTP (Node's own fetch), the experience named by a header,
the cost read from xproxy_result."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from tally_client import AsyncTallyClient, dollars
from tally_client.usage import openai_units
from tally_server.app import TallyServer
from tally_server.config import Settings

from . import fake_provider
from .conftest import IN_CI, unique

DOCS = Path(__file__).resolve().parent.parent / "docs" / "callers.md"


def node_example() -> str:
    return re.findall(r"```js\n(.*?)```", DOCS.read_text(), re.S)[0]


async def test_the_node_example_calls_through_the_proxy(database_url, tmp_path):
    node = shutil.which("node")
    if node is None:
        if IN_CI:
            pytest.fail("CI=true requires node (the proxy's Node.js example)")
        pytest.skip("node is not installed")
    provider, url = fake_provider.serve()
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        grace_seconds=1,
        proxy_listen="127.0.0.1:0",
        proxy_upstreams=(f"openai={url}/v1",),
    )
    server = TallyServer(settings)
    await server.start()
    try:
        name = unique("Node_Proxy")
        async with AsyncTallyClient(f"127.0.0.1:{server.port}") as client:
            await client.create_experience_type(name, "Calls through the proxy from Node.js")
            expected = dollars(
                (await client.quote_price("system.openai", "gpt-4o", openai_units(fake_provider.CHAT_USAGE))).cost_total
            )
            script = tmp_path / "caller.mjs"
            script.write_text(node_example())
            env = {
                **os.environ,
                "PROXY": f"http://127.0.0.1:{server.proxy.port}/openai/v1",
                "OPENAI_API_KEY": "sk-node",
                "EXPERIENCE_TYPE": name,
            }
            process = await asyncio.create_subprocess_exec(
                node, str(script), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, err.decode()
            said = json.loads(out.decode().strip().splitlines()[-1])
            assert said["answer"] == "A summary."
            assert said["experience_id"] == said["header_experience_id"]
            assert Decimal(said["cost_total"]) == expected
            stats = (await client.get_experience(said["experience_id"])).stats
            assert stats.event_count == 1 and dollars(stats.cost_total) == expected
    finally:
        await server.stop()
        provider.shutdown()

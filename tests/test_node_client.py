"""A second language: a real Node.js client (@grpc/grpc-js, @grpc/proto-loader) against a
real server. Its packages are installed from npm here on first use (tests/node)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from .conftest import IN_CI, unique

NODE_DIR = Path(__file__).parent / "node"


async def run(*command: str, limit_seconds: float = 300) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), limit_seconds)
    return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def node_ready() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        reason = "Node.js and npm are needed for the Node.js caller test"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        code, out, err = await run(npm, "ci", "--no-audit", "--no-fund")
        assert code == 0, f"npm ci failed:\n{out}\n{err}"
    return node


async def test_node_client_creates_ingests_and_reads_the_cost(stubs, node_ready):
    code, out, err = await run(node_ready, "caller.js", stubs.target, unique("Node_Summarization"), limit_seconds=60)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["result_experience_id"] == result["experience_id"]
    assert result["header_experience_id"] == result["experience_id"], "the xproxy-experience-id response header"
    assert result["user_id"] == "node-user"
    assert result["cost_total"] == {"currency_code": "USD", "units": "0", "nanos": 3500000}
    assert result["stats_cost_total"] == result["cost_total"]
    assert result["event_count"] == "1"

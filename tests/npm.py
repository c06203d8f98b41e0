"""The JavaScript callers' tests: their own npm packages, installed on first use."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from .conftest import IN_CI


async def run(directory: Path, *command: str | Path, limit_seconds: float = 300) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=directory, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), limit_seconds)
    return process.returncode or 0, out.decode(), err.decode()


async def install(directory: Path, installed: str, what: str) -> str:
    """`npm ci` in `directory` unless node_modules/`installed` exists; returns the node
    binary. Without Node.js and npm the test skips, or fails under CI=true."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        reason = f"Node.js and npm are needed for the {what} test"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    if not (directory / "node_modules" / installed).exists():
        code, out, err = await run(directory, npm, "ci", "--no-audit", "--no-fund")
        assert code == 0, f"npm ci failed:\n{out}\n{err}"
    return node

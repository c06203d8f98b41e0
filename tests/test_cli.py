"""The `tally` command line and the README's caller examples, as printed."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import unique
from .server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_block(language: str, contains: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if contains in block)


async def tally(target: str, *args: str, stdin: str = "") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "tally"),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TALLY_TARGET": target},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
def test_readme_cli_walkthrough(tmp_path):
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}").start()
    try:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TALLY_TARGET": server.target}
        script = "set -e\n" + readme_block("sh", "tally types create Document_Chatbot")
        result = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
        )
        again = subprocess.run(
            [
                "bash",
                "-c",
                f"{BIN}/tally ingest events.jsonl --experience-id $(tally experiences list Document_Chatbot --json"
                ' | python3 -c \'import json,sys; print(json.load(sys.stdin)["experiences"][0]["experience_id"])\')',
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
    finally:
        server.terminate()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "accepted 2, duplicates 0, rejected 1; cost of accepted events $0.008" in out
    assert "line 3: event.resource: resource is required" in out
    assert "some events were rejected" in out, "a rejection makes `tally ingest` exit non-zero"
    assert re.search(r"cost\s+\$0\.008\s+\(input \$0\.0045, output \$0\.0035\)", out)
    assert re.search(r"^v1\s+1\s+2\s+\$0\.008", out, re.M), "the per-version table"
    assert "Document_Chatbot is now at version 2" in out
    assert "accepted 0, duplicates 2, rejected 1" in again.stdout, again.stdout + again.stderr


def readme_python_example(stubs):
    code = readme_block("python", "with TallyClient(").replace("127.0.0.1:50051", stubs.target)
    code = code.replace("Document_Summarization", unique("Document_Summarization"))
    printed = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})

    return asyncio.to_thread(run), printed


async def test_readme_python_example_prints_each_documents_cost(stubs):
    running, printed = readme_python_example(stubs)
    await running
    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["q3-report.pdf", "contract.docx"]
    assert [line.split()[1] for line in lines] == ["0.0115", "0.0115"]


async def test_cli_errors_are_one_line_with_a_non_zero_exit(stubs):
    code, out, err = await tally(stubs.target, "types", "get", unique("missing"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("tally: NOT_FOUND (EXPERIENCE_TYPE_NOT_FOUND):")
    code, _, err = await tally("127.0.0.1:1", "types", "list")
    assert code == 1 and "is Tally running at 127.0.0.1:1?" in err
    code, _, err = await tally(stubs.target, "experiences", "get", "not-a-uuid")
    assert code == 1 and "INVALID_ARGUMENT" in err


async def test_cli_ingest_from_stdin_with_json_summary(stubs):
    name = unique("Stdin")
    assert (await tally(stubs.target, "types", "create", name, "-d", "from stdin"))[0] == 0
    lines = "\n".join(
        f'{{"category": "system.openai", "resource": "gpt-4o", "units": {{"text": {{"input": {n}}}}}}}'
        for n in range(1, 51)
    )
    code, out, err = await tally(stubs.target, "ingest", "--experience-name", name, "--json", stdin=lines)
    assert code == 0, err
    import json

    summary = json.loads(out)
    assert (summary["accepted"], summary["duplicates"], summary["rejected"]) == (50, 0, 0)
    # 1 + 2 + ... + 50 = 1,275 input tokens at $2.50/M
    assert summary["cost_of_accepted"] == "$0.0031875"

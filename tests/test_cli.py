"""The `tally` command line, and the README's Python example as printed."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os

from .conftest import unique
from .readme import BIN, block


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


def readme_python_example(stubs):
    code = block("python", "with TallyClient(").replace("127.0.0.1:50051", stubs.target)
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

"""The `tally` command line, and the README's Python example as printed."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re

from tally.v1 import ingest_service_pb2 as ing_pb

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


def jsonl(count: int, prefix: str) -> str:
    return "\n".join(
        json.dumps(
            {"category": "system.openai", "resource": "gpt-4o", "units": {"text": {"input": 100 * n, "output": 10}},
             "idempotency_key": f"{prefix}-{n}"}
        )
        for n in range(1, count + 1)
    )  # fmt: skip


async def test_cli_ingest_makes_one_experience_per_file(stubs, tmp_path):
    name = unique("Files")
    assert (await tally(stubs.target, "types", "create", name, "-d", "one run per file"))[0] == 0
    path = tmp_path / "run.jsonl"
    path.write_text(jsonl(40, unique("line")))
    code, out, err = await tally(stubs.target, "ingest", str(path), "--experience-name", name)
    assert code == 0, err
    created = re.search(rf"experience (\S+) \({name}\) created for this file", out)
    assert created, out
    code, out, _ = await tally(stubs.target, "experiences", "list", name, "--json")
    listed = json.loads(out)["experiences"]
    assert [e["experience_id"] for e in listed] == [created.group(1)]
    code, out, _ = await tally(stubs.target, "experiences", "get", created.group(1), "--json")
    assert json.loads(out)["stats"]["event_count"] == "40"
    code, out, _ = await tally(stubs.target, "ingest", str(path), "--experience-name", name)
    assert "duplicates 40" in out and "created for this file" not in out, "a rerun makes no empty experience"
    assert len(json.loads((await tally(stubs.target, "experiences", "list", name, "--json"))[1])["experiences"]) == 1


async def test_cli_ingest_experience_per_line_keeps_one_per_event(stubs, tmp_path):
    name = unique("Lines")
    await tally(stubs.target, "types", "create", name, "-d", "one run per line")
    path = tmp_path / "lines.jsonl"
    path.write_text(jsonl(5, unique("per-line")))
    code, out, err = await tally(stubs.target, "ingest", str(path), "--experience-name", name, "--experience-per-line")
    assert code == 0 and "5 experiences of" in out, out + err
    listed = json.loads((await tally(stubs.target, "experiences", "list", name, "--json"))[1])["experiences"]
    assert len(listed) == 5


async def test_cli_experiences_list_pages_with_a_hint(stubs):
    name = unique("Pages")
    await tally(stubs.target, "types", "create", name, "-d", "paged")
    for _ in range(3):
        assert (await tally(stubs.target, "experiences", "create", name))[0] == 0
    code, first, err = await tally(stubs.target, "experiences", "list", name, "--limit", "2")
    assert code == 0 and len(first.strip().splitlines()) == 4, first  # header, rule, two rows
    token = re.search(r"^more: tally experiences list \S+ --limit 2 --page-token (\S+)$", err, re.M)
    assert token, err
    code, second, err = await tally(
        stubs.target, "experiences", "list", name, "--limit", "2", "--page-token", token.group(1)
    )
    assert len(second.strip().splitlines()) == 3 and "more:" not in err
    ids = re.compile(r"^[0-9a-f]{8}-[0-9a-f-]{27}\b", re.M)
    assert len(set(ids.findall(first)) | set(ids.findall(second))) == 3, "three experiences, none twice"


async def test_cli_prices(stubs):
    resource = unique("acme-llm")
    code, out, err = await tally(
        stubs.target, "prices", "create", "custom.acme", resource, "--unit", "text=0.20/0.60", "--json"
    )
    assert code == 0, err
    price_id = json.loads(out)["price"]["price_id"]
    code, out, err = await tally(stubs.target, "prices", "quote", "custom.acme", resource, "--units", "text=10000/2000")
    assert code == 0 and out.startswith("$0.0032  (input $0.002, output $0.0012)"), out + err
    assert f"custom custom.acme/{resource.lower()}" in out
    code, out, _ = await tally(stubs.target, "prices", "list", "--category", "custom.acme")
    assert price_id in out and "text 0.20/0.60" in out
    code, out, _ = await tally(stubs.target, "prices", "get", price_id)
    assert code == 0 and price_id in out
    code, out, _ = await tally(stubs.target, "prices", "end", price_id)
    assert code == 0 and "events stored before keep their cost" in out
    code, out, err = await tally(stubs.target, "prices", "quote", "custom.acme", resource, "--units", "text=10000/2000")
    assert out.startswith("$0.00"), "ended: no price any more"
    assert "not priced: text 10000/2000" in out
    code, _, err = await tally(
        stubs.target,
        "prices",
        "create",
        "system.openai",
        "o3",
        "--unit",
        "text=1/1",
        "--context",
        "processing=overnight",
    )
    assert code == 0 and "warning: this price overrides the system price of system.openai/o3" in err
    code, out, err = await tally(
        stubs.target,
        "prices",
        "quote",
        "system.openai",
        "o3",
        "--units",
        "text=1000/1000",
        "--context",
        "service_tier=flex",
    )
    assert out.startswith("$0.005 ") and "variant service_tier=flex" in out, out + err


async def test_cli_limits_create_list_reset_and_refuse_bad_input(stubs):
    name = unique("cli-limit")
    code, out, err = await tally(
        stubs.target, "limits", "create", name, "--max", "2.50", "--tag", name, "--period", "day"
    )
    assert code == 0 and f"created limit {name}" in out and "$2.50" in out, err
    await stubs.ingest.Ingest(
        ing_pb.IngestRequest(
            event=ing_pb.UsageEvent(
                category="system.openai", resource="gpt-4o", units={"text": ing_pb.UnitCounts(input=1000)}
            )
        ),
        metadata=(("xproxy-request-tags", name),),
    )
    code, out, err = await tally(stubs.target, "limits", "get", name)
    assert code == 0 and "$0.0025" in out and "ok" in out, out + err
    code, out, _ = await tally(stubs.target, "limits", "list", "--limit", "1000")
    assert name in out
    code, out, err = await tally(stubs.target, "limits", "reset", name)
    assert code == 0 and "new period" in out, err
    code, out, _ = await tally(stubs.target, "limits", "periods", name)
    assert code == 0 and out.count("$0.0025") == 1, out
    code, out, err = await tally(stubs.target, "limits", "create", unique("bad"), "--max", "-1", "--everything")
    assert code != 0 and "INVALID_ARGUMENT" in err and "limit.max" in err, err
    code, out, err = await tally(stubs.target, "limits", "delete", name)
    assert code == 0


MISSPELT = "\n".join(
    [
        '{"category": "system.openai", "resource": "gtp-4o", "units": {"text": {"input": 100}}}',
        '{"category": "system.opneai", "resource": "gpt-4o", "units": {"text": {"input": 100}}}',
        '{"category": "system.openai", "resource": "gpt-4o", "units": {"txt": {"input": 100}}}',
    ]
)


async def test_cli_ingest_says_why_events_are_not_priced_and_can_fail_on_it(stubs):
    """Three misspelt lines: each reason printed with the nearest known name, and
    --fail-on-unpriced turns the quiet $0.00 into exit 1."""
    code, out, err = await tally(stubs.target, "ingest", stdin=MISSPELT)
    assert code == 0, err
    assert "3 unpriced" in out, out
    assert "no price for system.openai/gtp-4o (did you mean gpt-4o?) (1)" in out, out
    assert "no price for system.opneai/gpt-4o (did you mean system.openai?) (1)" in out, out
    assert "(did you mean 'text'?)" in out, out
    code, out, err = await tally(stubs.target, "ingest", "--fail-on-unpriced", "--json", stdin=MISSPELT)
    assert code == 1, (out, err)
    import json

    summary = json.loads(out)
    assert summary["unpriced"] == 3 and summary["accepted"] == 3
    assert sum(summary["not_priced_reasons"]["unpriced"].values()) == 3
    listed = await tally(stubs.target, "events", "list", "--resource", "gtp-4o", "--limit", "1")
    assert "did you mean gpt-4o?" in listed[1], listed


async def test_cli_says_its_version(stubs):
    code, out, _ = await tally(stubs.target, "--version")
    assert code == 0 and re.fullmatch(r"tally \d+\.\d+\.\d+ \(tally-genai-client\), server tally-genai \S+\n", out), out


async def test_cli_breakdown_by_day_is_in_time_order_with_empty_days(stubs):
    import datetime as dt

    from google.protobuf import timestamp_pb2

    from tally.v1 import experience_type_service_pb2 as et_pb

    name = unique("Daily")
    await stubs.types.CreateExperienceType(
        et_pb.CreateExperienceTypeRequest(experience_type=et_pb.ExperienceType(name=name, description="d"))
    )
    now = dt.datetime.now(dt.UTC)
    for days_ago, tokens in ((3, 1000), (0, 2000)):  # the dearer day last, and two empty days between
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(now - dt.timedelta(days=days_ago))
        units = {"text": ing_pb.UnitCounts(input=tokens)}
        event = ing_pb.UsageEvent(category="system.openai", resource="gpt-4o", units=units, event_timestamp=stamp)
        user = "early" if days_ago else "late"
        metadata = (("xproxy-experience-name", name), ("xproxy-user-id", user))
        await stubs.ingest.Ingest(ing_pb.IngestRequest(event=event), metadata=metadata)
    # Filtered by user: only that user's events (read from the events).
    code, out, err = await tally(stubs.target, "report", "breakdown", "--by", "user", "--type", name, "--user", "late")
    assert code == 0, err
    assert re.search(r"^late\s+1\s+0\s+2,000\s+0\s+\$", out, re.M) and "early" not in out, out
    code, out, err = await tally(stubs.target, "report", "breakdown", "--by", "day", "--days", "4", "--type", name)
    assert code == 0, err
    days = re.findall(r"^(\d{4}-\d{2}-\d{2})\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    assert [d for d, *_ in days] == sorted(d for d, *_ in days), out
    expected = [(now - dt.timedelta(days=n)).strftime("%Y-%m-%d") for n in (3, 2, 1, 0)]
    assert [d for d, *_ in days][-4:] == expected, out
    assert [events for _, events, *_ in days][-4:] == ["1", "0", "0", "1"], out

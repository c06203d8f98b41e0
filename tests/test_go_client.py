"""A third language: a real Go client against a real server, built as docs/callers.md
says, with no Go module proxy: Debian's grpc-go 1.33 and protobuf-go sources in GOPATH
mode, and the committed stubs of generated/go (package tally/v1).
Needs `go` and /usr/share/gocode (.ci/run installs them); skipped without them, failed
under CI=true."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import IN_CI, unique

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_GOPATH = Path("/usr/share/gocode")
PACKAGES = "golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev"


def build(gopath: Path) -> Path:
    """The Go caller, built from the committed stubs as docs/callers.md does it; returns the binary."""
    env = {
        **os.environ,
        "GOPATH": f"{gopath}{os.pathsep}{DEBIAN_GOPATH}",
        "GO111MODULE": "off",
        "GOCACHE": str(gopath / "cache"),
        "PATH": f"{gopath / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }

    def run(*command: str | Path) -> None:
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout}\n{result.stderr}"

    source = gopath / "src"
    shutil.copytree(ROOT / "generated" / "go" / "tally", source / "tally")
    (source / "caller").mkdir()
    shutil.copy(ROOT / "tests" / "go" / "caller.go", source / "caller" / "main.go")
    run("go", "build", "-o", gopath / "bin" / "caller", "caller")
    return gopath / "bin" / "caller"


@pytest.fixture(scope="session")
def go_caller(tmp_path_factory) -> Path:
    missing = [tool for tool in ("go",) if shutil.which(tool) is None]
    if missing or not (DEBIAN_GOPATH / "src" / "google.golang.org" / "grpc").exists():
        reason = f"the Go caller test needs Debian's {PACKAGES} (missing: {missing or '/usr/share/gocode'})"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    return build(tmp_path_factory.mktemp("gopath"))


@pytest.mark.slow
async def test_go_client_creates_ingests_reads_the_cost_and_decodes_errors(stubs, go_caller):
    process = await asyncio.create_subprocess_exec(
        go_caller,
        stubs.target,
        unique("Go_Summarization"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["result_experience_id"] == result["experience_id"]
    assert result["header_experience_id"] == [result["experience_id"]], "the xproxy-experience-id response header"
    assert result["user_id"] == "go-user"
    assert result["cost_total_nanos"] == 3_500_000 and result["stats_cost_nanos"] == 3_500_000
    assert result["event_count"] == 1
    assert (result["missing_type_code"], result["missing_type_reason"]) == ("NotFound", "EXPERIENCE_TYPE_NOT_FOUND")

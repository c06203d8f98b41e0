"""The client distribution on its own, as a caller installs it: `pip install ./clients`
into an empty virtual environment gives a working client and `tally` command with none
of the server's dependencies, and its typed surface holds under `mypy --strict` (a
README-style caller passes; what a caller can misspell fails)."""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CALLER = (Path(__file__).parent / "typing" / "caller.py").read_text()
SERVER_ONLY = {"sqlalchemy", "alembic", "aiosqlite", "asyncpg", "genai-prices", "uvloop", "tally-genai"}

# (what the caller's script gets wrong, the text that replaces a correct one, what mypy says)
MISTAKES = [
    (
        "a misspelt keyword of ingest",
        ('idempotency_key=f"{document}-2"', 'idempotncy_key=f"{document}-2"'),
        'Unexpected keyword argument "idempotncy_key"',
    ),
    ("a misspelt response field", (".stats.cost_total)", ".stats.cost_totl)"), 'has no attribute "cost_totl"'),
    (
        "a misspelt keyword of the async client",
        ("latency_ms=850", "latency=850"),
        'Unexpected keyword argument "latency"',
    ),
    (
        "a positional argument where the client takes keywords only",
        ('"Document_Summarization", page_size=10)', '"Document_Summarization", 1, 10)'),
        'Too many positional arguments for "list_experiences"',
    ),
    (
        "a unit count of the wrong type",
        ('{"text": (10_000, 2_000)}', '{"text": ("10000", 2_000)}'),
        'incompatible type "str": "tuple[str, int]"',
    ),
]


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with only ./clients (and mypy, to check callers) installed."""
    home = tmp_path_factory.mktemp("client-venv")
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT / "clients")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return home


def run(home: Path, *command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{home / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, **kwargs)


@pytest.mark.slow
def test_installs_without_the_server_dependencies(client_venv):
    listed = run(client_venv, "python", "-m", "pip", "list", "--format", "json", "--disable-pip-version-check")
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "tally-genai-client" in installed
    assert not installed & SERVER_ONLY, f"server dependencies in a client-only install: {installed & SERVER_ONLY}"
    imported = run(
        client_venv,
        "python",
        "-c",
        "import sys, tally_client, tally_client.instrument, tally_client.cli; "
        "from tally.v1 import ingest_service_pb2, ingest_service_pb2_grpc; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'tally_server')))",
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]", "the client imported server modules"
    site = run(
        client_venv, "python", "-c", "import tally_client, tally.v1, os; print(os.path.dirname(tally.v1.__file__))"
    )
    stubs = Path(site.stdout.strip())
    assert (stubs / "py.typed").exists() and (stubs / "ingest_service_pb2.pyi").exists(), "type stubs are shipped"


@pytest.mark.slow
async def test_its_tally_command_talks_to_a_server_and_explains_serve(client_venv, stubs):
    import asyncio

    from tests.conftest import unique

    name = unique("ClientOnly")
    created = await asyncio.to_thread(
        run, client_venv, "tally", "--target", stubs.target, "types", "create", name, "-d", "from a client-only venv"
    )
    assert created.returncode == 0, created.stderr
    assert f"created experience type {name}" in created.stdout
    serve = await asyncio.to_thread(run, client_venv, "tally", "serve")
    assert serve.returncode == 1
    assert "pip install ./clients ." in serve.stderr, serve.stderr


@pytest.fixture(scope="session")
def checker(client_venv) -> Path:
    """mypy in the client-only environment, as a caller's CI would have it."""
    install = run(
        client_venv, "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "mypy==2.4.1"
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return client_venv


def mypy(home: Path, tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "caller.py").write_text(source)
    return run(home, "python", "-m", "mypy", "--strict", "--no-incremental", "caller.py", cwd=tmp_path)


@pytest.mark.slow
def test_mypy_strict_accepts_a_readme_style_caller(checker, tmp_path):
    result = mypy(checker, tmp_path, CALLER)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("mistake", "edit", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mypy_strict_catches(checker, tmp_path, mistake, edit, message):
    right, wrong = edit
    assert right in CALLER, f"the caller no longer has {right!r}"
    result = mypy(checker, tmp_path, CALLER.replace(right, wrong, 1))
    assert result.returncode == 1, f"{mistake} passed mypy:\n{result.stdout}"
    assert message in result.stdout, result.stdout

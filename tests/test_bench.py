"""The benchmark still runs end to end (briefly: its figures are not checked here,
only that every scenario and baseline is measured and reported)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` from the repository root; asserts that it exited 0."""
    run = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.mark.slow
def test_bench_reports_every_scenario_beside_its_baseline():
    run = run_bench("bench", "--seconds", "0.3", "--rounds", "1", "--workers", "2", "--connections", "2")
    for line in (
        "no-op unary (c=64)",
        "Ingest unary (c=64)",
        "no-op stream",
        "IngestStream",
        "raw sqlite3 executemany (1,000/transaction)",
        "IngestBatch (1000/request, 2 in flight)",
    ):
        assert line in run.stdout, run.stdout
    assert run.stdout.count("target ") == 3, run.stdout
    assert "tally serve --workers 2:" in run.stdout, run.stdout


@pytest.mark.slow
def test_read_bench_times_every_read_at_each_size():
    run = run_bench("bench.reads", "--sizes", "2000,4000", "--calls", "2")
    from bench.reads import TARGETS

    for read in TARGETS:
        assert read in run.stdout, run.stdout
    assert run.stdout.count("growth <= 2x") == sum(target is not None for target in TARGETS.values())


@pytest.mark.slow
def test_migration_bench_times_the_rollups_migration_on_both_engines(postgres_url):
    run = run_bench("bench.migration", "--sizes", "1000,2000", "--postgres-url", postgres_url)
    rows = re.findall(r"^(SQLite|PostgreSQL) +([\d,]+) +[\d.]+ +[\d,]+$", run.stdout, re.MULTILINE)
    expected = [(engine, size) for engine in ("SQLite", "PostgreSQL") for size in ("1,000", "2,000")]
    assert rows == expected, run.stdout


@pytest.mark.slow
def test_budget_reports_every_stage(postgres_url):
    run = run_bench("bench.budget", "--batches", "2", "--postgres-url", postgres_url)
    assert "failed" not in run.stderr, run.stderr
    # The tricks weighed on both engines, in commits of 1,000 and of 32.
    assert len(re.findall(r"^  (sqlite|postgresql) +(1000|32) ", run.stdout, re.MULTILINE)) == 4, run.stdout
    for stage in (
        "validate and hash",
        "answer",
        "writer: the insert",
        "writer: resolve, price, ids, commit",
        "raw sqlite3",
    ):
        assert stage in run.stdout, run.stdout


def test_limits_bench_times_reserve_and_settle_beside_a_noop_at_each_size(postgres_url):
    run = run_bench("bench.limits", "--sizes", "1,100", "--seconds", "0.3", "--postgres-url", postgres_url)
    for engine in ("sqlite", "postgresql"):
        section = run.stdout.split(f"{engine}: ")[1]
        assert re.search(r"Reserve \+ settling Ingest \(1 limits\) .* \d\.\d\dx", section), section
        assert re.search(r"Reserve \+ settling Ingest \(100 limits\) .* \d\.\d\dx", section), section
        assert "(100 limits, one of them applying)" in section


@pytest.mark.slow
def test_otlp_bench_compares_export_with_ingest_batch():
    run = run_bench("bench.otlp", "--seconds", "0.3", "--rounds", "1")
    assert "IngestBatch (512/request, 2 in flight)" in run.stdout, run.stdout
    assert "Export (512 spans/request, 2 in flight)" in run.stdout, run.stdout
    assert re.search(r"Export / IngestBatch: \d+\.\d\dx .*target 0\.8x: (meets|MISSES)", run.stdout), run.stdout

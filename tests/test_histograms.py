"""The packed latency histogram an experience keeps on its row (migration 0025): packing,
unpacking and adding to it are exact, and the migration's frozen copy of the packing packs
the same bytes. Pure functions, checked by hypothesis."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hypothesis import given, strategies as st

from tally_server.domain.rollups import merged_histogram, packed_histogram, unpacked_histogram

MIGRATION = (
    Path(__file__).resolve().parents[1] / "server/tally_server/storage/migrations/versions/0025_packed_latencies.py"
)
# Buckets as the server makes them (0 to about 2,200 for a day in milliseconds) and beyond;
# counts up to a heavy run's and beyond what 32 bits hold.
histograms = st.dictionaries(st.integers(0, 40_000), st.integers(0, 2**40), max_size=60)


def _frozen() -> object:
    spec = importlib.util.spec_from_file_location("packed_latencies_0025", MIGRATION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FROZEN = _frozen()


@given(histograms)
def test_a_packed_histogram_unpacks_to_its_buckets(buckets: dict[int, int]) -> None:
    packed = packed_histogram(buckets)
    assert unpacked_histogram(packed) == {bucket: count for bucket, count in buckets.items() if count}
    assert FROZEN._packed(sorted(buckets.items())) == packed  # type: ignore[attr-defined]
    assert dict(FROZEN._unpacked(packed)) == unpacked_histogram(packed)  # type: ignore[attr-defined]


@given(histograms, histograms)
def test_adding_to_a_packed_histogram_adds_each_bucket(stored: dict[int, int], added: dict[int, int]) -> None:
    summed = {bucket: stored.get(bucket, 0) + added.get(bucket, 0) for bucket in {*stored, *added}}
    assert unpacked_histogram(merged_histogram(packed_histogram(stored), added)) == {
        bucket: count for bucket, count in summed.items() if count
    }
    assert unpacked_histogram(merged_histogram(None, added)) == unpacked_histogram(packed_histogram(added))


def test_the_packing_is_small() -> None:
    """A run's ten latencies a few buckets apart: two bytes a bucket, where a row per bucket
    took 26 on SQLite."""
    buckets = {300 + 4 * i: 1 for i in range(10)}
    assert len(packed_histogram(buckets)) == 2 + 1 + 9 * 2  # the first bucket's distance takes two
    assert unpacked_histogram(None) == unpacked_histogram(b"") == {}

"""Each experience's latency histogram packed on its own row (experiences.latency_buckets)
instead of a row per bucket in experience_latencies: each bucket's distance from the one
before and its count, as unsigned LEB128 varints, in bucket order (the server's
domain.rollups.packed_histogram). A row per bucket took 26 bytes an event on SQLite at
1,000,000 events (its 16-byte experience id repeated in each); packed, a bucket takes two
or three bytes.

Copied experience by experience, 10,000 at a time, with progress; then experience_latencies
is dropped. The downgrade unpacks them back.

Frozen: this file carries the statements it ran when it was written and imports nothing of
the server.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None

BATCH = 10_000  # experiences a statement pair reads and writes
_log = logging.getLogger("tally.migrations")


def _packed(buckets: Iterable[tuple[int, int]]) -> bytes:
    """(bucket, count) pairs in bucket order, as domain.rollups.packed_histogram packs them."""
    out = bytearray()
    previous = 0
    for bucket, count in buckets:
        if not count:
            continue
        for value in (bucket - previous, count):
            while value >= 0x80:
                out.append(value & 0x7F | 0x80)
                value >>= 7
            out.append(value)
        previous = bucket
    return bytes(out)


def _unpacked(packed: bytes) -> list[tuple[int, int]]:
    values, value, shift = [], 0, 0
    for byte in packed:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            values.append(value)
            value, shift = 0, 0
    pairs, bucket = [], 0
    for distance, count in zip(values[::2], values[1::2], strict=True):
        bucket += distance
        pairs.append((bucket, count))
    return pairs


def _in_batches(
    connection: Any, table: str, column: str, where: str, what: str
) -> Iterable[tuple[str, dict[str, Any]]]:
    """The condition on `column` that selects each batch of BATCH of its distinct values in
    `table` (of the rows `where` keeps), in order, with its parameters; a progress line after
    each batch."""
    total = connection.execute(sa.text(f"SELECT COUNT(DISTINCT {column}) FROM {table} WHERE {where}")).scalar()
    count, done, started, after = int(total or 0), 0, time.monotonic(), None
    while True:
        since = "" if after is None else f" AND {column} > :after"
        ids = [
            row[0]
            for row in connection.execute(
                sa.text(
                    f"SELECT {column} FROM {table} WHERE {where}{since}"
                    f" GROUP BY {column} ORDER BY {column} LIMIT {BATCH}"
                ),
                {"after": after} if since else {},
            )
        ]
        if not ids:
            return
        yield f"{column} <= :last{since}", {"last": ids[-1], **({"after": after} if since else {})}
        after, done = ids[-1], done + len(ids)
        _log.info("%s: %d of %d experiences in %.1f s", what, done, count, time.monotonic() - started)


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "postgresql":
        op.execute("CLOSE ALL")  # 0013's cursor on events, in an upgrade that ran it (see 0016)
    op.add_column("experiences", sa.Column("latency_buckets", sa.LargeBinary, nullable=True))
    update = sa.text("UPDATE experiences SET latency_buckets = :packed WHERE id = :id")
    batches = _in_batches(connection, "experience_latencies", "experience_id", "1 = 1", "latencies packed")
    for condition, parameters in batches:
        rows = connection.execute(
            sa.text(
                "SELECT experience_id, bucket, event_count FROM experience_latencies"
                f" WHERE {condition} ORDER BY experience_id, bucket"
            ),
            parameters,
        )
        by_experience: dict[Any, list[tuple[int, int]]] = {}
        for experience_id, bucket, count in rows:
            by_experience.setdefault(experience_id, []).append((int(bucket), int(count)))
        connection.execute(update, [{"id": key, "packed": _packed(pairs)} for key, pairs in by_experience.items()])
    op.drop_table("experience_latencies")


def downgrade() -> None:
    connection = op.get_bind()
    op.create_table(
        "experience_latencies",
        sa.Column("experience_id", sa.Uuid, nullable=False),
        sa.Column("bucket", sa.SmallInteger, nullable=False),
        sa.Column("event_count", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("experience_id", "bucket", name="pk_experience_latencies"),
        sqlite_with_rowid=False,
    )
    insert = sa.text(
        "INSERT INTO experience_latencies (experience_id, bucket, event_count) VALUES (:id, :bucket, :count)"
    )
    kept = "latency_buckets IS NOT NULL"
    for condition, parameters in _in_batches(connection, "experiences", "id", kept, "latencies unpacked"):
        rows = connection.execute(
            sa.text(f"SELECT id, latency_buckets FROM experiences WHERE {kept} AND {condition}"), parameters
        )
        values = [
            {"id": key, "bucket": bucket, "count": count}
            for key, packed in rows
            for bucket, count in _unpacked(bytes(packed))
        ]
        if values:
            connection.execute(insert, values)
    op.drop_column("experiences", "latency_buckets")

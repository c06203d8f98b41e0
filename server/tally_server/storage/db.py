"""Engines, connection settings and migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from asyncpg import exceptions as asyncpg_exceptions
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .. import metrics
from ..domain.errors import StorageUnavailable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_WRITE = "tally_write"
# Any constant: serializes migrations of replicas that start together on PostgreSQL.
_MIGRATION_LOCK_ID = 0x7A11E


DEFAULT_TIMEOUT_SECONDS = 5.0
_UNAVAILABLE = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,  # no pooled connection came free in time
    sqlite3.OperationalError,  # "database is locked", from the statements hot_path sends to the driver
    OSError,
    asyncio.TimeoutError,
)
# PostgreSQL errors that say the database is unreachable, refusing or busy, not that the
# request was wrong (SQLSTATE classes and codes): connection exceptions (08), too many
# connections or no resources (53), operator intervention (57: a statement or lock timeout,
# a shutdown, "cannot connect now"), the database not accepting connections (55000), a
# lock not available (55P03), the database gone (3D000), and retryable conflicts (40).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57", "55000", "55P03", "3D000", "40")


def _is_unavailable(error: BaseException) -> bool:
    if isinstance(error, _UNAVAILABLE):
        return True
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True  # a connection found broken (see _discard_broken_connections): retry on another
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return (
        isinstance(error, sa.exc.DBAPIError)
        and isinstance(sqlstate, str)
        and sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    )


@contextlib.asynccontextmanager
async def _unavailable_as_storage_error() -> AsyncIterator[None]:
    try:
        yield
    except Exception as error:
        if not _is_unavailable(error):
            raise
        metrics.DATABASE_ERRORS.inc()
        # The driver's own words, without SQLAlchemy's statement and "background" link.
        cause = getattr(error, "orig", None) or error
        raise StorageUnavailable(f"{type(cause).__name__}: {cause}") from error


class Database:
    """One engine for the process, with read and write transactions.

    On SQLite a write transaction starts with BEGIN IMMEDIATE, so a writer waits
    for the lock (busy_timeout) instead of failing when it upgrades a read lock.
    """

    def __init__(
        self, url: str, *, echo: bool = False, timeout: float = DEFAULT_TIMEOUT_SECONDS, connections: int = 20
    ) -> None:
        """`timeout`: the longest any database wait may take (a connection, the pool, a lock,
        a statement) before the call answers UNAVAILABLE. The database enforces it, so a
        statement it stops is rolled back: never committed after its caller was answered.
        `connections`: the most PostgreSQL connections this process holds (half kept open,
        half opened under load and closed after)."""
        self.url = sa.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.timeout = timeout
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            # read() and write() always end their transaction, so a connection comes
            # back to the pool clean: the pool's own reset would be one more rollback
            # (one more trip to the driver's thread) per transaction.
            kwargs.update(pool_reset_on_return=None)
        else:
            milliseconds = str(int(timeout * 1000))
            kwargs.update(
                pool_size=connections - connections // 2,
                max_overflow=connections // 2,
                pool_pre_ping=True,
                pool_timeout=timeout,
                connect_args={
                    "timeout": timeout,
                    # JIT off: a read of the events' weekly partitions (0028) sums every week's
                    # cost past jit_above_cost, and compiling took 170-360 ms of a 25 ms read
                    # (the property search over the newest 5,000 events at 1,000,000).
                    "server_settings": {"statement_timeout": milliseconds, "lock_timeout": milliseconds, "jit": "off"},
                },
            )
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine, timeout)
        else:
            _discard_broken_connections(self.engine)
        self._writer = self.engine.execution_options(**{_WRITE: True})
        self._sqlite_write_turn = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with _unavailable_as_storage_error(), self.engine.connect() as conn, self._discarded_if_cut(conn):
            yield conn

    @contextlib.asynccontextmanager
    async def _discarded_if_cut(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """PostgreSQL: a transaction cut short by cancellation (the caller's deadline, a
        database timeout) may leave asyncpg's connection mid-operation. It is closed, never
        handed to the next caller, who would meet "another operation is in progress"."""
        try:
            yield
        except asyncio.CancelledError:
            if not self.is_sqlite:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
            raise

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits when the block ends without an exception.

        On SQLite the write transactions of this process take turns on an asyncio lock
        first: waiting on SQLite's own lock sleeps in growing steps (its busy handler), so
        reservations, admin writes and the ingest writer contending for the file waited up
        to seconds where a queue in the process answers in turn (bench.limits, Reserve then
        settle on SQLite: p99 1,650 ms before). Other processes still meet SQLite's lock."""
        if not self.is_sqlite:
            async with _unavailable_as_storage_error(), self._writer.begin() as conn, self._discarded_if_cut(conn):
                yield conn
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._sqlite_write_turn.acquire()
        except TimeoutError:
            metrics.DATABASE_ERRORS.inc()
            raise StorageUnavailable(f"no write turn on the SQLite file within {self.timeout:g} s") from None
        try:
            async with _unavailable_as_storage_error(), self._writer.begin() as conn:
                yield conn
        finally:
            self._sqlite_write_turn.release()

    async def ping(self) -> None:
        """One round trip; StorageUnavailable if the database does not answer."""
        async with self.read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def check_sqlite_file(self) -> None:
        """StorageUnavailable naming the problem when the SQLite file cannot be made or
        written: said before the driver tries (a driver thread that failed to open the file
        can outlive the event loop and print a stack trace as the process exits)."""
        path = self.url.database
        if not self.is_sqlite or not path or path == ":memory:" or path.startswith("file:"):
            return
        file = os.path.abspath(path)
        directory = os.path.dirname(file)
        if not os.path.isdir(directory):
            raise StorageUnavailable(f"the directory {directory} does not exist")
        if os.path.exists(file):
            if not os.access(file, os.R_OK | os.W_OK):
                raise StorageUnavailable(f"{file} cannot be read and written (read-only file or mount?)")
        elif not os.access(directory, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"cannot create {file}: the directory is not writable (read-only mount?)")

    async def migrate(self) -> None:
        """Brings the schema to the newest migration (idempotent)."""
        self.check_sqlite_file()
        async with self.write() as conn:
            if not self.is_sqlite:
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
                # A backfill runs as long as the events it reads take, not a call's timeout:
                # 0013's one UPDATE of 300,000 events was cancelled at the default 5 s.
                await conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
            await conn.run_sync(_upgrade_to_head)

    async def dispose(self) -> None:
        await self.engine.dispose()


def alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade_to_head(connection: sa.Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _discard_broken_connections(engine: AsyncEngine) -> None:
    """asyncpg's InternalClientError ("cannot switch to state 12; another operation (2) is in
    progress") says the connection's protocol is mid-operation: that connection alone is
    invalidated (closed, never pooled again) and the call answers UNAVAILABLE, retryable."""

    @sa.event.listens_for(engine.sync_engine, "handle_error")
    def on_error(context: sa.engine.ExceptionContext) -> None:
        original = context.original_exception
        # asyncpg's own class, or SQLAlchemy's adapter of it (named alike)
        if isinstance(original, asyncpg_exceptions.InternalClientError) or (
            type(original).__name__ == "InternalClientError"
        ):
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False


def _configure_sqlite(engine: AsyncEngine, timeout: float) -> None:
    @sa.event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below own transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        # FULL: a commit is on disk before it returns, so an acknowledged event
        # survives a power cut too. Group commit amortizes the fsync.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        statement = "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN"
        # Straight to aiosqlite: one trip to its thread, where a cursor takes three.
        driver: Any = conn.connection.dbapi_connection  # SQLAlchemy's adapter of the aiosqlite connection
        driver.run_async(lambda aiosqlite_connection: _begin(aiosqlite_connection, statement))


async def _begin(connection: Any, statement: str) -> None:
    """BEGIN on a connection that is surely out of any transaction. A call cancelled while its
    BEGIN was on aiosqlite's thread leaves the transaction open there while SQLAlchemy, which
    saw the BEGIN fail, returns the connection to the pool as clean (no reset on return: see
    Database); the next user would be refused "cannot start a transaction within a
    transaction" (seen: 6 of 30 writes after bursts of reads cancelled by 1-5 ms deadlines)."""
    if connection.in_transaction:
        await connection.rollback()
    try:
        await connection.execute_fetchall(statement)
    except sqlite3.OperationalError as error:
        # The cancelled call's BEGIN was still queued on aiosqlite's thread when the check
        # above ran, and ran before this one (seen once in CI): roll it back, begin again.
        if "within a transaction" not in str(error):
            raise
        await connection.rollback()
        await connection.execute_fetchall(statement)

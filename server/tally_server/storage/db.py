"""Engines, connection settings and migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..domain.errors import StorageUnavailable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_WRITE = "tally_write"
# Any constant: serializes migrations of replicas that start together on PostgreSQL.
_MIGRATION_LOCK_ID = 0x7A11E


_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, OSError, asyncio.TimeoutError)


@contextlib.asynccontextmanager
async def _unavailable_as_storage_error() -> AsyncIterator[None]:
    try:
        yield
    except _UNAVAILABLE as error:
        # The driver's own words, without SQLAlchemy's statement and "background" link.
        cause = getattr(error, "orig", None) or error
        raise StorageUnavailable(f"{type(cause).__name__}: {cause}") from error


class Database:
    """One engine for the process, with read and write transactions.

    On SQLite a write transaction starts with BEGIN IMMEDIATE, so a writer waits
    for the lock (busy_timeout) instead of failing when it upgrades a read lock.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = sa.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            # read() and write() always end their transaction, so a connection comes
            # back to the pool clean: the pool's own reset would be one more rollback
            # (one more trip to the driver's thread) per transaction.
            kwargs.update(pool_reset_on_return=None)
        else:
            kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._writer = self.engine.execution_options(**{_WRITE: True})

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with _unavailable_as_storage_error(), self.engine.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits when the block ends without an exception."""
        async with _unavailable_as_storage_error(), self._writer.begin() as conn:
            yield conn

    async def migrate(self) -> None:
        """Brings the schema to the newest migration (idempotent)."""
        async with self.write() as conn:
            if not self.is_sqlite:
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
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


def _configure_sqlite(engine: AsyncEngine) -> None:
    @sa.event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below own transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        # FULL: a commit is on disk before it returns, so an acknowledged event
        # survives a power cut too. Group commit amortizes the fsync.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        statement = "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN"
        # Straight to aiosqlite: one trip to its thread, where a cursor takes three.
        driver: Any = conn.connection.dbapi_connection  # SQLAlchemy's adapter of the aiosqlite connection
        driver.run_async(lambda aiosqlite_connection: aiosqlite_connection.execute_fetchall(statement))

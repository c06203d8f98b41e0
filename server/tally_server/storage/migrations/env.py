"""Alembic environment: runs on the connection Tally hands it, or on TALLY_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os

import sqlalchemy as sa
from alembic import context

from tally_server.storage.partitions import include_name
from tally_server.storage.tables import metadata

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, include_name=include_name)
    with context.begin_transaction():
        context.run_migrations()


def _run_standalone() -> None:
    from tally_server.storage.db import Database

    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "TALLY_DATABASE_URL", "sqlite+aiosqlite:///./tally.db"
    )

    async def main() -> None:
        database = Database(url)
        try:
            async with database.write() as conn:
                await conn.run_sync(_run)
        finally:
            await database.dispose()

    asyncio.run(main())


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `tally migrate`")
connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    _run_standalone()

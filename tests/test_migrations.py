"""The schema Alembic's migrations build is the one the code describes, on both engines."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tally_server.storage import rollups
from tally_server.storage.db import Database, alembic_config
from tally_server.storage.tables import metadata

from .conftest import drop_database_url, make_database_url


async def test_migrations_match_the_table_definitions(server):
    def differences(connection):
        return compare_metadata(MigrationContext.configure(connection), metadata)

    async with server.db.read() as conn:
        assert await conn.run_sync(differences) == []
        version = await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
        assert [row[0] for row in version] == ["0005"]


async def test_an_upgrade_that_fails_changes_nothing(backend, tmp_path, monkeypatch):
    """The rollups' migration fails at its last step (building them from the events): the
    database is left at 0004, without a table or column of 0005."""
    url = await make_database_url(backend, tmp_path)
    database = Database(url)
    try:
        async with database.write() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0004"))

        def fail(connection):
            raise RuntimeError("stopped mid-way")

        monkeypatch.setattr(rollups, "backfill", fail)
        with pytest.raises(RuntimeError, match="stopped mid-way"):
            await database.migrate()

        def schema(connection):
            inspector = sa.inspect(connection)
            columns = {column["name"] for column in inspector.get_columns("experiences")}
            return inspector.get_table_names(), columns

        async with database.read() as conn:
            version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar_one()
            tables, columns = await conn.run_sync(schema)
        assert version == "0004"
        assert "cost_rollups" not in tables and "experience_latencies" not in tables, tables
        assert "cost_total_nanos" not in columns, columns
    finally:
        await database.dispose()
        await drop_database_url(url)

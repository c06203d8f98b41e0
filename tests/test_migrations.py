"""The schema Alembic's migrations build is the one the code describes, on both engines."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tally_server.storage.tables import metadata


async def test_migrations_match_the_table_definitions(server):
    def differences(connection):
        return compare_metadata(MigrationContext.configure(connection), metadata)

    async with server.db.read() as conn:
        assert await conn.run_sync(differences) == []
        version = await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
        assert [row[0] for row in version] == ["0005"]

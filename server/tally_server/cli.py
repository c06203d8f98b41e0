"""The server's commands of `tally`: `serve` and `migrate`.

The `tally` command belongs to the client distribution; it finds these through the
"tally.commands" entry point group, so that the client never imports the server.
"""

from __future__ import annotations

import argparse

from .config import add_arguments, from_arguments


def _serve(args: argparse.Namespace) -> int:
    from .app import run

    run(from_arguments(args))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .app import run_event_loop
    from .storage.db import Database

    async def main() -> None:
        db = Database(args.database_url)
        try:
            await db.migrate()
        finally:
            await db.dispose()

    run_event_loop(main())
    print(f"the database is at the newest schema ({db_url_for_humans(args.database_url)})")
    return 0


def db_url_for_humans(url: str) -> str:
    """The URL without its password, for messages."""
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `serve` and `migrate` to the `tally` command's subcommands."""
    serve = commands.add_parser("serve", help="run the gRPC server")
    add_arguments(serve)
    serve.set_defaults(local=_serve)
    migrate = commands.add_parser("migrate", help="bring the database schema to the newest migration")
    add_arguments(migrate)
    migrate.set_defaults(local=_migrate)

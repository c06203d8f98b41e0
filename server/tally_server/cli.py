"""The server's commands of `tally`: `serve`, `migrate` and `keys`.

The `tally` command belongs to the client distribution; it finds these through the
"tally.commands" entry point group, so that the client never imports the server.
`tally keys` works on the database directly (the same --database-url as `tally serve`),
which is how the first admin key is made; ApiKeyService manages keys remotely after that.

Only the parsers are built here at import: every `tally` command imports this module, so
the server itself (SQLAlchemy, the price catalog) is imported by the commands that run it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from .config import add_arguments, add_database_argument, from_arguments

if TYPE_CHECKING:
    from .domain.models import ApiKey
    from .services.keys import ApiKeys

T = TypeVar("T")
SCOPES = ("ingest", "read", "admin")  # as domain.keys.SCOPES, which a test holds equal


def serve_command(args: argparse.Namespace) -> int:
    settings = from_arguments(args)
    if settings.workers < 1:
        raise SystemExit(f"tally: --workers must be 1 or more, got {settings.workers}")
    if settings.retention_days < 0:
        raise SystemExit(f"tally: --retention-days must be 0 (keep every event) or more, got {settings.retention_days}")
    if settings.database_connections < 2:
        # One for the group-commit writer, one at least for everything else.
        raise SystemExit(f"tally: --database-connections must be 2 or more, got {settings.database_connections}")
    if settings.workers > 1:
        from .workers import serve_workers

        return serve_workers(settings)
    from .app import run

    run(settings)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .app import configure_logging
    from .storage.db import Database

    configure_logging("info")  # a migration that builds from stored events says so, and its time
    logging.getLogger("alembic").setLevel(logging.WARNING)

    async def migrate(url: str) -> None:
        db = Database(url)
        try:
            await db.migrate()
        finally:
            await db.dispose()

    _on_database(args, migrate(args.database_url))
    print(f"the database is at the newest schema ({db_url_for_humans(args.database_url)})")
    return 0


def db_url_for_humans(url: str) -> str:
    from .app import url_for_humans

    return url_for_humans(url)


def _on_database(args: argparse.Namespace, work: Awaitable[T]) -> T:
    """Runs `work`; a refusal or an unreachable database is one line and exit 1."""
    import sqlalchemy as sa

    from .app import run_event_loop
    from .domain.errors import StorageUnavailable, TallyError

    try:
        return run_event_loop(work)  # type: ignore[arg-type]
    except StorageUnavailable as error:
        raise SystemExit(f"tally: cannot use {db_url_for_humans(args.database_url)}: {error.detail}") from None
    except TallyError as error:
        raise SystemExit(f"tally: {error}") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ModuleNotFoundError) as error:
        raise SystemExit(f"tally: cannot use the database URL {args.database_url!r}: {error}") from None


def _sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL (absolute), None for another database or an in-memory one."""
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return None
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return None
    return os.path.abspath(path)


def _keys(args: argparse.Namespace, work: Callable[[ApiKeys], Awaitable[T]]) -> T:
    """Runs `work` on the keys of the database, migrated first. A SQLite file that does not
    exist is made only with --create: run from another directory, `./tally.db` is not the
    server's database, and a key made there would be refused by the server."""
    from .services.keys import ApiKeys
    from .storage.db import Database

    file = _sqlite_file(args.database_url)
    if file is not None and not os.path.exists(file) and not args.create:
        raise SystemExit(
            f"tally: there is no database at {file}; pass the server's --database-url (or TALLY_DATABASE_URL), "
            "run from the server's directory, or add --create to make a new one"
        )
    print(f"database: {db_url_for_humans(args.database_url)}", file=sys.stderr)

    async def on_database() -> T:
        db = Database(args.database_url)
        try:
            await db.migrate()
            return await work(ApiKeys(db))
        finally:
            await db.dispose()

    return _on_database(args, on_database())


def _keys_create(args: argparse.Namespace) -> int:
    _, secret = _keys(args, lambda keys: keys.create(args.name, args.scope))
    print(secret)  # alone on standard output, so that `SECRET=$(tally keys create ...)` takes it
    scopes = ", ".join(dict.fromkeys(args.scope))
    print(f"created API key {args.name} ({scopes}); its secret is shown only now", file=sys.stderr)
    return 0


async def _all_keys(keys: ApiKeys) -> list[ApiKey]:
    found: list[ApiKey] = []
    token = ""
    while True:
        page = await keys.list(1000, token)
        found.extend(page.items)
        if not (token := page.next_page_token):
            return found


def _keys_list(args: argparse.Namespace) -> int:
    from tally_client.output import table

    found = _keys(args, _all_keys)
    if args.json:
        print(json.dumps([_key_json(k) for k in found], indent=2))
        return 0
    rows = [
        [k.name, ",".join(k.scopes), _when(k.create_time_us), _when(k.last_use_time_us), _when(k.revoke_time_us)]
        for k in found
    ]
    print(table(["NAME", "SCOPES", "CREATED", "LAST USED", "REVOKED"], rows) if rows else "no API keys")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    revoked = _keys(args, lambda keys: keys.revoke(args.name))
    print(f"revoked API key {revoked.name}: every server refuses it within 10 seconds")
    return 0


def _when(time_us: int | None) -> str:
    if time_us is None:
        return "-"
    return datetime.fromtimestamp(time_us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _key_json(k: ApiKey) -> dict[str, object]:
    return {
        "name": k.name,
        "scopes": list(k.scopes),
        "create_time_us": k.create_time_us,
        "last_use_time_us": k.last_use_time_us,
        "revoke_time_us": k.revoke_time_us,
    }


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `serve`, `migrate` and `keys` to the `tally` command's subcommands."""
    serve = commands.add_parser("serve", help="run the gRPC server")
    add_arguments(serve)
    serve.set_defaults(local=serve_command)
    migrate = commands.add_parser("migrate", help="bring the database schema to the newest migration")
    add_database_argument(migrate)
    migrate.set_defaults(local=_migrate)

    keys = commands.add_parser("keys", help="API keys, on the database directly (the first admin key too)")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key; prints its secret alone, once")
    create.add_argument("--name", required=True, help="a unique name, [A-Za-z0-9._-]{1,64}")
    create.add_argument("--scope", action="append", required=True, choices=SCOPES, help="repeat for several")
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    revoke = actions.add_parser("revoke", help="revoke a key: every server refuses it within 10 seconds")
    revoke.add_argument("name")
    for parser, run in ((create, _keys_create), (listing, _keys_list), (revoke, _keys_revoke)):
        add_database_argument(parser)
        parser.add_argument(
            "--create", action="store_true", help="make the database if it does not exist (SQLite): the first key"
        )
        parser.set_defaults(local=run)

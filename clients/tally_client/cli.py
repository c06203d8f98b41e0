"""`tally`: the command line. `tally serve` runs the server; the other commands talk to one."""

from __future__ import annotations

import argparse
import asyncio
import sys


def _serve(args: argparse.Namespace) -> int:
    from tally_server.app import run
    from tally_server.config import from_arguments

    run(from_arguments(args))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from tally_server.storage.db import Database

    async def main() -> None:
        db = Database(args.database_url)
        try:
            await db.migrate()
        finally:
            await db.dispose()

    asyncio.run(main())
    print(f"database at {args.database_url} is at the newest schema")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tally_server.config import add_arguments

    parser = argparse.ArgumentParser(prog="tally", description="Tally: the cost of GenAI calls, per experience.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    add_arguments(serve)
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="bring the database schema to the newest migration")
    add_arguments(migrate)
    migrate.set_defaults(handler=_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

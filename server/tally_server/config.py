"""Settings of `tally serve`: flags, each with a TALLY_* environment variable of the same meaning."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./tally.db"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    log_level: str = "info"
    grace_seconds: float = 10.0
    # A full IngestBatch (1,000 events with properties) fits with room to spare.
    max_message_bytes: int = 32 * 1024 * 1024


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=_env("TALLY_LISTEN", DEFAULT_LISTEN),
        help=f"host:port to listen on; port 0 picks a free one (env TALLY_LISTEN, default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--database-url",
        default=_env("TALLY_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="SQLAlchemy URL: sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db "
        f"(env TALLY_DATABASE_URL, default {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--log-level",
        default=_env("TALLY_LOG_LEVEL", "info"),
        choices=LOG_LEVELS,
        help="log level (env TALLY_LOG_LEVEL, default info)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=float(_env("TALLY_GRACE_SECONDS", "10")),
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT (env TALLY_GRACE_SECONDS, default 10)",
    )


def from_arguments(args: argparse.Namespace) -> Settings:
    return Settings(
        listen=args.listen, database_url=args.database_url, log_level=args.log_level, grace_seconds=args.grace
    )

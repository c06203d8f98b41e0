"""Settings of `tally serve`: flags, each with a TALLY_* environment variable of the same meaning."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from dataclasses import dataclass

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./tally.db"
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_MODES = ("required", "off")


@dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    log_level: str = "info"
    grace_seconds: float = 10.0
    # The longest a database wait may take before a call answers UNAVAILABLE.
    database_timeout_seconds: float = 5.0
    # PostgreSQL connections one server process (each worker, each replica) may hold.
    database_connections: int = 20
    # Load shedding: past these, work is refused with RESOURCE_EXHAUSTED, not held in memory.
    max_calls: int = 1000
    max_streams: int = 100
    max_queued_events: int = 50_000
    # Memory, in bytes of requests as received: the unary and batch requests being served at
    # once, and what each stream has in flight (its events taken in and not yet answered).
    max_call_bytes: int = 16 * 1024 * 1024
    stream_window_bytes: int = 256 * 1024
    # How long a limit reservation holds when it is never settled (a crashed caller).
    reservation_seconds: int = 600
    metrics_listen: str = ""  # host:port of the Prometheus endpoint; empty: none
    web_listen: str = ""  # host:port of the dashboard; empty: none
    # "required", "off", or None: off on a loopback address, refused beyond it (see auth_required).
    auth: str | None = None
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # The largest message either way (gRPC's own default): 1,000 events of 4 KiB in one batch.
    max_message_bytes: int = 4 * 1024 * 1024
    # Server processes sharing the listen port (SO_REUSEPORT), each with its own writer.
    workers: int = 1
    worker: int = 0  # which of them this process is (from 1); 0 when it serves alone
    # The proxy: host:port of its provider-compatible routes (empty: none), its upstreams
    # (NAME=BASE_URL[,CATEGORY], added to or replacing openai and anthropic), the bound on a
    # body it reads, and whether it refuses calls while the database does not answer.
    proxy_listen: str = ""
    proxy_upstreams: tuple[str, ...] = ()
    proxy_max_body_bytes: int = 16 * 1024 * 1024
    proxy_fail_closed: bool = False
    proxy_read_timeout_seconds: float = 600.0
    # Raw events older than this many days (from the start of today, UTC) are deleted every
    # hour; 0 keeps them. Statistics, rollups and limit figures stay whatever the retention.
    retention_days: int = 0


class RefusedToStart(Exception):
    """A setting the server will not start with; the message says which and what to do."""


def listen_host(listen: str) -> str:
    return listen.rsplit(":", 1)[0].strip("[]")


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False  # ":50051" listens on every interface
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def listeners(settings: Settings) -> list[tuple[str, str]]:
    """Every address the server listens on, with the flag that set it."""
    found = [("--listen", settings.listen)]
    found += [
        (flag, value)
        for flag, value in (
            ("--web-listen", settings.web_listen),
            ("--metrics-listen", settings.metrics_listen),
            ("--proxy-listen", settings.proxy_listen),
        )
        if value
    ]
    return found


def auth_required(settings: Settings) -> tuple[bool, str]:
    """Whether calls need an API key, and a warning to log (or ""). Like Redis' protected
    mode, for every listener alike (gRPC, dashboard, metrics, proxy): a server reachable beyond this
    machine on any of them must be told whether to check keys."""
    if settings.auth == "required":
        return True, ""
    beyond = [(flag, listen) for flag, listen in listeners(settings) if not is_loopback(listen_host(listen))]
    if not beyond:
        return False, ""
    named = ", ".join(f"{flag} {listen}" for flag, listen in beyond)
    if settings.auth == "off":
        return False, f"authentication is off on {named}: anyone who reaches it can read costs, and on gRPC change them"
    raise RefusedToStart(
        f"tally: refusing to serve {named} beyond this machine without an authentication decision: "
        "pass --auth required (after `tally keys create --name NAME --scope admin`), "
        "or --auth off to serve without API keys (env TALLY_AUTH)"
    )


# The flags' defaults are the Settings' own, so that they are written down once.
_DEFAULTS = Settings()


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=_env("TALLY_LISTEN", DEFAULT_LISTEN),
        help=f"host:port to listen on; port 0 picks a free one (env TALLY_LISTEN, default {DEFAULT_LISTEN})",
    )
    add_database_argument(parser)
    parser.add_argument(
        "--log-level",
        default=_env("TALLY_LOG_LEVEL", _DEFAULTS.log_level),
        choices=LOG_LEVELS,
        help=f"log level (env TALLY_LOG_LEVEL, default {_DEFAULTS.log_level})",
    )
    parser.add_argument(
        "--retention-days",
        type=int,
        default=int(_env("TALLY_RETENTION_DAYS", "0")),
        help="delete raw events older than this many days (from the start of today, UTC), every hour, in "
        "batches that ingest never waits long for; statistics, rollups and limit figures stay as they were "
        "(env TALLY_RETENTION_DAYS, default 0: keep every event)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=float(_env("TALLY_GRACE_SECONDS", str(_DEFAULTS.grace_seconds))),
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT "
        f"(env TALLY_GRACE_SECONDS, default {_DEFAULTS.grace_seconds:g})",
    )
    parser.add_argument(
        "--database-timeout",
        type=float,
        default=float(_env("TALLY_DATABASE_TIMEOUT_SECONDS", str(_DEFAULTS.database_timeout_seconds))),
        help="seconds a connection, lock or statement may take before a call answers UNAVAILABLE "
        f"(env TALLY_DATABASE_TIMEOUT_SECONDS, default {_DEFAULTS.database_timeout_seconds:g})",
    )
    parser.add_argument(
        "--database-connections",
        type=int,
        default=int(_env("TALLY_DATABASE_CONNECTIONS", str(_DEFAULTS.database_connections))),
        help="PostgreSQL connections one server process may hold (each of --workers holds its own) "
        f"(env TALLY_DATABASE_CONNECTIONS, default {_DEFAULTS.database_connections})",
    )
    for flag, variable, default, what in (
        ("--max-calls", "TALLY_MAX_CALLS", _DEFAULTS.max_calls, "calls in progress at once"),
        ("--max-streams", "TALLY_MAX_STREAMS", _DEFAULTS.max_streams, "IngestStream calls in progress at once"),
        ("--max-queued-events", "TALLY_MAX_QUEUED_EVENTS", _DEFAULTS.max_queued_events, "events waiting to be stored"),
        (
            "--max-call-bytes",
            "TALLY_MAX_CALL_BYTES",
            _DEFAULTS.max_call_bytes,
            "bytes of unary and batch requests served at once",
        ),
        (
            "--max-message-bytes",
            "TALLY_MAX_MESSAGE_BYTES",
            _DEFAULTS.max_message_bytes,
            "bytes in one message, received or sent",
        ),
    ):
        parser.add_argument(
            flag,
            type=int,
            default=int(_env(variable, str(default))),
            help=f"at most this many {what}; past it, RESOURCE_EXHAUSTED (env {variable}, default {default:,})",
        )
    parser.add_argument(
        "--reservation-seconds",
        type=int,
        default=int(_env("TALLY_RESERVATION_SECONDS", str(_DEFAULTS.reservation_seconds))),
        help="how long a limit reservation holds when it is never settled or released: then it expires and "
        f"frees its amount (env TALLY_RESERVATION_SECONDS, default {_DEFAULTS.reservation_seconds})",
    )
    parser.add_argument(
        "--stream-window-bytes",
        type=int,
        default=int(_env("TALLY_STREAM_WINDOW_BYTES", str(_DEFAULTS.stream_window_bytes))),
        help="bytes of events one IngestStream may have taken in and not yet answered (besides at most 512 "
        "events); past it the stream reads no more until answers go out, and HTTP/2 holds the caller back "
        f"(env TALLY_STREAM_WINDOW_BYTES, default {_DEFAULTS.stream_window_bytes:,})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(_env("TALLY_WORKERS", str(_DEFAULTS.workers))),
        help="server processes sharing the listen port, each with its own writer, restarted if one dies "
        f"(env TALLY_WORKERS, default {_DEFAULTS.workers})",
    )
    parser.add_argument(
        "--web-listen",
        default=_env("TALLY_WEB_LISTEN", ""),
        help="host:port to serve the dashboard, a read-only web page of spend behind the same API keys "
        "(env TALLY_WEB_LISTEN; default: off; `make serve` uses 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--metrics-listen",
        default=_env("TALLY_METRICS_LISTEN", ""),
        help="host:port to serve Prometheus metrics at /metrics (env TALLY_METRICS_LISTEN; default: off)",
    )
    parser.add_argument(
        "--proxy-listen",
        default=_env("TALLY_PROXY_LISTEN", ""),
        help="host:port to serve the OpenAI- and Anthropic-compatible proxy: /openai/v1/..., /anthropic/v1/... "
        "and /NAME/v1/... of each --proxy-upstream (env TALLY_PROXY_LISTEN; default: off; `make serve` uses "
        "127.0.0.1:8090)",
    )
    parser.add_argument(
        "--proxy-upstream",
        action="append",
        default=[u for u in _env("TALLY_PROXY_UPSTREAMS", "").split() if u],
        metavar="NAME=BASE_URL[,CATEGORY]",
        help="an OpenAI-compatible provider the proxy forwards /NAME/v1/... to, priced in CATEGORY (default "
        "system.NAME); openai=URL or anthropic=URL moves those (defaults https://api.openai.com/v1 and "
        "https://api.anthropic.com/v1); repeatable (env TALLY_PROXY_UPSTREAMS, space-separated)",
    )
    parser.add_argument(
        "--proxy-max-body-bytes",
        type=int,
        default=int(_env("TALLY_PROXY_MAX_BODY_BYTES", str(_DEFAULTS.proxy_max_body_bytes))),
        help="the largest request body the proxy takes (413 past it), and the largest answer or stream event "
        "it reads for usage (passed on unread past it) "
        f"(env TALLY_PROXY_MAX_BODY_BYTES, default {_DEFAULTS.proxy_max_body_bytes:,})",
    )
    parser.add_argument(
        "--proxy-read-timeout",
        type=float,
        default=float(_env("TALLY_PROXY_READ_TIMEOUT_SECONDS", str(_DEFAULTS.proxy_read_timeout_seconds))),
        help="seconds an upstream may stay silent before the call is answered 504 "
        f"(env TALLY_PROXY_READ_TIMEOUT_SECONDS, default {_DEFAULTS.proxy_read_timeout_seconds:g})",
    )
    parser.add_argument(
        "--proxy-fail-closed",
        action="store_true",
        default=_env("TALLY_PROXY_FAIL_CLOSED", "") in ("1", "true", "yes"),
        help="refuse proxied calls (503) while the database does not answer; by default they are forwarded "
        "and counted as unrecorded (env TALLY_PROXY_FAIL_CLOSED)",
    )
    parser.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default=os.environ.get("TALLY_AUTH") or None,
        help="require API keys (required) or not (off); default: off on a loopback address, and a listen "
        "address beyond loopback refuses to start without a choice (env TALLY_AUTH)",
    )
    parser.add_argument(
        "--tls-cert",
        default=_env("TALLY_TLS_CERT", ""),
        help="PEM certificate chain: serve TLS only (with --tls-key; env TALLY_TLS_CERT)",
    )
    parser.add_argument("--tls-key", default=_env("TALLY_TLS_KEY", ""), help="PEM private key (env TALLY_TLS_KEY)")
    parser.add_argument(
        "--tls-client-ca",
        default=_env("TALLY_TLS_CLIENT_CA", ""),
        help="PEM CA certificates: also require client certificates signed by them, mTLS (env TALLY_TLS_CLIENT_CA); "
        "certificate files are re-read on SIGHUP or when they change",
    )


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=_env("TALLY_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="SQLAlchemy URL: sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db "
        f"(env TALLY_DATABASE_URL, default {DEFAULT_DATABASE_URL})",
    )


def from_arguments(args: argparse.Namespace) -> Settings:
    return Settings(
        listen=args.listen,
        database_url=args.database_url,
        log_level=args.log_level,
        grace_seconds=args.grace,
        database_timeout_seconds=args.database_timeout,
        database_connections=args.database_connections,
        max_calls=args.max_calls,
        max_streams=args.max_streams,
        max_queued_events=args.max_queued_events,
        max_call_bytes=args.max_call_bytes,
        reservation_seconds=args.reservation_seconds,
        stream_window_bytes=args.stream_window_bytes,
        max_message_bytes=args.max_message_bytes,
        metrics_listen=args.metrics_listen,
        web_listen=args.web_listen,
        auth=args.auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        workers=args.workers,
        proxy_listen=args.proxy_listen,
        proxy_upstreams=tuple(args.proxy_upstream),
        proxy_max_body_bytes=args.proxy_max_body_bytes,
        proxy_read_timeout_seconds=args.proxy_read_timeout,
        proxy_fail_closed=args.proxy_fail_closed,
        retention_days=args.retention_days,
    )

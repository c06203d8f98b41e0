"""`tally`: the command line. The commands here talk to a server; an installed server
(the tally-genai distribution) adds `tally serve` and `tally migrate`.

Each command group lives in a module of its own (types, experiences, events, ingest,
prices, limits, report; common holds what they share): a new command goes beside its
group's others, and is added to the parser here.

Every client command takes --target (env TALLY_TARGET, default 127.0.0.1:50051)
and --json (machine-readable output). Failures print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from importlib.metadata import entry_points

from ..client import DEFAULT_TARGET, TallyClient
from ..errors import TallyError
from . import events, experiences, ingest, limits, prices, report, types


def _add_installed_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands other installed distributions add (the server's `serve` and
    `migrate`), found by entry point so that the client never imports the server."""
    plugins = entry_points(group="tally.commands")
    for plugin in plugins:
        plugin.load()(commands)
    if "serve" not in commands.choices:
        hint = commands.add_parser("serve", help="run the gRPC server (needs the server: pip install tally-genai)")
        hint.set_defaults(local=_server_not_installed)


def _server_not_installed(args: argparse.Namespace) -> int:
    print(
        "tally: `tally serve` needs the Tally server, which is not installed here; install the "
        "tally-genai distribution (from a checkout: pip install ./clients .)",
        file=sys.stderr,
    )
    return 1


def _unavailable_hint(error: TallyError, args: argparse.Namespace) -> str:
    """Why a server may not answer: not running, or TLS on one side only."""
    text = error.message.lower()
    secure = args.tls or args.ca_file
    if not secure and ("socket closed" in text or "connection reset" in text or "eof" in text):
        return (
            f" (is Tally running at {args.target}? If it serves TLS, add --tls, or --ca-file with its CA, "
            "or set TALLY_TLS=1 / TALLY_CA_FILE)"
        )
    if secure and ("ssl" in text or "handshake" in text or "wrong_version" in text):
        return f" (Tally at {args.target} does not answer TLS: is it serving plaintext? Leave out --tls / --ca-file)"
    if secure and not args.client_cert and ("socket closed" in text or "connection reset" in text):
        return (
            f" (Tally at {args.target} may require a client certificate, mTLS: add --client-cert and --client-key, "
            "or set TALLY_CLIENT_CERT / TALLY_CLIENT_KEY)"
        )
    return f" (is Tally running at {args.target}?)"


def _versions() -> str:
    """This command's version, and the server's where it is installed beside it."""
    from importlib.metadata import PackageNotFoundError, version

    said = f"tally {version('tally-genai-client')} (tally-genai-client)"
    with contextlib.suppress(PackageNotFoundError):
        said += f", server tally-genai {version('tally-genai')}"
    return said


def build_parser() -> argparse.ArgumentParser:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--target", help=f"the Tally server, host:port (env TALLY_TARGET, default {DEFAULT_TARGET})")
    client.add_argument("--json", action="store_true", help="print JSON instead of text")
    client.add_argument("--timeout", type=float, default=10.0, help="seconds each call may take (default 10)")
    tls = client.add_argument_group("TLS (the API key comes from the environment: TALLY_API_KEY)")
    tls.add_argument(
        "--tls",
        action="store_true",
        default=bool(os.environ.get("TALLY_TLS")),
        help="TLS with the system's roots (env TALLY_TLS=1)",
    )
    tls.add_argument(
        "--ca-file", default=os.environ.get("TALLY_CA_FILE"), help="TLS with this PEM CA (env TALLY_CA_FILE)"
    )
    tls.add_argument(
        "--client-cert",
        default=os.environ.get("TALLY_CLIENT_CERT"),
        help="PEM client certificate, for mTLS (env TALLY_CLIENT_CERT)",
    )
    tls.add_argument(
        "--client-key",
        default=os.environ.get("TALLY_CLIENT_KEY"),
        help="PEM client key, for mTLS (env TALLY_CLIENT_KEY)",
    )

    parser = argparse.ArgumentParser(prog="tally", description="Tally: what your GenAI calls cost, per experience.")
    parser.add_argument("--version", action="version", version=_versions())
    # Also accepted before the command: `tally --target HOST:PORT types list`.
    parser.add_argument("--target", dest="global_target", help=argparse.SUPPRESS)
    parser.add_argument("--json", dest="global_json", action="store_true", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_installed_commands(commands)

    for group in (types, experiences, events, ingest, prices, limits, report):
        group.add_commands(commands, client)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "local"):
        args.target = args.target or args.global_target or os.environ.get("TALLY_TARGET") or DEFAULT_TARGET
        args.json = args.json or args.global_json
    try:
        if hasattr(args, "local"):
            return int(args.local(args))
        client = TallyClient(
            args.target,
            api_key=os.environ.get("TALLY_API_KEY") or None,
            secure=args.tls,
            ca_file=args.ca_file,
            client_cert_file=args.client_cert,
            client_key_file=args.client_key,
            timeout=args.timeout,
        )
        with client as tally:
            return int(args.remote(tally, args) or 0)
    except TallyError as error:
        detail = "; ".join(f"{field}: {why}" for field, why in error.field_violations.items())
        where = _unavailable_hint(error, args) if error.code.name == "UNAVAILABLE" else ""
        print(
            f"tally: {error}{where}" + (f" [{detail}]" if detail and detail not in error.message else ""),
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as error:  # a TLS file that cannot be read, half a key pair
        print(f"tally: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

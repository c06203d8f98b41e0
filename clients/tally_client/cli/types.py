"""`tally types`: experience types."""

from __future__ import annotations

import argparse
import json

from tally.v1 import (
    experience_type_service_pb2 as et_pb,
)

from ..client import TallyClient
from ..errors import AlreadyExists
from ..output import as_json, table, when
from .common import Commands, _emit, _pairs


def type_row(t: et_pb.ExperienceType) -> list[object]:
    return [t.name, t.version, when(t.create_time), t.description]


def types_create(tally: TallyClient, args: argparse.Namespace) -> None:
    try:
        created = tally.create_experience_type(args.name, args.description, settings=_pairs(args.setting, "--setting"))
    except AlreadyExists:
        if not args.exist_ok:
            raise
        found = tally.get_experience_type(args.name)
        _emit(args, found, f"experience type {found.name} exists (version {found.version}): left as it is")
        return
    _emit(args, created, f"created experience type {created.name} (version {created.version})")


def types_get(tally: TallyClient, args: argparse.Namespace) -> None:
    t = tally.get_experience_type(args.name)
    settings = ", ".join(f"{k}={v}" for k, v in sorted(t.settings.items())) or "-"
    _emit(
        args,
        t,
        f"{t.name} (version {t.version})\n  {t.description}\n  settings: {settings}\n"
        f"  created {when(t.create_time)}, updated {when(t.update_time)}",
    )


def types_list(tally: TallyClient, args: argparse.Namespace) -> None:
    items: list[et_pb.ExperienceType] = []
    token = ""
    while True:
        page = tally.list_experience_types(page_size=1000, page_token=token)
        items.extend(page.experience_types)
        token = page.next_page_token
        if not token:
            break
    if args.json:
        print(json.dumps([as_json(t) for t in items], indent=2))
    else:
        print(
            table(["NAME", "VERSION", "CREATED", "DESCRIPTION"], [type_row(t) for t in items])
            if items
            else "no experience types"
        )


def types_update(tally: TallyClient, args: argparse.Namespace) -> None:
    settings = _pairs(args.setting, "--setting") if args.setting is not None else None
    try:
        updated = tally.update_experience_type(args.name, description=args.description, settings=settings)
    except ValueError as error:
        raise SystemExit(f"tally: {error}") from None
    _emit(args, updated, f"updated {updated.name} (still version {updated.version})")


def types_increment(tally: TallyClient, args: argparse.Namespace) -> None:
    response = tally.increment_experience_type_version(args.name)
    _emit(args, response, f"{args.name} is now at version {response.experience_type.version}")


def types_versions(tally: TallyClient, args: argparse.Namespace) -> None:
    response = tally.list_experience_type_versions(args.name, page_size=1000)
    rows = [[v.version, when(v.create_time), v.description] for v in response.experience_type_versions]
    _emit(args, response, table(["VERSION", "CREATED", "DESCRIPTION"], rows))


def types_delete(tally: TallyClient, args: argparse.Namespace) -> None:
    deleted = tally.delete_experience_type(args.name, force=args.force)
    if args.json:
        print(json.dumps({"deleted_experience_count": deleted}))
    else:
        print(f"deleted experience type {args.name}" + (f" and {deleted} experience(s)" if deleted else ""))


def add_commands(commands: Commands, client: argparse.ArgumentParser) -> None:
    """`tally types ...`."""
    types = commands.add_parser("types", help="experience types").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = types.add_parser("create", parents=[client], help="create an experience type")
    p.add_argument("name")
    p.add_argument("--description", "-d", required=True)
    p.add_argument("--setting", action="append", metavar="KEY=VALUE")
    p.add_argument("--exist-ok", action="store_true", help="a type of that name already there is not an error")
    p.set_defaults(remote=types_create)
    p = types.add_parser("list", parents=[client], help="list experience types")
    p.set_defaults(remote=types_list)
    p = types.add_parser("get", parents=[client], help="show an experience type")
    p.add_argument("name")
    p.set_defaults(remote=types_get)
    p = types.add_parser("update", parents=[client], help="change the description or settings (not the version)")
    p.add_argument("name")
    p.add_argument("--description", "-d")
    p.add_argument("--setting", action="append", metavar="KEY=VALUE", help="replaces all settings")
    p.set_defaults(remote=types_update)
    p = types.add_parser("increment-version", parents=[client], help="start the next version")
    p.add_argument("name")
    p.set_defaults(remote=types_increment)
    p = types.add_parser("versions", parents=[client], help="list the versions of a type")
    p.add_argument("name")
    p.set_defaults(remote=types_versions)
    p = types.add_parser("delete", parents=[client], help="delete an experience type")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="also delete its experiences (their events are kept)")
    p.set_defaults(remote=types_delete)

"""Bounds and formats shared by every entry point (stated in the proto comments)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from .errors import Violations

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
UNIT_TYPE_PATTERN = re.compile(r"[a-z0-9_]{1,64}")
CATEGORY_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Bounds of what an event may say (stated in the proto comments). A count past a trillion
# or a latency past a week is a bug in the caller, and with these bounds and the price
# bound (prices.py) no event's cost or any sum of costs can overflow 64-bit nano-dollars.
UNIT_COUNT_MAX = 10**12
LATENCY_MAX_MS = 7 * 24 * 3600 * 1000
# String bounds are in bytes of UTF-8.
TEXT_MAX = 256  # ids, keys, user ids

DESCRIPTION_MAX = 1024
SETTINGS_MAX_ENTRIES = 32
PROPERTIES_MAX_ENTRIES = 64
MAP_VALUE_MAX = 1024
REQUEST_ID_MAX = 128


def utf8_length(text: str) -> int:
    """The bytes `text` takes in UTF-8: what it costs to hold and store, whatever its
    characters (a limit in characters let 4-byte characters make an event 4 times larger)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_text(v: Violations, field_path: str, value: str, max_bytes: int = TEXT_MAX) -> None:
    """At most `max_bytes` bytes of UTF-8, and no NUL (PostgreSQL's text cannot hold one)."""
    if (size := utf8_length(value)) > max_bytes:
        v.add(field_path, f"must be at most {max_bytes} bytes of UTF-8, got {size}")
    if "\x00" in value:
        v.add(field_path, "must not contain NUL characters")


def check_name(v: Violations, field_path: str, name: str, *, what: str = "name") -> None:
    if not name:
        v.add(field_path, f"{what} is required")
    elif not NAME_PATTERN.fullmatch(name):
        v.add(field_path, f"{what} must match [A-Za-z0-9._-]{{1,64}}, got {name[:80]!r}")


def check_string_map(v: Violations, field_path: str, values: Mapping[str, str], max_entries: int) -> None:
    if len(values) > max_entries:
        v.add(field_path, f"at most {max_entries} entries, got {len(values)}")
    for key, value in values.items():
        if not NAME_PATTERN.fullmatch(key):
            v.add(f"{field_path}[{key[:80]!r}]", "key must match [A-Za-z0-9._-]{1,64}")
        if utf8_length(value) > MAP_VALUE_MAX or "\x00" in value:
            v.add(f"{field_path}[{key[:80]!r}]", f"value must be at most {MAP_VALUE_MAX} bytes of UTF-8, without NUL")


PRICE_CONTEXT_MAX_ENTRIES = 8
PRICE_CONTEXT_VALUE_MAX = 64


def check_price_context(v: Violations, field_path: str, context: Mapping[str, str]) -> None:
    if len(context) > PRICE_CONTEXT_MAX_ENTRIES:
        v.add(field_path, f"at most {PRICE_CONTEXT_MAX_ENTRIES} entries, got {len(context)}")
    for key, value in context.items():
        if not NAME_PATTERN.fullmatch(key):
            v.add(f"{field_path}[{key[:64]!r}]", "key must match [A-Za-z0-9._-]{1,64}")
        if not value or utf8_length(value) > PRICE_CONTEXT_VALUE_MAX or not value.isprintable() or "," in value:
            v.add(
                f"{field_path}[{key[:64]!r}]",
                f"value must be 1 to {PRICE_CONTEXT_VALUE_MAX} bytes of printable UTF-8 without commas",
            )


def check_description(v: Violations, field_path: str, description: str) -> None:
    if not description.strip():
        v.add(field_path, "description is required")
    else:
        check_text(v, field_path, description, DESCRIPTION_MAX)


def check_request_id(v: Violations, field_path: str, request_id: str) -> None:
    check_text(v, field_path, request_id, REQUEST_ID_MAX)


def parse_uuid(text: str) -> uuid.UUID | None:
    """The UUID in `text` (any standard spelling), or None if it is not one."""
    try:
        return uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return None

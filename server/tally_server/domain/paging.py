"""AIP-158 paging: page sizes and opaque page tokens bound to the list's filters."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from typing import Any

from .errors import Violation, invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid([Violation("page_size", f"must not be negative, got {requested}")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(kind: str, filters: Any) -> str:
    text = json.dumps([kind, filters], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(kind: str, filters: Any, position: Any) -> str:
    """A token for the page after `position` (JSON-serializable), valid for these filters only."""
    body = json.dumps({"f": _fingerprint(kind, filters), "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(token: str, kind: str, filters: Any, check: Callable[[Any], bool] = lambda position: True) -> Any:
    """The position in `token`, or None for the first page. `check` validates its shape."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        fingerprint, position = body["f"], body["p"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise invalid([Violation("page_token", "not a page token returned by this list")]) from None
    if fingerprint != _fingerprint(kind, filters):
        raise invalid([Violation("page_token", "the token belongs to a list with other filters")])
    if not check(position):
        raise invalid([Violation("page_token", "malformed page token")])
    return position

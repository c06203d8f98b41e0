"""AIP-158 paging: page sizes and opaque, signed page tokens bound to the list's filters."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from typing import Any

from .errors import Violation, invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid([Violation("page_size", f"must not be negative, got {requested}")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


_MAX_TOKEN = 2048  # characters; a token this list made is far shorter


def _fingerprint(kind: str, filters: Any) -> str:
    text = json.dumps([kind, filters], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unpadded(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _padded(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Makes and reads page tokens: the position after a page and the list's filters,
    signed with HMAC-SHA256 so that a token cannot be forged or edited. The key is shared
    by every replica of one database (storage keeps it; see Database.page_token_key); a
    token of one list, or of other filters, is refused."""

    def __init__(self, key: bytes | None = None) -> None:
        # Until the server reads the shared key: one of this process's own.
        self.key = key or secrets.token_bytes(32)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()[:16]

    def encode(self, kind: str, filters: Any, position: Any) -> str:
        """A token for the page after `position` (JSON-serializable), valid for these filters only."""
        body = json.dumps({"f": _fingerprint(kind, filters), "p": position}, separators=(",", ":")).encode()
        return f"{_unpadded(body)}.{_unpadded(self._mac(body))}"

    def decode(self, token: str, kind: str, filters: Any, check: Callable[[Any], bool] = lambda position: True) -> Any:
        """The position in `token`, or None for the first page. `check` validates its shape."""
        if not token:
            return None
        try:
            if len(token) > _MAX_TOKEN:
                raise ValueError("too long")
            encoded_body, _, encoded_mac = token.partition(".")
            body = _padded(encoded_body)
            if not hmac.compare_digest(_padded(encoded_mac), self._mac(body)):
                raise ValueError("not signed by this service")
            decoded = json.loads(body)
            fingerprint, position = decoded["f"], decoded["p"]
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeError):
            raise invalid([Violation("page_token", "not a page token returned by this list")]) from None
        if fingerprint != _fingerprint(kind, filters):
            raise invalid([Violation("page_token", "the token belongs to a list with other filters")])
        if not check(position):
            raise invalid([Violation("page_token", "malformed page token")])
        return position

"""API keys: creation, listing, revocation, and authentication of a call's secret.

A secret is `tally_` and 43 URL-safe characters: 256 random bits from `secrets`. Only its
SHA-256 is stored. A slow password hash (bcrypt, scrypt, Argon2) protects secrets that
people choose, which can be guessed; these cannot be (2^256 tries), so a fast hash loses
nothing, and it lets a secret be looked up by its hash in one indexed read, where a
salted slow hash would cost tens of milliseconds of CPU on every call.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence

from ..storage import repository as repo
from ..storage.db import Database
from . import paging
from .errors import Code, TallyError, Violations, already_exists, not_found
from .models import ApiKey, Page, now_us
from .validation import check_name

SCOPES = ("ingest", "read", "admin")
SECRET_PREFIX = "tally_"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def unauthenticated(reason: str, message: str) -> TallyError:
    return TallyError(Code.UNAUTHENTICATED, reason, message)


def permission_denied(key: ApiKey, scope: str) -> TallyError:
    return TallyError(
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
        f"API key {key.name!r} (scopes: {', '.join(key.scopes)}) lacks the {scope!r} scope this call needs",
    )


def check_scopes(v: Violations, field_path: str, scopes: Sequence[str]) -> None:
    if not scopes:
        v.add(field_path, f"at least one scope is required: {', '.join(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            v.add(field_path, f"unknown scope {scope[:40]!r}; scopes are {', '.join(SCOPES)}")


class ApiKeys:
    """Keys in the database, and a small cache of what each presented secret is.

    A secret's key is read again after CACHE_SECONDS, so that a revocation reaches
    every replica within that time (the documented bound is 10 seconds). Its last use
    is written at most once a LAST_USE_RESOLUTION_US, not on every call.
    """

    CACHE_SECONDS = 5.0
    CACHE_ENTRIES = 10_000  # secrets remembered, unknown ones included: bounded memory
    LAST_USE_RESOLUTION_US = 60 * 1_000_000

    def __init__(self, db: Database, pages: paging.PageTokens | None = None) -> None:
        self.db = db
        self.pages = pages or paging.PageTokens()
        self._cache: OrderedDict[str, tuple[float, ApiKey | None]] = OrderedDict()

    async def create(self, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
        """The new key and its secret, which exists only in this answer."""
        v = Violations("api_key.")
        check_name(v, "name", name)
        check_scopes(v, "scopes", scopes)
        v.raise_if_any()
        key = ApiKey(name, tuple(dict.fromkeys(scopes)), now_us())
        secret = new_secret()
        async with self.db.write() as conn:
            if not await repo.insert_api_key(conn, key, hash_secret(secret)):
                raise already_exists("API_KEY_EXISTS", "tally.v1.ApiKey", name, f"an API key named {name!r} exists")
        return key, secret

    async def list(self, page_size: int, page_token: str) -> Page:
        size = paging.page_size(page_size)
        after = self.pages.decode(page_token, "api_keys", None, lambda p: isinstance(p, str))
        async with self.db.read() as conn:
            items = await repo.list_api_keys(conn, after, size + 1)
        token = self.pages.encode("api_keys", None, items[size - 1].name) if len(items) > size else ""
        return Page(items[:size], token)

    async def revoke(self, name: str) -> ApiKey:
        v = Violations()
        check_name(v, "name", name)
        v.raise_if_any()
        async with self.db.write() as conn:
            key = await repo.revoke_api_key(conn, name, now_us())
        if key is None:
            raise not_found("API_KEY_NOT_FOUND", "tally.v1.ApiKey", name, f"there is no API key named {name!r}")
        self._cache.clear()  # this replica at once; the others within CACHE_SECONDS
        return key

    async def authenticate(self, secret: str, scope: str | None) -> ApiKey:
        """The key of `secret` if it may make a call needing `scope` (None: any valid key).
        UNAUTHENTICATED for an unknown or revoked secret, PERMISSION_DENIED without the scope."""
        key = await self._key_of(secret)
        if key is None or key.revoke_time_us is not None:
            raise unauthenticated("API_KEY_INVALID", "the API key is not valid (unknown or revoked)")
        if scope is not None and not key.allows(scope):
            raise permission_denied(key, scope)
        return key

    async def _key_of(self, secret: str) -> ApiKey | None:
        now = time.monotonic()
        secret_hash = hash_secret(secret)  # the cache holds hashes too, never secrets
        cached = self._cache.get(secret_hash)
        if cached is not None and now - cached[0] < self.CACHE_SECONDS:
            return cached[1]
        async with self.db.read() as conn:
            key = await repo.api_key_by_hash(conn, secret_hash)
        if key is not None and key.revoke_time_us is None:
            last_use, current = key.last_use_time_us, now_us()
            if last_use is None or current - last_use >= self.LAST_USE_RESOLUTION_US:
                async with self.db.write() as conn:
                    await repo.touch_api_key(conn, secret_hash, current)
        self._cache[secret_hash] = (now, key)
        self._cache.move_to_end(secret_hash)
        while len(self._cache) > self.CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return key

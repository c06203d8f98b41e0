"""API keys: creation, listing, revocation, and authentication of a call's secret
(the rules of secrets and scopes are in domain.keys)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from ..domain import paging
from ..domain.errors import Violations, already_exists, not_found
from ..domain.keys import check_scopes, hash_secret, new_secret, permission_denied, unauthenticated
from ..domain.models import ApiKey, Page, now_us
from ..domain.validation import check_name
from ..storage import keys as stored_keys
from ..storage.db import Database


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
            if not await stored_keys.insert_api_key(conn, key, hash_secret(secret)):
                raise already_exists("API_KEY_EXISTS", "tally.v1.ApiKey", name, f"an API key named {name!r} exists")
        return key, secret

    async def list(self, page_size: int, page_token: str) -> Page:
        size = paging.page_size(page_size)
        after = self.pages.decode(page_token, "api_keys", None, lambda p: isinstance(p, str))
        async with self.db.read() as conn:
            items = await stored_keys.list_api_keys(conn, after, size + 1)
        token = self.pages.encode("api_keys", None, items[size - 1].name) if len(items) > size else ""
        return Page(items[:size], token)

    async def revoke(self, name: str) -> ApiKey:
        v = Violations()
        check_name(v, "name", name)
        v.raise_if_any()
        async with self.db.write() as conn:
            key = await stored_keys.revoke_api_key(conn, name, now_us())
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
            key = await stored_keys.api_key_by_hash(conn, secret_hash)
        if key is not None and key.revoke_time_us is None:
            last_use, current = key.last_use_time_us, now_us()
            if last_use is None or current - last_use >= self.LAST_USE_RESOLUTION_US:
                async with self.db.write() as conn:
                    await stored_keys.touch_api_key(conn, secret_hash, current)
        self._cache[secret_hash] = (now, key)
        self._cache.move_to_end(secret_hash)
        while len(self._cache) > self.CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return key

    async def server_key(self, name: str) -> bytes:
        """A key the replicas of this database share (made by migration 0004): page tokens
        signed by one replica are read by any other."""
        async with self.db.read() as conn:
            return await stored_keys.server_key(conn, name)

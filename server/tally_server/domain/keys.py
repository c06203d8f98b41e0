"""API keys' rules: scopes, secrets and the errors of authentication.

A secret is `tally_` and 43 URL-safe characters: 256 random bits from `secrets`. Only its
SHA-256 is stored. A slow password hash (bcrypt, scrypt, Argon2) protects secrets that
people choose, which can be guessed; these cannot be (2^256 tries), so a fast hash loses
nothing, and it lets a secret be looked up by its hash in one indexed read, where a
salted slow hash would cost tens of milliseconds of CPU on every call.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from .errors import Code, TallyError, Violations
from .models import ApiKey

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

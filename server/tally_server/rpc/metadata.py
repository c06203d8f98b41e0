"""The xproxy metadata keys of a call, as an experience context."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from tally_client.metadata import EXPERIENCE_ID, EXPERIENCE_NAME, EXPERIENCE_VERSION, REQUEST_TAGS, USER_ID

from ..domain.errors import Violations
from ..domain.models import EventContext

__all__ = ["EXPERIENCE_ID", "call_context"]


_NO_CONTEXT = EventContext()


def call_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> EventContext:
    """The context every event of the call gets; INVALID_ARGUMENT for a malformed key."""
    pairs = tuple((key, value) for key, value in metadata or () if key.startswith("xproxy-") and isinstance(value, str))
    return _context_of(pairs) if pairs else _NO_CONTEXT


# A caller sends the same few contexts again and again; a refused one raises and is not cached.
@functools.lru_cache(maxsize=4096)
def _context_of(pairs: tuple[tuple[str, str], ...]) -> EventContext:
    values = {key: value.strip() for key, value in pairs}
    v = Violations()
    version = 0
    raw_version = values.get(EXPERIENCE_VERSION, "")
    if raw_version:
        if raw_version.isdigit() and 0 < int(raw_version) < 2**31:
            version = int(raw_version)
        else:
            v.add(EXPERIENCE_VERSION, f"must be a positive integer, got {raw_version[:40]!r}")
    tags = tuple(tag.strip() for tag in values.get(REQUEST_TAGS, "").split(",") if tag.strip())
    v.raise_if_any()
    return EventContext(
        experience_id=values.get(EXPERIENCE_ID, ""),
        experience_name=values.get(EXPERIENCE_NAME, ""),
        experience_version=version,
        user_id=values.get(USER_ID, ""),
        request_tags=tags,
    )

"""The xproxy metadata keys, mirroring the reference product's xProxy headers.

The one copy of these names: the server reads the same constants.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

EXPERIENCE_ID = "xproxy-experience-id"
EXPERIENCE_NAME = "xproxy-experience-name"
EXPERIENCE_VERSION = "xproxy-experience-version"
USER_ID = "xproxy-user-id"
REQUEST_TAGS = "xproxy-request-tags"

# Each field of an event's context (tally.v1.EventContext) and the key that carries it.
CONTEXT_KEYS = {
    "experience_id": EXPERIENCE_ID,
    "experience_name": EXPERIENCE_NAME,
    "experience_version": EXPERIENCE_VERSION,
    "user_id": USER_ID,
    "request_tags": REQUEST_TAGS,
}

Metadata = tuple[tuple[str, str], ...]


def create_metadata(
    experience_id: str | UUID | None = None,
    experience_name: str | None = None,
    experience_version: int | None = None,
    user_id: str | None = None,
    request_tags: Iterable[str] | None = None,
) -> Metadata:
    """gRPC metadata for the given context, leaving out what is unset.

    >>> create_metadata(experience_name="Document_Summarization", request_tags=["beta", "eu"])
    (('xproxy-experience-name', 'Document_Summarization'), ('xproxy-request-tags', 'beta,eu'))
    """
    pairs: list[tuple[str, str]] = []
    if experience_id:
        pairs.append((EXPERIENCE_ID, str(experience_id)))
    if experience_name:
        pairs.append((EXPERIENCE_NAME, experience_name))
    if experience_version:
        pairs.append((EXPERIENCE_VERSION, str(int(experience_version))))
    if user_id:
        pairs.append((USER_ID, user_id))
    tags = [tag for tag in (request_tags or ()) if tag]
    if tags:
        if any("," in tag for tag in tags):
            raise ValueError("request tags cannot contain commas")
        pairs.append((REQUEST_TAGS, ",".join(tags)))
    return tuple(pairs)

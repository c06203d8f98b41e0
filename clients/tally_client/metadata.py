"""The xproxy metadata keys, mirroring the reference product's xProxy headers.

The one copy of these names: the server reads the same constants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal
from uuid import UUID

EXPERIENCE_ID = "xproxy-experience-id"
EXPERIENCE_NAME = "xproxy-experience-name"
EXPERIENCE_VERSION = "xproxy-experience-version"
USER_ID = "xproxy-user-id"
REQUEST_TAGS = "xproxy-request-tags"
# The step of its run an event belongs to (e.g. "retrieve", "summarize").
EXPERIENCE_STEP = "xproxy-experience-step"
# Pay-i has since renamed experiences to use cases: these mean the same as the three above.
USECASE_ID = "xproxy-usecase-id"
USECASE_NAME = "xproxy-usecase-name"
USECASE_VERSION = "xproxy-usecase-version"
USECASE_STEP = "xproxy-usecase-step"
USECASE_ALIASES = {
    USECASE_ID: EXPERIENCE_ID,
    USECASE_NAME: EXPERIENCE_NAME,
    USECASE_VERSION: EXPERIENCE_VERSION,
    USECASE_STEP: EXPERIENCE_STEP,
}
# The proxy only: the run's outcome values as a JSON object ({"resolved": true, "csat": 4}),
# checked before the call is forwarded and recorded once its event is stored.
EXPERIENCE_OUTCOMES = "xproxy-experience-outcomes"
USECASE_OUTCOMES = "xproxy-usecase-outcomes"
OUTCOME_KEYS = (EXPERIENCE_OUTCOMES, USECASE_OUTCOMES)
# Comma-separated key=value pairs that select price variants, e.g. "processing=batch".
PRICE_CONTEXT = "xproxy-price-context"
# The limit reservation (from LimitService.Reserve) that the call's event settles.
LIMIT_RESERVATION = "xproxy-limit-reservation"
API_KEY = "xproxy-api-key"
KNOWN_KEYS = frozenset(
    (
        EXPERIENCE_ID,
        EXPERIENCE_NAME,
        EXPERIENCE_VERSION,
        USER_ID,
        REQUEST_TAGS,
        EXPERIENCE_STEP,
        PRICE_CONTEXT,
        LIMIT_RESERVATION,
        API_KEY,
        *USECASE_ALIASES,
    )
)

# Each field of an event's context (tally.v1.EventContext) and the key that carries it.
CONTEXT_KEYS = {
    "experience_id": EXPERIENCE_ID,
    "experience_name": EXPERIENCE_NAME,
    "experience_version": EXPERIENCE_VERSION,
    "user_id": USER_ID,
    "request_tags": REQUEST_TAGS,
    "limit_reservation": LIMIT_RESERVATION,
    "step": EXPERIENCE_STEP,
}

Metadata = tuple[tuple[str, str], ...]


def create_metadata(
    experience_id: str | UUID | None = None,
    experience_name: str | None = None,
    experience_version: int | None = None,
    user_id: str | None = None,
    request_tags: Iterable[str] | None = None,
    *,
    price_context: Mapping[str, str] | None = None,
    limit_reservation: str | None = None,
    step: str | None = None,
    family: Literal["experience", "usecase"] = "experience",
) -> Metadata:
    """gRPC metadata for the given context, leaving out what is unset. `family="usecase"`
    names the experience with Pay-i's current keys (xproxy-usecase-*), which mean the same.

    >>> create_metadata(experience_name="Document_Summarization", request_tags=["beta", "eu"])
    (('xproxy-experience-name', 'Document_Summarization'), ('xproxy-request-tags', 'beta,eu'))
    >>> create_metadata(experience_name="Chat", family="usecase", price_context={"processing": "batch"})
    (('xproxy-usecase-name', 'Chat'), ('xproxy-price-context', 'processing=batch'))
    """
    if family not in ("experience", "usecase"):
        raise ValueError(f"family is 'experience' or 'usecase', not {family!r}")
    keys = (EXPERIENCE_ID, EXPERIENCE_NAME, EXPERIENCE_VERSION)
    if family == "usecase":
        keys = (USECASE_ID, USECASE_NAME, USECASE_VERSION)
    pairs: list[tuple[str, str]] = []
    if experience_id:
        pairs.append((keys[0], str(experience_id)))
    if experience_name:
        pairs.append((keys[1], experience_name))
    if experience_version:
        pairs.append((keys[2], str(int(experience_version))))
    if user_id:
        pairs.append((USER_ID, user_id))
    tags = [tag for tag in (request_tags or ()) if tag]
    if tags:
        if any("," in tag for tag in tags):
            raise ValueError("request tags cannot contain commas")
        pairs.append((REQUEST_TAGS, ",".join(tags)))
    if price_context:
        if any(("," in item or "=" in item) for pair in price_context.items() for item in pair):
            raise ValueError("price context keys and values cannot contain ',' or '='")
        pairs.append((PRICE_CONTEXT, ",".join(f"{key}={value}" for key, value in sorted(price_context.items()))))
    if limit_reservation:
        pairs.append((LIMIT_RESERVATION, str(limit_reservation)))
    if step:
        pairs.append((USECASE_STEP if family == "usecase" else EXPERIENCE_STEP, step))
    return tuple(pairs)


# The HTTP spelling of each key, as the reference product's helper writes them.
HEADER_NAMES = {
    EXPERIENCE_ID: "xProxy-Experience-Id",
    EXPERIENCE_NAME: "xProxy-Experience-Name",
    EXPERIENCE_VERSION: "xProxy-Experience-Version",
    USECASE_ID: "xProxy-UseCase-Id",
    USECASE_NAME: "xProxy-UseCase-Name",
    USECASE_VERSION: "xProxy-UseCase-Version",
    USER_ID: "xProxy-User-Id",
    REQUEST_TAGS: "xProxy-Request-Tags",
    EXPERIENCE_STEP: "xProxy-Experience-Step",
    USECASE_STEP: "xProxy-UseCase-Step",
    PRICE_CONTEXT: "xProxy-Price-Context",
    LIMIT_RESERVATION: "xProxy-Limit-Reservation",
    API_KEY: "xProxy-Api-Key",
}


def create_headers(
    experience_id: str | UUID | None = None,
    experience_name: str | None = None,
    experience_version: int | None = None,
    user_id: str | None = None,
    request_tags: Iterable[str] | None = None,
    *,
    price_context: Mapping[str, str] | None = None,
    limit_reservation: str | None = None,
    step: str | None = None,
    api_key: str | None = None,
    family: Literal["experience", "usecase"] = "experience",
) -> dict[str, str]:
    """The xProxy-* HTTP headers for the given context (the reference product's helper, by
    name): pass them as a provider SDK call's `extra_headers`, through Tally's proxy (which
    reads and strips them) or to an SDK tracked by `track_openai` / `track_anthropic` (which
    takes them as the call's context and does not send them on). `api_key` is Tally's key,
    for a proxy that requires one.

    >>> create_headers(experience_name="Document_Summarization", user_id="u-42")
    {'xProxy-Experience-Name': 'Document_Summarization', 'xProxy-User-Id': 'u-42'}
    """
    pairs = create_metadata(
        experience_id,
        experience_name,
        experience_version,
        user_id,
        request_tags,
        price_context=price_context,
        limit_reservation=limit_reservation,
        step=step,
        family=family,
    )
    headers = {HEADER_NAMES[key]: value for key, value in pairs}
    if api_key:
        headers[HEADER_NAMES[API_KEY]] = api_key
    return headers

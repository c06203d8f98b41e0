"""Where the proxy may forward: the providers configured by name, each a base URL, an API
shape (OpenAI-compatible or Anthropic) and the price category of its calls. Nothing a
caller sends chooses the host: a request's path picks an upstream by name and appends a
checked path to its base URL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

OPENAI = "openai"
ANTHROPIC = "anthropic"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# What the rest of a path may hold: RFC 3986's unreserved characters and the separators
# provider APIs use (file ids, model names with colons). No '%' (an encoded '/' or '.'),
# no '\\', no '@', no '?' or '#' (the query string is passed on apart).
_SAFE_PATH = re.compile(r"[A-Za-z0-9._~:/,+=-]*")


@dataclass(frozen=True)
class Upstream:
    name: str  # the route's first segment: /NAME/v1/...
    base_url: str  # ends with the API's version, e.g. https://api.openai.com/v1
    shape: str  # OPENAI or ANTHROPIC: how requests and responses look
    category: str  # the price category of its calls, e.g. system.openai

    def url(self, rest: str) -> str:
        return f"{self.base_url}/{rest}"


DEFAULT_UPSTREAMS = (
    Upstream(OPENAI, "https://api.openai.com/v1", OPENAI, "system.openai"),
    Upstream(ANTHROPIC, "https://api.anthropic.com/v1", ANTHROPIC, "system.anthropic"),
)


def parse_upstream(text: str) -> Upstream:
    """`NAME=BASE_URL` or `NAME=BASE_URL,CATEGORY`: an OpenAI-compatible upstream (or, named
    `openai` or `anthropic`, that provider at another base URL). The category defaults to
    system.NAME. ValueError saying what is wrong."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--proxy-upstream takes NAME=BASE_URL[,CATEGORY] with NAME of [a-z0-9_-], got {text!r}")
    base_url, _, category = rest.partition(",")
    base_url = base_url.strip().rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ValueError(
            f"--proxy-upstream {name}: the base URL must be http(s)://HOST[:PORT][/PATH], got {base_url!r}"
        )
    category = category.strip() or f"system.{name}"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", category):
        raise ValueError(f"--proxy-upstream {name}: the category must match [A-Za-z0-9._-]{{1,128}}, got {category!r}")
    return Upstream(name, base_url, ANTHROPIC if name == ANTHROPIC else OPENAI, category)


def upstreams(configured: tuple[str, ...]) -> dict[str, Upstream]:
    """The defaults, replaced or added to by `--proxy-upstream` flags, by name."""
    found = {upstream.name: upstream for upstream in DEFAULT_UPSTREAMS}
    for text in configured:
        upstream = parse_upstream(text)
        found[upstream.name] = upstream
    return found


def safe_rest(rest: str) -> bool:
    """Whether the rest of a path (after /NAME/v1/) may be appended to a base URL: only
    safe characters, no empty, '.' or '..' segment, so that it stays under the base."""
    if not rest or not _SAFE_PATH.fullmatch(rest):
        return False
    return all(segment not in ("", ".", "..") for segment in rest.split("/"))

"""Who may call what: each RPC's scope, read from the contract, and a call's credentials.

The scope of every tally.v1 RPC is the method option `(tally.v1.required_scope)` in
the protos; building the table fails loudly if an RPC has none, so that no RPC is ever
served without a scope decision. The health service is open; anything else served
(reflection) needs a valid key of any scope.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Mapping

from google.protobuf.descriptor import ServiceDescriptor

from tally.v1 import access_pb2

from ..domain.keys import unauthenticated
from ..domain.models import ApiKey
from ..services.keys import ApiKeys

AUTHORIZATION = "authorization"
API_KEY = "xproxy-api-key"  # the reference product's header
_BEARER = "bearer "
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
_SCOPE_NAMES = {access_pb2.SCOPE_INGEST: "ingest", access_pb2.SCOPE_READ: "read", access_pb2.SCOPE_ADMIN: "admin"}

# The key of the call being served (None with authentication off), for the servicers
# that record who changed what (custom prices).
current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("tally_api_key", default=None)


def required_scopes(services: Iterable[ServiceDescriptor]) -> dict[str, str]:
    """'/package.Service/Method' -> scope name, for every method of these services."""
    scopes: dict[str, str] = {}
    for service in services:
        for method in service.methods:
            scope = method.GetOptions().Extensions[access_pb2.required_scope]
            if scope not in _SCOPE_NAMES:
                raise RuntimeError(f"{method.full_name} declares no (tally.v1.required_scope) in its proto")
            scopes[f"/{service.full_name}/{method.name}"] = _SCOPE_NAMES[scope]
    return scopes


def presented_secret(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The secret a call presents: `authorization: Bearer <secret>`, else `xproxy-api-key`."""
    bearer = api_key = ""
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == AUTHORIZATION and value[: len(_BEARER)].lower() == _BEARER:
            bearer = value[len(_BEARER) :].strip()
        elif key == API_KEY:
            api_key = value.strip()
    return bearer or api_key


class Access:
    """Decides whether a call may proceed. With `keys` None, authentication is off."""

    def __init__(self, scopes: Mapping[str, str], keys: ApiKeys | None) -> None:
        self.scopes = scopes
        self.keys = keys

    async def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> ApiKey | None:
        """The calling key, or None when authentication is off or the method is open;
        raises UNAUTHENTICATED or PERMISSION_DENIED."""
        if self.keys is None or method.startswith(OPEN_SERVICES):
            return None
        secret = presented_secret(metadata)
        if not secret:
            raise unauthenticated(
                "API_KEY_MISSING",
                "this server requires an API key: send `authorization: Bearer <secret>` or `xproxy-api-key: <secret>`",
            )
        return await self.keys.authenticate(secret, self.scopes.get(method))

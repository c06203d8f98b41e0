"""Requests through Tally: OpenAI- and Anthropic-compatible routes (`tally serve
--proxy-listen HOST:PORT`) that forward each call to its provider, price and attribute it
from what came back, block it beforehand when a limit says so, and answer with the
provider's own response plus `xproxy_result`. An edge like rpc and web: HTTP in and out,
services below."""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from aiohttp import web

from ..edges.http import Admission, HttpSite, host_guard, loopback_bind
from .forward import Forwarder, ProxyServices, ProxySettings
from .upstreams import Upstream, parse_upstream, upstreams

__all__ = ["ProxyServices", "ProxySettings", "ProxySite", "Upstream", "parse_upstream", "upstreams"]


class ProxySite(HttpSite):
    """The proxy's listener, with the same protections as every listener of the server:
    Host names on a loopback bind, a bound on calls served at once, TLS with the server's
    certificate; Tally's key is checked per call (xProxy-Api-Key)."""

    def __init__(
        self,
        services: ProxyServices,
        configured: Mapping[str, Upstream],
        settings: ProxySettings,
        listen: str,
        max_calls: int,
        shared_port: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.forwarder = Forwarder(services, configured, settings)
        app = web.Application(
            middlewares=[host_guard(loopback_bind(listen)), Admission(max_calls).middleware()],
            client_max_size=settings.max_body_bytes,
        )
        app.router.add_route("*", "/{path:.*}", self.forwarder.handle)
        # A caller that goes away cancels its call: the upstream request is closed with it.
        super().__init__(app, listen, shared_port, tls, handler_cancellation=True)

    async def start(self) -> int:
        await self.forwarder.start()
        return await super().start()

    async def stop(self) -> None:
        await super().stop()
        await self.forwarder.stop()

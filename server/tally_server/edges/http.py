"""What every HTTP listener of Tally (the dashboard, metrics) does before its handlers, as the
gRPC interceptor does for calls: refuses foreign Host names on a loopback bind (DNS
rebinding), checks the API key when keys are on, bounds the requests served at once, and
serves TLS when the server has a certificate."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..config import is_loopback, listen_host
from ..domain.keys import unauthenticated
from ..services.keys import ApiKeys

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback_name(host_header: str) -> bool:
    """Whether a Host header names this machine: localhost, 127.0.0.0/8 or [::1], any port."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_guard(loopback_bind: bool) -> Any:
    """On a loopback bind, a request whose Host is not a loopback name is refused (421): a
    page of another site that resolves its name to 127.0.0.1 reads nothing."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback_bind and not is_loopback_name(request.headers.get("Host", "")):
            return web.json_response(
                {"error": "this server answers only to localhost, 127.0.0.1 or [::1] as its Host"}, status=421
            )
        return await handler(request)

    return middleware


class Admission:
    """At most `limit` requests served at once; past it, 429 with Retry-After, never a queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.serving = 0

    def middleware(self, paths: str = "/") -> Any:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith(paths):
                return await handler(request)
            if self.serving >= self.limit:
                return web.json_response(
                    {"error": f"{self.limit} requests are being served; retry"},
                    status=429,
                    headers={"Retry-After": "1"},
                )
            self.serving += 1
            try:
                return await handler(request)
            finally:
                self.serving -= 1

        return middleware


async def check_key(keys: ApiKeys | None, request: web.Request, scope: str) -> None:
    """Nothing when keys are off or the request carries a key with `scope` (Authorization:
    Bearer); else the TallyError that refuses it."""
    if keys is None:
        return
    given = request.headers.get("Authorization", "")
    secret = given[7:].strip() if given.lower().startswith("bearer ") else ""
    if not secret:
        raise unauthenticated("API_KEY_MISSING", f"this endpoint needs an API key with the {scope} scope")
    await keys.authenticate(secret, scope)


class HttpSite:
    """One HTTP listener, started and stopped with the server."""

    def __init__(
        self,
        app: web.Application,
        listen: str,
        shared_port: bool = False,
        tls: ssl.SSLContext | None = None,
        handler_cancellation: bool = False,
    ) -> None:
        self.app = app
        self.handler_cancellation = handler_cancellation
        self.listen = listen
        self.shared_port = shared_port  # the workers of --workers N bind one port (SO_REUSEPORT)
        self.tls = tls
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        host, _, port = self.listen.rpartition(":")
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=self.handler_cancellation)
        await self._runner.setup()
        await web.TCPSite(
            self._runner,
            host.strip("[]") or "0.0.0.0",
            int(port),
            reuse_port=self.shared_port or None,
            ssl_context=self.tls,
        ).start()
        self.port = int(self._runner.addresses[0][1])  # the bound port, for port 0
        return self.port

    def url(self, path: str = "/") -> str:
        """Where it listens, as bound: the address given (0.0.0.0 is every interface), the real port."""
        return bound_url(self.listen, self.port, self.tls is not None, path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def bound_url(listen: str, port: int, tls: bool, path: str = "/") -> str:
    host = listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
    shown = f"[{host}]" if ":" in host else host
    everywhere = " (every interface)" if host in ("0.0.0.0", "::") else ""
    return f"{'https' if tls else 'http'}://{shown}:{port}{path}{everywhere}"


def loopback_bind(listen: str) -> bool:
    return is_loopback(listen_host(listen))


def run_forever_in_thread(start: Callable[[], Awaitable[Any]]) -> asyncio.AbstractEventLoop:
    """Runs `start()` on an event loop of its own in a daemon thread, then that loop forever
    (the parent of --workers, which has no loop, serves metrics this way)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as error:  # noqa: BLE001 - said to the caller, in its thread
            failure.append(error)
            started.set()
            return
        started.set()
        loop.run_forever()

    threading.Thread(target=main, name="tally-http", daemon=True).start()
    started.wait()
    if failure:
        raise failure[0]
    return loop

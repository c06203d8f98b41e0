"""Prometheus metrics over HTTP (`--metrics-listen`): /metrics behind the same protections
as the dashboard (Host names on loopback, a read key when keys are on, TLS)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..domain.errors import StorageUnavailable, TallyError
from ..edges.http import Admission, check_key, host_guard
from ..services.keys import ApiKeys

# Scrapes served at once: a scrape is cheap; more at once is a flood, answered 429.
MAX_SCRAPES = 8


def metrics_application(registry: Any, keys: ApiKeys | None, loopback_bind: bool) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        try:
            await check_key(keys, request, "read")
        except StorageUnavailable:
            return web.json_response({"error": "the database is unavailable; retry"}, status=503)
        except TallyError as error:
            status = 401 if error.code.name == "UNAUTHENTICATED" else 403
            return web.json_response({"error": error.message, "reason": error.reason}, status=status)
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[host_guard(loopback_bind), Admission(MAX_SCRAPES).middleware()])
    app.router.add_get("/metrics", scrape)
    return app

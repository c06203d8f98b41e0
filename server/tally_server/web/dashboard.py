"""The dashboard: a read-only web page and the JSON it reads, served by the same process
and the same services as the gRPC API (`tally serve --web-listen HOST:PORT`). An edge like
rpc: it calls services only."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from ..domain.errors import StorageUnavailable, TallyError
from ..domain.models import CostGroup, CostState, now_us
from ..edges.http import Admission, Handler, HttpSite, check_key, host_guard, loopback_bind
from ..services.events import Events
from ..services.experience_types import ExperienceTypes
from ..services.experiences import Experiences
from ..services.keys import ApiKeys
from ..services.limits import Limits
from ..services.reports import Reports

log = logging.getLogger("tally.web")
DAY_US = 86_400 * 1_000_000
MAX_DAYS = 366
STATIC = resources.files("tally_server.web") / "static"
_CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@dataclass
class Services:
    """What the dashboard reads, the same objects the gRPC servicers call."""

    types: ExperienceTypes
    experiences: Experiences
    events: Events
    reports: Reports
    limits: Limits
    keys: ApiKeys | None  # None: API keys are off


def _dollars(nanos: int) -> float:
    return nanos / 1e9


def _whole_number(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A query parameter that must be a whole number from `low` to `high`; 400 naming it if not."""
    text = request.query.get(name, str(default))
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number from {low} to {high}, got {text[:40]!r}")
    return int(text)


def _days(request: web.Request) -> int:
    return _whole_number(request, "days", 30, 1, MAX_DAYS)


def _guarded(services: Services) -> Any:
    """Every /api call carries a read key when keys are on; a TallyError is its HTTP status."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/") or request.path == "/api/whoami":
            return await handler(request)
        try:
            await check_key(services.keys, request, "read")
            return await handler(request)
        except StorageUnavailable:
            return web.json_response({"error": "the database is unavailable; retry"}, status=503)
        except TallyError as error:
            status = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404}.get(error.code.name, 400)
            return web.json_response({"error": error.message, "reason": error.reason}, status=status)

    return middleware


def _group_json(group: CostGroup) -> dict[str, Any]:
    return {
        **group.keys,
        "cost": _dollars(group.totals.cost_total_nanos),
        "events": group.totals.event_count,
        "unpriced": group.totals.unpriced_event_count,
    }


# Groups /api/spend shows by name; the rest are summed as "other" (caller-chosen names, such
# as 50,000 misspelt models, cannot make the answer or its reads grow).
SPEND_GROUPS = 12


async def _spend(services: Services, request: web.Request) -> web.Response:
    """Spend per day over the last `days` of the costliest groups by experience type, version,
    model, resource or category, and the rest as "other": read from the hourly rollup kept at
    ingest, ranked in the database, at most SPEND_GROUPS groups per day in the answer."""
    by = request.query.get("by", "experience_name")
    if by not in ("experience_name", "experience_version", "model", "resource", "category"):
        raise web.HTTPBadRequest(text="by is experience_name, experience_version, model, resource or category")
    days = _days(request)
    end = now_us()
    start = (end // DAY_US - days + 1) * DAY_US
    top = await services.reports.top_spend_by_day(by, start, end, SPEND_GROUPS)
    return web.json_response(
        {
            "start_us": start,
            "days": days,
            "groups": [_group_json(g) for g in top.groups],
            "other": [_group_json(g) for g in top.other],
            "other_groups": top.other_groups,
            "total": _group_json(top.total),
        }
    )


async def _top_runs(services: Services, request: web.Request) -> web.Response:
    """The most expensive experiences: the costliest of each type, merged."""
    limit = _whole_number(request, "limit", 20, 1, 100)
    runs: list[dict[str, Any]] = []
    token = ""
    while True:
        page = await services.types.list(1000, token)
        for experience_type in page.items:
            found = await services.experiences.list(experience_type.name, 0, None, None, limit, "", "cost_total desc")
            for experience in found.items:
                stats = experience.stats
                runs.append(
                    {
                        "experience_id": str(experience.experience_id),
                        "type": experience.experience_name,
                        "version": experience.experience_version,
                        "cost": _dollars(stats.cost_total_nanos) if stats else 0.0,
                        "events": stats.event_count if stats else 0,
                        "unpriced": stats.unpriced_event_count if stats else 0,
                    }
                )
        if not (token := page.next_page_token) or len(runs) > 10_000:
            break
    runs.sort(key=lambda run: -run["cost"])
    return web.json_response({"runs": runs[:limit]})


async def _run(services: Services, request: web.Request) -> web.Response:
    """One run: its statistics and its events, newest first (at most 500)."""
    experience, stats = await services.experiences.get(request.match_info["experience_id"])
    page = await services.events.list(experience_id=str(experience.experience_id), page_size=500)
    events = [
        {
            "request_id": str(stored.result.request_id),
            "time_us": stored.result.event_time_us,
            "model": stored.event.resource,
            "category": stored.event.category,
            "cost": _dollars(stored.result.cost.total_nanos),
            "state": stored.result.cost.state.name.lower(),
            "latency_ms": stored.event.end_to_end_latency_ms,
            "why_not_priced": sorted({u.reason for u in stored.result.cost.unknown_units}),
        }
        for stored in page.items
    ]
    return web.json_response(
        {
            "experience_id": str(experience.experience_id),
            "type": experience.experience_name,
            "version": experience.experience_version,
            "cost": _dollars(stats.cost_total_nanos),
            "events": stats.event_count,
            "latency_p50_ms": stats.latency_p50_ms,
            "latency_p95_ms": stats.latency_p95_ms,
            "steps": events,
        }
    )


async def _versions(services: Services, request: web.Request) -> web.Response:
    """Cost per run of each version of each type, side by side."""
    rows: list[dict[str, Any]] = []
    token = ""
    while True:
        page = await services.types.list(1000, token)
        for experience_type in page.items:
            stats = await services.types.stats(experience_type.name, 0, None, None)
            for version, d in sorted(stats.by_version.items()):
                rows.append(
                    {
                        "type": experience_type.name,
                        "version": version,
                        "runs": d.experience_count,
                        "mean": _dollars(d.mean_nanos),
                        "p50": _dollars(d.p50_nanos),
                        "p95": _dollars(d.p95_nanos),
                        "total": _dollars(d.total_nanos),
                    }
                )
        if not (token := page.next_page_token):
            break
    return web.json_response({"versions": rows})


# Types whose two latest versions the page compares, at most: each costs a comparison (about
# 0.3 s, most of it the bootstrap's resampling, at any size), so a house of many types is not
# read whole on every load; and the answer is reused for COMPARE_SECONDS.
COMPARED_TYPES = 20
COMPARE_SECONDS = 60.0
# The last answer and when it was made, kept in the application (one per server).
COMPARED = web.AppKey("compared", dict)


async def _compare(services: Services, request: web.Request) -> web.Response:
    """Each type's two latest versions with runs, side by side (CompareVersions): cost per
    run and, for its first outcome with a goal, success rate and cost per success."""
    cache = request.app[COMPARED]
    if cache and time.monotonic() - cache["at"] < COMPARE_SECONDS:
        return web.json_response(cache["answer"])
    rows: list[dict[str, Any]] = []
    token = ""
    while len(rows) < COMPARED_TYPES:
        page = await services.types.list(100, token)
        for experience_type in page.items:
            if experience_type.version < 2 or len(rows) >= COMPARED_TYPES:
                continue
            stats = await services.types.stats(experience_type.name, 0, None, None)
            latest = sorted(stats.by_version)[-2:]
            if len(latest) < 2:
                continue
            compared = await services.reports.compare(experience_type.name, latest[0], latest[1], None, None)
            by_metric = {d.metric: d for d in compared.differences}
            cost = by_metric["cost_per_run"]
            row: dict[str, Any] = {
                "type": experience_type.name,
                "baseline": latest[0],
                "candidate": latest[1],
                "runs": [compared.baseline.runs, compared.candidate.runs],
                "cost": [cost.baseline, cost.candidate],
                "cost_change": cost.relative,
                "enough_runs": cost.enough_runs,
            }
            success = next((d for d in compared.differences if d.metric.startswith("success_rate:")), None)
            if success is not None:
                name = success.metric.split(":", 1)[1]
                per_success = by_metric.get(f"cost_per_success:{name}")
                row.update(
                    outcome=name,
                    success=[success.baseline, success.candidate],
                    cost_per_success_change=per_success.relative if per_success else None,
                )
            rows.append(row)
        if not (token := page.next_page_token):
            break
    answer = {"comparisons": rows, "at_most": COMPARED_TYPES, "seconds": COMPARE_SECONDS}
    cache.update(at=time.monotonic(), answer=answer)
    return web.json_response(answer)


# The newest events of each state whose reasons the page counts, the reasons it shows (the
# rest counted as one), and the characters of each: caller-chosen names stay bounded.
UNPRICED_SAMPLE = 1000
UNPRICED_REASONS = 20
REASON_CHARS = 300


async def _unpriced(services: Services, request: web.Request) -> web.Response:
    """Events not (fully) priced over the last `days`: their count from the hourly rollup,
    their reasons from the newest of them (an index holds only those): what to fix."""
    days = _days(request)
    end = now_us()
    since = end - days * DAY_US
    _, total = await services.reports.breakdown(["category"], since, end, page_size=1)
    reasons: dict[str, int] = {}
    sampled = 0
    for state in (CostState.UNPRICED, CostState.PARTIALLY_PRICED):
        page = await services.events.list(cost_state=int(state), start_us=since, page_size=UNPRICED_SAMPLE)
        for stored in page.items:
            sampled += 1
            for reason in {u.reason for u in stored.result.cost.unknown_units}:
                reasons[reason] = reasons.get(reason, 0) + 1
    ordered = sorted(reasons.items(), key=lambda item: -item[1])
    return web.json_response(
        {
            "events": total.totals.unpriced_event_count,
            "sampled": sampled,
            "reasons": [{"reason": r[:REASON_CHARS], "events": n} for r, n in ordered[:UNPRICED_REASONS]],
            "other_reasons": sum(n for _, n in ordered[UNPRICED_REASONS:]),
        }
    )


async def _limits(services: Services, request: web.Request) -> web.Response:
    items, _ = await services.limits.list(1000, "")
    rows = []
    for limit, view in items:
        rows.append(
            {
                "name": limit.name,
                "kind": limit.kind.name.lower(),
                "period": limit.period.name.lower(),
                "max": _dollars(limit.max_nanos),
                "spend": _dollars(view.spend.spend_nanos) if view else None,
                "reserved": _dollars(view.spend.reserved_nanos) if view else None,
                "state": view.state.name.lower() if view else "per experience",
            }
        )
    return web.json_response({"limits": rows})


async def _whoami(services: Services, request: web.Request) -> web.Response:
    """Whether keys are on, and whether this request's key may read: answered without a refusal,
    so that the page asks for a key without an error in the browser's console."""
    try:
        await check_key(services.keys, request, "read")
    except StorageUnavailable:
        return web.json_response({"error": "the database is unavailable; retry"}, status=503)
    except TallyError as error:
        return web.json_response({"keys": True, "authenticated": False, "reason": error.message})
    return web.json_response({"keys": services.keys is not None, "authenticated": True})


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name") or "index.html"
    resource = STATIC / name
    suffix = "." + name.rsplit(".", 1)[-1]
    if "/" in name or name.startswith(".") or suffix not in _CONTENT_TYPES or not resource.is_file():
        raise web.HTTPNotFound()
    headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"}
    return web.Response(body=resource.read_bytes(), content_type=_CONTENT_TYPES[suffix], headers=headers)


# /api requests served at once: each is bounded, but many at once would take the database
# from the gRPC callers; past it, 429 with Retry-After.
MAX_API_REQUESTS = 8


def application(services: Services, loopback_bind: bool = True) -> web.Application:
    app = web.Application(
        middlewares=[host_guard(loopback_bind), Admission(MAX_API_REQUESTS).middleware("/api/"), _guarded(services)]
    )
    app[COMPARED] = {}

    def bound(handler: Callable[[Services, web.Request], Awaitable[web.Response]]) -> Handler:
        async def call(request: web.Request) -> web.StreamResponse:
            return await handler(services, request)

        return call

    app.router.add_get("/", _static)
    app.router.add_get("/static/{name}", _static)
    for path, handler in (
        ("/api/whoami", _whoami),
        ("/api/spend", _spend),
        ("/api/runs", _top_runs),
        ("/api/runs/{experience_id}", _run),
        ("/api/versions", _versions),
        ("/api/compare", _compare),
        ("/api/unpriced", _unpriced),
        ("/api/limits", _limits),
    ):
        app.router.add_get(path, bound(handler))
    return app


def dashboard(
    services: Services, listen: str, shared_port: bool = False, tls: ssl.SSLContext | None = None
) -> HttpSite:
    """The dashboard's HTTP listener."""
    return HttpSite(application(services, loopback_bind(listen)), listen, shared_port, tls)

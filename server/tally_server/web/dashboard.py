"""The dashboard: a read-only web page and the JSON it reads, served by the same process
and the same services as the gRPC API (`tally serve --web-listen HOST:PORT`). An edge like
rpc: it calls services only."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from ..domain import limits as rules
from ..domain.errors import StorageUnavailable, TallyError, Violations
from ..domain.models import (
    CostFilter,
    CostGroup,
    CostState,
    Experience,
    ExperienceStats,
    Page,
    StoredEvent,
    now_us,
)
from ..domain.money import divide_half_even
from ..domain.rollups import REASON_CHARS, reasons_of
from ..domain.validation import MAP_VALUE_MAX, NAME_PATTERN, parse_uuid, utf8_length
from ..edges.http import Admission, Handler, HttpSite, check_key, host_guard, loopback_bind
from ..services.events import Events
from ..services.experience_types import ExperienceTypes
from ..services.experiences import Experiences
from ..services.keys import ApiKeys
from ..services.limits import PERIODS_BY_SPEND, Limits
from ..services.reports import Reports, WindowSummary, check_filter

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


def _dollars(nanos: int) -> str:
    """Money in the JSON: exact, as a decimal string of dollars with nine places (the page
    formats it by one rule: static/app.js, `usd`)."""
    whole, part = divmod(abs(nanos), 1_000_000_000)
    return f"{'-' if nanos < 0 else ''}{whole}.{part:09d}"


def _whole_number(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A query parameter that must be a whole number from `low` to `high`; 400 naming it if not."""
    text = request.query.get(name, str(default))
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number from {low} to {high}, got {text[:40]!r}")
    return int(text)


def _days(request: web.Request) -> int:
    return _whole_number(request, "days", 30, 1, MAX_DAYS)


@dataclass(frozen=True)
class View:
    """The window and filters every panel shares (the page keeps them in its URL): whole UTC
    days from `from` to `to` (inclusive; the last 30 days by default, or the last `days`),
    and the events of a type (and version), provider, model, user and tag."""

    start_us: int
    end_us: int
    only: CostFilter

    @property
    def days(self) -> int:
        return (self.end_us - self.start_us) // DAY_US

    def before(self) -> View:
        """The window of the same length just before this one."""
        length = self.end_us - self.start_us
        return View(self.start_us - length, self.start_us, self.only)


def _date(request: web.Request, name: str) -> int | None:
    text = request.query.get(name, "")
    if not text:
        return None
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a date, YYYY-MM-DD (UTC), got {text[:40]!r}") from None
    return int(datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()) * 1_000_000


def _view(request: web.Request) -> View:
    today = now_us() // DAY_US * DAY_US
    last = _date(request, "to")
    last = today if last is None else last
    first = _date(request, "from")
    if first is None:
        first = last - (_days(request) - 1) * DAY_US
    if first > last:
        raise web.HTTPBadRequest(text="from must not be after to")
    if (last - first) // DAY_US + 1 > MAX_DAYS:
        raise web.HTTPBadRequest(text=f"a window is at most {MAX_DAYS} days")
    version = _whole_number(request, "version", 0, 0, 2**31 - 1)
    q = request.query
    only = CostFilter(
        q.get("type", ""), version, q.get("provider", ""), q.get("model", ""), q.get("user", ""), q.get("tag", "")
    )
    v = Violations()
    check_filter(v, only)
    v.raise_if_any()  # a 400 naming each field (the middleware)
    return View(first, last + DAY_US, only)


async def _events_of(services: Services, view: View, page_size: int, cost_state: int = 0, page_token: str = "") -> Page:
    """A page of the window's events of the view's filters, newest first (ListEvents)."""
    only = view.only
    return await services.events.list(
        experience_name=only.experience_name,
        experience_version=only.experience_version,
        user_id=only.user_id,
        request_tag=only.request_tag,
        category=only.category,
        model=only.model,
        cost_state=cost_state,
        start_us=view.start_us,
        end_us=view.end_us,
        page_size=page_size,
        page_token=page_token,
    )


async def _unpriced_sample(services: Services, view: View) -> list[StoredEvent]:
    """The newest UNPRICED_SAMPLE events of the view in each not-priced state (those whose
    reasons /api/unpriced counts where the rollup of reasons does not answer): what a
    reason's request log is found among."""
    found: list[StoredEvent] = []
    for state in (CostState.UNPRICED, CostState.PARTIALLY_PRICED):
        some, _ = await services.events.newest_among(
            view.only, view.start_us, view.end_us, int(state), among=UNPRICED_SCAN, limit=UNPRICED_SAMPLE
        )
        found += some
    return found


def _reasons(stored: StoredEvent) -> set[str]:
    """Why an event was not (fully) priced, each reason cut as the rollup of reasons keeps it."""
    return set(reasons_of(stored.result.cost))


async def _type_names(services: Services, only: CostFilter) -> list[str]:
    """The type the filter names, else every type (the first 500: bounded however many)."""
    if only.experience_name:
        return [only.experience_name]
    names: list[str] = []
    token = ""
    while len(names) < 500:
        page = await services.types.list(1000, token)
        names += [t.name for t in page.items]
        if not (token := page.next_page_token):
            break
    return names


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
        "tokens_in": group.totals.input_tokens,
        "tokens_out": group.totals.output_tokens,
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
    view = _view(request)
    top = await services.reports.top_spend_by_day(by, view.start_us, view.end_us, SPEND_GROUPS, view.only)
    return web.json_response(
        {
            "start_us": view.start_us,
            "days": view.days,
            "groups": [_group_json(g) for g in top.groups],
            "other": [_group_json(g) for g in top.other],
            "other_groups": top.other_groups,
            "total": _group_json(top.total),
        }
    )


# What /api/spend_by groups by (read from the rollups kept at ingest: by user, tag or key, of
# a user or a tag, of a provider or model); the answer is the SPEND_GROUPS costliest and the
# rest as one.
SPEND_BY = {"user": "user_id", "tag": "request_tag", "key": "api_key_name"}


async def _spend_by(services: Services, request: web.Request) -> web.Response:
    """Spend over the window and filters by user, request tag or API key name: the costliest
    SPEND_GROUPS groups (BreakDownCost's first page), their events and tokens, and the rest
    summed (by tag an event counts once per tag, so the groups may sum past the total; kept
    to a tag, by tag is that tag alone, and the answer's note says so)."""
    by = request.query.get("by", "user")
    if by not in SPEND_BY:
        raise web.HTTPBadRequest(text="by is user, tag or key")
    view = _view(request)
    tag = view.only.request_tag
    if by == "tag" and tag:
        # Kept to a tag: the tag itself. Its events' other tags would be read from every event
        # of the tag (no rollup keeps pairs of tags: they grow with the square of an event's
        # up to 32 tags), seconds at a million events.
        total = CostGroup({}, await services.reports.window_total(view.start_us, view.end_us, view.only))
        return web.json_response(
            {
                "by": by,
                "groups": [{**_group_json(total), "name": tag}] if total.totals.event_count else [],
                "rest": None,
                "total": _group_json(total),
                "note": "kept to one tag: its events' other tags are not broken down",
            }
        )
    page, total = await services.reports.breakdown(
        [SPEND_BY[by]], view.start_us, view.end_us, view.only, page_size=SPEND_GROUPS
    )
    rest = dataclasses.replace(total.totals)
    for g in page.items:
        rest.subtract(g.totals)
    shown_rest = by != "tag" and bool(page.next_page_token)  # by tag, the groups overlap
    return web.json_response(
        {
            "by": by,
            "groups": [{**_group_json(g), "name": g.keys[SPEND_BY[by]]} for g in page.items],
            "rest": {"cost": _dollars(rest.cost_total_nanos), "events": rest.event_count} if shown_rest else None,
            "total": _group_json(total),
            "note": None,
        }
    )


def _tiles(summary: WindowSummary) -> dict[str, Any]:
    t = summary.totals
    return {
        "spend": _dollars(t.cost_total_nanos),
        "events": t.event_count,
        "failed": t.failed_event_count,
        "unpriced": t.unpriced_event_count,
        "tokens_in": t.input_tokens,
        "tokens_out": t.output_tokens,
        "runs": summary.runs,
        "cost_per_run": _dollars(divide_half_even(summary.run_cost_nanos, summary.runs)) if summary.runs else None,
        "runs_counted": summary.runs is not None,
        "runs_started": summary.runs_started,
        "runs_not_counted": summary.why_not_counted,
    }


async def _summary(services: Services, request: web.Request) -> web.Response:
    """The tiles: spend, events, unpriced events, runs and cost per run over the window and
    filters, each beside the window of the same length before it."""
    view = _view(request)
    now = await services.reports.window_summary(view.start_us, view.end_us, view.only)
    before = view.before()
    then = await services.reports.window_summary(before.start_us, before.end_us, before.only)
    return web.json_response(
        {"start_us": view.start_us, "days": view.days, "current": _tiles(now), "previous": _tiles(then)}
    )


# Events a page of the request log shows, and the characters of a caller-chosen text it shows.
LOG_PAGE = 50


def _event_json(stored: StoredEvent) -> dict[str, Any]:
    result, event = stored.result, stored.event
    return {
        "request_id": str(result.request_id),
        "time_us": result.event_time_us,
        "experience_id": str(result.experience_id) if result.experience_id else "",
        "type": result.experience_name,
        "version": result.experience_version,
        "user": event.context.user_id,
        "tags": list(event.context.request_tags),
        "category": event.category,
        "resource": event.resource,
        "units": {unit: list(counts) for unit, counts in sorted(event.units.items())},
        "latency_ms": event.end_to_end_latency_ms or None,  # 0: not reported
        "status": event.http_status_code,
        "state": result.cost.state.name.lower(),
        "price": result.cost.price.resource if result.cost.price is not None else "",
        "why_not_priced": sorted({u.reason for u in result.cost.unknown_units}),
        "cost": _dollars(result.cost.total_nanos),
        "idempotency_key": event.idempotency_key,
        "provider_response_id": event.provider_response_id,
        "properties": dict(event.properties),
    }


# The newest events of the view a property search reads, at most: a property has no index.
PROPERTY_SCAN = 5000


async def _with_property(services: Services, view: View, query: str) -> tuple[list[StoredEvent], int]:
    """The view's events (among its newest PROPERTY_SCAN) with a property whose value is
    `query`, or for "key=value" whose property `key` is `value`: at most LOG_PAGE, newest
    first; and how many events were searched."""
    key, equals, value = (part.strip() for part in query.partition("="))
    if not equals or not NAME_PATTERN.fullmatch(key):
        key, value = "", query
    if utf8_length(value) > MAP_VALUE_MAX:
        return [], 0  # no property holds it
    found, searched = await services.events.with_property(
        key, value, view.only, view.start_us, view.end_us, among=PROPERTY_SCAN, limit=LOG_PAGE
    )
    return list(found), searched


async def _events(services: Services, request: web.Request) -> web.Response:
    """The request log: the window's events of the filters, newest first, a page at a time;
    `q` finds one by request id, idempotency key or provider response id instead (else
    those with a property of that value, or "key=value", among the newest PROPERTY_SCAN), and
    `state=unpriced` keeps the events not (fully) priced."""
    view = _view(request)
    query = request.query.get("q", "").strip()[:300]
    if query:
        found: list[StoredEvent] = []
        if "\x00" in query:  # in no id, key or property: nothing to find
            return web.json_response({"events": [], "next": "", "searched": query.replace("\x00", ""), "scanned": 0})
        if parse_uuid(query) is not None:
            with contextlib.suppress(TallyError):
                found.append(await services.events.get(request_id=query))
        if not found:
            with contextlib.suppress(TallyError):
                found.append(await services.events.get(idempotency_key=query))
        if not found and utf8_length(query) <= 256:  # the longest response id an event holds
            page = await services.events.list(provider_response_id=query, page_size=LOG_PAGE)
            found = list(page.items)
        scanned = 0
        if not found:
            found, scanned = await _with_property(services, view, query)
        answer = {"events": [_event_json(e) for e in found], "next": "", "searched": query, "scanned": scanned}
        return web.json_response(answer)
    state = request.query.get("state", "")
    if state not in ("", "unpriced", "partially_priced"):
        raise web.HTTPBadRequest(text="state is unpriced or partially_priced")
    cost_state = {"": 0, "unpriced": int(CostState.UNPRICED), "partially_priced": int(CostState.PARTIALLY_PRICED)}
    reason = request.query.get("reason", "")
    if reason:  # the events of one unpriced reason: among the newest the reasons panel counts
        found = [e for e in await _unpriced_sample(services, view) if reason in _reasons(e)]
        found.sort(key=lambda e: (-e.result.event_time_us, str(e.result.request_id)))
        return web.json_response({"events": [_event_json(e) for e in found[:LOG_PAGE]], "next": "", "searched": ""})
    page = await _events_of(services, view, LOG_PAGE, cost_state[state], request.query.get("page", ""))
    return web.json_response(
        {"events": [_event_json(e) for e in page.items], "next": page.next_page_token, "searched": ""}
    )


# With a provider, model, user or tag filter, the runs panel shows the runs of the newest
# RUNS_FROM_EVENTS matching events (a user's through the index of the events by user),
# ranked in the database, the first `limit` read.
RUNS_FROM_EVENTS = 1000
# How the runs panel may sort: ListExperiences' orders.
RUN_ORDERS = {"cost": "cost_total", "events": "event_count", "time": "create_time"}


def _run_json(experience: Experience) -> dict[str, Any]:
    stats = experience.stats or ExperienceStats()
    return {
        "experience_id": str(experience.experience_id),
        "type": experience.experience_name,
        "version": experience.experience_version,
        "user": "",  # its first event's (_with_users)
        "tokens_in": stats.input_tokens,
        "tokens_out": stats.output_tokens,
        "created_us": experience.create_time_us,
        "first_us": stats.first_event_time_us,
        "last_us": stats.last_event_time_us,
        "events": stats.event_count,
        "failed": stats.failed_event_count,
        "unpriced": stats.unpriced_event_count,
        "cost": _dollars(stats.cost_total_nanos),
        "cost_nanos": stats.cost_total_nanos,
    }


async def _top_runs(services: Services, request: web.Request) -> web.Response:
    """Runs created in the window, of the type (and version) chosen or of every type (the
    first of each type's, merged: bounded however many types), sorted by cost, events or
    time, most first."""
    limit = _whole_number(request, "limit", 20, 1, 100)
    sort = request.query.get("sort", "cost")
    if sort not in RUN_ORDERS:
        raise web.HTTPBadRequest(text="sort is cost, events or time")
    view = _view(request)
    key = {"cost": "cost_nanos", "events": "events", "time": "created_us"}[sort]
    only = view.only
    if only.category or only.model or only.user_id or only.request_tag:
        # Runs with one of the filter's events: those of its newest RUNS_FROM_EVENTS events.
        ids, events = await services.events.newest_runs(only, view.start_us, view.end_us, among=RUNS_FROM_EVENTS)
        found_runs = await services.experiences.ranked(ids, RUN_ORDERS[sort], limit)
        answer = await _with_users(services, found_runs, key, limit)
        return web.json_response({"runs": answer, "sort": sort, "from_events": events})
    runs: list[Experience] = []
    for name in await _type_names(services, only):
        found = await services.experiences.list(
            name, view.only.experience_version, view.start_us, view.end_us, limit, "", f"{RUN_ORDERS[sort]} desc"
        )
        runs += found.items
    return web.json_response({"runs": await _with_users(services, runs, key, limit), "sort": sort})


async def _with_users(services: Services, runs: list[Experience], key: str, limit: int) -> list[dict[str, Any]]:
    """The first `limit` runs by `key` (most first), each with the user of its first event."""
    rows = sorted((_run_json(run) for run in runs), key=lambda run: (-run[key], run["experience_id"]))[:limit]
    users = await services.experiences.first_users([uuid.UUID(row["experience_id"]) for row in rows])
    for row in rows:
        row["user"] = users.get(uuid.UUID(row["experience_id"]), "")
    return rows


async def _run(services: Services, request: web.Request) -> web.Response:
    """One run: its statistics, its steps' costs and its events (each with its model, tokens
    by unit, latency or none reported, price entry, state, reason and properties), newest
    first (at most 500)."""
    experience, stats = await services.experiences.get(request.match_info["experience_id"])
    page = await services.events.list(experience_id=str(experience.experience_id), page_size=500)
    reported = stats.latency_reported_event_count > 0
    return web.json_response(
        {
            **(await _with_users(services, [dataclasses.replace(experience, stats=stats)], "events", 1))[0],
            "user_ids": sorted({e.event.context.user_id for e in page.items if e.event.context.user_id}),
            "latency_p50_ms": stats.latency_p50_ms if reported else None,
            "latency_p95_ms": stats.latency_p95_ms if reported else None,
            "step_costs": [
                {"step": c.step, "events": c.event_count, "cost": _dollars(c.cost_nanos)} for c in experience.step_costs
            ],
            "steps": [_event_json(e) for e in page.items],
        }
    )


async def _versions(services: Services, request: web.Request) -> web.Response:
    """Each version of each type (or of the type chosen) side by side, over its runs whose
    first event is in the window: runs, cost per run (mean, p50, p95), failure rate, events
    not priced (a run of them counts $0 for them: said, not hidden), and for the type's
    first outcome with a goal, its success rate and cost per success."""
    view = _view(request)
    rows: list[dict[str, Any]] = []
    for name in await _type_names(services, view.only):
        stats = await services.types.stats(
            name, view.only.experience_version, view.start_us, view.end_us, include_outcomes=True, versions_only=True
        )
        for version, d in sorted(stats.by_version.items()):
            row: dict[str, Any] = {
                "type": name,
                "version": version,
                "runs": d.experience_count,
                "events": d.event_count,
                "mean": _dollars(d.mean_nanos),
                "p50": _dollars(d.p50_nanos),
                "p95": _dollars(d.p95_nanos),
                "total": _dollars(d.total_nanos),
                "failure_rate": d.failed_event_count / d.event_count if d.event_count else None,
                "unpriced_events": d.unpriced_event_count,
            }
            gated = [o for o in stats.outcomes.get(version, ()) if o.success_rate is not None]
            if gated:
                first = gated[0]
                row.update(
                    outcome=first.name,
                    success_rate=first.success_rate,
                    cost_per_success=_dollars(first.cost_per_success_nanos)
                    if first.cost_per_success_nanos is not None
                    else None,
                )
            rows.append(row)
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
                "cost": [_dollars(compared.baseline.mean_nanos), _dollars(compared.candidate.mean_nanos)],
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


# Where the rollup of reasons does not answer: the newest events of each state whose reasons
# the page counts, and the newest of the window in that state those of a tag, model or
# provider are looked for among; the reasons it shows (the rest counted as one): what is read
# stays bounded.
UNPRICED_SAMPLE = 1000
UNPRICED_SCAN = 5_000
UNPRICED_REASONS = 20
# The rows of the rollup of reasons the panel reads at most (a window's days times the
# models and reasons of its user, tag or keys); past them, it counts the newest events.
REASON_ROWS = 5_000


async def _unpriced(services: Services, request: web.Request) -> web.Response:
    """Events not (fully) priced over the window and filters: their count from the hourly
    rollups; their reasons from the rollup of reasons (all of them), else, for a type or
    version, or a user and a tag together, from the newest of them (an index holds only
    those): what to fix."""
    view = _view(request)
    # By type: a dimension both rollups keep (by model, and by user or tag).
    _, total = await services.reports.breakdown(["experience_name"], view.start_us, view.end_us, view.only, page_size=1)
    events = total.totals.unpriced_event_count
    counted = await services.events.reasons_counted(view.only, view.start_us, view.end_us, max_rows=REASON_ROWS)
    reasons: dict[str, int] = {}
    sampled, bounded = events, False
    if counted is not None:
        for reason, of_reason in counted:
            reasons[reason] = reasons.get(reason, 0) + of_reason
    else:
        sampled = 0
        for state in (CostState.UNPRICED, CostState.PARTIALLY_PRICED):
            of_events, scanned = await services.events.unpriced_reasons(
                view.only, view.start_us, view.end_us, int(state), among=UNPRICED_SCAN, limit=UNPRICED_SAMPLE
            )
            bounded = bounded or scanned
            for event_reasons, of_reasons in of_events:
                sampled += of_reasons
                for reason in {r[:REASON_CHARS] for r in event_reasons}:  # an event counts once per reason
                    reasons[reason] = reasons.get(reason, 0) + of_reasons
    ordered = sorted(reasons.items(), key=lambda item: -item[1])
    return web.json_response(
        {
            "events": events,
            "sampled": sampled,
            "among": UNPRICED_SCAN if bounded else None,
            "reasons": [{"reason": r, "events": n} for r, n in ordered[:UNPRICED_REASONS]],
            "other_reasons": sum(n for _, n in ordered[UNPRICED_REASONS:]),
        }
    )


# Per-experience limits whose busiest runs the limits panel reads (one read each), and the
# runs it shows of each: bounded however many limits and runs there are.
BUSIEST_LIMITS = 20
BUSIEST_RUNS = 3


def _iso_day(time_us: int) -> str:
    return datetime.datetime.fromtimestamp(time_us / 1_000_000, datetime.UTC).date().isoformat()


def _limit_view(limit: rules.Limit, start_us: int, now: int) -> dict[str, str]:
    """The dashboard's view of a limit's events this period: its scope as filters, and the
    whole UTC days from its period's start (or its creation, at most MAX_DAYS back) to today."""
    today = now // DAY_US * DAY_US
    first = max(start_us, limit.create_time_us, today - (MAX_DAYS - 1) * DAY_US) // DAY_US * DAY_US
    scope = limit.scope
    picked = {"from": _iso_day(first), "to": _iso_day(today)}
    if scope.experience_type:
        picked["type"] = scope.experience_type
        if scope.experience_version:
            picked["version"] = str(scope.experience_version)
    if scope.kind == rules.ScopeKind.USER:
        picked["user"] = scope.value
    elif scope.kind == rules.ScopeKind.REQUEST_TAG:
        picked["tag"] = scope.value
    return picked


async def _limits(services: Services, request: web.Request) -> web.Response:
    """Every limit (the first 1,000) with its current period, spend, reservations, max and
    state; a per-experience limit, whose runs each have a period, with its busiest runs this
    period (of the first BUSIEST_LIMITS such limits); and each with the view of its events."""
    items, more = await services.limits.list(1000, "")
    now = now_us()
    rows = []
    busiest_read = 0
    for limit, current in items:
        start, end = (current.spend.key.start_us, current.end_us) if current else rules.period_of(limit, now)
        row: dict[str, Any] = {
            "name": limit.name,
            "kind": limit.kind.name.lower(),
            "period": limit.period.name.lower(),
            "start_us": start,
            "end_us": end,
            "max": _dollars(limit.max_nanos),
            "spend": _dollars(current.spend.spend_nanos) if current else None,
            "reserved": _dollars(current.spend.reserved_nanos) if current else None,
            "state": current.state.name.lower() if current else "per experience",
            "view": _limit_view(limit, start, now),
        }
        if limit.scope.per_experience:
            row["busiest"] = None  # past BUSIEST_LIMITS: not read
            if busiest_read < BUSIEST_LIMITS:
                busiest_read += 1
                periods, _ = await services.limits.periods(limit.name, "", BUSIEST_RUNS, "", PERIODS_BY_SPEND)
                row["busiest"] = [
                    {
                        "experience_id": p.spend.key.subject,
                        "spend": _dollars(p.spend.spend_nanos),
                        "events": p.spend.event_count,
                        "state": p.state.name.lower(),
                    }
                    for p in periods
                ]
        rows.append(row)
    return web.json_response({"limits": rows, "more": bool(more)})


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
        ("/api/spend_by", _spend_by),
        ("/api/summary", _summary),
        ("/api/events", _events),
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

"""Assembles and runs the server: services, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import sqlalchemy as sa
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tally.v1 import (
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    experience_service_pb2,
    experience_service_pb2_grpc,
    experience_type_service_pb2,
    experience_type_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    limit_service_pb2,
    limit_service_pb2_grpc,
    price_catalog_service_pb2,
    price_catalog_service_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)

from . import memory, metrics
from .config import RefusedToStart, Settings, auth_required
from .domain.errors import StorageUnavailable, TallyError
from .domain.paging import PageTokens
from .edges.http import HttpSite, loopback_bind
from .proxy import ProxyServices, ProxySettings, ProxySite, upstreams
from .rpc import otlp
from .rpc.access import Access, required_scopes
from .rpc.interceptor import GRPC_RECEIVE_FACTOR, Admission, ServerInterceptor
from .rpc.limits import LimitServicer
from .rpc.servicers import (
    ApiKeyServicer,
    EventServicer,
    ExperienceServicer,
    ExperienceTypeServicer,
    IngestServicer,
    PriceCatalogServicer,
    ReportServicer,
)
from .services.catalog import LiveCatalog
from .services.events import Events
from .services.experience_types import ExperienceTypes
from .services.experiences import Experiences
from .services.ingest import Ingestor
from .services.keys import ApiKeys
from .services.limits import Limits, LiveLimits
from .services.prices import Prices
from .services.reports import Reports
from .services.retention import Retention
from .storage.db import Database
from .tls import CertificateFiles, certificate_files
from .web.dashboard import Services, dashboard
from .web.scrape import metrics_application

T = TypeVar("T")
log = logging.getLogger("tally")

SERVICES = (
    experience_type_service_pb2.DESCRIPTOR.services_by_name["ExperienceTypeService"],
    experience_service_pb2.DESCRIPTOR.services_by_name["ExperienceService"],
    ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"],
    price_catalog_service_pb2.DESCRIPTOR.services_by_name["PriceCatalogService"],
    api_key_service_pb2.DESCRIPTOR.services_by_name["ApiKeyService"],
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"],
    report_service_pb2.DESCRIPTOR.services_by_name["ReportService"],
    limit_service_pb2.DESCRIPTOR.services_by_name["LimitService"],
)
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)
# Every RPC's scope, from the contract; fails at import if an RPC declares none. OTLP's
# trace export stores events: the ingest scope.
REQUIRED_SCOPES = {**required_scopes(SERVICES), otlp.EXPORT_METHOD: "ingest"}


# Calls grpc-core may hold until the server takes them (past this, grpc-core cancels new
# ones itself). Measured: a flood of 20,000 unary calls at --max-calls 100 grew the server
# from 119 to 327 MB at its peak, every call served or refused RESOURCE_EXHAUSTED.
MAX_PENDING_CALLS = 20_000


class TallyServer:
    """One server process: a gRPC server, a database and a group-commit writer."""

    def __init__(self, settings: Settings, extra_handlers: tuple[grpc.GenericRpcHandler, ...] = ()) -> None:
        """`extra_handlers` are generic RPC handlers served beside Tally's (the benchmark's baselines)."""
        self.settings = settings
        self.extra_handlers = extra_handlers
        self.db = Database(
            settings.database_url,
            timeout=settings.database_timeout_seconds,
            connections=settings.database_connections,
        )
        self.catalog = LiveCatalog()
        self.live_limits = LiveLimits()
        self.ingestor = Ingestor(self.db, self.catalog, self.live_limits, max_queued_events=settings.max_queued_events)
        self.health = health.aio.HealthServicer()
        # One signer of page tokens for every list; start() gives it the database's shared key.
        self.pages = PageTokens()
        self.types = ExperienceTypes(self.db, self.pages)
        self.experiences = Experiences(self.db, self.pages)
        self.prices = Prices(self.db, self.catalog, self.pages)
        self.keys = ApiKeys(self.db, self.pages)
        self.events = Events(self.db, self.pages)
        self.reports = Reports(self.db, self.pages)
        self.retention = Retention(self.db)
        self.limits = Limits(self.db, self.catalog, self.pages, settings.reservation_seconds, self.live_limits)
        self.server: aio.Server | None = None
        self.port = 0
        self.dashboard: HttpSite | None = None
        self.web_port = 0
        self.sites: list[tuple[str, HttpSite, str]] = []
        self.database_serving = True  # as the health watcher last saw it
        self.proxy: HttpSite | None = None
        self.certificates: CertificateFiles | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._weeks: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Migrates the database, binds and starts serving; returns the bound port.
        RefusedToStart for settings it will not serve with."""
        auth, warning = auth_required(self.settings)
        self.certificates = certificate_files(self.settings)
        await self.db.migrate()
        self.pages.key = await self.keys.server_key("page_tokens")
        if warning:
            log.warning(warning)
        if auth and not (await self.keys.list(1, "")).items:
            log.warning("API keys are required but none exists: `tally keys create --name NAME --scope admin`")
        server = self._grpc_server(auth)
        try:
            if self.certificates is None:
                self.port = server.add_insecure_port(self.settings.listen)
            else:
                self.port = server.add_secure_port(self.settings.listen, self.certificates.credentials())
        except RuntimeError as error:
            raise SystemExit(f"tally: cannot listen on {self.settings.listen}: {error} (is the port in use?)") from None
        if not self.port:
            raise SystemExit(f"tally: cannot listen on {self.settings.listen} (is the port in use?)")
        self.ingestor.start()
        self.sites = self._http_sites(auth)
        for what, site, _ in self.sites:
            try:
                await site.start()
            except (OSError, ValueError) as error:
                raise RefusedToStart(f"tally: cannot serve the {what} on {site.listen}: {error}") from None
        self.dashboard = next((site for what, site, _ in self.sites if what == "dashboard"), None)
        self.web_port = self.dashboard.port if self.dashboard is not None else 0
        self.proxy = next((site for what, site, _ in self.sites if what == "proxy"), None)
        await server.start()
        self.server = server
        tune_garbage_collector()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watcher = asyncio.create_task(self._watch_database(), name="tally-database-health")
        self._trimmer = asyncio.create_task(self._give_back_memory(), name="tally-memory-trim")
        if self.settings.metrics_listen:
            self._gauges = asyncio.create_task(self._export_limit_gauges(), name="tally-limit-gauges")
        if self.settings.retention_days:
            self._pruner = asyncio.create_task(self._keep_retention(), name="tally-retention")
        if not self.db.is_sqlite:
            self._weeks = asyncio.create_task(self._make_weeks(), name="tally-event-weeks")
        host = self.settings.listen.rsplit(":", 1)[0]
        security = "plaintext" if self.certificates is None else "TLS"
        if self.certificates is not None and self.certificates.client_ca is not None:
            security = "mTLS"
        if self.settings.worker:  # the parent says "tally ready" once every worker is
            log.info("tally worker %d ready: pid %d on %s:%d", self.settings.worker, os.getpid(), host, self.port)
        else:
            log.info(
                "tally ready: serving on %s:%d (%s, API keys %s), database %s%s",
                host,
                self.port,
                security,
                "required" if auth else "off",
                self.db.url.render_as_string(hide_password=True),
                self._http_listeners(),
            )
        return self.port

    HEALTH_INTERVAL_SECONDS = 2.0

    def _grpc_server(self, auth: bool) -> aio.Server:
        """The gRPC edge: every service, health and reflection behind the interceptor."""
        limit = self.settings.max_message_bytes
        server = aio.server(
            interceptors=[
                ServerInterceptor(
                    Access(REQUIRED_SCOPES, self.keys if auth else None),
                    Admission(
                        self.settings.max_calls,
                        self.settings.max_streams,
                        self.settings.max_call_bytes,
                        self.settings.max_message_bytes,
                    ),
                )
            ],
            options=[
                # Off, so that a second server on a taken port fails instead of sharing it;
                # on for the workers of `--workers N`, which share the port their parent reserved.
                ("grpc.so_reuseport", 1 if self.settings.worker else 0),
                ("grpc.max_receive_message_length", limit * GRPC_RECEIVE_FACTOR),
                ("grpc.max_send_message_length", limit),
                # The receive windows stay at HTTP/2's 64 KiB per stream: grpc-core's probing
                # grew them to megabytes, so 40 streams whose callers never read answers had
                # 350 MB of events waiting in the transport, out of Tally's byte bounds.
                ("grpc.http2.bdp_probe", 0),
                # grpc-core's defaults (1,000 pending calls, then random early cancellation up
                # to 3,000) cancelled a third of a flood of 5,000 calls before Tally saw them;
                # now they reach the interceptor, which answers those past --max-calls
                # RESOURCE_EXHAUSTED.
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ],
        )
        experience_type_service_pb2_grpc.add_ExperienceTypeServiceServicer_to_server(
            ExperienceTypeServicer(self.types), server
        )
        experience_service_pb2_grpc.add_ExperienceServiceServicer_to_server(
            ExperienceServicer(self.experiences), server
        )
        ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(
            IngestServicer(self.ingestor, self.settings.stream_window_bytes, self.settings.max_message_bytes), server
        )
        price_catalog_service_pb2_grpc.add_PriceCatalogServiceServicer_to_server(
            PriceCatalogServicer(self.prices), server
        )
        api_key_service_pb2_grpc.add_ApiKeyServiceServicer_to_server(ApiKeyServicer(self.keys), server)
        event_service_pb2_grpc.add_EventServiceServicer_to_server(
            EventServicer(self.events, self.retention, self.settings.max_message_bytes), server
        )
        report_service_pb2_grpc.add_ReportServiceServicer_to_server(ReportServicer(self.reports), server)
        limit_service_pb2_grpc.add_LimitServiceServicer_to_server(LimitServicer(self.limits), server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            otlp.TraceServicer(self.ingestor), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.extra_handlers:
            server.add_generic_rpc_handlers(self.extra_handlers)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                otlp.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        return server

    def _http_sites(self, auth: bool) -> list[tuple[str, HttpSite, str]]:
        """The HTTP edges these settings ask for, each with what it is and the path the ready
        line names: every one with the same protections (edges/http.py) and TLS when gRPC has it."""
        settings, keys, tls = self.settings, self.keys if auth else None, self._http_tls()
        sites: list[tuple[str, HttpSite, str]] = []
        if settings.web_listen:
            services = Services(self.types, self.experiences, self.events, self.reports, self.limits, keys)
            sites.append(("dashboard", dashboard(services, settings.web_listen, bool(settings.worker), tls), "/"))
        if settings.proxy_listen:
            try:
                configured = upstreams(settings.proxy_upstreams)
            except ValueError as error:
                raise RefusedToStart(f"tally: {error}") from None
            proxy_settings = ProxySettings(
                max_body_bytes=settings.proxy_max_body_bytes,
                max_held_bytes=max(16 * settings.proxy_max_body_bytes, 256 * 1024 * 1024),
                fail_closed=settings.proxy_fail_closed,
                read_timeout_seconds=settings.proxy_read_timeout_seconds,
            )
            services_ = ProxyServices(self.ingestor, self.limits, keys, self.experiences, lambda: self.database_serving)
            site = ProxySite(
                services_,
                configured,
                proxy_settings,
                settings.proxy_listen,
                settings.max_calls,
                bool(settings.worker),
                tls,
            )
            sites.append(("proxy", site, "/"))
        if settings.metrics_listen and not settings.worker:  # the parent of --workers serves all
            app = metrics_application(metrics.registry(), keys, loopback_bind(settings.metrics_listen))
            sites.append(("metrics", HttpSite(app, settings.metrics_listen, tls=tls), "/metrics"))
        return sites

    def _http_listeners(self) -> str:
        """The ready line's part naming the HTTP edges as bound."""
        return "".join(f", {what} at {site.url(path)}" for what, site, path in self.sites)

    def _http_tls(self) -> ssl.SSLContext | None:
        """TLS for the HTTP listeners whenever gRPC has it: keys never cross in clear."""
        return None if self.certificates is None else self.certificates.http_context()

    async def _set_health(self, status: Any) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _watch_database(self) -> None:
        """Health says NOT_SERVING while the database does not answer, SERVING once it does."""
        serving = True
        while True:
            await asyncio.sleep(self.HEALTH_INTERVAL_SECONDS)
            try:
                async with asyncio.timeout(self.db.timeout):
                    await self.db.ping()
                answered = True
            except (StorageUnavailable, TimeoutError) as error:
                answered = False
                if serving:
                    log.warning("the database does not answer (%s): health is NOT_SERVING", error)
            self.database_serving = answered
            if answered != serving:
                serving = answered
                if serving:
                    log.info("the database answers again: health is SERVING")
                status = (
                    health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self._set_health(status)

    async def _export_limit_gauges(self) -> None:
        exported: set[str] = set()
        while True:
            try:
                views = await self.limits.current()
            except StorageUnavailable:
                views = None  # kept as last read until the database answers
            if views is not None:
                names = {view.limit.name for view in views}
                for gone in exported - names:
                    metrics.forget_limit(gone)
                for view in views:
                    metrics.LIMIT_SPEND.labels(view.limit.name).set(view.spend.spend_nanos / 1e9)
                    metrics.LIMIT_RESERVED.labels(view.limit.name).set(view.spend.reserved_nanos / 1e9)
                    metrics.LIMIT_MAX.labels(view.limit.name).set(view.limit.max_nanos / 1e9)
                exported = names
            await asyncio.sleep(metrics.LIMIT_GAUGE_SECONDS)

    async def _give_back_memory(self) -> None:
        trimmer = memory.Trimmer()
        while True:
            await asyncio.sleep(memory.TRIM_SECONDS)
            trimmer.tick()

    RETENTION_INTERVAL_SECONDS = 3600.0

    async def _keep_retention(self) -> None:
        """--retention-days: prunes at start and every hour after (each replica alike: a
        second prune of the same hour finds nothing to delete)."""
        days = self.settings.retention_days
        while True:
            try:
                deleted = await self.retention.prune_older_than(days)
                if deleted:
                    log.info("retention: deleted %d events older than %d days", deleted, days)
            except TallyError as error:  # the database is unwell: the next hour tries again
                log.warning("retention: could not prune events: %s", error)
            await asyncio.sleep(self.RETENTION_INTERVAL_SECONDS)

    WEEKS_INTERVAL_SECONDS = 3600.0

    async def _make_weeks(self) -> None:
        """PostgreSQL: makes the coming weeks' partitions of events, and those of backfilled
        weeks, at start and every hour after (replicas take turns; a week made is kept)."""
        while True:
            try:
                made = await self.retention.make_weeks()
                if made:
                    log.info("events: made the partitions %s", ", ".join(made))
            except TallyError as error:  # the events arrive in the default partition meanwhile
                log.warning("events: could not make the weeks' partitions: %s", error)
            await asyncio.sleep(self.WEEKS_INTERVAL_SECONDS)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then in-flight calls get `grace` seconds, then the writer and database close."""
        grace = self.settings.grace_seconds if grace is None else grace
        for task in (self._watcher, self._trimmer, self._gauges, self._pruner, self._weeks):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        for _, site, _ in self.sites:
            await site.stop()
        await self.ingestor.stop()
        await self.limits.writer.stop()
        await self.db.dispose()
        log.info("tally stopped")


def url_for_humans(url: str) -> str:
    """A database URL without its password, for messages; as given when it does not parse."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def tune_garbage_collector() -> None:
    """Ingest makes many short-lived objects per event. With the defaults, the
    collector ran every 700 allocations and kept rescanning what lives as long as
    the process (the price catalog, descriptors, SQLAlchemy): a fifth of the ingest
    path's time. What exists after start-up is frozen out of collection, and young
    objects are collected less often. Process-wide: a server owns its process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def configure_logging(level: str, worker: int = 0) -> None:
    """Log lines to stderr; a worker of `--workers` names itself in each."""
    who = f"worker-{worker} " if worker else ""
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)s {who}%(name)s %(message)s")


def _start_failure(settings: Settings, error: Exception) -> SystemExit | None:
    """What keeps the server from starting, as one line naming the problem and the path
    or URL (without its password); None for an error that is not about the settings."""
    if isinstance(error, RefusedToStart):
        return SystemExit(str(error))
    url = url_for_humans(settings.database_url)
    if isinstance(error, StorageUnavailable):
        return SystemExit(f"tally: cannot use the database {url}: {error.detail}")
    if isinstance(error, sa.exc.ArgumentError | sa.exc.NoSuchModuleError | ModuleNotFoundError):
        return SystemExit(
            f"tally: cannot use the database URL {url!r}: {error}; "
            "Tally takes sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
        )
    return None


async def _started(settings: Settings, start: Callable[[], Awaitable[T]]) -> T:
    """`start()`'s result, or SystemExit with _start_failure's line. Raised outside the
    `except`, so that nothing of the failed start (a driver's connection thread) outlives
    the event loop through the exception's context."""
    try:
        return await start()
    except Exception as error:
        failure = _start_failure(settings, error)
        if failure is None:
            raise
    raise failure


def migrate_or_exit(settings: Settings) -> None:
    """Brings the database to the newest schema (before the workers of `--workers` start)."""

    async def migrate() -> None:
        db = Database(settings.database_url, timeout=settings.database_timeout_seconds)
        try:
            await db.migrate()
        finally:
            await db.dispose()

    async def main() -> None:
        await _started(settings, migrate)

    asyncio.run(main())


async def serve(settings: Settings, ready: Any = None) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully. `ready` (a queue, for the
    workers of `--workers`) is told this worker's number once it serves."""

    # The signals are handled before the server says it is ready: a SIGHUP sent right after
    # the ready line once found its default action (the process ended) still in place.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    started: list[TallyServer] = []

    def reload_certificates() -> None:  # SIGHUP; nothing to reload without TLS
        if started and started[0].certificates is not None:
            started[0].certificates.request_reload()

    loop.add_signal_handler(signal.SIGHUP, reload_certificates)

    async def start() -> TallyServer:
        server = TallyServer(settings)
        started.append(server)
        await server.start()
        return server

    server = await _started(settings, start)
    if ready is not None:
        ready.put(settings.worker)
    await stopping.wait()
    log.info("shutting down: in-flight calls get %.1f s", settings.grace_seconds)
    await server.stop()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs `main` to its result on uvloop where it is installed (Linux and macOS): the
    ingest path, which waits on the writer and the database, gains most from its faster loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run(settings: Settings, ready: Any = None) -> None:
    configure_logging(settings.log_level, settings.worker)
    # grpc logs a stack trace for a taken port before raising; ours says it in one line.
    logging.getLogger("grpc").setLevel(logging.CRITICAL)
    if settings.log_level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    run_event_loop(serve(settings, ready))

"""`tally serve --workers N`: N server processes sharing one listen port, supervised.

As grpc's own multiprocessing example does, the parent reserves the port with
SO_REUSEPORT (so that port 0 can be shared, and the port stays reserved while a
worker restarts) and each worker binds it with SO_REUSEPORT too: the kernel spreads
connections across the workers. Each worker is a whole server with its own
group-commit writer. The parent migrates the database once, restarts a worker that
dies, and on SIGTERM or SIGINT passes the signal on and waits for every worker to
drain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from typing import Any, cast

from . import metrics
from .config import RefusedToStart, Settings, auth_required, listen_host
from .edges.http import HttpSite, bound_url, loopback_bind, run_forever_in_thread
from .services.keys import ApiKeys
from .storage.db import Database
from .tls import certificate_files
from .web.scrape import metrics_application

log = logging.getLogger("tally.workers")
RESTART_DELAY_SECONDS = 1.0


@contextlib.contextmanager
def reserve_port(listen: str) -> Iterator[int]:
    """Binds (without listening) host:port with SO_REUSEPORT; yields the port."""
    host, port = listen_host(listen), int(listen.rsplit(":", 1)[1])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as error:
            raise SystemExit(f"tally: cannot listen on {listen}: {error.strerror}") from None
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _worker_main(settings: Settings, ready: Any) -> None:
    from .app import run

    run(settings, ready=ready)


class Supervisor:
    def __init__(self, settings: Settings, port: int, metrics_dir: str | None = None) -> None:
        host = settings.listen.rsplit(":", 1)[0]
        self.settings = settings
        self.listen = f"{host}:{port}"
        self.context = multiprocessing.get_context("spawn")
        self.ready = self.context.Queue()
        self.workers: dict[int, SpawnProcess] = {}
        self.stopping = False
        self.metrics_dir = metrics_dir

    def _settings(self, index: int) -> Settings:
        return dataclasses.replace(self.settings, listen=self.listen, worker=index)

    def spawn(self, index: int) -> None:
        process = self.context.Process(
            target=_worker_main, args=(self._settings(index), self.ready), name=f"tally-worker-{index}"
        )
        process.start()
        self.workers[index] = process

    def stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info(
                "shutting down %d workers: in-flight calls get %.1f s", len(self.workers), self.settings.grace_seconds
            )
        self.stopping = True
        for process in self.workers.values():
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()

    def run(self) -> int:
        for index in range(1, self.settings.workers + 1):
            self.spawn(index)
        started: set[int] = set()
        while len(started) < len(self.workers):
            if not all(p.is_alive() for p in self.workers.values()):
                self.stop(signal.SIGTERM, None)
                self.join()
                raise SystemExit("tally: a worker failed to start (its error is above)")
            with contextlib.suppress(Exception):
                started.add(self.ready.get(timeout=0.2))
        also = ""
        tls = bool(self.settings.tls_cert)
        if self.settings.web_listen:
            port = int(self.settings.web_listen.rpartition(":")[2])
            also += f", dashboard at {bound_url(self.settings.web_listen, port, tls)}"
        if self.settings.proxy_listen:
            port = int(self.settings.proxy_listen.rpartition(":")[2])
            also += f", proxy at {bound_url(self.settings.proxy_listen, port, tls)}"
        if self.settings.metrics_listen:
            port = int(self.settings.metrics_listen.rpartition(":")[2])
            also += f", metrics of all workers at {bound_url(self.settings.metrics_listen, port, tls, '/metrics')}"
        log.info(
            "tally ready: serving on %s with %d workers (pids %s)%s",
            self.listen,
            len(self.workers),
            ", ".join(str(p.pid) for p in self.workers.values()),
            also,
        )
        while not self.stopping:
            sentinels = {p.sentinel: index for index, p in self.workers.items()}
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
                self._restart(sentinels[cast(int, sentinel)])
        return self.join()

    def _restart(self, index: int) -> None:
        process = self.workers[index]
        process.join()
        if self.metrics_dir is not None and process.pid is not None:
            metrics.worker_exited(process.pid, self.metrics_dir)
        if self.stopping:
            return
        log.warning("worker %d (pid %s) exited with code %s: restarting it", index, process.pid, process.exitcode)
        time.sleep(RESTART_DELAY_SECONDS)
        if not self.stopping:
            self.spawn(index)

    def join(self) -> int:
        deadline = time.monotonic() + self.settings.grace_seconds + 10
        failed = 0
        for process in self.workers.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %s did not stop in time: killing it", process.pid)
                process.kill()
                process.join()
            failed += process.exitcode not in (0, -signal.SIGTERM)
        log.info("tally stopped: %d workers", len(self.workers))
        return 1 if failed else 0


def serve_workers(settings: Settings) -> int:
    """Runs settings.workers server processes on one port until SIGTERM or SIGINT."""
    from .app import configure_logging, migrate_or_exit

    configure_logging(settings.log_level)
    try:
        auth_required(settings)  # refused here in one line, not once per worker
    except RefusedToStart as refusal:
        raise SystemExit(str(refusal)) from None
    migrate_or_exit(settings)  # once, before any worker starts
    with reserve_port(settings.listen) as port, _metrics_for_workers(settings) as metrics_dir:
        supervisor = Supervisor(settings, port, metrics_dir)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, supervisor.stop)
        return supervisor.run()


@contextlib.contextmanager
def _metrics_for_workers(settings: Settings) -> Iterator[str | None]:
    """With metrics on: a fresh directory for the workers' values (the spawned workers
    inherit its name in the environment), served summed from here, with the protections of
    every listener (its own event loop in a thread; keys checked on a database connection
    of its own)."""
    listen = settings.metrics_listen
    if not listen:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="tally-metrics-")
    os.environ[metrics.MULTIPROCESS_DIR] = directory
    auth, _ = auth_required(settings)
    certificates = certificate_files(settings)

    async def start() -> None:
        keys = ApiKeys(Database(settings.database_url, timeout=settings.database_timeout_seconds)) if auth else None
        app = metrics_application(metrics.registry(directory), keys, loopback_bind(listen))
        await HttpSite(app, listen, tls=certificates.http_context() if certificates else None).start()

    try:
        try:
            run_forever_in_thread(start)
        except (OSError, ValueError) as error:
            raise SystemExit(f"tally: cannot serve metrics on {listen}: {error}") from None
        yield directory
    finally:
        os.environ.pop(metrics.MULTIPROCESS_DIR, None)
        shutil.rmtree(directory, ignore_errors=True)

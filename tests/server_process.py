"""A Tally server in a child process, for tests that kill or restart it."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time

READY = re.compile(r"tally ready: serving on [^:]+:(\d+)")


class ServerProcess:
    def __init__(self, database_url: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.database_url = database_url
        self.extra = extra
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.lines: list[str] = []  # what it logged until it was ready
        self.log: collections.deque[str] = collections.deque(maxlen=1000)  # the last of what it logged after

    def start(self, timeout: float = 60) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tally_server",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                self.database_url,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if match := READY.search(line):
                self.port = int(match.group(1))
                self.lines = lines
                # Its log goes on (a line per call): read it, or a full pipe stalls the server.
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.kill()
        raise RuntimeError("server did not become ready:\n" + "".join(lines))

    def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

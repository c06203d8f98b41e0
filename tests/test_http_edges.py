"""Every HTTP listener (the dashboard, metrics, the proxy) is protected as the gRPC port is: foreign
Host names refused on a loopback bind (DNS rebinding), keys checked when required, TLS
whenever the server has a certificate, and the ready line naming each as bound."""

from __future__ import annotations

import re
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from .readme import BIN
from .server_process import ServerProcess
from .test_tls import pki  # noqa: F401 - the test's own certificate authorities

LISTENERS = re.compile(
    r"dashboard at (https?)://[^ ]+:(\d+)/( \(every interface\))?, (?:proxy at [^ ]+, )?"
    r"metrics at (https?)://[^ ]+:(\d+)/metrics"
)


def get(url: str, host: str | None = None, key: str = "", context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if host is not None:
        request.add_header("Host", host)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def listeners(server: ServerProcess) -> tuple[str, str, bool]:
    """The dashboard's and metrics' base URLs from the ready line, and whether it said 'every interface'."""
    match = LISTENERS.search("".join(server.lines))
    assert match, server.lines
    scheme, port, everywhere, metrics_scheme, metrics_port = match.groups()
    return f"{scheme}://127.0.0.1:{port}", f"{metrics_scheme}://127.0.0.1:{metrics_port}", bool(everywhere)


def start(tmp_path, *flags: str) -> ServerProcess:
    return ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'edges.db'}", *flags).start()


def test_a_loopback_bind_answers_only_to_loopback_host_names(tmp_path):
    """The default `make serve`: a page of another site whose name resolves to 127.0.0.1
    (DNS rebinding) reads nothing from the dashboard or metrics."""
    server = start(tmp_path, "--web-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
    try:
        web, metrics, everywhere = listeners(server)
        assert not everywhere
        for url in (f"{web}/api/limits", f"{web}/", f"{web}/api/whoami", f"{metrics}/metrics"):
            status, body = get(url, host="attacker.example")
            assert status == 421 and b"localhost" in body, (url, status, body[:200])
            status, _ = get(url, host="attacker.example:8080")
            assert status == 421
            for host in ("localhost", "127.0.0.1", f"localhost:{url.split(':')[2].split('/')[0]}", "[::1]:80"):
                status, _ = get(url, host=host)
                assert status == 200, (url, host, status)
    finally:
        server.terminate()


@pytest.mark.parametrize("auth", ["required", "off"])
def test_every_listener_beyond_loopback_is_protected_like_the_grpc_port(tmp_path, auth):
    flags = ("--web-listen", "0.0.0.0:0", "--metrics-listen", "0.0.0.0:0", "--auth", auth)
    server = start(tmp_path, *flags)
    try:
        web, metrics, everywhere = listeners(server)
        assert everywhere, "the ready line says where it really listens"
        if auth == "off":
            warned = [line for line in server.lines if "authentication is off on" in line]
            assert warned and "--web-listen 0.0.0.0:0" in warned[0] and "--metrics-listen 0.0.0.0:0" in warned[0]
            assert get(f"{metrics}/metrics", host="tally.example")[0] == 200, "not a loopback bind: any Host"
            return
        for url in (f"{web}/api/limits", f"{metrics}/metrics"):
            status, body = get(url, host="tally.example")
            assert status == 401 and b"API key" in body, (url, status, body)
        key = create_key(server, "reader", "read")
        assert get(f"{web}/api/limits", key=key)[0] == 200
        status, body = get(f"{metrics}/metrics", key=key)
        assert status == 200 and b"tally_calls" in body
    finally:
        server.terminate()


def create_key(server: ServerProcess, name: str, scope: str) -> str:
    made = subprocess.run(
        [str(BIN / "tally"), "keys", "create", "--name", name, "--scope", scope, "--database-url", server.database_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_the_dashboard_metrics_and_proxy_are_served_over_tls_when_grpc_is(pki, tmp_path):  # noqa: F811
    servers, _, _ = pki
    cert = servers.issue("edges-server", server=True)
    flags = ("--web-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
    server = start(tmp_path, *flags, "--tls-cert", str(cert.cert), "--tls-key", str(cert.key))
    try:
        web, metrics, _ = listeners(server)
        proxy = re.search(r"proxy at (https?://[^ ]+:\d+)/", "".join(server.lines))
        assert proxy and proxy.group(1).startswith("https://"), server.lines
        assert web.startswith("https://") and metrics.startswith("https://"), server.lines
        trusting = ssl.create_default_context(cafile=str(servers.pem))
        assert get(f"{web}/api/whoami", context=trusting)[0] == 200
        assert get(f"{metrics}/metrics", context=trusting)[0] == 200
        # The proxy answers over TLS (a route it does not have: its own 404, in OpenAI's shape).
        status, body = get(f"{proxy.group(1)}/nowhere/v1/models", context=trusting)
        assert status == 404 and b"Tally proxy" in body
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # nothing in clear
            get(web.replace("https://", "http://") + "/api/whoami")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            get(proxy.group(1).replace("https://", "http://") + "/nowhere/v1/models")
    finally:
        server.terminate()

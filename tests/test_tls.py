"""TLS and mTLS through the wire, with certificates the test makes (the `cryptography`
package): grpcurl with -cacert, the Python client and the CLI with a CA file and a
client certificate, plaintext refused by a TLS server, a client without a certificate
refused by an mTLS server, and certificate files replaced and re-read on SIGHUP without
a restart."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from tally_client import EventFilter, TallyClient, Unavailable

from .readme import BIN, ROOT
from .server_process import ServerProcess
from .test_otlp import GENAI_CALL, record_spans


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    cert, key_file = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(cert, key_file)


class Authority:
    """A certificate authority of the test's own, issuing server and client certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _write(directory, name, self.certificate, self.key).cert

    def issue(self, stem: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(self.directory, stem, builder.sign(self.key, hashes.SHA256()), key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> tuple[Authority, Authority, Path]:
    directory = tmp_path_factory.mktemp("pki")
    return Authority(directory, "server-ca"), Authority(directory, "client-ca"), directory


def serve(tmp_path: Path, *flags: str) -> ServerProcess:
    return ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'tls.db'}", *flags).start()


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "grpcurl"), *args], capture_output=True, text=True, timeout=60)


def listed(target: str, **tls: str | Path) -> bool:
    """Whether a fresh client with these TLS options can list experience types."""
    try:
        with TallyClient(target, timeout=5, **tls) as client:  # type: ignore[arg-type]
            client.list_experience_types()
    except Unavailable:
        return False
    return True


@pytest.mark.slow
def test_tls_serves_only_tls(pki, tmp_path):
    servers, _, _ = pki
    cert = servers.issue("tls-server", server=True)
    server = serve(tmp_path, "--tls-cert", str(cert.cert), "--tls-key", str(cert.key))
    try:
        assert any("(TLS, API keys off)" in line for line in server.lines), server.lines
        trusted = grpcurl("-cacert", str(servers.pem), server.target, "list")
        assert trusted.returncode == 0 and "tally.v1.IngestService" in trusted.stdout, trusted.stderr
        plaintext = grpcurl("-plaintext", "-connect-timeout", "2", server.target, "list")
        assert plaintext.returncode != 0, "a TLS server refuses plaintext"
        untrusted = grpcurl(server.target, "list")  # the system's roots do not know this CA
        assert untrusted.returncode != 0
        assert listed(server.target, ca_file=servers.pem)
        assert not listed(server.target), "the Python client in plaintext"
        plain = subprocess.run(
            [str(BIN / "tally"), "types", "list", "--target", server.target, "--timeout", "5"],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        )
        assert plain.returncode == 1 and "add --tls, or --ca-file" in plain.stderr, plain.stderr
        # OTLP on the same TLS port: the SDK's exporter with the CA stores a GenAI span.
        assert "opentelemetry.proto.collector.trace.v1.TraceService" in trusted.stdout
        spans = record_spans({}, [("chat gpt-4o", GENAI_CALL, False)])
        credentials = grpc.ssl_channel_credentials(servers.pem.read_bytes())
        exporter = OTLPSpanExporter(endpoint=server.target, credentials=credentials, timeout=10)
        assert exporter.export(spans) == SpanExportResult.SUCCESS
        exporter.shutdown()
        with TallyClient(server.target, ca_file=servers.pem) as client:
            (stored,) = client.list_events(EventFilter(resource="gpt-4o-2024-08-06")).events
        assert stored.event.properties["otel.span_id"] == format(spans[0].context.span_id, "016x")
    finally:
        server.terminate()


@pytest.mark.slow
def test_mtls_requires_a_client_certificate(pki, tmp_path):
    servers, clients, _ = pki
    cert = servers.issue("mtls-server", server=True)
    client = clients.issue("mtls-client", server=False)
    stranger = Authority(tmp_path, "stranger-ca").issue("stranger", server=False)
    flags = ("--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--tls-client-ca", str(clients.pem))
    server = serve(tmp_path, *flags)
    try:
        assert any("(mTLS," in line for line in server.lines), server.lines
        assert not listed(server.target, ca_file=servers.pem), "no client certificate"
        assert not listed(
            server.target, ca_file=servers.pem, client_cert_file=stranger.cert, client_key_file=stranger.key
        )
        assert listed(server.target, ca_file=servers.pem, client_cert_file=client.cert, client_key_file=client.key)
        with_cert = grpcurl(
            "-cacert", str(servers.pem), "-cert", str(client.cert), "-key", str(client.key), server.target, "list"
        )
        assert with_cert.returncode == 0, with_cert.stderr
        assert grpcurl("-cacert", str(servers.pem), server.target, "list").returncode != 0
        cli = subprocess.run(
            [str(BIN / "tally"), "types", "list", "--target", server.target],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "TALLY_CA_FILE": str(servers.pem),
                "TALLY_CLIENT_CERT": str(client.cert),
                "TALLY_CLIENT_KEY": str(client.key),
            },
        )
        assert cli.returncode == 0 and "no experience types" in cli.stdout, cli.stderr
        # The README's TLS command, without the client certificate: the error says what is missing.
        bare = subprocess.run(
            [str(BIN / "tally"), "types", "list", "--target", server.target, "--ca-file", str(servers.pem)],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        )
        assert bare.returncode == 1 and "--client-cert and --client-key" in bare.stderr, bare.stderr
    finally:
        server.terminate()


@pytest.mark.slow
def test_certificates_are_reread_on_sighup_without_a_restart(pki, tmp_path):
    servers, _, _ = pki
    first = servers.issue("rotating", server=True)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    server = serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        successor = Authority(tmp_path, "successor-ca")
        assert listed(server.target, ca_file=servers.pem)
        assert not listed(server.target, ca_file=successor.pem)
        rotated = successor.issue("rotated", server=True)
        # Replaced the way certificate managers do: write aside, then rename over.
        for source, target in ((rotated.key, key), (rotated.cert, cert)):
            aside = target.with_suffix(".new")
            aside.write_bytes(source.read_bytes())
            os.replace(aside, target)
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        assert listed(server.target, ca_file=successor.pem), "new connections get the new certificate"
        assert not listed(server.target, ca_file=servers.pem)
        assert server.process.poll() is None, "the server kept running"
    finally:
        assert server.terminate() == 0


@pytest.mark.slow
def test_a_reload_of_bad_files_is_said_and_the_old_certificate_stays(pki, tmp_path):
    """SIGHUP after the files were replaced by a corrupt certificate, then by a key of another
    certificate: each reload is logged as a failure naming the files, and handshakes go on
    presenting the certificate that was loaded."""
    servers, _, _ = pki
    first = servers.issue("kept", server=True)
    other = servers.issue("other", server=True)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    server = serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    assert server.process is not None
    try:
        for broken_cert, broken_key in (
            (b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n", first.key.read_bytes()),
            (first.cert.read_bytes(), other.key.read_bytes()),  # a key of another certificate
        ):
            cert.write_bytes(broken_cert)
            key.write_bytes(broken_key)
            server.process.send_signal(signal.SIGHUP)
            assert listed(server.target, ca_file=servers.pem), "the loaded certificate is still presented"
            presented = ssl.get_server_certificate(("127.0.0.1", server.port), ca_certs=str(servers.pem))
            assert presented.strip() == first.cert.read_text().strip()
        log = "".join(server.log)
        assert log.count("TLS certificate files NOT reloaded") >= 2, log[-2000:]
        assert f"{cert} and {key} are not a certificate and its key" in log, log[-2000:]
        assert "TLS certificate files reloaded" not in log
        assert server.process.poll() is None, "the server kept running"
    finally:
        assert server.terminate() == 0


def test_a_start_with_a_corrupt_certificate_names_the_files(pki, tmp_path):
    servers, _, _ = pki
    first = servers.issue("corrupt-start", server=True)
    cert = tmp_path / "corrupt.pem"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    database = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    command = [str(BIN / "tally"), "serve", "--listen", "127.0.0.1:0", "--database-url", database]
    command += ["--tls-cert", str(cert), "--tls-key", str(first.key)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert process.returncode == 1, process.stderr
    assert f"{cert} and {first.key} are not a certificate and its key" in process.stderr, process.stderr
    assert "is the port in use" not in process.stderr


@pytest.mark.parametrize("flag", ["--listen", "--web-listen", "--metrics-listen", "--proxy-listen"])
def test_serving_beyond_loopback_needs_an_authentication_decision(tmp_path, flag):
    """The gRPC port's rule holds for every listener: the dashboard, metrics and proxy too."""
    command = [sys.executable, "-m", "tally_server", "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"]
    if flag != "--listen":
        command += ["--listen", "127.0.0.1:0"]
    refused = subprocess.run([*command, flag, "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    expected = f"tally: refusing to serve {flag} 0.0.0.0:0 beyond this machine"
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "--auth required" in lines[0] and "--auth off" in lines[0]
    if flag != "--listen":
        return
    half_tls = subprocess.run([*command, "--tls-cert", "x.pem"], capture_output=True, text=True, timeout=60)
    assert half_tls.returncode != 0 and half_tls.stderr.strip() == (
        "tally: TLS needs both --tls-cert and --tls-key (and --tls-client-ca for mTLS)"
    )


@pytest.mark.slow
def test_auth_off_beyond_loopback_starts_with_a_warning(tmp_path):
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'open.db'}", "--listen", "0.0.0.0:0", "--auth", "off")
    server.start()
    try:
        assert any("WARNING" in line and "authentication is off on --listen 0.0.0.0:0" in line for line in server.lines)
        assert listed(server.target)
    finally:
        server.terminate()


@pytest.mark.slow
def test_the_docs_opentelemetry_block_exports_to_a_tls_tally_as_written(pki, tmp_path, monkeypatch):
    """docs/callers.md's SDK block, run as printed (its address replaced) against a TLS Tally:
    the exporter trusts the test's CA through the SDK's own OTEL_EXPORTER_OTLP_CERTIFICATE."""
    servers, _, _ = pki
    cert = servers.issue("docs-otlp-server", server=True)
    server = serve(tmp_path, "--tls-cert", str(cert.cert), "--tls-key", str(cert.key))
    try:
        text = (ROOT / "docs" / "callers.md").read_text()
        code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "OTLPSpanExporter(" in b)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(servers.pem))
        names: dict[str, Any] = {}
        exec(compile(code.replace("tally.example:50052", server.target), "docs/callers.md", "exec"), names)
        tracer = names["provider"].get_tracer("docs")
        with tracer.start_as_current_span("chat gpt-4o", attributes=GENAI_CALL) as span:
            span_id = format(span.get_span_context().span_id, "016x")
        names["provider"].shutdown()  # the batch processor sends what it holds
        with TallyClient(server.target, ca_file=servers.pem) as client:
            found = client.list_events(EventFilter(resource="gpt-4o-2024-08-06")).events
        assert [e.event.properties["otel.span_id"] for e in found] == [span_id]
    finally:
        server.terminate()

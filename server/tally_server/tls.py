"""TLS and mTLS server credentials whose certificate files are re-read without a restart.

grpc asks the fetcher for a new certificate configuration at each new TLS handshake;
it answers with the files' new contents when one of them changed (by modification time
and size) or after a SIGHUP, and with None (keep the current one) otherwise. Open
connections keep the certificate they started with; new ones get the new one.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path
from typing import Any

import grpc

from .config import RefusedToStart, Settings
from .logs import RepeatedLog

log = logging.getLogger("tally.tls")
repeated = RepeatedLog(log)  # grpc asks at every handshake: a bad file is said once per interval


class CertificateFiles:
    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self.paths = [Path(p) for p in (cert, key, client_ca) if p]
        self.cert, self.key, self.client_ca = Path(cert), Path(key), Path(client_ca) if client_ca else None
        self._reload = threading.Event()
        self._seen = self._stamps()
        self.initial = self._configuration()
        self._http_contexts: list[ssl.SSLContext] = []

    def request_reload(self) -> None:
        """Re-read the files at the next handshake (SIGHUP)."""
        self._reload.set()

    def credentials(self) -> grpc.ServerCredentials:
        # grpc's stubs say the fetcher returns a configuration; grpc itself takes None as "no change".
        fetcher: Any = self.fetch
        return grpc.dynamic_ssl_server_credentials(
            self.initial, fetcher, require_client_authentication=self.client_ca is not None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each handshake: a new configuration, or None for no change."""
        stamps = self._stamps()
        if stamps == self._seen and not self._reload.is_set():
            return None
        self._reload.clear()
        try:
            configuration = self._configuration()
        except (OSError, ValueError) as error:  # corrupt or half written: keep serving the current one
            repeated.error("TLS certificate files NOT reloaded, still serving the previous certificate: %s", error)
            return None
        self._seen = stamps
        for context in self._http_contexts:  # new HTTP connections get the new certificate too
            self._load(context)
        log.info("TLS certificate files reloaded: %s", ", ".join(map(str, self.paths)))
        return configuration

    def http_context(self) -> ssl.SSLContext:
        """The same certificate (and client CAs, for mTLS) for an HTTP listener: the dashboard
        and metrics are served over TLS whenever gRPC is."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(context)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        self._http_contexts.append(context)
        return context

    def _load(self, context: ssl.SSLContext) -> None:
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=self.client_ca)

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in self.paths:
            try:
                status = os.stat(path)
                stamps.append((status.st_mtime_ns, status.st_size))
            except OSError:
                stamps.append((0, 0))
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as grpc takes them, checked first as OpenSSL reads them: grpc would take a
        corrupt certificate or a key of another certificate here and only fail at handshakes."""
        stamps = self._stamps()
        pair = (self.key.read_bytes(), self.cert.read_bytes())
        root = self.client_ca.read_bytes() if self.client_ca else None
        if b"PRIVATE KEY" not in pair[0] or b"CERTIFICATE" not in pair[1]:
            raise ValueError(f"{self.key} must hold a PEM private key and {self.cert} a PEM certificate")
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            check.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as error:
            raise ValueError(f"{self.cert} and {self.key} are not a certificate and its key: {error}") from None
        if self.client_ca is not None:
            try:
                check.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as error:
                raise ValueError(f"{self.client_ca} is not a PEM CA certificate: {error}") from None
        if self._stamps() != stamps:
            raise ValueError("the files changed while they were read (being written?)")
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)


def certificate_files(settings: Settings) -> CertificateFiles | None:
    """The TLS files of these settings, read once now; None for plaintext."""
    if not (settings.tls_cert or settings.tls_key or settings.tls_client_ca):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise RefusedToStart("tally: TLS needs both --tls-cert and --tls-key (and --tls-client-ca for mTLS)")
    try:
        return CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except (OSError, ValueError) as error:
        raise RefusedToStart(f"tally: cannot read the TLS files: {error}") from None

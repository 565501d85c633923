"""TLS on the gRPC port: server credentials that follow their files, so a rotated
certificate serves new connections without a restart.

grpc calls the fetcher before every TLS handshake, on one of its own threads; it compares
the files' (inode, size, modification time) with those of the set in use, a few ``stat``
calls, and reads the files only when one changed. A changed set that does not load (half
written, a key that does not match its certificate) is logged once and the set in use
keeps serving until the files are right.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from sluice.errors import ConfigError
from sluice.settings import TLSSettings

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]


def _no_password() -> bytes:
    return b""  # an encrypted key then fails to load instead of prompting on a terminal


class CertificateFiles:
    """The server's certificate, key and client CA files, read when they change."""

    def __init__(self, settings: TLSSettings) -> None:
        assert settings.cert_file is not None and settings.key_file is not None
        self._cert = settings.cert_file
        self._key = settings.key_file
        self._client_ca = settings.client_ca_file
        self._require_client_cert = settings.require_client_cert
        self._lock = threading.Lock()
        stamp, self._initial = self._load()
        self._in_use = self._refused = stamp

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up changed files on each new connection."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]  # grpc documents None as "no change"
            require_client_authentication=self._require_client_cert,
        )

    def describe(self) -> str:
        if self._require_client_cert:
            return f"TLS, client certificates required, signed by a CA in {self._client_ca}"
        return "TLS"

    def _files(self) -> list[tuple[str, Path]]:
        files = [("tls.cert_file", self._cert), ("tls.key_file", self._key)]
        if self._client_ca is not None:
            files.append(("tls.client_ca_file", self._client_ca))
        return files

    def _stamp(self) -> Stamp:
        stats = [os.stat(path) for _, path in self._files()]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate-configuration fetcher: None keeps the set in use."""
        try:
            stamp = self._stamp()
        except OSError:
            return None  # a file is being replaced; the next connection looks again
        with self._lock:
            if stamp in (self._in_use, self._refused):
                return None
            try:
                loaded_stamp, config = self._load()
            except ConfigError as exc:
                self._refused = stamp
                log.warning("TLS files changed but do not load; still serving the old: %s", exc)
                return None
            if loaded_stamp != stamp:
                return None  # changed while being read; the next connection looks again
            self._in_use = stamp
            log.info("TLS files changed: new connections get the new certificate")
            return config

    def _load(self) -> tuple[Stamp, grpc.ServerCertificateConfiguration]:
        """Check the files with the ssl module, then read them; the stamp taken before and
        after must agree, so what was checked is what was read."""
        try:
            before = self._stamp()
            _check(self._cert, self._key, self._client_ca)
            contents = {name: path.read_bytes() for name, path in self._files()}
            after = self._stamp()
        except OSError as exc:
            names = [name for name, path in self._files() if str(path) == str(exc.filename)]
            raise ConfigError(
                f"cannot read {' and '.join(names) or 'the TLS files'} {exc.filename}: "
                f"{exc.strerror or exc}"
            ) from exc
        if before != after:
            raise ConfigError("the TLS files changed while they were read")
        config = grpc.ssl_server_certificate_configuration(
            [(contents["tls.key_file"], contents["tls.cert_file"])],
            root_certificates=contents.get("tls.client_ca_file"),
        )
        return after, config


def _check(cert: Path, key: Path, client_ca: Path | None) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls.cert_file {cert} and tls.key_file {key} are not a PEM certificate chain and "
            f"its unencrypted private key: {exc.reason or exc}"
        ) from exc
    if client_ca is None:
        return
    try:
        context.load_verify_locations(cafile=client_ca)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls.client_ca_file {client_ca} holds no PEM CA certificate: {exc.reason or exc}"
        ) from exc

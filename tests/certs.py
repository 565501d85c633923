"""Certificates made at test time (never committed): a CA, a server certificate for
127.0.0.1 / localhost, and two client certificates, written as PEM files to a folder.

The files are named as docs/grpcurl.md names them: ``ca.pem``, ``server.pem`` /
``server.key``, ``admin.pem`` / ``admin.key`` (CN ``ops-admin``, also the URI SAN
``spiffe://sluice.test/ops``) and ``client.pem`` / ``client.key`` (CN ``app``).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ADMIN_CN = "ops-admin"
ADMIN_URI = "spiffe://sluice.test/ops"
CLIENT_CN = "app"
SERVER_NAMES = ("localhost", "127.0.0.1")

_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Certificates:
    directory: Path
    ca_name: str

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def admin_cert(self) -> Path:
        return self.directory / "admin.pem"

    @property
    def admin_key(self) -> Path:
        return self.directory / "admin.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def server_settings(self, *, mutual: bool = True) -> dict[str, Any]:
        """The server's ``tls`` settings section: TLS, with client certificates when
        ``mutual``."""
        tls: dict[str, Any] = {"cert_file": self.server_cert, "key_file": self.server_key}
        if mutual:
            tls |= {"client_ca_file": self.ca, "require_client_cert": True}
        return tls


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sign(
    builder: x509.CertificateBuilder, subject: str, key: _Key, issuer: x509.Name, issuer_key: _Key
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        builder.subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )


def _write(path: Path, certificate: x509.Certificate, key: _Key | None = None) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _leaf(sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )


def make_certificates(directory: Path, *, ca_name: str = "Sluice test CA") -> Certificates:
    """A fresh CA and the certificates it signs, written to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_builder = x509.CertificateBuilder().add_extension(
        x509.BasicConstraints(ca=True, path_length=0), critical=True
    )
    ca = _sign(ca_builder, ca_name, ca_key, _name(ca_name), ca_key)
    _write(directory / "ca.pem", ca)
    server_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    leaves = {
        "server": ("sluice-server", server_sans, ExtendedKeyUsageOID.SERVER_AUTH),
        "admin": (
            ADMIN_CN,
            [x509.UniformResourceIdentifier(ADMIN_URI)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        "client": (CLIENT_CN, [x509.DNSName("app.sluice.test")], ExtendedKeyUsageOID.CLIENT_AUTH),
    }
    for stem, (subject, sans, usage) in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        _write(
            directory / f"{stem}.pem",
            _sign(_leaf(sans, usage), subject, key, ca.subject, ca_key),
            key,
        )
    return Certificates(directory, ca_name)

"""TLS and mTLS on the gRPC port, with certificates made at test time: no plaintext port
with TLS on, client certificates required when configured, certificate files rotated
without a restart, and clear start-up errors for files that do not load."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from sluice.errors import ConfigError
from sluice.settings import Settings
from sluice_client import AsyncClient, Client, TLSConfig, Unavailable
from tests.certs import Certificates, make_certificates
from tests.conftest import StartServer
from tests.serve_process import workers_env

SIMPLE = {
    "INPUT0": np.arange(16, dtype=np.int32).reshape(1, 16),
    "INPUT1": np.ones((1, 16), dtype=np.int32),
}


def tls(certificates: Certificates, *, client: bool = True, **extra: str) -> TLSConfig:
    """The client side: trust the test CA, and present the client certificate."""
    if not client:
        return TLSConfig(ca_file=certificates.ca, **extra)
    return TLSConfig(
        ca_file=certificates.ca,
        cert_file=certificates.client_cert,
        key_file=certificates.client_key,
        **extra,
    )


async def served_health(address: str, config: TLSConfig | None) -> str:
    """A fresh connection's health answer; its own subchannel, so its own handshake."""
    async with AsyncClient(address, tls=config, timeout_s=5) as client:
        return await client.health()


async def test_tls_serves_and_plaintext_is_refused(
    start_server: StartServer, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sluice.transport.server"):
        server = await start_server(tls=certificates.server_settings(mutual=False))
    assert f"gRPC listening on 127.0.0.1:{server.port} (TLS)" in caplog.text
    async with AsyncClient(server.address, tls=tls(certificates, client=False)) as client:
        assert await client.health() == "SERVING"
        result = await client.infer("simple", SIMPLE)
        np.testing.assert_array_equal(result.outputs["OUTPUT0"], SIMPLE["INPUT0"] + 1)
    # No plaintext on the port: a plaintext client gets no answer.
    with pytest.raises(Unavailable):
        await served_health(server.address, None)
    # A client that trusts another CA refuses the server's certificate.
    other = make_certificates(certificates.directory.parent / "other-ca", ca_name="Other CA")
    with pytest.raises(Unavailable):
        await served_health(server.address, TLSConfig(ca_file=other.ca))


async def test_the_server_name_override_is_what_is_verified(
    start_server: StartServer, certificates: Certificates
) -> None:
    server = await start_server(tls=certificates.server_settings(mutual=False))
    # The certificate names localhost and 127.0.0.1: either verifies, another name fails.
    named = tls(certificates, client=False, server_name="localhost")
    assert await served_health(server.address, named) == "SERVING"
    with pytest.raises(Unavailable):
        wrong = tls(certificates, client=False, server_name="elsewhere.sluice.test")
        await served_health(server.address, wrong)


async def test_mtls_requires_a_client_certificate(
    start_server: StartServer, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sluice.transport.server"):
        server = await start_server(tls=certificates.server_settings())
    assert "(TLS, client certificates required" in caplog.text, caplog.text
    assert await served_health(server.address, tls(certificates)) == "SERVING"
    with pytest.raises(Unavailable):
        await served_health(server.address, tls(certificates, client=False))
    # A certificate from a CA the server does not trust is refused too.
    other = make_certificates(certificates.directory.parent / "stranger", ca_name="Stranger")
    stranger = TLSConfig(
        ca_file=certificates.ca, cert_file=other.client_cert, key_file=other.client_key
    )
    with pytest.raises(Unavailable):
        await served_health(server.address, stranger)

    # The blocking client speaks mTLS the same way (in a thread: the server shares this
    # test's event loop).
    def blocking_infer() -> tuple[int, ...]:
        with Client(server.address, tls=tls(certificates), timeout_s=5) as client:
            return client.infer("simple", SIMPLE).outputs["OUTPUT0"].shape

    assert await asyncio.to_thread(blocking_infer) == (1, 16)


def _install(source: Certificates, target: Path, *, key: bool = True) -> None:
    """Replace the served files the way deployments do: write aside, then rename."""
    pairs = [(source.server_cert, target / "server.pem")]
    if key:
        pairs.append((source.server_key, target / "server.key"))
    for origin, destination in pairs:
        staged = destination.with_suffix(".new")
        shutil.copyfile(origin, staged)
        os.replace(staged, destination)


async def test_rotated_certificates_serve_new_connections_without_a_restart(
    start_server: StartServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_certificates(tmp_path / "first", ca_name="First CA")
    second = make_certificates(tmp_path / "second", ca_name="Second CA")
    served = tmp_path / "served"
    served.mkdir()
    _install(first, served)
    server = await start_server(
        tls={"cert_file": served / "server.pem", "key_file": served / "server.key"}
    )
    trusts_first, trusts_second = TLSConfig(ca_file=first.ca), TLSConfig(ca_file=second.ca)
    async with AsyncClient(server.address, tls=trusts_first, timeout_s=5) as kept:
        assert await kept.health() == "SERVING"

        # Half a rotation (the new certificate, the old key) does not load: the old pair
        # keeps serving new connections, and the refusal is logged.
        with caplog.at_level(logging.WARNING, logger="sluice.transport.tls"):
            _install(second, served, key=False)
            assert await served_health(server.address, trusts_first) == "SERVING"
        assert "do not load; still serving the old" in caplog.text

        # The rest of the rotation: new connections get the new certificate.
        _install(second, served)
        assert await served_health(server.address, trusts_second) == "SERVING"
        with pytest.raises(Unavailable):
            await served_health(server.address, trusts_first)
        # A connection made before the rotation goes on working.
        assert await kept.health() == "SERVING"


async def test_rotated_client_ca_is_picked_up(start_server: StartServer, tmp_path: Path) -> None:
    first = make_certificates(tmp_path / "first", ca_name="First CA")
    second = make_certificates(tmp_path / "second", ca_name="Second CA")
    client_ca = tmp_path / "clients.pem"
    shutil.copyfile(first.ca, client_ca)
    server = await start_server(
        tls={
            "cert_file": first.server_cert,
            "key_file": first.server_key,
            "client_ca_file": client_ca,
            "require_client_cert": True,
        }
    )
    from_second = TLSConfig(
        ca_file=first.ca, cert_file=second.client_cert, key_file=second.client_key
    )
    with pytest.raises(Unavailable):
        await served_health(server.address, from_second)
    staged = tmp_path / "clients.new"
    staged.write_bytes(first.ca.read_bytes() + second.ca.read_bytes())
    os.replace(staged, client_ca)
    assert await served_health(server.address, from_second) == "SERVING"


@pytest.mark.parametrize(
    ("tls_settings", "message"),
    [
        ({"key_file": "k.pem"}, "tls.cert_file and tls.key_file go together"),
        (
            {"cert_file": "c.pem", "key_file": "k.pem", "client_ca_file": "ca.pem"},
            "tls.require_client_cert is false",
        ),
        (
            {"cert_file": "c.pem", "key_file": "k.pem", "require_client_cert": True},
            "tls.require_client_cert needs tls.client_ca_file",
        ),
    ],
)
def test_incomplete_tls_settings_are_rejected(
    tls_settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.model_validate({"tls": tls_settings})


async def sluice_serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``sluice serve`` that must fail at start: its exit status and stderr."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sluice", "serve", "--grpc-port", "0", "--metrics-port", "0"),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SLUICE_LOG_FORMAT": "text", **workers_env(), **(env or {})},
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"sluice serve {' '.join(args)} did not stop by itself") from None
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_serve_refuses_tls_files_that_do_not_load(
    certificates: Certificates, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    cases = {
        "cannot read tls.cert_file": (
            "--tls-cert-file",
            missing,
            "--tls-key-file",
            certificates.server_key,
        ),
        "are not a PEM certificate chain and its unencrypted private key": (
            *("--tls-cert-file", certificates.server_cert),
            *("--tls-key-file", certificates.client_key),
        ),
        "tls.cert_file and tls.key_file go together": ("--tls-key-file", certificates.server_key),
    }
    results = await asyncio.gather(
        *(sluice_serve(*(str(arg) for arg in args)) for args in cases.values())
    )
    for message, (status, stderr) in zip(cases, results, strict=True):
        assert status == 1, stderr
        assert message in stderr, stderr
        assert "Traceback" not in stderr, stderr


async def test_a_client_ca_file_without_certificates_is_refused(
    start_server: StartServer, certificates: Certificates
) -> None:
    settings = certificates.server_settings() | {"client_ca_file": certificates.server_key}
    with pytest.raises(ConfigError, match=r"tls\.client_ca_file .* holds no PEM CA certificate"):
        await start_server(tls=settings)


async def test_serve_reads_tls_settings_from_the_environment(certificates: Certificates) -> None:
    status, stderr = await sluice_serve(
        env={
            "SLUICE_TLS__CERT_FILE": str(certificates.server_cert),
            "SLUICE_TLS__KEY_FILE": str(certificates.admin_key),  # not the certificate's key
            "SLUICE_TLS__CLIENT_CA_FILE": str(certificates.ca),
            "SLUICE_TLS__REQUIRE_CLIENT_CERT": "true",
        }
    )
    assert status == 1 and "KEY_VALUES_MISMATCH" in stderr, stderr

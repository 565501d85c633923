"""The ``sluice`` client commands over TLS and mTLS, run as subprocesses against an
in-process server with certificates made at test time."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from sluice_client.cli import add_client_commands
from tests.certs import ADMIN_CN, Certificates
from tests.conftest import RunningServer, StartServer
from tests.test_cli import assert_clean_failure, sluice

TLS_FLAGS = ("--tls", "--ca-file", "--cert-file", "--key-file", "--server-name")


def mtls_flags(certificates: Certificates, *, admin: bool = False) -> list[str]:
    cert, key = (
        (certificates.admin_cert, certificates.admin_key)
        if admin
        else (certificates.client_cert, certificates.client_key)
    )
    return [
        *("--ca-file", str(certificates.ca)),
        *("--cert-file", str(cert), "--key-file", str(key)),
        *("--server-name", "localhost"),
    ]


@pytest.fixture
async def mtls_server(
    start_server: StartServer, certificates: Certificates, example_repository: Path
) -> RunningServer:
    return await start_server(
        repository=example_repository,
        tls=certificates.server_settings(),
        admin={"identities": [ADMIN_CN]},
    )


def test_every_client_command_takes_the_tls_options() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_client_commands(sub)
    assert sub.choices, "no client commands"
    for name, command in sub.choices.items():
        shown = command.format_help().split()
        assert all(flag in shown for flag in TLS_FLAGS), (name, shown)


async def test_health_and_models_over_mtls(
    mtls_server: RunningServer, certificates: Certificates
) -> None:
    flags = ["--url", mtls_server.address, *mtls_flags(certificates)]
    health = await sluice("health", *flags)
    assert (health.returncode, health.stdout) == (0, "SERVING\n"), health.stderr
    models = await sluice("models", *flags)
    assert models.returncode == 0 and "simple" in models.stdout, models.stderr
    # Changes need a certificate named in admin.identities.
    refused = await sluice("models", "promote", "mlp", "2", *flags)
    assert_clean_failure(refused, "PERMISSION_DENIED")
    admin = ["--url", mtls_server.address, *mtls_flags(certificates, admin=True)]
    promoted = await sluice("models", "promote", "mlp", "2", "--reason", "cli", *admin)
    assert (promoted.returncode, promoted.stdout) == (0, "serving: 2 -> 2\n"), promoted.stderr
    history = await sluice("models", "history", "mlp", *flags)
    assert history.stdout.splitlines()[-1].split()[-2:] == [ADMIN_CN, "cli"], history.stdout


async def test_infer_over_mtls_from_the_environment(
    mtls_server: RunningServer, certificates: Certificates, tmp_path: Path
) -> None:
    np.save(tmp_path / "a.npy", np.arange(16, dtype=np.int32).reshape(1, 16))
    np.save(tmp_path / "b.npy", np.ones((1, 16), np.int32))
    finished = await sluice(
        *("infer", "simple", "--input", f"INPUT0={tmp_path / 'a.npy'}"),
        *("--input", f"INPUT1={tmp_path / 'b.npy'}"),
        env={
            "SLUICE_URL": mtls_server.address,
            "SLUICE_CA_FILE": str(certificates.ca),
            "SLUICE_CERT_FILE": str(certificates.client_cert),
            "SLUICE_KEY_FILE": str(certificates.client_key),
        },
    )
    assert finished.returncode == 0, finished.stderr
    assert "OUTPUT0  INT32  [1, 16]" in finished.stdout


async def test_without_a_client_certificate_commands_fail_cleanly(
    mtls_server: RunningServer, certificates: Certificates
) -> None:
    finished = await sluice(
        "health", "--url", mtls_server.address, "--ca-file", str(certificates.ca)
    )
    assert_clean_failure(finished, "UNAVAILABLE")
    plaintext = await sluice("health", "--url", mtls_server.address, "--timeout-s", "5")
    assert_clean_failure(plaintext, "UNAVAILABLE")

"""The admin plane is closed by default: admin calls need the bearer token or a client
certificate named in ``admin.identities``; with neither, they are served only when the
server listens on loopback alone, decided from the bind address, never from the peer."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from sluice.settings import Settings
from sluice.transport.interceptors.auth import is_loopback_only
from sluice_api.sluice.v1 import model_service_pb2 as pb
from sluice_api.sluice.v1 import model_service_pb2_grpc as pb_grpc
from sluice_client import AsyncClient, InvalidArgument, PermissionDenied, TLSConfig
from tests.certs import ADMIN_CN, ADMIN_URI, Certificates
from tests.conftest import RunningServer, StartServer

SERVER_LOG = "sluice.transport.server"


def as_admin(certificates: Certificates) -> TLSConfig:
    return TLSConfig(
        ca_file=certificates.ca, cert_file=certificates.admin_cert, key_file=certificates.admin_key
    )


def as_client(certificates: Certificates) -> TLSConfig:
    return TLSConfig(
        ca_file=certificates.ca,
        cert_file=certificates.client_cert,
        key_file=certificates.client_key,
    )


async def promote(address: str, *, authorization: str | None = None) -> grpc.StatusCode:
    """PromoteModel(mlp, 2) with a raw ``authorization`` header: the status it ends with."""
    metadata = (("authorization", authorization),) if authorization is not None else ()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            await stub.PromoteModel(
                pb.PromoteModelRequest(model_name="mlp", version="2"),
                metadata=metadata,
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def last_who(address: str, model: str = "mlp", tls: TLSConfig | None = None) -> str:
    async with AsyncClient(address, tls=tls) as client:
        return (await client.history(model))[-1].who


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("", False),
        ("10.1.2.3", False),
        ("192.168.0.10", False),
        ("no-such-host.invalid", False),
    ],
)
def test_loopback_is_decided_from_the_bind_address(host: str, loopback: bool) -> None:
    assert is_loopback_only(host) is loopback


async def test_on_loopback_without_a_credential_admin_calls_are_served_as_local(
    start_server: StartServer, example_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        server = await start_server(repository=example_repository)
    assert "admin calls need no credential: 127.0.0.1 is a loopback address" in caplog.text
    assert await promote(server.address) is grpc.StatusCode.OK
    # The history names the caller's identity, never its address.
    assert await last_who(server.address) == "local"


async def test_ipv6_loopback_counts_as_loopback(
    start_server: StartServer, example_repository: Path
) -> None:
    server = await start_server(repository=example_repository, host="::1")
    address = f"[::1]:{server.port}"
    assert await promote(address) is grpc.StatusCode.OK
    assert await last_who(address) == "local"


async def test_bound_beyond_loopback_without_a_credential_admin_is_refused(
    start_server: StartServer, example_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Bound to every interface, this server is reached here over loopback: exactly how a
    # sidecar, a port-forward or a tunnel makes remote callers look local. The bind
    # address decides, so they are refused.
    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        server = await start_server(repository=example_repository, host="0.0.0.0")
    assert "admin calls are REFUSED: the server listens on 0.0.0.0" in caplog.text
    assert await promote(server.address) is grpc.StatusCode.PERMISSION_DENIED
    async with AsyncClient(server.address) as client:
        with pytest.raises(PermissionDenied, match=r"no admin credential configured"):
            await client.load_model("mlp", version="1")
        assert await client.ready()  # the data plane and reads stay open
        assert await client.history("mlp")


async def test_the_token_is_a_bearer_credential_and_nothing_else(
    start_server: StartServer, example_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        server = await start_server(
            repository=example_repository, host="0.0.0.0", admin={"token": "s3cret", "name": "ci"}
        )
    assert "admin calls need the admin token (authorization: Bearer)" in caplog.text
    assert "s3cret" not in caplog.text
    refused = ["s3cret", "Basic s3cret", "Bearer wrong", "Bearer", "Bearer s3cret-and-more", ""]
    for header in refused:
        assert await promote(server.address, authorization=header) is (
            grpc.StatusCode.PERMISSION_DENIED
        ), header
    for header in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):
        assert await promote(server.address, authorization=header) is grpc.StatusCode.OK, header
    assert await last_who(server.address) == "ci"


def test_an_empty_token_is_a_settings_error() -> None:
    for token in ("", "  "):
        with pytest.raises(ValueError, match=r"admin\.token is empty"):
            Settings.model_validate({"admin": {"token": token}})


def test_identities_need_client_certificates(certificates: Certificates) -> None:
    with pytest.raises(ValueError, match=r"admin\.identities needs client certificates"):
        Settings.model_validate({"admin": {"identities": [ADMIN_CN]}})
    with pytest.raises(ValueError, match=r"admin\.identities needs client certificates"):
        Settings.model_validate(
            {
                "admin": {"identities": [ADMIN_CN]},
                "tls": certificates.server_settings(mutual=False),
            }
        )


@pytest.mark.parametrize("identity", [ADMIN_CN, ADMIN_URI], ids=["common-name", "uri-san"])
async def test_a_listed_client_certificate_is_an_admin(
    start_server: StartServer,
    example_repository: Path,
    certificates: Certificates,
    identity: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        server = await start_server(
            repository=example_repository,
            tls=certificates.server_settings(),
            admin={"identities": [identity]},
        )
    assert f"admin calls need client certificates named {identity}" in caplog.text
    async with AsyncClient(server.address, tls=as_client(certificates)) as client:
        with pytest.raises(
            PermissionDenied, match=r"client certificate named in admin\.identities"
        ):
            await client.promote("mlp", "2")
        assert await client.ready()
    async with AsyncClient(server.address, tls=as_admin(certificates)) as admin:
        assert await admin.promote("mlp", "2", reason="by certificate") == ("2", "2")
        entry = (await admin.history("mlp"))[-1]
    assert (entry.who, entry.reason) == (identity, "by certificate")


async def test_token_and_identities_each_open_the_admin_plane(
    start_server: StartServer, example_repository: Path, certificates: Certificates
) -> None:
    server = await start_server(
        repository=example_repository,
        tls=certificates.server_settings(),
        admin={"identities": [ADMIN_CN], "token": "s3cret"},
    )
    client_tls = as_client(certificates)
    async with AsyncClient(server.address, tls=client_tls) as client:
        with pytest.raises(PermissionDenied, match=r"Bearer <token>.*, or connect with a client"):
            await client.promote("mlp", "2")
    async with AsyncClient(server.address, tls=client_tls, admin_token="s3cret") as client:
        await client.promote("mlp", "2")
    assert await last_who(server.address, tls=client_tls) == "admin"
    async with AsyncClient(server.address, tls=as_admin(certificates)) as admin:
        await admin.promote("mlp", "2")
    assert await last_who(server.address, tls=client_tls) == ADMIN_CN


async def test_admin_reasons_are_bounded(
    start_server: StartServer, example_repository: Path
) -> None:
    server = await start_server(repository=example_repository, admin={"max_reason_chars": 50})
    async with AsyncClient(server.address) as client:
        before = len(await client.history("mlp"))
        with pytest.raises(InvalidArgument, match="reason has 51 characters; at most 50"):
            await client.promote("mlp", "2", reason="x" * 51)
        with pytest.raises(InvalidArgument, match="at most 50"):
            await client.load_model("mlp", version="1", reason="y" * 4_000_000)
        assert len(await client.history("mlp")) == before  # nothing ran, nothing recorded
        await client.promote("mlp", "2", reason="z" * 50)
        assert (await client.history("mlp"))[-1].reason == "z" * 50


async def test_history_never_shows_a_peer_address(
    start_server: StartServer, example_repository: Path, tmp_path: Path
) -> None:
    # A history written when callers were recorded by their peer address.
    state = tmp_path / "state"
    first = await start_server(repository=example_repository, lifecycle={"state_dir": state})
    await first.service.promote("mlp", "2", who="ipv4:127.0.0.1:53111", reason="old entry")
    server: RunningServer = await start_server(
        repository=example_repository, lifecycle={"state_dir": state}
    )
    async with AsyncClient(server.address) as client:
        entries = await client.history("mlp")
    assert [e.who for e in entries if e.reason == "old entry"] == ["local"]
    assert not any(":" in e.who for e in entries), entries

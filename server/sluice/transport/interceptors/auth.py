"""Admin authorization: calls that change what is served (``Rpc.admin`` in
``transport.rpcs``) need an admin credential.

Trust is configured, never inferred from a peer's address (behind a sidecar, a port-forward
or a tunnel every remote caller looks local). An admin call is served when it carries
``authorization: Bearer <admin.token>`` (scheme in any case, token compared in constant
time), or comes over mTLS with a client certificate whose subject CN or a subject
alternative name is in ``admin.identities``. With neither configured, admin calls are
served only when every address the server listens on is a loopback address (decided from
the bind address at start); bound anywhere else they are refused. Refusals are
PERMISSION_DENIED before the call runs. Who made the call (the token's name, the
certificate identity, or ``local``) goes to ``callctx.caller`` for the model's history.

Behind transport processes (``--workers``), TLS ends at the transport, which forwards the
client certificate's names as internal metadata; they count only on calls that came over
the engine's private Unix socket (``sluice.transport.identity``).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from sluice import callctx
from sluice.errors import PermissionDeniedError
from sluice.settings import Settings
from sluice.transport.identity import certificate_names, forwarded_names
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice.transport.rpcs import Rpc


def is_loopback_only(host: str) -> bool:
    """Whether every address ``host`` (a bind address or name) stands for is loopback."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if not host:
        return False
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return False
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    return bool(addresses) and all(_loopback(address) for address in addresses)


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """Who may make admin calls, decided once at start from the settings."""

    token: bytes | None = field(repr=False)
    token_name: str
    identities: frozenset[str]
    host: str
    loopback_only: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> AdminAccess:
        token = settings.admin.token
        return cls(
            token=token.get_secret_value().encode() if token is not None else None,
            token_name=settings.admin.name,
            identities=frozenset(settings.admin.identities),
            host=settings.host,
            loopback_only=is_loopback_only(settings.host),
        )

    @property
    def open_locally(self) -> bool:
        """No credential configured and only loopback listens: every caller is local."""
        return self.token is None and not self.identities and self.loopback_only

    def describe(self) -> str:
        """The admin mode in force, for the start-up log."""
        ways = []
        if self.token is not None:
            ways.append("the admin token (authorization: Bearer)")
        if self.identities:
            ways.append(f"client certificates named {', '.join(sorted(self.identities))}")
        if ways:
            return "admin calls need " + " or ".join(ways)
        if self.loopback_only:
            return f"admin calls need no credential: {self.host} is a loopback address"
        return (
            f"admin calls are REFUSED: the server listens on {self.host}, beyond loopback, and "
            "no admin credential is configured (set admin.token or admin.identities)"
        )

    def authorize(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Who makes the admin call, or PermissionDeniedError."""
        if self._carries_token(call):
            return self.token_name
        if self.identities:
            identity = _certificate_identity(context, self.identities)
            if identity is not None:
                return identity
        if self.open_locally:
            return callctx.LOCAL_CALLER
        raise PermissionDeniedError(f"{call.short_method} changes what is served: {self._needs()}")

    def _carries_token(self, call: CallInfo) -> bool:
        presented = _bearer(call)
        if self.token is None or presented is None:
            return False
        return hmac.compare_digest(presented, self.token)

    def _needs(self) -> str:
        ways = []
        if self.token is not None:
            ways.append("send 'authorization: Bearer <token>' with the admin token")
        if self.identities:
            ways.append("connect with a client certificate named in admin.identities")
        if ways:
            return "it needs the admin credential: " + ", or ".join(ways)
        return (
            f"the server listens on {self.host}, beyond loopback, and has no admin credential "
            "configured (admin.token or admin.identities), so admin calls are refused"
        )


def _bearer(call: CallInfo) -> bytes | None:
    scheme, _, value = call.metadata("authorization").strip().partition(" ")
    return value.strip().encode() if scheme.lower() == "bearer" else None


def _certificate_identity(
    context: grpc.aio.ServicerContext[Any, Any], identities: frozenset[str]
) -> str | None:
    """The first name of the verified client certificate that ``identities`` lists: the
    certificate of this connection, or the one a transport process forwarded."""
    names = certificate_names(context.auth_context()) or forwarded_names(
        context.peer(), context.invocation_metadata() or ()
    )
    return next((name for name in names if name in identities), None)


class AuthInterceptor(Interceptor):
    def __init__(self, access: AdminAccess) -> None:
        self._access = access

    def applies(self, kind: Rpc, *, request_streaming: bool) -> bool:
        return kind.admin

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if not call.rpc.admin:
            yield
            return
        token = callctx.caller.set(self._access.authorize(call, context))
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):  # ended in another context
                callctx.caller.reset(token)

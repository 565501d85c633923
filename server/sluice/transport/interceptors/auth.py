"""Admin authorization: calls that change what is served need the admin credential.

With ``admin.token`` configured, an admin call must carry ``authorization: Bearer <token>``
(compared in constant time); with none configured, admin calls are served only to callers
on the loopback interface. Anything else is refused with PERMISSION_DENIED before it runs.
Who made the call goes to ``callctx.caller`` for the model's history.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.errors import PermissionDeniedError
from sluice.settings import AdminSettings
from sluice.transport import callctx
from sluice.transport.interceptors._wrap import CallInfo, Interceptor

ADMIN_METHODS = frozenset(
    {
        "/sluice.v1.ModelService/LoadModel",
        "/sluice.v1.ModelService/UnloadModel",
        "/sluice.v1.ModelService/PromoteModel",
        "/sluice.v1.ModelService/RollbackModel",
        "/sluice.v1.ModelService/RescanRepository",
        "/sluice.v1.ModelService/SetShadowing",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)

_LOOPBACK_PEERS = ("ipv4:127.", "ipv6:[::1]", "ipv6:[::ffff:127.", "unix:")


class AuthInterceptor(Interceptor):
    def __init__(self, settings: AdminSettings) -> None:
        self._token = settings.token.get_secret_value().encode() if settings.token else None
        self._name = settings.name

    @contextlib.asynccontextmanager
    async def around(
        self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if call.method not in ADMIN_METHODS:
            yield
            return
        token = callctx.caller.set(self._authorize(call, context))
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):  # ended in another context
                callctx.caller.reset(token)

    def _authorize(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        peer = context.peer() or ""
        if self._token is None:
            if peer.startswith(_LOOPBACK_PEERS):
                return peer
            raise PermissionDeniedError(
                f"{call.short_method} changes what is served: with no admin token configured "
                "(admin.token) it is served only on the loopback interface"
            )
        presented = call.metadata("authorization").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(presented, self._token):
            raise PermissionDeniedError(
                f"{call.short_method} changes what is served and needs the admin credential: "
                "send 'authorization: Bearer <token>'"
            )
        return self._name

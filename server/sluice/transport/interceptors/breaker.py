"""Breaker check: fail fast with UNAVAILABLE when every candidate that could serve the call
(the model and its fallbacks) has an open breaker, before anything is queued (``Rpc.
inference`` calls, through the ``CallPolicy``; breakers themselves count at the executor
call). Refusals count as ``rejected{reason="breaker"}``."""

from __future__ import annotations

from typing import Any

import grpc

from sluice.policy import CallPolicy
from sluice.transport.interceptors._entering import Entering
from sluice.transport.interceptors._wrap import CallInfo, Interceptor
from sluice.transport.rpcs import Rpc


class BreakerInterceptor(Interceptor):
    def __init__(self, policy: CallPolicy) -> None:
        self._policy = policy

    def applies(self, kind: Rpc, *, request_streaming: bool) -> bool:
        # Request streams check each request they carry (the stream sessions).
        return kind.inference and not request_streaming

    def around(self, call: CallInfo, context: grpc.aio.ServicerContext[Any, Any]) -> Entering:
        return Entering(self._check(call))

    async def _check(self, call: CallInfo) -> None:
        if call.request is not None:
            # ModelInferRequest and GenerateRequest both name the model this way.
            self._policy.check_breakers(call.request.model_name, call.request.model_version)

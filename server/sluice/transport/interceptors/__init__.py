"""Server interceptors, one concern each. ``build`` is the one place their order is set.

Which calls a hook acts on is the RPC table's say (``transport.rpcs``); the rules of the
deadline, admission and breaker hooks are the ``CallPolicy``'s, which the stream sessions
apply to each request a stream carries."""

from __future__ import annotations

import grpc

from sluice.admission import AdmissionController
from sluice.clock import Clock
from sluice.metrics import Metrics
from sluice.policy import CallPolicy
from sluice.registry import ModelTable
from sluice.tracing import Tracing
from sluice.transport.interceptors._wrap import Chain
from sluice.transport.interceptors.admission import AdmissionInterceptor
from sluice.transport.interceptors.auth import AdminAccess, AuthInterceptor
from sluice.transport.interceptors.breaker import BreakerInterceptor
from sluice.transport.interceptors.deadline import DeadlineInterceptor
from sluice.transport.interceptors.decode import DecodeInterceptor
from sluice.transport.interceptors.errors import ErrorInterceptor
from sluice.transport.interceptors.telemetry import TelemetryInterceptor


def build(
    *,
    registry: ModelTable,
    policy: CallPolicy,
    admission: AdmissionController,
    metrics: Metrics,
    clock: Clock,
    tracing: Tracing,
    admin: AdminAccess,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors in execution order, outermost first (run as one chain)."""
    return [
        Chain(
            [
                TelemetryInterceptor(metrics, registry, clock=clock, tracing=tracing),
                ErrorInterceptor(),
                DecodeInterceptor(registry.longest_prompt_bytes),
                AuthInterceptor(admin),
                DeadlineInterceptor(policy, metrics),
                AdmissionInterceptor(admission, policy),
                BreakerInterceptor(policy),
            ]
        )
    ]

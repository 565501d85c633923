"""Server interceptors, one concern each. ``build`` is the one place their order is set."""

from __future__ import annotations

import grpc

from sluice.admission import AdmissionController
from sluice.batching.dynamic import Clock
from sluice.deadlines import DeadlinePolicy
from sluice.metrics import Metrics
from sluice.routing import Router
from sluice.service import InferenceService
from sluice.settings import Settings
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
    settings: Settings,
    service: InferenceService,
    router: Router,
    admission: AdmissionController,
    deadlines: DeadlinePolicy,
    metrics: Metrics,
    clock: Clock,
    tracing: Tracing,
    admin: AdminAccess,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors in execution order, outermost first (run as one chain)."""
    return [
        Chain(
            [
                TelemetryInterceptor(metrics, service, clock=clock, tracing=tracing),
                ErrorInterceptor(),
                DecodeInterceptor(),
                AuthInterceptor(admin),
                DeadlineInterceptor(deadlines, metrics),
                AdmissionInterceptor(
                    admission, tenant_key=settings.admission.tenant_metadata_key, tracing=tracing
                ),
                BreakerInterceptor(router, metrics),
            ]
        )
    ]

"""The core as the transport sees it, built in one place.

The transport serves every call with these and nothing else: the control plane (the
``ModelRegistry``), the ``Router`` (infer, generate; its attempts run on the ``DataPlane``,
which also counts tokens), the ``Shadower`` (shadow reports, the kill switch) and the
``CallPolicy`` (the rules a request passes before it runs). What crosses between them and
the transport is plain values (``domain``): requests, results, chunk streams and the call's
facts.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.admission import AdmissionController
from sluice.caching import ResponseCache
from sluice.clock import Clock
from sluice.dataplane import DataPlane
from sluice.deadlines import DeadlinePolicy
from sluice.metrics import Metrics
from sluice.policy import CallPolicy
from sluice.priority import Priorities
from sluice.registry import ModelRegistry
from sluice.routing import Router
from sluice.routing.remote import RemoteClient
from sluice.settings import Settings
from sluice.shadow import Shadower
from sluice.tracing import Tracing


@dataclass(frozen=True, slots=True)
class Core:
    registry: ModelRegistry
    plane: DataPlane
    router: Router
    shadow: Shadower
    policy: CallPolicy
    admission: AdmissionController
    cache: ResponseCache


def build_core(
    settings: Settings,
    registry: ModelRegistry,
    *,
    metrics: Metrics,
    clock: Clock,
    tracing: Tracing,
    remote: RemoteClient | None = None,
) -> Core:
    priorities = Priorities(settings.priority)
    admission = AdmissionController(settings.admission, metrics, priorities=priorities)
    plane = DataPlane(registry, settings, metrics=metrics, clock=clock, tracing=tracing)
    shadow = Shadower(registry, plane, settings.shadow, metrics=metrics, clock=clock)
    cache = ResponseCache(settings.cache, metrics=metrics, clock=clock)
    router = Router(
        registry,
        plane,
        settings,
        metrics=metrics,
        clock=clock,
        tracing=tracing,
        shadow=shadow,
        remote=remote,
        cache=cache,
    )
    policy = CallPolicy(
        tenant_key=settings.admission.tenant_metadata_key,
        deadlines=DeadlinePolicy(settings.deadline, clock),
        admission=admission,
        priorities=priorities,
        router=router,
        metrics=metrics,
        tracing=tracing,
    )
    return Core(registry, plane, router, shadow, policy, admission, cache)

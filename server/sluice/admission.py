"""Admission: how many calls may be in flight, globally and per tenant. Sheds at once.

Over the global limit a call gets UNAVAILABLE with a pushback (another replica, or the same
one a moment later, will serve it); over a tenant's quota it gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from sluice.errors import DrainingError, OverloadedError, QuotaExceededError
from sluice.metrics import Metrics
from sluice.settings import AdmissionSettings


class Ticket:
    """One admitted call; ``release`` exactly once when it finishes."""

    __slots__ = ("_controller", "_released", "_tenant")

    def __init__(self, controller: AdmissionController, tenant: str) -> None:
        self._controller = controller
        self._tenant = tenant
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self._tenant)


class AdmissionController:
    def __init__(self, settings: AdmissionSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._inflight = 0
        self._by_tenant: Counter[str] = Counter()
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrived = asyncio.Event()

    @property
    def inflight(self) -> int:
        return self._inflight

    def begin_drain(self) -> None:
        self._draining = True

    async def wait_quiet(self, quiet_s: float) -> None:
        """Return once nothing is in flight and no call has arrived for ``quiet_s``.

        Closing the transport while calls still arrive would let gRPC cancel the ones it
        has read but not dispatched; refusing them here gives a clean, retryable status.
        """
        while True:
            await self._idle.wait()
            self._arrived.clear()
            try:
                async with asyncio.timeout(quiet_s):
                    await self._arrived.wait()
            except TimeoutError:
                if not self._inflight:
                    return

    def admit(self, tenant: str = "") -> Ticket:
        """Admit a call or raise; synchronous, so no other call interleaves."""
        self._arrived.set()
        if self._draining:
            self._metrics.rejected.labels("draining").inc()
            raise DrainingError(
                "the server is shutting down and takes no new calls; retry on another replica",
                retry_after_ms=self._settings.pushback_ms,
            )
        limit = self._settings.max_inflight_requests
        if self._inflight >= limit:
            self._metrics.rejected.labels("overload").inc()
            raise OverloadedError(
                f"the server has {self._inflight} calls in flight (its limit is {limit}); "
                "retry after the suggested back-off",
                retry_after_ms=self._settings.pushback_ms,
            )
        quota = self._settings.tenant_max_inflight_requests
        if tenant and quota and self._by_tenant[tenant] >= quota:
            self._metrics.rejected.labels("quota").inc()
            raise QuotaExceededError(
                f"tenant '{tenant}' has {self._by_tenant[tenant]} calls in flight, its quota; "
                "wait for some to finish",
                subject=f"tenant:{tenant}",
                retry_after_ms=self._settings.pushback_ms,
            )
        self._inflight += 1
        self._idle.clear()
        if tenant:
            self._by_tenant[tenant] += 1
        self._metrics.inflight.set(self._inflight)
        return Ticket(self, tenant)

    def _release(self, tenant: str) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()
        if tenant:
            self._by_tenant[tenant] -= 1
            if not self._by_tenant[tenant]:
                del self._by_tenant[tenant]
        self._metrics.inflight.set(self._inflight)

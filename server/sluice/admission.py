"""Admission: how many calls may be in flight, globally and per tenant. Sheds at once.

Over the global limit a call gets UNAVAILABLE with a pushback (another replica, or the same
one a moment later, will serve it); over a tenant's quota it gets RESOURCE_EXHAUSTED.

Streaming calls are held open with ``stream()`` (their requests are admitted one by one), so
that a drain refuses new streams, tells open ones to wind up (``wait_drain``), and waits for
them as it waits for admitted calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

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
        self._streams = 0
        self._by_tenant: Counter[str] = Counter()
        self._draining = False
        self._drain_started = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrived = asyncio.Event()

    @property
    def inflight(self) -> int:
        return self._inflight

    def begin_drain(self) -> None:
        self._draining = True
        self._drain_started.set()

    async def wait_drain(self) -> None:
        """Return once a drain has begun: an open stream then stops taking new requests,
        finishes the ones it has, and ends with UNAVAILABLE (``DrainingError``)."""
        await self._drain_started.wait()

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Hold one streaming call open; refused while draining, and a drain waits for it."""
        self._arrived.set()
        if self._draining:
            self._metrics.rejected.labels("draining").inc()
            raise DrainingError(
                "the server is shutting down and opens no new streams; retry on another replica",
                retry_after_ms=self._settings.pushback_ms,
            )
        self._streams += 1
        self._idle.clear()
        self._metrics.open_streams.set(self._streams)
        try:
            yield
        finally:
            self._streams -= 1
            if not self._inflight and not self._streams:
                self._idle.set()
            self._metrics.open_streams.set(self._streams)

    async def wait_quiet(self, quiet_s: float) -> None:
        """Return once no call or stream is in flight and none has arrived for ``quiet_s``.

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
                if not self._inflight and not self._streams:
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
        if not self._inflight and not self._streams:
            self._idle.set()
        if tenant:
            self._by_tenant[tenant] -= 1
            if not self._by_tenant[tenant]:
                del self._by_tenant[tenant]
        self._metrics.inflight.set(self._inflight)

"""Admission: what may be in flight, globally and per tenant. Sheds at once (never queues).

Every inference call is weighed before it costs anything, on three resources:

* **requests**: calls (and requests of a stream) in flight;
* **bytes**: the request's size as received plus its reply's size, known from the model's
  output shapes before the model runs (``Ticket.need``);
* **tokens**: a generation's prompt plus ``max_new_tokens``, known once the prompt is
  tokenized (its bytes are weighed before that).

A call that does not fit now gets UNAVAILABLE with a pushback (another replica, or the same
one a moment later, will serve it); over a tenant's quota it gets RESOURCE_EXHAUSTED with a
pushback. A call larger than a whole budget could never run: RESOURCE_EXHAUSTED at once,
naming both numbers, with no pushback (retrying cannot help). Priority levels below the
highest may fill only their share of the request limit (``Priorities.admission_limit``):
the least urgent are shed first.

Streaming calls are held open with ``stream()`` (their requests are admitted one by one), so
that a drain refuses new streams, tells open ones to wind up (``wait_drain``), and waits for
them as it waits for admitted calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from sluice.deadlines import Expiry
from sluice.errors import (
    DrainingError,
    InvalidInputError,
    OverloadedError,
    QuotaExceededError,
    RequestTooLargeError,
)
from sluice.machine import available_memory_bytes
from sluice.metrics import Metrics
from sluice.priority import Priorities
from sluice.settings import AdmissionSettings

log = logging.getLogger(__name__)

MAX_TENANT_CHARS = 128
"""Longest tenant id a caller may name (it appears in error details)."""

BYTES_SHARE_OF_MEMORY = 16
"""Without ``max_inflight_bytes``, the byte budget is this fraction (1/16) of the memory
the process may use: a call's peak memory is a few times its request plus reply (the
message as received, the decoded tensors, the batch, the outputs, the encoded reply)."""

MIN_DEFAULT_INFLIGHT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """The budgets in force (0: no limit on that resource at that scope)."""

    requests: int
    bytes: int
    tokens: int
    tenant_requests: int
    tenant_bytes: int
    tenant_tokens: int

    @classmethod
    def from_settings(cls, settings: AdmissionSettings, memory_bytes: int | None) -> Limits:
        inflight_bytes = settings.max_inflight_bytes
        if inflight_bytes is None:
            memory = memory_bytes if memory_bytes is not None else available_memory_bytes()
            inflight_bytes = max(MIN_DEFAULT_INFLIGHT_BYTES, memory // BYTES_SHARE_OF_MEMORY)
        return cls(
            requests=settings.max_inflight_requests,
            bytes=inflight_bytes,
            tokens=settings.max_inflight_tokens,
            tenant_requests=settings.tenant_max_inflight_requests,
            tenant_bytes=settings.tenant_max_inflight_bytes,
            tenant_tokens=settings.tenant_max_inflight_tokens,
        )


class Ticket:
    """One admitted call: what it holds, grown with ``need``; ``release`` exactly once."""

    __slots__ = ("_bytes", "_controller", "_released", "_tokens", "_work_bytes", "tenant")

    def __init__(self, controller: AdmissionController, tenant: str) -> None:
        self._controller = controller
        self.tenant = tenant
        self._bytes = 0
        self._work_bytes = 0
        self._tokens = 0
        self._released = False

    @property
    def bytes(self) -> int:
        """Bytes this call holds: its request, plus the most its work may build (decoded
        tensors, the reply)."""
        return self._bytes

    @property
    def tokens(self) -> int:
        return self._tokens

    def need(self, *, work_bytes: int = 0, tokens: int = 0) -> None:
        """Hold enough for ``work_bytes`` built while serving the call (decoded tensors, the
        reply) and ``tokens`` generation tokens. The largest asked so far counts: a
        fallback does not add to what its primary held. Raises, holding nothing more, when
        that does not fit."""
        extra_bytes = max(0, work_bytes - self._work_bytes)
        extra_tokens = max(0, tokens - self._tokens)
        if not (extra_bytes or extra_tokens) or self._released:
            return
        self._controller._take(self, extra_bytes, extra_tokens)
        self._work_bytes += extra_bytes
        self._bytes += extra_bytes
        self._tokens += extra_tokens

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self)


class AdmissionController:
    def __init__(
        self,
        settings: AdmissionSettings,
        metrics: Metrics,
        *,
        memory_bytes: int | None = None,
        priorities: Priorities | None = None,
    ) -> None:
        self._settings = settings
        self._priorities = priorities or Priorities()
        self._metrics = metrics
        self.limits = Limits.from_settings(settings, memory_bytes)
        self._inflight = 0
        self._bytes = 0
        self._tokens = 0
        self._streams = 0
        self._by_tenant: Counter[str] = Counter()
        self._tenant_bytes: Counter[str] = Counter()
        self._tenant_tokens: Counter[str] = Counter()
        self._draining = False
        self._give_up_at: float | None = None
        self._cutoffs: set[asyncio.Timeout] = set()
        self._drain_started = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrived = asyncio.Event()
        for resource, scope, value in (
            ("requests", "server", self.limits.requests),
            ("bytes", "server", self.limits.bytes),
            ("tokens", "server", self.limits.tokens),
            ("requests", "tenant", self.limits.tenant_requests),
            ("bytes", "tenant", self.limits.tenant_bytes),
            ("tokens", "tenant", self.limits.tenant_tokens),
        ):
            metrics.admission_limit.labels(resource, scope).set(value)
        log.info(
            "admission: at most %d calls, %d bytes and %d tokens in flight",
            self.limits.requests,
            self.limits.bytes,
            self.limits.tokens,
        )

    @property
    def inflight(self) -> int:
        return self._inflight

    def begin_drain(self, give_up_at: float | None = None) -> None:
        """Refuse new calls from now on; calls still running at ``give_up_at`` (event loop
        time) are stopped with UNAVAILABLE (see ``cutoff``)."""
        self._draining = True
        self._give_up_at = give_up_at
        for timeout in self._cutoffs:
            timeout.reschedule(give_up_at)
        self._drain_started.set()

    def cutoff(self) -> Expiry:
        """Run one call (or a whole stream) so that a drain's grace ending stops it with
        UNAVAILABLE (``DrainingError``), which tells the client to retry elsewhere, instead
        of leaving it running (or cancelled without a status) when the transport closes."""
        return Expiry(self._give_up_at, self._drain_grace_ended, scopes=self._cutoffs)

    def _drain_grace_ended(self) -> DrainingError:
        self._metrics.rejected.labels("drain_grace").inc()
        return DrainingError(
            "the server is shutting down and its drain grace ended before this call "
            "finished; retry on another replica",
            retry_after_ms=self._settings.pushback_ms,
        )

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

    def admit(
        self,
        tenant: str = "",
        *,
        request_bytes: int = 0,
        priority: int = 0,
        read_before_drain: bool = False,
    ) -> Ticket:
        """Admit a call of ``request_bytes`` at ``priority`` or raise; synchronous, so no other
        call interleaves. ``read_before_drain``: a request an open stream (which stops
        reading once the drain begins) had read: the drain does not refuse it."""
        self._arrived.set()
        if self._draining and not read_before_drain:
            self._metrics.rejected.labels("draining").inc()
            raise DrainingError(
                "the server is shutting down and takes no new calls; retry on another replica",
                retry_after_ms=self._settings.pushback_ms,
            )
        if len(tenant) > MAX_TENANT_CHARS:
            raise InvalidInputError(
                f"the tenant id has {len(tenant)} characters; at most {MAX_TENANT_CHARS} "
                f"are allowed (metadata '{self._settings.tenant_metadata_key}')"
            )
        self._check_count(tenant, priority)
        ticket = Ticket(self, tenant)
        if request_bytes:
            self._take(ticket, request_bytes, 0)
            ticket._bytes = request_bytes
        self._inflight += 1
        self._idle.clear()
        if tenant:
            self._by_tenant[tenant] += 1
        self._metrics.inflight.set(self._inflight)
        return ticket

    def _check_count(self, tenant: str, priority: int) -> None:
        level = self._priorities.level(priority)
        limit = self._priorities.admission_limit(level, self.limits.requests)
        if self._inflight >= limit:
            self._metrics.rejected.labels("overload").inc()
            self._metrics.shed.labels(str(level)).inc()
            raise OverloadedError(
                f"the server has {self._inflight} calls in flight (the limit for priority "
                f"level {level} is {limit}); "
                "retry after the suggested back-off",
                retry_after_ms=self._settings.pushback_ms,
            )
        quota = self.limits.tenant_requests
        if tenant and quota and self._by_tenant[tenant] >= quota:
            self._metrics.rejected.labels("quota").inc()
            raise QuotaExceededError(
                f"tenant '{tenant}' has {self._by_tenant[tenant]} calls in flight, its quota; "
                "wait for some to finish",
                subject=f"tenant:{tenant}",
                retry_after_ms=self._settings.pushback_ms,
            )

    def _take(self, ticket: Ticket, extra_bytes: int, extra_tokens: int) -> None:
        """Add to what ``ticket`` holds, or raise holding nothing more."""
        tenant = ticket.tenant
        for unit, extra, total, used, limit, tenant_used, tenant_limit in (
            (
                "bytes",
                extra_bytes,
                ticket.bytes + extra_bytes,
                self._bytes,
                self.limits.bytes,
                self._tenant_bytes[tenant] if tenant else 0,
                self.limits.tenant_bytes,
            ),
            (
                "tokens",
                extra_tokens,
                ticket.tokens + extra_tokens,
                self._tokens,
                self.limits.tokens,
                self._tenant_tokens[tenant] if tenant else 0,
                self.limits.tenant_tokens,
            ),
        ):
            if extra:
                self._check_fits(
                    unit,
                    tenant,
                    extra=extra,
                    total=total,
                    used=used,
                    limit=limit,
                    tenant_used=tenant_used,
                    tenant_limit=tenant_limit,
                )
        self._bytes += extra_bytes
        self._tokens += extra_tokens
        if tenant:
            self._tenant_bytes[tenant] += extra_bytes
            self._tenant_tokens[tenant] += extra_tokens
        self._show()

    def _check_fits(
        self,
        unit: str,
        tenant: str,
        *,
        extra: int,
        total: int,
        used: int,
        limit: int,
        tenant_used: int,
        tenant_limit: int,
    ) -> None:
        tenant_limit = tenant_limit if tenant else 0
        for scope, budget in (("the server's", limit), (f"tenant '{tenant}''s", tenant_limit)):
            if budget and total > budget:
                self._metrics.rejected.labels("too_large").inc()
                raise RequestTooLargeError(
                    f"the call needs {total} {unit} in flight, more than {scope} whole budget "
                    f"of {budget}; it can never run here: send a smaller request"
                )
        if limit and used + extra > limit:
            self._metrics.rejected.labels(unit).inc()
            raise OverloadedError(
                f"the server has {used} of its {limit} {unit} in flight and this call needs "
                f"{extra} more; retry after the suggested back-off",
                retry_after_ms=self._settings.pushback_ms,
            )
        if tenant_limit and tenant_used + extra > tenant_limit:
            self._metrics.rejected.labels("quota").inc()
            raise QuotaExceededError(
                f"tenant '{tenant}' has {tenant_used} of its {tenant_limit} {unit} in flight "
                f"and this call needs {extra} more; wait for some calls to finish",
                subject=f"tenant:{tenant}",
                retry_after_ms=self._settings.pushback_ms,
            )

    def _release(self, ticket: Ticket) -> None:
        tenant = ticket.tenant
        self._inflight -= 1
        self._bytes -= ticket.bytes
        self._tokens -= ticket.tokens
        if not self._inflight and not self._streams:
            self._idle.set()
        if tenant:
            for counter, amount in (
                (self._by_tenant, 1),
                (self._tenant_bytes, ticket.bytes),
                (self._tenant_tokens, ticket.tokens),
            ):
                counter[tenant] -= amount
                if counter[tenant] <= 0:
                    del counter[tenant]
        self._metrics.inflight.set(self._inflight)
        self._show()

    def count_stream_bytes(self, delta: int) -> None:
        """Streams' windows changed by ``delta`` bytes (requests read and not yet answered,
        replies not yet written)."""
        self._metrics.stream_pending_bytes.inc(delta)

    def _show(self) -> None:
        self._metrics.inflight_bytes.set(self._bytes)
        self._metrics.inflight_tokens.set(self._tokens)

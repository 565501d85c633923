"""Deadline budgets: a default when the client sent none, a cap, and early rejection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from sluice.clock import Clock
from sluice.errors import DeadlineExceededError
from sluice.settings import DeadlineSettings


class DeadlinePolicy:
    def __init__(self, settings: DeadlineSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock

    def budget_s(self, client_remaining_s: float | None, timeout_s: float | None = None) -> float:
        """Seconds this call may take: the tightest of client deadline, timeout and cap."""
        candidates = [self._settings.max_deadline_s]
        candidates.append(
            self._settings.default_deadline_s if client_remaining_s is None else client_remaining_s
        )
        if timeout_s is not None and timeout_s > 0:
            candidates.append(timeout_s)
        budget = min(candidates)
        if budget <= 0:
            raise DeadlineExceededError(
                "the call's deadline had already passed when it reached the server"
            )
        return budget

    def deadline(self, budget_s: float) -> float:
        """The absolute deadline on the service clock for a budget starting now."""
        return self._clock() + budget_s


class Expiry:
    """``asyncio.timeout_at(when)`` whose expiry raises ``error()`` (from the TimeoutError).

    ``scopes``: a set the timeout is in while entered, so that its deadline can be moved
    (a drain does). ``any_timeout``: any TimeoutError leaving the body becomes ``error()``
    too, whoever raised it; else only once this scope itself has expired. A plain class, not a
    generator-based context manager: every call enters one or two."""

    __slots__ = ("_any", "_error", "_scopes", "_timeout")

    def __init__(
        self,
        when: float | None,
        error: Callable[[], BaseException],
        *,
        scopes: set[asyncio.Timeout] | None = None,
        any_timeout: bool = False,
    ) -> None:
        self._timeout = asyncio.timeout_at(when)
        self._error = error
        self._scopes = scopes
        self._any = any_timeout

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        if self._scopes is not None:
            self._scopes.add(self._timeout)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._scopes is not None:
            self._scopes.discard(self._timeout)
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError as timed_out:
            if not (self._any or self._timeout.expired()):
                raise
            raise self._error() from timed_out
        if isinstance(exc, TimeoutError) and (self._any or self._timeout.expired()):
            raise self._error() from exc

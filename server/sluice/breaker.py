"""Circuit breakers for backends, on pybreaker, driven from asyncio with ``calling()``.

pybreaker stamps the time a breaker opened with the wall clock; ``ClockedStorage`` keeps
that stamp on an injected monotonic clock instead, so a clock jump cannot hold a breaker
open and tests can move time without sleeping.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pybreaker

from sluice.errors import BreakerOpenError, ExecutorError
from sluice.settings import BreakerSettings

log = logging.getLogger(__name__)

Clock = Callable[[], float]
StateListener = Callable[[str, str], None]

STATES = ("closed", "half-open", "open")


class ClockedStorage(pybreaker.CircuitMemoryStorage):
    """In-memory breaker state whose ``opened_at`` follows an injected monotonic clock."""

    def __init__(self, state: str, clock: Clock) -> None:
        super().__init__(state)
        self._clock = clock
        self._opened_mono: float | None = None

    @property
    def opened_at(self) -> datetime | None:
        if self._opened_mono is None:
            return None
        elapsed = self._clock() - self._opened_mono
        return datetime.now(UTC) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_mono = self._clock()


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, name: str, on_change: StateListener | None) -> None:
        self._name = name
        self._on_change = on_change

    def state_change(self, cb: pybreaker.CircuitBreaker, old: object, new: object) -> None:
        old_name = getattr(old, "name", str(old))
        new_name = getattr(new, "name", str(new))
        log.warning("breaker %s: %s -> %s", self._name, old_name, new_name)
        if self._on_change is not None:
            self._on_change(old_name, new_name)


def _not_a_backend_fault(exc: BaseException) -> bool:
    return not isinstance(exc, ExecutorError)


class BackendBreaker:
    """One breaker for one (model, version, backend)."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        clock: Clock,
        on_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self._reset_timeout = timedelta(seconds=settings.reset_timeout_s)
        self._storage = ClockedStorage(pybreaker.STATE_CLOSED, clock)
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=settings.fail_max,
            reset_timeout=settings.reset_timeout_s,
            success_threshold=settings.success_threshold,
            exclude=[_not_a_backend_fault],
            listeners=[_Listener(name, on_change)],
            state_storage=self._storage,
            name=name,
            throw_new_error_on_trip=False,
        )

    @property
    def state(self) -> str:
        return str(self._breaker.current_state)

    def is_open(self) -> bool:
        """Open and still inside its reset timeout: a call now would fail fast."""
        if self.state != pybreaker.STATE_OPEN:
            return False
        opened = self._storage.opened_at
        return opened is not None and datetime.now(UTC) < opened + self._reset_timeout

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Guard one backend call; an open breaker raises ``BreakerOpenError``."""
        try:
            with self._breaker.calling():
                yield
        except pybreaker.CircuitBreakerError as exc:
            raise BreakerOpenError(
                f"backend {self.name} is failing and its circuit breaker is open; "
                "retry later or use another model version"
            ) from exc

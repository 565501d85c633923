"""Circuit breakers for backends, on pybreaker, driven from asyncio with ``calling()``.

One ``BackendBreaker`` per (model, version, backend). Only backend faults (``ExecutorError``)
count against it; any other error (bad input) counts as a success, as pybreaker treats
excluded errors. Half-open, pybreaker lets every call through; ``calling()`` lets at most
``half_open_max_calls`` trial calls run at once and fails the others fast. The breaker keeps
its state where the server's ``BreakerStore`` says (memory, a state file or Redis; see
``sluice.breaker_state``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pybreaker

from sluice.breaker_state import BreakerStore, MemoryBreakerStore
from sluice.clock import Clock
from sluice.errors import BreakerOpenError, ExecutorError
from sluice.settings import BreakerSettings

log = logging.getLogger(__name__)

StateListener = Callable[[str, str], None]
"""Called with (old state, new state) on every state change."""

STATES = ("closed", "half-open", "open")


class _Gate(enum.Enum):
    """What a call made now would be."""

    PASS = "pass"
    TRIAL = "trial"
    REFUSE = "refuse"


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, name: str, callbacks: Sequence[StateListener]) -> None:
        self._name = name
        self._callbacks = callbacks

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old: pybreaker.CircuitBreakerState | None,
        new: pybreaker.CircuitBreakerState,
    ) -> None:
        old_name = old.name if old is not None else ""
        if old_name == new.name:  # a late trial call settling a state already left
            return
        log.warning("breaker %s: %s -> %s", self._name, old_name, new.name)
        for callback in self._callbacks:
            try:
                callback(old_name, new.name)
            except Exception:  # a listener's bug must not leave the breaker half-updated
                log.exception("breaker %s: a state listener failed", self._name)


def _not_a_backend_fault(exc: BaseException) -> bool:
    return not isinstance(exc, ExecutorError)


class BackendBreaker:
    """One breaker for one (model, version, backend); ``name`` is its key in the store."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        clock: Clock,
        on_change: StateListener | None = None,
        listeners: Sequence[StateListener] = (),
        store: BreakerStore | None = None,
    ) -> None:
        self.name = name
        self._reset_timeout = timedelta(seconds=settings.reset_timeout_s)
        self._half_open_max_calls = settings.half_open_max_calls
        self._trials_in_flight = 0
        bound = (store or MemoryBreakerStore()).bind(
            name, clock=clock, reset_timeout_s=settings.reset_timeout_s
        )
        self._storage = bound.storage
        callbacks: list[StateListener] = [lambda _old, new: bound.record(new)]
        if on_change is not None:
            callbacks.append(on_change)
        callbacks.extend(listeners)
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=settings.fail_max,
            reset_timeout=settings.reset_timeout_s,
            success_threshold=settings.success_threshold,
            exclude=[_not_a_backend_fault],
            listeners=[_Listener(name, callbacks)],
            state_storage=bound.storage,
            name=name,
            throw_new_error_on_trip=False,
        )

    @property
    def state(self) -> str:
        return str(self._breaker.current_state)

    def is_open(self) -> bool:
        """A call now would fail fast: open inside its reset timeout, or half-open with
        every trial slot taken."""
        return self._gate() is _Gate.REFUSE

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Guard one backend call; an open breaker raises ``BreakerOpenError``."""
        gate = self._gate()
        if gate is _Gate.REFUSE:
            raise self._open_error()
        trial = gate is _Gate.TRIAL
        if trial:
            self._trials_in_flight += 1
        try:
            with self._breaker.calling():
                yield
        except pybreaker.CircuitBreakerError as exc:
            raise self._open_error() from exc
        finally:
            if trial:
                self._trials_in_flight -= 1

    def _gate(self) -> _Gate:
        state = self.state
        if state == pybreaker.STATE_CLOSED:
            return _Gate.PASS
        if state == pybreaker.STATE_OPEN and not self._reset_timeout_passed():
            return _Gate.REFUSE
        if self._trials_in_flight >= self._half_open_max_calls:
            return _Gate.REFUSE
        return _Gate.TRIAL

    def _reset_timeout_passed(self) -> bool:
        opened = self._storage.opened_at
        return opened is None or datetime.now(UTC) >= opened + self._reset_timeout

    def _open_error(self) -> BreakerOpenError:
        return BreakerOpenError(
            f"backend {self.name} is failing and its circuit breaker is {self.state}; "
            "retry later or use another model version"
        )

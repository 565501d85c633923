"""Where breaker state lives: in memory, in a JSON state file, or in Redis.

A server opens one store (``open_breaker_store``) and each new ``BackendBreaker`` binds to it
by key (``model/version/backend``), getting the storage pybreaker keeps its state in and a
hook to call on every state change.

- ``MemoryBreakerStore``: nothing outlives the process.
- ``BreakerStateStore``: the latest state of every breaker in one JSON file, rewritten
  atomically on each state change and read back when a breaker is created, so a restart
  does not hammer a backend known to be broken. While running, the open time follows the
  injected monotonic clock; the file keeps it as "opened N seconds before the save" next to
  the wall time of the save, and a restore adds the wall-clock gap since then (never
  negative). An unreadable or corrupt file is logged and ignored.
- ``RedisBreakerStore``: pybreaker's ``CircuitRedisStorage``, so replicas share state.
  pybreaker stamps ``opened_at`` in Redis with the wall clock in whole seconds, so there the
  reset timeout follows the wall clock, not the injected one; every state check is a
  synchronous Redis round trip; the half-open trial bound holds per replica.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import pybreaker
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sluice.clock import Clock, WallClock
from sluice.errors import ConfigError
from sluice.files import write_atomically
from sluice.settings import BreakerSettings

if TYPE_CHECKING:
    import redis  # type: ignore[import-not-found, unused-ignore]

log = logging.getLogger(__name__)

StateName = Literal["closed", "half-open", "open"]


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What a breaker needs to come back as it was."""

    state: StateName
    fail_counter: int
    opened_s_ago: float | None = None
    """Time since the breaker opened (None unless it is open)."""


@dataclass(frozen=True, slots=True)
class BoundState:
    """One breaker's storage, and what to call with each state it moves to."""

    storage: pybreaker.CircuitBreakerStorage
    record: Callable[[str], None]


class BreakerStore(Protocol):
    """Where the breakers of one server keep their state."""

    def bind(self, key: str, *, clock: Clock, reset_timeout_s: float) -> BoundState:
        """Storage for a new breaker, holding the state last known for ``key``."""
        ...


class ClockedStorage(pybreaker.CircuitMemoryStorage):
    """In-memory breaker state whose open time follows an injected monotonic clock.

    pybreaker reads ``opened_at`` as a datetime and compares it with ``datetime.now``; this
    storage derives that datetime from the monotonic time the breaker opened, so a wall
    clock jump cannot hold a breaker open and tests move time without sleeping.
    """

    def __init__(self, state: str, clock: Clock) -> None:
        super().__init__(state)
        self._clock = clock
        self._failures = 0
        self._opened_mono: float | None = None

    @property
    def counter(self) -> int:
        return self._failures

    def increment_counter(self) -> None:
        self._failures += 1

    def reset_counter(self) -> None:
        self._failures = 0

    @property
    def opened_at(self) -> datetime | None:
        if self._opened_mono is None:
            return None
        elapsed = self._clock() - self._opened_mono
        return datetime.now(UTC) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_mono = self._clock()

    def snapshot(self, state: StateName) -> BreakerSnapshot:
        """This storage as its breaker moves to ``state`` (pybreaker tells listeners before
        it stores the new state name, so the caller names it)."""
        opened_s_ago = None
        if state == pybreaker.STATE_OPEN and self._opened_mono is not None:
            opened_s_ago = max(0.0, self._clock() - self._opened_mono)
        return BreakerSnapshot(state, self._failures, opened_s_ago)

    def restore(self, snapshot: BreakerSnapshot, *, reset_timeout_s: float) -> None:
        """Take over a saved state; an open breaker whose reset timeout has passed since
        comes back half-open, ready for a trial call."""
        state: str = snapshot.state
        if state == pybreaker.STATE_OPEN:
            opened_s_ago = snapshot.opened_s_ago or 0.0
            if opened_s_ago >= reset_timeout_s:
                state = pybreaker.STATE_HALF_OPEN
            else:
                self._opened_mono = self._clock() - opened_s_ago
        self.state = state
        self._failures = snapshot.fail_counter


def _forget(_state: str) -> None:
    """State changes of a breaker whose state outlives nothing (or lives in Redis)."""


class MemoryBreakerStore:
    """Breaker state that lives and dies with the process."""

    def bind(self, key: str, *, clock: Clock, reset_timeout_s: float) -> BoundState:
        return BoundState(ClockedStorage(pybreaker.STATE_CLOSED, clock), _forget)


class _Saved(BaseModel):
    model_config = ConfigDict(frozen=True)

    state: StateName
    fail_counter: int = Field(ge=0)
    opened_s_before_save: float | None = Field(None, ge=0)
    saved_at_unix_s: float


class _StateFile(BaseModel):
    format: Literal[1] = 1
    breakers: dict[str, _Saved] = Field(default_factory=dict)


class BreakerStateStore:
    """The latest state of every breaker of one server, kept in one JSON file."""

    def __init__(self, path: Path, *, wall_clock: WallClock = time.time) -> None:
        self.path = path
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._saved = _read(path)

    def bind(self, key: str, *, clock: Clock, reset_timeout_s: float) -> BoundState:
        storage = ClockedStorage(pybreaker.STATE_CLOSED, clock)
        snapshot = self.restore(key)
        if snapshot is not None:
            storage.restore(snapshot, reset_timeout_s=reset_timeout_s)
            log.info("breaker %s: restored %s from %s", key, storage.state, self.path)

        def record(state: str) -> None:
            self.save(key, storage.snapshot(_state_name(state)))

        return BoundState(storage, record)

    def restore(self, key: str) -> BreakerSnapshot | None:
        """The state last saved for ``key``, its open time moved on by the wall-clock time
        since that save."""
        saved = self._saved.get(key)
        if saved is None:
            return None
        opened_s_ago = saved.opened_s_before_save
        if opened_s_ago is not None:
            opened_s_ago += max(0.0, self._wall_clock() - saved.saved_at_unix_s)
        return BreakerSnapshot(saved.state, saved.fail_counter, opened_s_ago)

    def save(self, key: str, snapshot: BreakerSnapshot) -> None:
        """Record ``key``'s state and rewrite the file; a failed write is logged, not raised."""
        with self._lock:
            self._saved[key] = _Saved(
                state=snapshot.state,
                fail_counter=snapshot.fail_counter,
                opened_s_before_save=snapshot.opened_s_ago,
                saved_at_unix_s=self._wall_clock(),
            )
            data = _StateFile(breakers=self._saved).model_dump_json(indent=2).encode()
            try:
                write_atomically(self.path, data)
            except OSError as exc:
                log.warning("cannot write breaker state file %s: %s", self.path, exc)


class RedisBreakerStore:
    """Breaker state in Redis, shared by every replica that uses the same server."""

    def __init__(self, client: redis.Redis, *, errors: type[Exception]) -> None:
        self._client = client
        self._errors = errors

    @classmethod
    def connect(cls, url: str, *, timeout_s: float = 2.0) -> RedisBreakerStore:
        """A store on ``url`` whose commands give up after ``timeout_s``; the ``redis``
        package is imported only here."""
        try:
            import redis  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise ConfigError(
                "breaker.redis_url is set but the 'redis' package is not installed; "
                "install it (pip install redis) or leave breaker.redis_url unset"
            ) from exc
        try:
            client = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
        except ValueError as exc:
            raise ConfigError(f"breaker.redis_url is not a Redis URL: {exc}") from exc
        return cls(client, errors=redis.RedisError)

    def bind(self, key: str, *, clock: Clock, reset_timeout_s: float) -> BoundState:
        try:
            storage = pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED, self._client, namespace=f"sluice:{key}"
            )
        except self._errors as exc:
            log.warning(
                "breaker %s: Redis is unreachable (%s); its state stays in memory", key, exc
            )
            return MemoryBreakerStore().bind(key, clock=clock, reset_timeout_s=reset_timeout_s)
        return BoundState(storage, _forget)


def open_breaker_store(
    settings: BreakerSettings, *, wall_clock: WallClock = time.time
) -> BreakerStore:
    """The one breaker store of a server, as its settings ask."""
    if settings.redis_url is not None and settings.state_file is not None:
        raise ConfigError(
            "breaker.state_file and breaker.redis_url exclude each other: Redis already "
            "keeps breaker state across restarts"
        )
    if settings.redis_url is not None:
        return RedisBreakerStore.connect(settings.redis_url, timeout_s=settings.redis_timeout_s)
    if settings.state_file is not None:
        return BreakerStateStore(settings.state_file, wall_clock=wall_clock)
    return MemoryBreakerStore()


def _state_name(state: str) -> StateName:
    if state == pybreaker.STATE_OPEN:
        return "open"
    if state == pybreaker.STATE_HALF_OPEN:
        return "half-open"
    return "closed"


def _read(path: Path) -> dict[str, _Saved]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("cannot read breaker state file %s (%s); ignoring it", path, exc)
        return {}
    try:
        return dict(_StateFile.model_validate_json(raw).breakers)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        log.warning(
            "breaker state file %s is corrupt (%s: %s); ignoring it", path, where, first["msg"]
        )
        return {}

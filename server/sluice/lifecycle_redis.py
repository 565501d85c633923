"""What each model serves, and its history, shared by replicas through Redis.

With ``lifecycle.redis_url`` every replica keeps, per model, the same two things the file
store keeps (``sluice.lifecycle``), in Redis:

* ``sluice:lifecycle:<model>:history``: a list, one JSON change per entry (``seq``, time,
  action, from, to, who, reason), appended with RPUSH;
* ``sluice:lifecycle:<model>:pointer``: the serving pointer as JSON (serving version, the
  stack a rollback returns to, the ``seq`` and the change last applied).

A change is one optimistic transaction (WATCH the pointer, read it, MULTI, RPUSH the change,
SET the new pointer, EXEC; retried when another replica changed the pointer in between), so
the history and the pointer never disagree and every ``seq`` is used once. A change that
moves the pointer (promote, rollback) applies only if the shared pointer still serves the
version the caller saw (``from_version``): a promote that another replica already made is
taken as done, any other overtaken change is refused and changes nothing.

Each replica serves its own copy of the pointer (``ModelState.pointer``) and brings it up to
the shared one (``shared_pointers``, then ``adopt``) every ``lifecycle.sync_interval_s``;
the replica that made a change applies it at once. A replica that starts later opens each
model on the shared pointer, so it serves the promoted version.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from sluice.errors import ConfigError, UnavailableError
from sluice.lifecycle import (
    Change,
    ModelState,
    Pointer,
    change_from_dict,
    pointer_from_dict,
    pointer_to_dict,
    utc_now,
)
from sluice.settings import LifecycleSettings

if TYPE_CHECKING:
    import redis  # type: ignore[import-not-found, unused-ignore]

log = logging.getLogger(__name__)

KEY_PREFIX = "sluice:lifecycle:"
MOVES_POINTER = ("promote", "rollback")


def pointer_key(model: str) -> str:
    return f"{KEY_PREFIX}{model}:pointer"


def history_key(model: str) -> str:
    return f"{KEY_PREFIX}{model}:history"


class ServingChangedError(ConfigError):
    """The shared serving pointer moved (on another replica) since the caller looked."""


class RedisModelState(ModelState):
    """One model's pointer and history, kept in Redis and shared by every replica."""

    def __init__(self, name: str, store: RedisLifecycleStore) -> None:
        super().__init__(None)
        self._name = name
        self._store = store

    @property
    def history(self) -> list[Change]:
        raw = self._store.call(lambda client: client.lrange(history_key(self._name), 0, -1))
        return [change_from_dict(json.loads(entry), history_key(self._name)) for entry in raw]

    def record(
        self, action: str, *, from_version: str, to_version: str, who: str, reason: str
    ) -> Change:
        """Record the change in Redis (see the module doc), then serve the shared pointer."""
        proposed = Change(0, utc_now(), action, from_version, to_version, who, reason)
        outcome: tuple[Change, Pointer] = self._store.call(
            lambda client: self._transact(client, proposed)
        )
        self.adopt(outcome[1])
        return outcome[0]

    def adopt(self, shared: Pointer) -> None:
        """Serve ``shared`` from now on (it is newer than what this replica serves)."""
        self.pointer = copy.deepcopy(shared)

    def _transact(self, client: redis.Redis, proposed: Change) -> tuple[Change, Pointer]:
        result: tuple[Change, Pointer] | None = None

        def attempt(pipe: Any) -> None:
            nonlocal result
            shared = pointer_from_json(pipe.get(pointer_key(self._name)))
            result = self._apply(pipe, shared, proposed)

        client.transaction(attempt, pointer_key(self._name))
        assert result is not None
        return result

    def _apply(self, pipe: Any, shared: Pointer, proposed: Change) -> tuple[Change, Pointer]:
        if proposed.action in MOVES_POINTER and shared.serving != proposed.from_version:
            if proposed.action == "promote" and shared.serving == proposed.to_version:
                assert shared.last is not None
                return shared.last, shared  # another replica made this very promote
            raise ServingChangedError(
                f"model '{self._name}': its serving version changed on another replica "
                f"meanwhile (it is now {shared.serving or 'none'}, not "
                f"{proposed.from_version or 'none'}); nothing was changed: look at its "
                "history and try again"
            )
        change = dataclasses.replace(proposed, seq=shared.seq + 1)
        moved = copy.deepcopy(shared)
        moved.apply(change)
        pipe.multi()
        pipe.rpush(history_key(self._name), json.dumps(dataclasses.asdict(change)))
        pipe.set(pointer_key(self._name), pointer_to_json(moved))
        return change, moved


class RedisLifecycleStore:
    """The Redis connection behind every model's ``RedisModelState``."""

    def __init__(self, client: redis.Redis, *, errors: type[Exception], sync_interval_s: float):
        self._client = client
        self._errors = errors
        self.sync_interval_s = sync_interval_s

    @classmethod
    def connect(cls, settings: LifecycleSettings) -> RedisLifecycleStore:
        """A store on ``settings.redis_url``; the ``redis`` package is imported only here."""
        assert settings.redis_url is not None
        try:
            import redis  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise ConfigError(
                "lifecycle.redis_url is set but the 'redis' package is not installed; "
                "install it (pip install 'sluice[redis]') or leave lifecycle.redis_url unset"
            ) from exc
        try:
            client = redis.Redis.from_url(
                settings.redis_url,
                socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s,
            )
        except ValueError as exc:
            raise ConfigError(f"lifecycle.redis_url is not a Redis URL: {exc}") from exc
        return cls(client, errors=redis.RedisError, sync_interval_s=settings.sync_interval_s)

    def open(self, name: str) -> RedisModelState:
        """A model's state, serving the shared pointer as it is now."""
        state = RedisModelState(name, self)
        raw = self.call(lambda client: client.get(pointer_key(name)))
        state.adopt(pointer_from_json(raw))
        return state

    def shared_pointers(self, names: Iterable[str]) -> dict[str, Pointer]:
        """The shared pointers of ``names`` (one round trip); a model with none is left out."""
        wanted = list(names)
        if not wanted:
            return {}
        raw = self.call(lambda client: client.mget([pointer_key(name) for name in wanted]))
        found = zip(wanted, raw, strict=True)
        return {name: pointer_from_json(value) for name, value in found if value}

    def call(self, command: Any) -> Any:
        """Run ``command(client)``; Redis being unreachable is UNAVAILABLE to the caller."""
        try:
            return command(self._client)
        except self._errors as exc:
            raise UnavailableError(
                f"the shared lifecycle state (Redis) cannot be reached: {exc}; nothing was "
                "changed, try again"
            ) from exc

    def close(self) -> None:
        self._client.close()


def pointer_to_json(pointer: Pointer) -> str:
    return json.dumps(pointer_to_dict(pointer))


def pointer_from_json(raw: bytes | str | None) -> Pointer:
    return pointer_from_dict(json.loads(raw), "the shared pointer") if raw else Pointer()


class PointerFollower:
    """Brings this replica's serving pointers up to the shared ones, every
    ``sync_interval_s``: ``on_newer(model, shared)`` is awaited for each model whose shared
    pointer has a later change than the one served here."""

    def __init__(
        self,
        store: RedisLifecycleStore,
        *,
        served: Callable[[], dict[str, Pointer]],
        on_newer: Callable[[str, Pointer], Awaitable[None]],
    ) -> None:
        self._store = store
        self._served = served
        self._on_newer = on_newer
        self._reachable = True

    async def run(self) -> None:
        """Follow until cancelled."""
        while True:
            await asyncio.sleep(self._store.sync_interval_s)
            await self.sync_once()

    async def sync_once(self) -> None:
        served = self._served()
        try:
            shared = await asyncio.to_thread(self._store.shared_pointers, list(served))
        except UnavailableError as exc:
            if self._reachable:
                log.warning("cannot follow the shared serving pointers: %s", exc.message)
            self._reachable = False
            return
        if not self._reachable:
            log.info("following the shared serving pointers again")
            self._reachable = True
        for name, pointer in shared.items():
            if pointer.seq > served[name].seq:
                await self._on_newer(name, pointer)

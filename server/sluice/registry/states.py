"""Where each model's serving pointer and history live (``lifecycle.ModelState``): opened
once per model and kept across reloads of it; with ``lifecycle.redis_url``, shared by the
replicas (``lifecycle_redis``), each following what the others change."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from sluice.errors import ConfigError
from sluice.lifecycle import ModelState, Pointer
from sluice.lifecycle_redis import PointerFollower, RedisLifecycleStore
from sluice.repository import EXAMPLE_REPOSITORY, STATE_FOLDER
from sluice.settings import Settings


class ModelStates:
    def __init__(self, root: Path | None, *, shared: RedisLifecycleStore | None = None) -> None:
        """``root`` None keeps every model's state in memory only; ``shared`` keeps it in
        Redis for every replica instead."""
        self._root = root
        self._shared = shared
        self._states: dict[str, ModelState] = {}

    @classmethod
    def from_settings(cls, settings: Settings, repository: Path) -> ModelStates:
        shared = None
        if settings.lifecycle.redis_url is not None:
            shared = RedisLifecycleStore.connect(settings.lifecycle)
        return cls(state_root(settings, repository), shared=shared)

    def get(self, name: str) -> ModelState:
        """The model's state, read (and recovered) from its folder (or from Redis) the first
        time."""
        state = self._states.get(name)
        if state is None and self._shared is not None:
            state = self._states[name] = self._shared.open(name)
        if state is None:
            directory = None if self._root is None else self._root / name
            try:
                state = ModelState.open(directory)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"model '{name}': its state in {directory} is unreadable: {exc}"
                ) from exc
            self._states[name] = state
        return state

    def following(
        self,
        served: Callable[[], dict[str, Pointer]],
        on_newer: Callable[[str, Pointer], Awaitable[None]],
    ) -> Coroutine[Any, Any, None] | None:
        """What keeps this replica's pointers up to the shared ones (to run as a task), or
        None when nothing is shared."""
        if self._shared is None:
            return None
        return PointerFollower(self._shared, served=served, on_newer=on_newer).run()

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()


def state_root(settings: Settings, repository: Path) -> Path | None:
    """Where serving pointers and histories live: the configured directory, else
    ``.sluice/`` in a configured model repository; the bundled examples keep them in memory
    (the package's folder is no place for run-time state)."""
    if settings.lifecycle.state_dir is not None:
        return settings.lifecycle.state_dir
    if repository.resolve() == EXAMPLE_REPOSITORY.resolve():
        return None
    return repository / STATE_FOLDER

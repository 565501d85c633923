"""Where each model's serving pointer and history live (``lifecycle.ModelState``): opened
once per model and kept across reloads of it."""

from __future__ import annotations

from pathlib import Path

from sluice.errors import ConfigError
from sluice.lifecycle import ModelState
from sluice.repository import EXAMPLE_REPOSITORY, STATE_FOLDER
from sluice.settings import Settings


class ModelStates:
    def __init__(self, root: Path | None) -> None:
        """``root`` None keeps every model's state in memory only."""
        self._root = root
        self._states: dict[str, ModelState] = {}

    def get(self, name: str) -> ModelState:
        """The model's state, read (and recovered) from its folder the first time."""
        state = self._states.get(name)
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


def state_root(settings: Settings, repository: Path) -> Path | None:
    """Where serving pointers and histories live: the configured directory, else
    ``.sluice/`` in a configured model repository; the bundled examples keep them in memory
    (the package's folder is no place for run-time state)."""
    if settings.lifecycle.state_dir is not None:
        return settings.lifecycle.state_dir
    if repository.resolve() == EXAMPLE_REPOSITORY.resolve():
        return None
    return repository / STATE_FOLDER

"""Backends by name, and the choice of one for a model version's folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sluice.errors import ConfigError
from sluice.executors.base import ExecutorFactory
from sluice.executors.onnxruntime import OnnxRuntimeFactory


class BackendRegistry:
    """Ordered backends: the first one that finds its file in a version folder wins."""

    def __init__(self, factories: Iterable[ExecutorFactory]) -> None:
        self._factories = {factory.backend: factory for factory in factories}

    @classmethod
    def default(cls) -> BackendRegistry:
        return cls([OnnxRuntimeFactory()])

    @property
    def backends(self) -> list[str]:
        return list(self._factories)

    def select(self, version_dir: Path, forced: str | None = None) -> tuple[ExecutorFactory, Path]:
        if forced is not None:
            factory = self._factories.get(forced)
            if factory is None:
                raise ConfigError(
                    f"{version_dir}: backend '{forced}' is unknown; known: {self.backends}"
                )
            candidates = [factory]
        else:
            candidates = list(self._factories.values())
        for factory in candidates:
            path = factory.find(version_dir)
            if path is not None:
                return factory, path
        names = sorted({name for f in candidates for name in f.filenames})
        raise ConfigError(f"{version_dir}: no model file found (looked for {', '.join(names)})")

"""Backends by name, and the choice of one for a model version's folder."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from sluice.errors import ConfigError
from sluice.executors.base import ExecutorFactory
from sluice.executors.capabilities import BackendPlan, Capabilities, rank_backends
from sluice.executors.onnxruntime import OnnxRuntimeFactory


class BackendRegistry:
    """Ordered backends: the first one that finds its file in a version folder wins."""

    def __init__(self, factories: Iterable[ExecutorFactory]) -> None:
        self._factories = {factory.backend: factory for factory in factories}

    @classmethod
    def default(cls) -> BackendRegistry:
        """ONNX Runtime always; PyTorch and TensorRT (whose buffers are torch tensors) where
        torch is installed, and causal LMs where safetensors and tokenizers are too. TensorRT
        itself is imported only when a plan is loaded."""
        factories: list[ExecutorFactory] = [OnnxRuntimeFactory()]
        if importlib.util.find_spec("torch") is not None:
            from sluice.executors.pytorch import PyTorchFactory
            from sluice.executors.tensorrt import TensorRTFactory

            factories += [PyTorchFactory(), TensorRTFactory()]
            if all(importlib.util.find_spec(m) for m in ("safetensors", "tokenizers")):
                from sluice.executors.causal_lm import CausalLMFactory

                factories.append(CausalLMFactory())
        return cls(factories)

    @property
    def backends(self) -> list[str]:
        return list(self._factories)

    def factory(self, backend: str) -> ExecutorFactory:
        found = self._factories.get(backend)
        if found is None:
            raise ConfigError(f"backend '{backend}' is unknown; known: {self.backends}")
        return found

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

    def plan(
        self,
        version_dir: Path,
        capabilities: Capabilities,
        *,
        forced: str | None = None,
        forced_by: str = "the model config",
    ) -> BackendPlan:
        """The capability ladder's candidates for a version folder, best first (registered
        backends the ladder does not rank come last); raises when none can serve it here,
        naming why each rung was passed over."""
        artifacts = {
            backend: factory.find(version_dir) for backend, factory in self._factories.items()
        }
        plan = rank_backends(capabilities, artifacts, forced=forced, forced_by=forced_by)
        if not plan.candidates:
            raise ConfigError(
                f"{version_dir}: no backend can serve this version here: "
                + "; ".join(plan.passed_over)
            )
        return plan

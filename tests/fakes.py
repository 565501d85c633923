"""A controllable executor for scheduling tests (never used to claim a backend works)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from sluice.errors import ExecutorError, InvalidInputError
from sluice.executors.base import DeclaredTensor, Executor, ExecutorFactory, LoadOptions
from sluice.executors.registry import BackendRegistry
from sluice.tensors import Array

POISON = -999.0


@dataclass
class Behaviour:
    """What the fake backend does; tests flip these while the server runs."""

    fail: bool = False
    gate: asyncio.Event | None = None
    batches: list[int] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def calls(self) -> int:
        return len(self.batches)

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()


class FakeExecutor(Executor):
    """Doubles ``x`` (FP32 [batch, 4]) into ``y``; rows equal to POISON are bad input."""

    backend: ClassVar[str] = "fake"

    def __init__(self, behaviour: Behaviour) -> None:
        self._behaviour = behaviour

    @property
    def inputs(self) -> Sequence[DeclaredTensor]:
        return (DeclaredTensor("x", "FP32", (-1, 4)),)

    @property
    def outputs(self) -> Sequence[DeclaredTensor]:
        return (DeclaredTensor("y", "FP32", (-1, 4)),)

    @property
    def device(self) -> str:
        return "cpu"

    async def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        b = self._behaviour
        x = inputs["x"]
        b.batches.append(int(x.shape[0]))
        b.started.set()
        if b.gate is not None:
            await b.gate.wait()
        if b.fail:
            raise ExecutorError("fake backend fault")
        if np.any(x == POISON):
            raise InvalidInputError("fake backend: poison value in the batch")
        return {"y": x * 2}

    async def close(self) -> None:
        return None


class FakeFactory(ExecutorFactory):
    backend: ClassVar[str] = "fake"
    filenames: ClassVar[tuple[str, ...]] = ("model.fake",)

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour

    def load(self, path: Path, options: LoadOptions) -> Executor:
        return FakeExecutor(self.behaviour)


def fake_repository(root: Path, config: str = "") -> Path:
    """A repository with one model ``fake`` (version 1) served by the fake backend."""
    (root / "fake" / "1").mkdir(parents=True)
    (root / "fake" / "1" / "model.fake").write_text("fake\n")
    if config:
        (root / "fake" / "config.yaml").write_text(config)
    return root


def fake_backends(behaviour: Behaviour) -> BackendRegistry:
    return BackendRegistry([FakeFactory(behaviour)])

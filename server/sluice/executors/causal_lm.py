"""Causal language models in PyTorch: a Hugging Face-format folder (``config.json``,
``*.safetensors``, ``tokenizer.json``) served by the continuous batcher: the generation
backend.

The executor loads the model and its tokenizer; ``start_engine`` puts a
``ContinuousBatcher`` (its own engine thread) in front of them, wrapped in a
``FaultyEngine`` when the model's config injects faults. Every generation of the version
runs through that engine, seen from outside only as a ``GenerationEngine``. ``run``, the
tensor interface every executor has, takes the tensors Triton's generation tools send
(``generation.text``) and answers ``text_output`` with the whole generation, so warm-up
inferences and health probes work on generation models too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from sluice.errors import ConfigError, SluiceError
from sluice.executors.base import (
    DeclaredTensor,
    EngineOptions,
    Executor,
    ExecutorFactory,
    LoadOptions,
)
from sluice.executors.faults import FaultyEngine
from sluice.generation.causal_lm import CausalLM
from sluice.generation.engine import GenerationEngine
from sluice.generation.scheduler import ContinuousBatcher
from sluice.generation.text import TEXT_INPUT, TEXT_OUTPUT, generate_text, text_output
from sluice.generation.tokenizer import TOKENIZER_FILE, Tokenizer
from sluice.tensors import Array

log = logging.getLogger(__name__)

#: The tensors of the generation interface: Triton's names where its tools have one.
INPUTS: tuple[DeclaredTensor, ...] = (
    DeclaredTensor(TEXT_INPUT, "BYTES", (1,)),
    DeclaredTensor("max_tokens", "INT32", (1,), optional=True),
    DeclaredTensor("stream", "BOOL", (1,), optional=True),
    DeclaredTensor("temperature", "FP32", (1,), optional=True),
    DeclaredTensor("top_k", "INT32", (1,), optional=True),
    DeclaredTensor("top_p", "FP32", (1,), optional=True),
    DeclaredTensor("repetition_penalty", "FP32", (1,), optional=True),
    DeclaredTensor("seed", "UINT64", (1,), optional=True),
)
OUTPUTS: tuple[DeclaredTensor, ...] = (DeclaredTensor(TEXT_OUTPUT, "BYTES", (1,)),)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMExecutor(Executor):
    backend: ClassVar[str] = "causal_lm"

    def __init__(self, lm: CausalLM, tokenizer: Tokenizer, *, default_max_new_tokens: int) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self._default_max_new_tokens = default_max_new_tokens
        self._engine: GenerationEngine | None = None

    @property
    def inputs(self) -> Sequence[DeclaredTensor]:
        return INPUTS

    @property
    def outputs(self) -> Sequence[DeclaredTensor]:
        return OUTPUTS

    @property
    def device(self) -> str:
        return str(self.lm.device)

    def start_engine(self, options: EngineOptions) -> GenerationEngine:
        """Put the continuous batcher in front of the model (on the running event loop)."""
        engine: GenerationEngine = ContinuousBatcher(
            self.lm, self.tokenizer, name=options.name, limits=options.limits, clock=options.clock
        )
        if options.faults is not None:
            log.warning("model %s: injecting faults %s", options.name, options.faults)
            engine = FaultyEngine(engine, options.faults)
        engine.start()
        self._engine = engine
        return engine

    async def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """The whole generation for one request's tensors (no batch dimension)."""
        if self._engine is None:
            raise SluiceError("the generation engine is not started")
        return await generate_text(
            self._engine,
            inputs,
            default_max_new_tokens=self._default_max_new_tokens,
            deadline=None,
        )

    def probe_inputs(self) -> dict[str, Array]:
        """One token for a short prompt."""
        return {TEXT_INPUT: text_output("Hello"), "max_tokens": np.array([1], dtype=np.int32)}

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.close()
            self._engine = None


class CausalLMFactory(ExecutorFactory):
    backend: ClassVar[str] = "causal_lm"
    filenames: ClassVar[tuple[str, ...]] = ("config.json",)

    def find(self, version_dir: Path) -> Path | None:
        """A Hugging Face-format folder: ``config.json`` beside ``tokenizer.json``."""
        found = super().find(version_dir)
        return found if found is not None and (version_dir / TOKENIZER_FILE).is_file() else None

    def load(self, path: Path, options: LoadOptions) -> CausalLMExecutor:
        model_dir = path.parent
        settings = options.generation
        device = options.device or "cpu"
        try:
            lm = CausalLM.load(model_dir, dtype=_DTYPES[settings.dtype], device=device)
        except SluiceError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"{model_dir}: the model does not load: {exc}") from exc
        tokenizer = Tokenizer.load(model_dir)
        if tokenizer.vocab_size > lm.config.vocab_size:
            raise ConfigError(
                f"{model_dir / TOKENIZER_FILE}: {tokenizer.vocab_size} tokens, more than the "
                f"model's vocab_size {lm.config.vocab_size}"
            )
        log.info(
            "causal LM %s: %s, %d layers, context %d, %s on %s",
            model_dir,
            lm.config.architecture,
            lm.config.num_layers,
            lm.max_context,
            settings.dtype,
            device,
        )
        return CausalLMExecutor(
            lm, tokenizer, default_max_new_tokens=settings.default_max_new_tokens
        )

"""Causal language models in PyTorch: a Hugging Face-format folder (``config.json``,
``*.safetensors``, ``tokenizer.json``) served by the continuous batcher.

The executor loads the model and its tokenizer; ``start`` puts a ``ContinuousBatcher`` (its
own engine thread) in front of them. Streams (``sluice.v1`` Generate, decoupled
ModelStreamInfer) use the batcher directly; ``run``, the tensor interface every executor has,
takes the tensors Triton's generation tools send (``text_input``, ``max_tokens``, ...) and
answers ``text_output`` with the whole generation, so ModelInfer and health probes work on
generation models too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from sluice.admission import Ticket
from sluice.errors import ConfigError, InvalidInputError, SluiceError
from sluice.executors.base import DeclaredTensor, Executor, ExecutorFactory, LoadOptions
from sluice.executors.faults import FaultConfig
from sluice.generation.causal_lm import CausalLM
from sluice.generation.sampling import SamplingParams
from sluice.generation.scheduler import Clock, ContinuousBatcher, SchedulerLimits
from sluice.generation.tokenizer import TOKENIZER_FILE, Tokenizer
from sluice.tensors import Array

log = logging.getLogger(__name__)

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"

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


@dataclass(frozen=True, slots=True)
class TextRequest:
    prompt: str
    params: SamplingParams
    stream: bool


def text_request(inputs: Mapping[str, Array], *, default_max_new_tokens: int) -> TextRequest:
    """Read the generation interface's tensors (each one element, any shape)."""

    def scalar(name: str) -> Any:
        array = inputs.get(name)
        if array is None:
            return None
        if array.size != 1:
            raise InvalidInputError(f"input '{name}' must hold one element, got {array.size}")
        return array.reshape(-1)[0]

    raw = scalar(TEXT_INPUT)
    if not isinstance(raw, bytes):
        raise InvalidInputError(f"input '{TEXT_INPUT}' must be one BYTES element (the prompt)")
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"input '{TEXT_INPUT}' is not UTF-8 text: {exc}") from exc
    values = {
        name: value
        for name in ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
        if (value := scalar(name)) is not None
    }
    params = SamplingParams(
        max_new_tokens=_number(values, "max_tokens", int, default_max_new_tokens),
        temperature=_number(values, "temperature", float, 0.0),
        top_k=_number(values, "top_k", int, 0),
        top_p=_number(values, "top_p", float, 1.0),
        repetition_penalty=_number(values, "repetition_penalty", float, 1.0),
        seed=_number(values, "seed", int, None),
    )
    stream = scalar("stream")
    return TextRequest(prompt, params, bool(stream) if stream is not None else False)


def _number(values: Mapping[str, Any], name: str, kind: type[Any], default: Any) -> Any:
    """One sampling input as ``kind`` (int or float), or ``InvalidInputError``."""
    if name not in values:
        return default
    value = values[name]
    if isinstance(value, bytes | str) or (kind is int and isinstance(value, float)):
        raise InvalidInputError(f"input '{name}' must be a number, got {str(value)[:40]!r}")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"input '{name}' must be a number: {exc}") from exc


def text_output(text: str) -> Array:
    array = np.empty((1,), dtype=object)
    array[0] = text.encode("utf-8")
    return array


async def generate_text(
    generator: ContinuousBatcher,
    inputs: Mapping[str, Array],
    *,
    default_max_new_tokens: int,
    deadline: float | None,
    ticket: Ticket | None = None,
) -> dict[str, Array]:
    """The whole generation for one request's tensors, as ``text_output``; its tokens are
    added to the call's admission ``ticket`` before it is queued."""
    request = text_request(inputs, default_max_new_tokens=default_max_new_tokens)
    prompt_ids = await generator.encode_prompt(request.prompt)
    generator.check_fits(len(prompt_ids), request.params.max_new_tokens)
    if ticket is not None:
        ticket.need(tokens=len(prompt_ids) + request.params.max_new_tokens)
    async with generator.submit(prompt_ids, request.params, deadline=deadline) as stream:
        text = "".join([chunk.text async for chunk in stream])
    return {TEXT_OUTPUT: text_output(text)}


class CausalLMExecutor(Executor):
    backend: ClassVar[str] = "causal_lm"

    def __init__(self, lm: CausalLM, tokenizer: Tokenizer, *, default_max_new_tokens: int) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self._default_max_new_tokens = default_max_new_tokens
        self.generator: ContinuousBatcher | None = None

    @property
    def inputs(self) -> Sequence[DeclaredTensor]:
        return INPUTS

    @property
    def outputs(self) -> Sequence[DeclaredTensor]:
        return OUTPUTS

    @property
    def device(self) -> str:
        return str(self.lm.device)

    def start(
        self,
        *,
        name: str,
        limits: SchedulerLimits,
        faults: FaultConfig | None,
        clock: Clock = time.monotonic,
    ) -> ContinuousBatcher:
        """Put the continuous batcher in front of the model (on the running event loop)."""
        self.generator = ContinuousBatcher(
            self.lm, self.tokenizer, name=name, limits=limits, faults=faults, clock=clock
        )
        self.generator.start(asyncio.get_running_loop())
        return self.generator

    async def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """The whole generation for one request's tensors (no batch dimension)."""
        if self.generator is None:
            raise SluiceError("the generation engine is not started")
        return await generate_text(
            self.generator,
            inputs,
            default_max_new_tokens=self._default_max_new_tokens,
            deadline=None,
        )

    def probe_inputs(self) -> dict[str, Array]:
        """One token for a short prompt."""
        return {TEXT_INPUT: text_output("Hello"), "max_tokens": np.array([1], dtype=np.int32)}

    async def close(self) -> None:
        if self.generator is not None:
            await self.generator.close()
            self.generator = None


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

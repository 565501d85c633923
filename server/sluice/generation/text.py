"""A generation model's tensor interface: Triton's names for its inputs (``text_input``,
``max_tokens``, ``stream``, sampling values) and its output (``text_output``), and the whole
generation for one request's tensors.

This is how ModelInfer, decoupled ModelStreamInfer and health probes reach a generation
model; it needs no torch (it drives any ``GenerationEngine``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sluice.domain import Budget, SamplingParams
from sluice.errors import InvalidInputError
from sluice.generation.engine import GenerationEngine
from sluice.tensors import Array

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"


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
    engine: GenerationEngine,
    inputs: Mapping[str, Array],
    *,
    default_max_new_tokens: int,
    deadline: float | None,
    ticket: Budget | None = None,
) -> dict[str, Array]:
    """The whole generation for one request's tensors, as ``text_output``; its tokens are
    added to the call's admission ``ticket`` before it is queued."""
    request = text_request(inputs, default_max_new_tokens=default_max_new_tokens)
    prompt_ids = await engine.encode(request.prompt)
    engine.check_fits(len(prompt_ids), request.params.max_new_tokens)
    if ticket is not None:
        ticket.need(tokens=len(prompt_ids) + request.params.max_new_tokens)
    async with engine.submit(prompt_ids, request.params, deadline=deadline) as stream:
        text = "".join([chunk.text async for chunk in stream])
    return {TEXT_OUTPUT: text_output(text)}

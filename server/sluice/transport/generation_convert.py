"""Protobuf <-> domain conversions for the sluice.v1 generation API."""

from __future__ import annotations

from sluice.dataplane import ServedGeneration
from sluice.domain import Chunk, FinishReason, GenerationRequest, SamplingParams
from sluice_api.sluice.v1 import generation_service_pb2 as gen

FINISH_REASONS = {
    FinishReason.STOP: gen.FINISH_REASON_STOP,
    FinishReason.LENGTH: gen.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: gen.FINISH_REASON_CANCELLED,
}


def sampling_params(msg: gen.SamplingParameters, *, default_max_new_tokens: int) -> SamplingParams:
    """Proto3 zeros mean "not set": each takes the default that turns its feature off."""
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens or default_max_new_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p or 1.0,
        repetition_penalty=msg.repetition_penalty or 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_sequences=tuple(msg.stop_sequences),
        stop_token_ids=tuple(msg.stop_token_ids),
    )


def generation_request(
    msg: gen.GenerateRequest, *, default_max_new_tokens: int, request_id: str = ""
) -> GenerationRequest:
    return GenerationRequest(
        model=msg.model_name,
        version=msg.model_version,
        prompt=msg.prompt,
        params=sampling_params(msg.parameters, default_max_new_tokens=default_max_new_tokens),
        id=request_id,
    )


def generate_response(generation: ServedGeneration, chunk: Chunk | None) -> gen.GenerateResponse:
    """One chunk; ``None`` (or a chunk that ends the generation) makes the last message,
    with the finish reason and usage."""
    response = gen.GenerateResponse(
        model_name=generation.spec.name,
        model_version=generation.spec.version,
        fallback_reason=generation.fallback_reason,
    )
    if chunk is not None:
        response.text = chunk.text
        response.token_ids.append(chunk.token_id)
    reason = generation.finish_reason if chunk is None else chunk.finish_reason
    if reason is not None:
        response.finish_reason = FINISH_REASONS[reason]
        response.usage.prompt_tokens = generation.prompt_tokens
        response.usage.completion_tokens = generation.completion_tokens
    return response

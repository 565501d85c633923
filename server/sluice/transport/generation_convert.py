"""Protobuf <-> domain conversions for the sluice.v1 generation API."""

from __future__ import annotations

from sluice.dataplane import Generation
from sluice.domain import NO_TOKEN, Chunk, FinishReason, GenerationRequest, SamplingParams
from sluice_api.sluice.v1 import generation_service_pb2 as gen
from sluice_client.names import CACHE_KEY, DEGRADED_KEY, ENDPOINT_KEY

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


def generate_response(generation: Generation, chunk: Chunk | None) -> gen.GenerateResponse:
    """One chunk; ``None`` (or a chunk that ends the generation) makes the last message,
    with the finish reason and usage."""
    response = gen.GenerateResponse(
        model_name=generation.spec.name,
        model_version=generation.spec.version,
        fallback_reason=generation.fallback_reason,
    )
    if chunk is not None:
        response.text = chunk.text
        if chunk.token_id != NO_TOKEN:
            response.token_ids.append(chunk.token_id)
    reason = generation.finish_reason if chunk is None else chunk.finish_reason
    if reason is not None:
        response.finish_reason = FINISH_REASONS[reason]
        response.usage.prompt_tokens = generation.prompt_tokens
        response.usage.completion_tokens = generation.completion_tokens
    return response


def generation_trailers(generation: Generation) -> tuple[tuple[str, str], ...]:
    """A cache hit's mark, a degraded answer's and a remote candidate's endpoint, as
    trailing metadata."""
    marks: tuple[tuple[str, str], ...] = ((CACHE_KEY, "hit"),) if generation.cached else ()
    if generation.degraded:
        marks = (*marks, (DEGRADED_KEY, generation.degraded))
    if generation.endpoint:
        marks = (*marks, (ENDPOINT_KEY, generation.endpoint))
    return marks

"""One request's output: generated tokens -> text chunks and a finish reason; and
``generate``, one sequence on its own (the reference a batched run must reproduce)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sluice.domain import Chunk, FinishReason, SamplingParams
from sluice.errors import InvalidInputError
from sluice.generation.causal_lm import CausalLM
from sluice.generation.sampling import TokenSampler
from sluice.generation.stopping import StopSequences
from sluice.generation.tokenizer import Tokenizer


def check_fits(prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
    """Refuse a request whose prompt and output cannot fit the context, naming the numbers."""
    if prompt_tokens + max_new_tokens > max_context:
        raise InvalidInputError(
            f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} tokens do not fit the model's context of "
            f"{max_context}"
        )


class SequenceOutput:
    """Turns one request's generated tokens into chunks, and decides when it is done."""

    def __init__(
        self, tokenizer: Tokenizer, params: SamplingParams, *, prompt_ids: Sequence[int]
    ) -> None:
        self._stop_ids = tokenizer.eos_token_ids | frozenset(params.stop_token_ids)
        self._detokenizer = tokenizer.detokenizer(prompt_ids)
        self._stops = StopSequences(params.stop_sequences)
        self._max_new_tokens = params.max_new_tokens
        self.generated = 0
        self.finish_reason: FinishReason | None = None

    def add(self, token_id: int) -> Chunk:
        if self.finish_reason is not None:
            raise ValueError("the sequence has already finished")
        self.generated += 1
        if token_id in self._stop_ids:
            return self._finish(token_id, FinishReason.STOP, self._tail())
        text, stopped = self._stops.push(self._detokenizer.push(token_id))
        if stopped:
            return self._finish(token_id, FinishReason.STOP, text)
        if self.generated >= self._max_new_tokens:
            return self._finish(token_id, FinishReason.LENGTH, text + self._tail())
        return Chunk(text, token_id)

    def _finish(self, token_id: int, reason: FinishReason, text: str) -> Chunk:
        self.finish_reason = reason
        return Chunk(text, token_id, reason)

    def _tail(self) -> str:
        """What is still held back, now that no token follows."""
        text, stopped = self._stops.push(self._detokenizer.flush())
        return text if stopped else text + self._stops.flush()


def generate(
    lm: CausalLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams
) -> Iterator[Chunk]:
    """Generate for one sequence alone, a chunk per token; its cache is released when the
    iterator finishes or is closed."""
    check_fits(len(prompt_ids), params.max_new_tokens, lm.max_context)
    logits, cache = lm.prefill(prompt_ids)
    try:
        sampler = TokenSampler(
            params, prompt_ids=prompt_ids, vocab_size=lm.config.vocab_size, device=str(lm.device)
        )
        output = SequenceOutput(tokenizer, params, prompt_ids=prompt_ids)
        while True:
            chunk = output.add(sampler.sample(logits))
            yield chunk
            if chunk.finish_reason is not None:
                return
            logits = lm.decode([(chunk.token_id, cache)])[0]
    finally:
        cache.release()

"""How a request's next token is chosen, and when its generation stops.

The order matches Hugging Face's ``generate``: repetition penalty, then (unless greedy)
temperature, top-k, top-p, and a draw from the request's own seeded ``torch.Generator``,
so a request with a seed gets the same tokens from the same logits every time.

The draw is an exponential race: the token maximising ``p / E`` with ``E ~ Exp(1)`` drawn
per token is distributed exactly as ``p``. Each request draws its own noise from its own
generator, and the arithmetic runs for all the sequences of a decode step at once
(``sample_many``), so batching changes neither the tokens nor what a seed means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sluice.domain import SamplingParams


class TokenSampler:
    """Chooses one request's tokens, one step at a time."""

    def __init__(
        self, params: SamplingParams, *, prompt_ids: Sequence[int], vocab_size: int, device: str
    ) -> None:
        self._params = params
        self._generator = torch.Generator(device=device)
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)
        self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self._seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True

    @property
    def params(self) -> SamplingParams:
        return self._params

    def sample(self, logits: Tensor) -> int:
        """The next token for ``[vocab]`` logits; remembers it for the repetition penalty."""
        return sample_many([self], logits[None])[0]

    def _penalized(self, scores: Tensor) -> Tensor:
        if self._params.repetition_penalty == 1:
            return scores
        return _penalize_repeats(scores, self._seen, self._params.repetition_penalty)

    def _filtered(self, scores: Tensor) -> Tensor:
        """Temperature-scaled ``scores`` with top-k / top-p applied."""
        if self._params.top_k:
            scores = _keep_top_k(scores, self._params.top_k)
        if self._params.top_p < 1:
            scores = _keep_top_p(scores, self._params.top_p)
        return scores

    def _draw(self, noise: Tensor) -> None:
        """Fill ``noise`` (one row) with this request's next exponential draws."""
        noise.exponential_(generator=self._generator)

    def _remember(self, token: int) -> None:
        if self._params.repetition_penalty != 1:
            self._seen[token] = True


def sample_many(samplers: Sequence[TokenSampler], logits: Tensor) -> list[int]:
    """The next token of each sequence: row ``i`` of ``[n, vocab]`` logits with
    ``samplers[i]``; the same tokens as ``samplers[i].sample(logits[i])`` one at a time."""
    scores = logits.float()
    if any(s.params.repetition_penalty != 1 for s in samplers):
        scores = torch.stack([s._penalized(row) for s, row in zip(samplers, scores, strict=True)])
    tokens = [0] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    if greedy:
        for i, token in zip(greedy, scores[greedy].argmax(dim=-1).tolist(), strict=True):
            tokens[i] = token
    drawn = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if drawn:
        temperatures = torch.tensor(
            [samplers[i].params.temperature for i in drawn], device=scores.device
        )
        scaled = (scores if len(drawn) == len(samplers) else scores[drawn]) / temperatures[:, None]
        if any(samplers[i].params.top_k or samplers[i].params.top_p < 1 for i in drawn):
            scaled = torch.stack(
                [samplers[i]._filtered(row) for i, row in zip(drawn, scaled, strict=True)]
            )
        probabilities = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probabilities)
        for row, i in enumerate(drawn):
            samplers[i]._draw(noise[row])
        for i, token in zip(drawn, (probabilities / noise).argmax(dim=-1).tolist(), strict=True):
            tokens[i] = token
    for sampler, token in zip(samplers, tokens, strict=True):
        sampler._remember(token)
    return tokens


def _penalize_repeats(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalized, scores)


def _keep_top_k(scores: Tensor, k: int) -> Tensor:
    if k >= scores.shape[-1]:
        return scores
    threshold = torch.topk(scores, k).values[-1]
    return scores.masked_fill(scores < threshold, -math.inf)


def _keep_top_p(scores: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    ordered, indices = torch.sort(scores, descending=True)
    probabilities = torch.softmax(ordered, dim=-1)
    before = torch.cumsum(probabilities, dim=-1) - probabilities
    drop = torch.zeros_like(scores, dtype=torch.bool)
    drop[indices] = before >= p
    return scores.masked_fill(drop, -math.inf)

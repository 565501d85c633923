"""How a request's next token is chosen, and when its generation stops.

The order matches Hugging Face's ``generate``: repetition penalty, then (unless greedy)
temperature, top-k, top-p, and a draw from the request's own seeded generator, so a request
with a seed gets the same tokens from the same logits every time.

The draw inverts the cumulative distribution: one uniform number ``u`` per token, and the
token is the first whose cumulative probability exceeds ``u`` times the total. Each request
draws ``u`` from its own ``random.Random`` (seeded with the request's ``seed``, or from the
operating system's entropy without one), and the arithmetic runs for all the sequences of a
decode step at once (``sample_many``), so batching changes neither the tokens nor what a
seed means (on a GPU the logits themselves may differ in their last bits with the batch, as
matrix kernels do). The exponential race this replaced drew one number per vocabulary entry
per token, one torch call per sequence (about 660 us per sequence and token at 32,000
entries on this project's CPU); what is left to grow with the vocabulary is one softmax and
one sum over the step's rows (bench/README.md, "Sampling").
"""

from __future__ import annotations

import math
import random
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
        # No seed: random.Random seeds itself from the operating system's entropy.
        self._random = random.Random(params.seed)
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

    def _uniform(self) -> float:
        """This request's next uniform number in [0, 1)."""
        return self._random.random()

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
        uniforms = [samplers[i]._uniform() for i in drawn]
        for i, token in zip(drawn, _inverse_cdf(scaled, uniforms).tolist(), strict=True):
            tokens[i] = token
    for sampler, token in zip(samplers, tokens, strict=True):
        sampler._remember(token)
    return tokens


def _inverse_cdf(scores: Tensor, uniforms: Sequence[float]) -> Tensor:
    """Row ``i``'s token for the uniform number ``uniforms[i]`` in [0, 1): the first whose
    cumulative probability (summed in float64) exceeds ``uniforms[i]`` times the row's
    total.

    A token of probability zero (filtered out, or too unlikely for a float) adds nothing to
    the sum and so is never chosen, the tokens after the last likely one included: ``u``
    times the total, rounded, stays below the total for every ``u`` below 1.

    A row with no finite distribution (an infinite score, from a temperature so small that
    dividing by it overflows or from a model that overflowed; NaN from a broken model)
    takes its highest score instead, the limit of a vanishing temperature. Rows are summed
    apart, so such a row changes no other row's token.
    """
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    uniform = torch.tensor(uniforms, dtype=torch.float64, device=scores.device)[:, None]
    chosen = torch.searchsorted(cdf, uniform * total, right=True)[:, 0]
    broken = ~torch.isfinite(total[:, 0])
    if bool(broken.any()):
        highest = scores.nan_to_num(nan=-math.inf).argmax(dim=-1)
        chosen = torch.where(broken, highest, chosen)
    return chosen


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

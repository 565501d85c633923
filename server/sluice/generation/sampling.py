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
from dataclasses import dataclass

import torch
from torch import Tensor

from sluice.errors import InvalidInputError

MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
"""Stop sequences one request may give (each is matched against the text at every token)."""
MAX_STOP_SEQUENCE_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """One request's generation parameters; invalid values raise ``InvalidInputError``."""

    max_new_tokens: int = 16
    """Most tokens to generate; the prompt and these must fit the model's context."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); higher values flatten the distribution."""
    top_k: int = 0
    """Draw only among the k most likely tokens; 0 turns this off."""
    top_p: float = 1.0
    """Draw only among the most likely tokens whose probabilities reach this sum."""
    repetition_penalty: float = 1.0
    """Above 1, tokens of the prompt and the output so far become less likely."""
    seed: int | None = None
    """Makes the draws repeatable; None draws a fresh seed."""
    stop_token_ids: tuple[int, ...] = ()
    """End the generation on these tokens (besides the model's end-of-sequence tokens)."""
    stop_sequences: tuple[str, ...] = ()
    """End the generation when the text contains one of these; it is not returned."""

    def __post_init__(self) -> None:
        problems = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            (
                "repetition_penalty",
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                "> 0 (1 turns it off)",
            ),
            ("seed", self.seed is None or 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "token ids (>= 0)"),
            ("stop_sequences", all(self.stop_sequences), "non-empty strings"),
            (
                "stop_sequences",
                len(self.stop_sequences) <= MAX_STOP_SEQUENCES
                and all(len(stop) <= MAX_STOP_SEQUENCE_CHARS for stop in self.stop_sequences),
                f"at most {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_SEQUENCE_CHARS} "
                "characters",
            ),
            (
                "stop_token_ids",
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                f"at most {MAX_STOP_TOKEN_IDS} token ids",
            ),
        ]
        for field, valid, expected in problems:
            if not valid:
                got = repr(getattr(self, field))
                got = got if len(got) <= 80 else f"{got[:80]}... ({len(got)} characters)"
                raise InvalidInputError(f"{field} must be {expected}, got {got}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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

    def _noise(self, size: int, device: torch.device) -> Tensor:
        return torch.empty(size, device=device).exponential_(generator=self._generator)

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
        scaled = scores[drawn] / temperatures[:, None]
        if any(samplers[i].params.top_k or samplers[i].params.top_p < 1 for i in drawn):
            scaled = torch.stack(
                [samplers[i]._filtered(row) for i, row in zip(drawn, scaled, strict=True)]
            )
        probabilities = torch.softmax(scaled, dim=-1)
        noise = torch.stack([samplers[i]._noise(scores.shape[-1], scores.device) for i in drawn])
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

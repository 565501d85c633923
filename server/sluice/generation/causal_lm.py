"""A causal language model with its KV cache: prefill one sequence, decode many at once.

This is the surface iteration-level batching drives::

    logits, cache = lm.prefill(prompt_ids)        # one new sequence
    logits = lm.decode([(token, cache), ...])     # one token for each of many sequences
    running, joined, caches = lm.step(decodes, prompts)  # both in one forward pass
    cache.release()                               # the sequence leaves

Between two ``decode`` calls sequences may join (``prefill``) and leave (``release``); the
sequences of one ``decode`` may all have different lengths. ``decode`` over every live
sequence reads the cache without copying it (see ``kv_cache``).

Library errors (torch) are not translated here: the executor that runs this model does that
at its boundary. Not thread-safe: one thread drives a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sluice.errors import InvalidInputError
from sluice.generation.config import GPT2Config, LlamaConfig, ModelConfig, load_config
from sluice.generation.gpt2 import GPT2LMHeadModel
from sluice.generation.kv_cache import CacheStep, KVCachePool, KVStep, MixedStep, SequenceCache
from sluice.generation.llama import LlamaForCausalLM
from sluice.generation.modeling import CausalLMModule
from sluice.generation.weights import assign_weights, read_checkpoint


def build_module(config: ModelConfig, *, device: torch.device) -> CausalLMModule:
    """An implementation for ``config``; its parameters go to the ambient default device."""
    match config:
        case LlamaConfig():
            return LlamaForCausalLM(config, device=device)
        case GPT2Config():
            return GPT2LMHeadModel(config)


class CausalLM:
    """A loaded model and the pool of key/value rows its live sequences hold."""

    def __init__(
        self, module: CausalLMModule, config: ModelConfig, *, dtype: torch.dtype, device: str
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self._module = module
        module.prepare()
        self._pool = KVCachePool(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_context=config.max_context,
            dtype=dtype,
            device=self.device,
        )

    @classmethod
    def load(
        cls, model_dir: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> CausalLM:
        """Load a Hugging Face-format folder: ``config.json`` and ``*.safetensors``."""
        config = load_config(model_dir)
        target = torch.device(device)
        with torch.device("meta"):
            module = build_module(config, device=target)
        tensors = read_checkpoint(model_dir)
        assign_weights(module, tensors, where=model_dir, dtype=dtype, device=target)
        return cls(module, config, dtype=dtype, device=device)

    @property
    def max_context(self) -> int:
        return self.config.max_context

    @property
    def live_sequences(self) -> int:
        return self._pool.live_sequences

    @property
    def cache_bytes(self) -> int:
        """Memory the key/value cache holds now."""
        return self._pool.storage_bytes

    def prefill(self, token_ids: Sequence[int]) -> tuple[Tensor, SequenceCache]:
        """Run a new sequence's prompt: its next-token logits (``[vocab]``, float32) and
        its cache, which the caller releases when the sequence ends."""
        if not token_ids:
            raise InvalidInputError("the prompt has no tokens")
        cache = self._pool.open()
        try:
            (logits,) = self._forward([_Group([cache], [list(token_ids)])])
        except BaseException:
            cache.release()
            raise
        return logits[0], cache

    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, list[SequenceCache]]:
        """Run several new sequences' prompts in one forward pass: ``[len(prompts), vocab]``
        next-token logits and their caches.

        Shorter prompts are padded on the right to the longest: a real token only ever
        attends to positions at or before its own, so padding changes nothing it computes,
        and the padded positions are beyond each sequence's length (the next token
        overwrites them).
        """
        _, logits, caches = self.step([], prompts)
        return logits, caches

    def decode(self, steps: Sequence[tuple[int, SequenceCache]]) -> Tensor:
        """Add one token to each sequence in one forward pass: ``[len(steps), vocab]``
        float32 next-token logits, in the order of ``steps``."""
        (logits,) = self._forward([_decode_group(steps)])
        return logits

    def step(
        self, decodes: Sequence[tuple[int, SequenceCache]], prompts: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor, list[SequenceCache]]:
        """``decode(decodes)`` and ``prefill_many(prompts)`` in one forward pass (either
        may be empty): the running sequences' next-token logits, the new ones', and the new
        ones' caches (released again if the pass fails).

        The model reads its weights once for both: on a CPU, a pass over a few more tokens
        costs little more than a pass over fewer, so sequences that join while others run
        add their prompts to the others' step instead of a pass of their own.
        """
        if not (prompts or decodes) or any(not prompt for prompt in prompts):
            raise InvalidInputError("every prompt needs at least one token")
        caches = [self._pool.open() for _ in prompts]
        longest = max((len(prompt) for prompt in prompts), default=0)
        joining = _Group(
            caches,
            [[*prompt, *[0] * (longest - len(prompt))] for prompt in prompts],
            [len(prompt) for prompt in prompts],
        )
        groups = [group for group in (_decode_group(decodes), joining) if group.caches]
        try:
            logits = self._forward(groups)
        except BaseException:
            for cache in reversed(caches):
                cache.release()
            raise
        if not decodes:
            logits.insert(0, logits[0][:0])
        if not prompts:
            logits.append(logits[0][:0])
        return logits[0], logits[1], caches

    def _forward(self, groups: Sequence[_Group]) -> list[Tensor]:
        """One pass adding ``token_ids[i]`` to ``caches[i]`` in every group; with
        ``lengths``, only the first ``lengths[i]`` of a group's tokens are real (the rest is
        padding) and the logits are taken at the last real one. One group runs in its own
        ``[batch, new_tokens]`` layout; several are packed one after another (``MixedStep``).
        """
        vocab = self.config.vocab_size
        for group in groups:
            if any(not 0 <= token < vocab for tokens in group.token_ids for token in tokens):
                raise InvalidInputError(f"token ids must lie in [0, {vocab})")
        with torch.no_grad():
            steps = self._pool.plan_groups([(g.caches, g.new_tokens) for g in groups])
            inputs: list[Tensor] = []
            lasts: list[int] = []
            offset = 0
            for group, step in zip(groups, steps, strict=True):
                batch, new_tokens = step.positions.shape
                inputs.append(torch.tensor([group.token_ids[i] for i in step.order]))
                ends = group.ordered(step) or [new_tokens] * batch
                lasts.extend(offset + row * new_tokens + end - 1 for row, end in enumerate(ends))
                offset += batch * new_tokens
            kv: KVStep = steps[0] if len(steps) == 1 else MixedStep(steps)
            packed = [ids.reshape(-1) for ids in inputs]
            input_ids = inputs[0] if len(steps) == 1 else torch.cat(packed)[None]
            hidden = self._module.hidden_states(input_ids.to(self.device), kv.positions, kv)
            last = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(lasts, device=self.device)]
            logits = self._module.logits(last).float()
            results, start = [], 0
            for group, step in zip(groups, steps, strict=True):
                self._pool.commit(step, lengths=group.ordered(step))
                rows = logits[start : start + len(step.order)]
                restored = torch.empty_like(rows)
                restored[torch.tensor(step.order, device=self.device)] = rows
                results.append(restored)
                start += len(step.order)
        return results


@dataclass(frozen=True, slots=True)
class _Group:
    """Sequences of one forward pass that each add the same number of tokens."""

    caches: list[SequenceCache]
    token_ids: list[list[int]]
    lengths: list[int] | None = None
    """How many of each sequence's tokens are real (None: all)."""

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids[0]) if self.token_ids else 0

    def ordered(self, step: CacheStep) -> list[int] | None:
        """``lengths`` in the step's row order."""
        return None if self.lengths is None else [self.lengths[i] for i in step.order]


def _decode_group(steps: Sequence[tuple[int, SequenceCache]]) -> _Group:
    return _Group([cache for _, cache in steps], [[token] for token, _ in steps])

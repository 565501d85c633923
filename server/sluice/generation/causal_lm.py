"""A causal language model with its KV cache: prefill one sequence, decode many at once.

This is the surface iteration-level batching drives::

    logits, cache = lm.prefill(prompt_ids)        # one new sequence
    logits = lm.decode([(token, cache), ...])     # one token for each of many sequences
    cache.release()                               # the sequence leaves

Between two ``decode`` calls sequences may join (``prefill``) and leave (``release``); the
sequences of one ``decode`` may all have different lengths. ``decode`` over every live
sequence reads the cache without copying it (see ``kv_cache``).

Library errors (torch) are not translated here: the executor that runs this model does that
at its boundary. Not thread-safe: one thread drives a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sluice.errors import InvalidInputError
from sluice.generation.config import GPT2Config, LlamaConfig, ModelConfig, load_config
from sluice.generation.gpt2 import GPT2LMHeadModel
from sluice.generation.kv_cache import KVCachePool, SequenceCache
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
            logits = self._forward([cache], [list(token_ids)])
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
        if not prompts or any(not prompt for prompt in prompts):
            raise InvalidInputError("every prompt needs at least one token")
        caches = [self._pool.open() for _ in prompts]
        longest = max(len(prompt) for prompt in prompts)
        padded = [[*prompt, *[0] * (longest - len(prompt))] for prompt in prompts]
        lengths = [len(prompt) for prompt in prompts]
        try:
            logits = self._forward(caches, padded, lengths=lengths)
        except BaseException:
            for cache in caches:
                cache.release()
            raise
        return logits, caches

    def decode(self, steps: Sequence[tuple[int, SequenceCache]]) -> Tensor:
        """Add one token to each sequence in one forward pass: ``[len(steps), vocab]``
        float32 next-token logits, in the order of ``steps``."""
        return self._forward([cache for _, cache in steps], [[token] for token, _ in steps])

    def _forward(
        self,
        caches: list[SequenceCache],
        token_ids: list[list[int]],
        *,
        lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """One pass adding ``token_ids[i]`` to ``caches[i]``; with ``lengths``, only the first
        ``lengths[i]`` of them are real (the rest is padding) and the logits are taken at the
        last real one."""
        vocab = self.config.vocab_size
        if any(not 0 <= token < vocab for tokens in token_ids for token in tokens):
            raise InvalidInputError(f"token ids must lie in [0, {vocab})")
        with torch.no_grad():
            step = self._pool.plan(caches, len(token_ids[0]))
            order = torch.tensor(step.order, device=self.device)
            input_ids = torch.tensor(token_ids, device=self.device)[order]
            hidden = self._module.hidden_states(input_ids, step.positions, step)
            if lengths is None:
                last = hidden[:, -1]
            else:
                ordered = torch.tensor([lengths[i] for i in step.order], device=self.device)
                last = hidden[torch.arange(len(caches), device=self.device), ordered - 1]
            logits = self._module.logits(last).float()
            self._pool.commit(
                step, lengths=None if lengths is None else [lengths[i] for i in step.order]
            )
            restored = torch.empty_like(logits)
            restored[order] = logits
        return restored

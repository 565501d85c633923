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

    def decode(self, steps: Sequence[tuple[int, SequenceCache]]) -> Tensor:
        """Add one token to each sequence in one forward pass: ``[len(steps), vocab]``
        float32 next-token logits, in the order of ``steps``."""
        return self._forward([cache for _, cache in steps], [[token] for token, _ in steps])

    def _forward(self, caches: list[SequenceCache], token_ids: list[list[int]]) -> Tensor:
        vocab = self.config.vocab_size
        if any(not 0 <= token < vocab for tokens in token_ids for token in tokens):
            raise InvalidInputError(f"token ids must lie in [0, {vocab})")
        with torch.no_grad():
            step = self._pool.plan(caches, len(token_ids[0]))
            order = torch.tensor(step.order, device=self.device)
            input_ids = torch.tensor(token_ids, device=self.device)[order]
            hidden = self._module.hidden_states(input_ids, step.positions, step)
            logits = self._module.logits(hidden[:, -1]).float()
            self._pool.commit(step)
            restored = torch.empty_like(logits)
            restored[order] = logits
        return restored

"""GPT-2: LayerNorm, learned positions, GELU-tanh MLP and full multi-head attention, under
the Hugging Face parameter names (its projections are ``Conv1D``: weights stored
``[in, out]``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sluice.generation.config import GPT2Config
from sluice.generation.kv_cache import KVStep
from sluice.generation.modeling import CausalLMModule, attend, merge_heads, split_heads

PREFIX = "transformer."
"""Checkpoints saved from ``GPT2LMHeadModel`` prefix the body; the original ones do not."""

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
"""Causal-mask buffers that older checkpoints saved."""


class Conv1D(nn.Module):
    """A linear layer with its weight stored ``[in, out]``, as GPT-2 checkpoints have it."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inputs, outputs))
        self.bias = nn.Parameter(torch.zeros(outputs))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = config.num_heads
        self.c_attn = Conv1D(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, kv: KVStep | None) -> Tensor:
        q, k, v = (split_heads(part, self.heads) for part in self.c_attn(x).chunk(3, dim=-1))
        out: Tensor = self.c_proj(merge_heads(attend(q, k, v, layer=self.layer, kv=kv)))
        return out


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return out


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GPT2Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, kv: KVStep | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv)
        out: Tensor = x + self.mlp(self.ln_2(x))
        return out


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_context, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, layer) for layer in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPT2LMHeadModel(CausalLMModule):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def hidden_states(self, input_ids: Tensor, positions: Tensor, kv: KVStep | None) -> Tensor:
        x: Tensor = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, kv)
        out: Tensor = self.transformer.ln_f(x)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.transformer.wte.weight)
        out: Tensor = self.lm_head(hidden)
        return out

    def checkpoint_names(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        renamed = {}
        for name, tensor in tensors.items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight":
                if self.lm_head is not None:
                    renamed[name] = tensor
                continue
            renamed[name if name.startswith(PREFIX) else PREFIX + name] = tensor
        return renamed

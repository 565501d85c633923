"""The Llama family (Llama, Qwen2, Mistral): RMSNorm, rotary embeddings, SwiGLU MLP and
grouped-query attention, under the Hugging Face parameter names."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sluice.generation.config import LlamaConfig
from sluice.generation.kv_cache import KVStep
from sluice.generation.modeling import (
    CausalLMModule,
    Fused,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    attend,
    fuse,
    merge_heads,
    split_heads,
)

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers that some checkpoints saved and the model recomputes."""


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = config.num_heads
        self.kv_heads = config.num_kv_heads
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.heads * head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.heads * head_dim, hidden, bias=config.o_bias)
        self._qkv: Fused | None = None
        self._qk_v = [(self.heads + self.kv_heads) * head_dim, self.kv_heads * head_dim]

    def fuse(self) -> None:
        """Project queries, keys and values with one matrix product (see ``fuse``)."""
        self._qkv = fuse(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], kv: KVStep | None) -> Tensor:
        cos, sin = rotary
        if self._qkv is None:
            q = apply_rotary(split_heads(self.q_proj(x), self.heads), cos, sin)
            k = apply_rotary(split_heads(self.k_proj(x), self.kv_heads), cos, sin)
            v = split_heads(self.v_proj(x), self.kv_heads)
        else:  # queries and keys lie side by side: rotate them in one go
            qk, v = torch.split(self._qkv(x), self._qk_v, dim=-1)
            qk = apply_rotary(split_heads(qk, self.heads + self.kv_heads), cos, sin)
            q, k = torch.split(qk, [self.heads, self.kv_heads], dim=1)
            v = split_heads(v, self.kv_heads)
        out: Tensor = self.o_proj(merge_heads(attend(q, k, v, layer=self.layer, kv=kv)))
        return out


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self._gate_up: Fused | None = None

    def fuse(self) -> None:
        """Project the gate and the up branch with one matrix product (see ``fuse``)."""
        self._gate_up = fuse(self.gate_proj, self.up_proj)

    def forward(self, x: Tensor) -> Tensor:
        if self._gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self._gate_up(x).chunk(2, dim=-1)
        out: Tensor = self.down_proj(F.silu(gate) * up)
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], kv: KVStep | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, kv)
        out: Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, layer) for layer in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLMModule):
    def __init__(self, config: LlamaConfig, *, device: torch.device) -> None:
        """Parameters go wherever the ambient default device says (``meta`` when loading);
        ``device`` is where the rotary frequencies live."""
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, device)

    def hidden_states(self, input_ids: Tensor, positions: Tensor, kv: KVStep | None) -> Tensor:
        x: Tensor = self.model.embed_tokens(input_ids)
        rotary = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rotary, kv)
        out: Tensor = self.model.norm(x)
        return out

    def prepare(self) -> None:
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def logits(self, hidden: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight)
        out: Tensor = self.lm_head(hidden)
        return out

    def checkpoint_names(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: tensor
            for name, tensor in tensors.items()
            if not name.endswith(IGNORED_SUFFIXES)
            and not (self.lm_head is None and name == "lm_head.weight")
        }

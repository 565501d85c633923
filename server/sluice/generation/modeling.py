"""What every causal LM implementation shares: its interface and the common layers.

Module and parameter names follow the Hugging Face checkpoints, so a ``*.safetensors``
state dict loads with at most a renaming of a few keys (``checkpoint_names``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sluice.generation.kv_cache import KVStep


class CausalLMModule(nn.Module, abc.ABC):
    """A decoder-only language model that reads and writes a ``KVCachePool``."""

    @abc.abstractmethod
    def hidden_states(self, input_ids: Tensor, positions: Tensor, kv: KVStep | None) -> Tensor:
        """``[batch, new_tokens]`` token ids at ``positions`` -> final hidden states.

        With ``kv``, the new tokens' keys and values are stored there and each token sees
        the positions the step's mask allows; without, the tokens are a whole causal
        sequence each (training).
        """

    def prepare(self) -> None:
        """Get ready to serve, once the weights are in (by default, nothing to do)."""

    @abc.abstractmethod
    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states -> next-token logits over the vocabulary."""

    @abc.abstractmethod
    def checkpoint_names(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's tensors under this module's parameter names, without the entries
        it does not need (buffers that older checkpoints saved, a tied output matrix)."""


class Fused:
    """Several linear layers that read the same input, run as one matrix product (their
    outputs side by side, in order, on the last axis). Each output element is the same dot
    product as in its own layer, so the numbers do not change; one product instead of
    several saves their per-call overhead, which is most of a small model's decode step on
    a CPU.

    The layers' weights (and biases) become views of the fused ones: no extra memory, and
    their state dict is unchanged.
    """

    def __init__(self, *layers: nn.Linear) -> None:
        weights: list[Tensor] = [layer.weight for layer in layers]
        biases: list[Tensor] = [layer.bias for layer in layers if layer.bias is not None]
        self.weight = torch.cat(weights)
        self.bias = torch.cat(biases) if len(biases) == len(layers) else None
        start = 0
        for layer in layers:
            end = start + layer.out_features
            layer.weight = nn.Parameter(self.weight[start:end], requires_grad=False)
            if self.bias is not None:
                layer.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
            start = end

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def fuse(*layers: nn.Linear) -> Fused:
    """``Fused(*layers)`` without gradients (serving only)."""
    with torch.no_grad():
        return Fused(*layers)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference implementation does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one call, the same arithmetic (and the same numbers)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding:
    """Rotary position embeddings (the default kind: no scaling), computed per position."""

    def __init__(self, head_dim: int, theta: float, device: torch.device) -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
        self.inv_freq = 1.0 / (theta ** (exponents / head_dim))

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``[batch, tokens]`` positions -> cos and sin ``[batch, 1, tokens, head_dim]``."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(q: Tensor, k: Tensor, v: Tensor, *, layer: int, kv: KVStep | None) -> Tensor:
    """Scaled dot-product attention of ``[batch, heads, tokens, head_dim]`` queries over the
    new keys and values (``[batch, kv_heads, tokens, head_dim]``) and what ``kv`` holds.

    Query heads share key/value heads in groups (``enable_gqa``) without copying them.
    """
    if kv is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return kv.attend(layer, q, k, v)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[batch, tokens, heads * head_dim]`` -> ``[batch, heads, tokens, head_dim]``."""
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[batch, heads, tokens, head_dim]`` -> ``[batch, tokens, heads * head_dim]``."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

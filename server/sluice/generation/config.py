"""A Hugging Face ``config.json`` read into one of our frozen model configs.

Two families are supported:

* ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` -> ``LlamaConfig``
  (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention; Qwen2 adds a bias to the
  query, key and value projections);
* ``GPT2LMHeadModel`` -> ``GPT2Config`` (LayerNorm, learned positions, GELU-tanh).

Anything these implementations would get wrong is refused with a ``ConfigError`` naming the
file and the field: rotary scaling other than the default, activations other than the
family's own, cross-attention, per-layer attention scaling.

A sliding attention window (Mistral, Qwen2 with ``use_sliding_window``) is not implemented.
A window never masks anything inside a context no longer than itself, so such a model is
offered with ``max_context = min(max_position_embeddings, sliding_window)``: exact, at the
price of the longer contexts the window would allow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

DEFAULT_ROPE_THETA = 10_000.0


@dataclass(frozen=True, kw_only=True, slots=True)
class LlamaConfig:
    """The Llama family: Llama, Qwen2 and Mistral checkpoints."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Fewer than ``num_heads`` for grouped-query attention."""
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_context: int
    """Longest sequence (prompt + generated tokens) the model is offered for."""
    tie_word_embeddings: bool
    qkv_bias: bool
    """A bias on the query, key and value projections (Qwen2, Llama's ``attention_bias``)."""
    o_bias: bool
    mlp_bias: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class GPT2Config:
    """GPT-2 checkpoints (``GPT2LMHeadModel``)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    max_context: int
    tie_word_embeddings: bool

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


ModelConfig = LlamaConfig | GPT2Config


class _Fields:
    """Typed access to a config.json's fields; every error names the file and the field."""

    def __init__(self, raw: Mapping[str, Any], where: Path, prefix: str = "") -> None:
        self.raw = raw
        self.where = where
        self.prefix = prefix

    def error(self, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: field '{self.prefix}{field}': {problem}")

    def positive_int(self, field: str, default: int | None = None) -> int:
        value = self.raw.get(field)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(field, f"expected a positive integer, got {value!r}")
        return value

    def positive_float(self, field: str, default: float) -> float:
        value = self.raw.get(field)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(field, f"expected a positive number, got {value!r}")
        return float(value)

    def flag(self, field: str, default: bool) -> bool:
        value = self.raw.get(field)
        value = default if value is None else value
        if not isinstance(value, bool):
            raise self.error(field, f"expected true or false, got {value!r}")
        return value

    def require(self, field: str, allowed: tuple[object, ...], default: object) -> None:
        value = self.raw.get(field)
        value = default if value is None else value
        if value not in allowed:
            choices = " or ".join(repr(a) for a in allowed)
            raise self.error(field, f"{value!r} is not supported (only {choices})")


def load_config(model_dir: Path) -> ModelConfig:
    """Read ``<model_dir>/config.json``."""
    path = model_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: missing (a Hugging Face model folder needs one)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return parse_config(raw, where=path)


def parse_config(raw: Mapping[str, Any], *, where: Path) -> ModelConfig:
    fields = _Fields(raw, where)
    architectures = raw.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise fields.error("architectures", f"expected one architecture, got {architectures!r}")
    architecture = architectures[0]
    parse = _PARSERS.get(architecture)
    if parse is None:
        raise fields.error(
            "architectures", f"{architecture!r} is not supported (supported: {', '.join(_PARSERS)})"
        )
    return parse(fields, architecture)


def _parse_llama(fields: _Fields, architecture: str) -> LlamaConfig:
    fields.require("hidden_act", ("silu",), "silu")
    fields.require("partial_rotary_factor", (1.0,), 1.0)
    hidden = fields.positive_int("hidden_size")
    heads = fields.positive_int("num_attention_heads")
    kv_heads = fields.positive_int("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise fields.error(
            "num_key_value_heads", f"{kv_heads} does not divide num_attention_heads ({heads})"
        )
    if "head_dim" not in fields.raw and hidden % heads:
        raise fields.error("num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
    attention_bias = fields.flag("attention_bias", False)
    qwen2 = architecture == "Qwen2ForCausalLM"
    return LlamaConfig(
        architecture=architecture,
        vocab_size=fields.positive_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=fields.positive_int("intermediate_size"),
        num_layers=fields.positive_int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=fields.positive_int("head_dim", default=hidden // heads),
        rms_norm_eps=fields.positive_float("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(fields),
        max_context=_llama_context(fields, architecture),
        tie_word_embeddings=fields.flag("tie_word_embeddings", False),
        qkv_bias=qwen2 or attention_bias,
        o_bias=attention_bias and not qwen2,
        mlp_bias=fields.flag("mlp_bias", False),
    )


def _rope_theta(fields: _Fields) -> float:
    """Default rotary embeddings only: ``rope_scaling`` (older files) and ``rope_parameters``
    (newer files, which also carry ``rope_theta``) must not ask for another kind."""
    theta = fields.positive_float("rope_theta", DEFAULT_ROPE_THETA)
    for field in ("rope_scaling", "rope_parameters"):
        params = fields.raw.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise fields.error(field, f"expected an object or null, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise fields.error(field, f"rotary scaling {kind!r} is not supported (only default)")
        if "rope_theta" in params:
            nested = _Fields(params, fields.where, prefix=f"{field}.")
            theta = nested.positive_float("rope_theta", theta)
    return theta


def _llama_context(fields: _Fields, architecture: str) -> int:
    context = fields.positive_int("max_position_embeddings")
    window: int | None = None
    if architecture == "MistralForCausalLM" and fields.raw.get("sliding_window") is not None:
        window = fields.positive_int("sliding_window")
    if architecture == "Qwen2ForCausalLM" and fields.flag("use_sliding_window", False):
        window = fields.positive_int("sliding_window")
    if window is not None and window < context:
        log.info(
            "%s: sliding_window %d < max_position_embeddings %d: the model is offered with a "
            "context of %d tokens, inside which the window masks nothing",
            fields.where,
            window,
            context,
            window,
        )
        return window
    return context


def _parse_gpt2(fields: _Fields, architecture: str) -> GPT2Config:
    fields.require("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    fields.require("scale_attn_weights", (True,), True)
    fields.require("scale_attn_by_inverse_layer_idx", (False,), False)
    fields.require("add_cross_attention", (False,), False)
    hidden = fields.positive_int("n_embd")
    heads = fields.positive_int("n_head")
    if hidden % heads:
        raise fields.error("n_head", f"{heads} does not divide n_embd {hidden}")
    return GPT2Config(
        architecture=architecture,
        vocab_size=fields.positive_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=fields.positive_int("n_inner", default=4 * hidden),
        num_layers=fields.positive_int("n_layer"),
        num_heads=heads,
        layer_norm_eps=fields.positive_float("layer_norm_epsilon", 1e-5),
        max_context=fields.positive_int("n_positions"),
        tie_word_embeddings=fields.flag("tie_word_embeddings", True),
    )


_PARSERS: dict[str, Callable[[_Fields, str], ModelConfig]] = {
    "LlamaForCausalLM": _parse_llama,
    "MistralForCausalLM": _parse_llama,
    "Qwen2ForCausalLM": _parse_llama,
    "GPT2LMHeadModel": _parse_gpt2,
}

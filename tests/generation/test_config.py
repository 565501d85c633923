"""config.json -> our model configs, and the clear errors for what we do not support."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from sluice.errors import ConfigError
from sluice.generation.config import GPT2Config, LlamaConfig, load_config, parse_config
from tests.generation.random_models import CONFIGS

WHERE = Path("model/config.json")


def parse(raw: dict[str, Any]) -> LlamaConfig | GPT2Config:
    return parse_config(raw, where=WHERE)


def test_llama_with_grouped_query_attention() -> None:
    config = parse(CONFIGS["llama"])
    assert isinstance(config, LlamaConfig)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.rope_theta == 500.0
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (False, False, False)
    assert config.max_context == 128


def test_qwen2_has_query_key_value_bias() -> None:
    config = parse(CONFIGS["qwen2"])
    assert isinstance(config, LlamaConfig)
    assert (config.qkv_bias, config.o_bias) == (True, False)
    assert config.tie_word_embeddings


def test_a_sliding_window_shorter_than_the_context_becomes_the_context() -> None:
    config = parse(CONFIGS["mistral"])
    assert isinstance(config, LlamaConfig)
    assert config.max_context == 96  # sliding_window, below max_position_embeddings 256
    assert config.head_dim == 24
    long_window = parse({**CONFIGS["mistral"], "sliding_window": 4096})
    assert long_window.max_context == 256
    qwen_window = {**CONFIGS["qwen2"], "use_sliding_window": True, "sliding_window": 32}
    assert parse(qwen_window).max_context == 32


def test_gpt2() -> None:
    config = parse(CONFIGS["gpt2"])
    assert isinstance(config, GPT2Config)
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (64, 256, 2)
    assert (config.num_kv_heads, config.head_dim, config.max_context) == (4, 16, 128)
    assert config.tie_word_embeddings


def with_field(name: str, field: str, value: object) -> dict[str, Any]:
    raw = copy.deepcopy(CONFIGS[name])
    raw[field] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        (
            with_field("llama", "architectures", ["T5ForConditionalGeneration"]),
            "architectures",
            "not supported",
        ),
        (
            with_field("llama", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
            "rope_scaling",
            "'linear'",
        ),
        (
            with_field("llama", "rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}),
            "rope_parameters",
            "'llama3'",
        ),
        (with_field("llama", "hidden_act", "gelu"), "hidden_act", "'gelu'"),
        (with_field("llama", "num_key_value_heads", 3), "num_key_value_heads", "does not divide"),
        (with_field("llama", "hidden_size", "64"), "hidden_size", "positive integer"),
        (with_field("llama", "rms_norm_eps", -1), "rms_norm_eps", "positive number"),
        (with_field("qwen2", "tie_word_embeddings", "yes"), "tie_word_embeddings", "true or false"),
        (with_field("gpt2", "activation_function", "relu"), "activation_function", "'relu'"),
        (
            with_field("gpt2", "scale_attn_by_inverse_layer_idx", True),
            "scale_attn_by_inverse_layer_idx",
            "True",
        ),
        (with_field("gpt2", "n_head", 5), "n_head", "does not divide"),
    ],
)
def test_unsupported_configs_name_the_file_and_field(
    raw: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: field '{field}")
    assert problem in message


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json: missing"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_config(tmp_path)

"""Tiny random-initialised models of every supported architecture, saved as Hugging Face
folders (``config.json`` + ``model.safetensors``) by our own implementation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sluice.generation.causal_lm import build_module
from sluice.generation.config import parse_config

VOCAB = 128

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "max_position_embeddings": 256,
        "sliding_window": 96,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
    },
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 128,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "vocab_size": VOCAB,
    },
}


def write_random_model(directory: Path, config_json: dict[str, Any], *, seed: int = 0) -> Path:
    """Save a model with every parameter random (norm scales near 1, small biases), so a
    wrong layer shows up in the logits."""
    directory.mkdir(parents=True, exist_ok=True)
    config = parse_config(config_json, where=directory / "config.json")
    module = build_module(config, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, parameter in module.state_dict().items():
        noise = torch.randn(parameter.shape, generator=generator)
        if parameter.dim() == 1 and "bias" not in name:
            state[name] = 1 + 0.1 * noise
        else:
            state[name] = 0.15 * noise
    save_file(state, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config_json))
    return directory

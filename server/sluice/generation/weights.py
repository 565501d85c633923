"""Weights from ``*.safetensors``: one ``model.safetensors``, or the shards that
``model.safetensors.index.json`` lists."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from sluice.errors import ConfigError
from sluice.generation.modeling import CausalLMModule

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_checkpoint(model_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint in ``model_dir``, on the CPU, as stored."""
    tensors: dict[str, Tensor] = {}
    for path in _checkpoint_files(model_dir):
        try:
            tensors.update(load_file(path))
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"{path}: not a readable safetensors file: {exc}") from exc
    return tensors


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{index}: field 'weight_map': not a valid index: {exc}") from exc
        return [model_dir / shard for shard in shards]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise ConfigError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE}")


def assign_weights(
    module: CausalLMModule,
    tensors: dict[str, Tensor],
    *,
    where: Path,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Give ``module`` (built on the ``meta`` device) the checkpoint's tensors as its
    parameters, converted to ``dtype`` on ``device``; names and shapes must match exactly."""
    state = module.checkpoint_names(tensors)
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ConfigError(
            f"{where}: the checkpoint does not match config.json: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(
                f"{where}: tensor '{name}' has shape {tuple(tensor.shape)}, config.json "
                f"implies {tuple(expected[name].shape)}"
            )
    converted = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    module.load_state_dict(converted, strict=True, assign=True)
    module.requires_grad_(False)
    module.eval()


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"

"""Logits of our implementations against Hugging Face transformers on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sluice.generation.causal_lm import CausalLM

transformers = pytest.importorskip(
    "transformers", reason="transformers (a test-only reference) is not installed"
)

TOLERANCE = 1e-4


def reference(model_dir: Path) -> Any:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # every tensor matched by name
    return model.eval()


def test_prefill_and_decode_match_transformers(random_model_dir: Path) -> None:
    ours = CausalLM.load(random_model_dir)
    theirs = reference(random_model_dir)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(ours.config.vocab_size, (20,), generator=generator).tolist()
    logits, cache = ours.prefill(tokens[:12])
    for length in range(12, len(tokens) + 1):
        with torch.no_grad():
            expected = theirs(torch.tensor([tokens[:length]])).logits[0, -1]
        torch.testing.assert_close(logits, expected, atol=TOLERANCE, rtol=0)
        if length < len(tokens):
            logits = ours.decode([(tokens[length], cache)])[0]
    cache.release()

"""The bundled model: it loads, and greedy generation is deterministic English-like text."""

from __future__ import annotations

import re

import pytest
import torch

from sluice.app import EXAMPLE_REPOSITORY
from sluice.errors import InvalidInputError
from sluice.generation.causal_lm import CausalLM
from sluice.generation.generate import FinishReason, SequenceOutput, generate
from sluice.generation.sampling import SamplingParams, TokenSampler
from sluice.generation.tokenizer import Tokenizer
from tests.conftest import REPO_ROOT

TINY_LLAMA = EXAMPLE_REPOSITORY / "tiny_llama" / "1"
PROMPT = "Once upon a time, there was a"


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    return CausalLM.load(TINY_LLAMA)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(TINY_LLAMA)


def complete(
    lm: CausalLM, tokenizer: Tokenizer, params: SamplingParams
) -> tuple[str, FinishReason | None]:
    chunks = list(generate(lm, tokenizer, tokenizer.encode(PROMPT), params))
    return "".join(chunk.text for chunk in chunks), chunks[-1].finish_reason


def test_greedy_text_is_deterministic_and_english_like(lm: CausalLM, tokenizer: Tokenizer) -> None:
    text, reason = complete(lm, tokenizer, SamplingParams(max_new_tokens=40))
    assert (text, reason) == complete(lm, tokenizer, SamplingParams(max_new_tokens=40))
    assert reason is FinishReason.LENGTH
    training_words = set(
        re.findall(r"[a-z]+", (REPO_ROOT / "scripts" / "data" / "stories.txt").read_text().lower())
    )
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 15
    assert sum(word in training_words for word in words) >= 0.9 * len(words)
    assert lm.live_sequences == 0


def test_stop_sequence_cuts_the_text(lm: CausalLM, tokenizer: Tokenizer) -> None:
    full, _ = complete(lm, tokenizer, SamplingParams(max_new_tokens=40))
    stop = full.split()[3]
    cut, reason = complete(lm, tokenizer, SamplingParams(max_new_tokens=40, stop_sequences=(stop,)))
    assert reason is FinishReason.STOP
    assert cut == full[: full.index(stop)]


def test_seeded_sampling_is_repeatable(lm: CausalLM, tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=11)
    assert complete(lm, tokenizer, params) == complete(lm, tokenizer, params)


def test_end_of_sequence_token_stops_without_text(tokenizer: Tokenizer) -> None:
    (eos,) = tokenizer.eos_token_ids
    output = SequenceOutput(tokenizer, SamplingParams(max_new_tokens=5), prompt_ids=[])
    first = output.add(tokenizer.encode(" cat")[0])
    last = output.add(eos)
    assert (first.text, first.finish_reason) == (" cat", None)
    assert (last.text, last.token_id, last.finish_reason) == ("", eos, FinishReason.STOP)


def test_context_guard_names_both_numbers(lm: CausalLM, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=lm.max_context)
    expected = f"{len(prompt)} tokens and max_new_tokens is {lm.max_context}"
    with pytest.raises(InvalidInputError, match=expected):
        next(generate(lm, tokenizer, prompt, params))


def test_bundled_model_matches_transformers(lm: CausalLM, tokenizer: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(
        TINY_LLAMA, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    ids = tokenizer.encode(PROMPT)
    logits, cache = lm.prefill(ids)
    cache.release()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    sampler = TokenSampler(
        SamplingParams(), prompt_ids=ids, vocab_size=lm.config.vocab_size, device="cpu"
    )
    assert sampler.sample(logits) == int(expected.argmax())

"""Token choice (greedy, seeded draws, top-k, top-p, repetition penalty) and stopping."""

from __future__ import annotations

import pytest
import torch

from sluice.errors import InvalidInputError
from sluice.generation.sampling import SamplingParams, TokenSampler
from sluice.generation.stopping import StopSequences

VOCAB = 50


def logits_sequence(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(VOCAB, generator=generator) for _ in range(count)]


def draw(params: SamplingParams, logits: list[torch.Tensor]) -> list[int]:
    sampler = TokenSampler(params, prompt_ids=[], vocab_size=VOCAB, device="cpu")
    return [sampler.sample(row) for row in logits]


def test_seeded_draws_repeat_and_seeds_differ() -> None:
    logits = logits_sequence(40)
    params = SamplingParams(temperature=1.5, seed=7)
    assert draw(params, logits) == draw(params, logits)
    assert draw(params, logits) != draw(SamplingParams(temperature=1.5, seed=8), logits)


def test_greedy_and_top_k_1_pick_the_most_likely_token() -> None:
    logits = logits_sequence(20)
    expected = [int(row.argmax()) for row in logits]
    assert draw(SamplingParams(), logits) == expected
    assert draw(SamplingParams(temperature=2.0, top_k=1, seed=3), logits) == expected


def test_top_k_and_top_p_limit_the_candidates() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (VOCAB - 4)))
    top_k = set(draw(SamplingParams(temperature=1.0, top_k=2, seed=1), [logits] * 200))
    top_p = set(draw(SamplingParams(temperature=1.0, top_p=0.7, seed=1), [logits] * 200))
    assert top_k == top_p == {0, 1}
    everything = set(draw(SamplingParams(temperature=1.0, seed=1), [logits] * 400))
    assert everything == {0, 1, 2, 3}


def test_repetition_penalty_covers_the_prompt_and_the_output() -> None:
    logits = torch.zeros(VOCAB)
    logits[:3] = torch.tensor([2.0, 1.9, 1.8])
    params = SamplingParams(repetition_penalty=1.2)
    sampler = TokenSampler(params, prompt_ids=[0], vocab_size=VOCAB, device="cpu")
    assert [sampler.sample(logits) for _ in range(3)] == [1, 2, 0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("seed", -1),
        ("stop_token_ids", (-2,)),
        ("stop_sequences", ("",)),
    ],
)
def test_invalid_parameters_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError, match=f"^{field} must be"):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_stop_sequence_across_pieces_is_never_emitted() -> None:
    stops = StopSequences(["STOP", "\n\n"])
    assert stops.push("Hello wor") == ("Hello wor", False)
    assert stops.push("ld! ST") == ("ld! ", False)  # "ST" might begin "STOP"
    assert stops.push("ARS ") == ("STARS ", False)  # it did not
    assert stops.push("and S") == ("and ", False)
    assert stops.push("TOP here") == ("", True)


def test_earliest_stop_sequence_wins_and_held_text_flushes() -> None:
    stops = StopSequences(["world", "o w"])
    assert stops.push("hello world") == ("hell", True)
    unfinished = StopSequences(["world"])
    assert unfinished.push("a wor") == ("a ", False)
    assert unfinished.flush() == "wor"

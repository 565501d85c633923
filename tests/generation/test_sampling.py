"""Token choice (greedy, seeded draws, top-k, top-p, repetition penalty) and stopping."""

from __future__ import annotations

import pytest
import torch

from sluice.errors import InvalidInputError
from sluice.generation.sampling import SamplingParams, TokenSampler, _inverse_cdf, sample_many
from sluice.generation.stopping import StopSequences

VOCAB = 50


def logits_sequence(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(VOCAB, generator=generator) for _ in range(count)]


def sampler(
    params: SamplingParams, *, vocab: int = VOCAB, prompt_ids: list[int] | None = None
) -> TokenSampler:
    return TokenSampler(params, prompt_ids=prompt_ids or [], vocab_size=vocab, device="cpu")


def draw(params: SamplingParams, logits: list[torch.Tensor]) -> list[int]:
    chooser = sampler(params)
    return [chooser.sample(row) for row in logits]


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


def test_draws_follow_each_rows_own_distribution_in_a_batch() -> None:
    """Two rows of one step, each with its own distribution (one token of each filtered
    out): 6,000 seeded draws of each land on every token as often as its probability
    says, within 2 points, and never on a filtered one."""
    wanted = [
        torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]),
        torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]),
    ]
    logits = torch.log(torch.stack(wanted))
    samplers = [sampler(SamplingParams(temperature=1.0, seed=seed), vocab=5) for seed in (11, 12)]
    counts = torch.zeros(2, 5)
    draws = 6000
    for _ in range(draws):
        for row, token in enumerate(sample_many(samplers, logits)):
            counts[row, token] += 1
    assert counts[0, 4] == counts[1, 0] == 0
    assert torch.allclose(counts / draws, torch.stack(wanted), atol=0.02), counts / draws


def test_a_batched_step_draws_what_each_sequence_draws_alone() -> None:
    """Batching changes no token: a step of eight samplers (greedy, top-k, top-p and plain
    draws mixed) picks what each sampler picks from its own row alone."""
    generator = torch.Generator().manual_seed(5)
    steps = [torch.randn(8, VOCAB, generator=generator) for _ in range(30)]
    kinds = [
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(),
        SamplingParams(temperature=1.3, top_k=5, seed=2),
        SamplingParams(temperature=0.7, top_p=0.9, seed=3),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=4),
        SamplingParams(temperature=0.5, seed=5),
        SamplingParams(temperature=2.0, seed=6),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.8, seed=7),
    ]

    def samplers() -> list[TokenSampler]:
        return [sampler(p, prompt_ids=[1, 2]) for p in kinds]

    together, alone = samplers(), samplers()
    batched = [sample_many(together, logits) for logits in steps]
    one_by_one = [[s.sample(row) for s, row in zip(alone, logits, strict=True)] for logits in steps]
    assert batched == one_by_one
    assert len({tuple(step) for step in batched}) > 1  # the draws moved


def test_the_ends_of_the_unit_interval_choose_likely_tokens() -> None:
    """u = 0 picks the first likely token and u just below 1 the last, never a filtered
    token around them, also in a row whose float32 probabilities sum to less than 1."""
    inf = float("inf")
    scores = torch.tensor(
        [[-inf, -inf, 1.0, 2.0, -inf], [-inf, 0.5, 0.5, -inf, -inf], [0.0] * 5],
        dtype=torch.float32,
    )
    below_one = 1 - 2**-53
    assert _inverse_cdf(scores, [0.0, 0.0, 0.0]).tolist() == [2, 1, 0]
    assert _inverse_cdf(scores, [below_one, below_one, below_one]).tolist() == [3, 2, 4]
    assert _inverse_cdf(scores, [0.4, 0.4, 0.5]).tolist() == [3, 1, 2]
    short = torch.tensor([[-0.5663175, 0.37311465, -0.8919953, -1.5091077, -inf]])
    assert torch.softmax(short, dim=-1).double().sum() < 1
    assert _inverse_cdf(short, [below_one]).tolist() == [3]


def test_an_unlikely_token_keeps_its_own_share_of_the_draws() -> None:
    """A token of probability 1e-9 between two likely ones is chosen for the points of its
    own narrow interval (summed in float32, the interval would vanish)."""
    scores = torch.tensor([[0.0, -20.0, 0.0]])
    cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)[0]
    middle = float((cdf[0] + cdf[1]) / 2 / cdf[-1])
    assert _inverse_cdf(scores, [middle]).tolist() == [1]


def test_a_row_with_no_finite_distribution_takes_its_highest_score_alone() -> None:
    """An infinite score (a model that overflowed) or a temperature so small that dividing
    by it overflows: the highest-scoring token, the limit of a vanishing temperature; NaN
    scores count as lowest. The other rows of the step keep their own draws."""
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor(
        [
            [1.0, inf, 2.0, -inf, 0.0],
            [nan, 1.0, 3.0, nan, 2.0],
            [nan] * 5,
            [0.0, 0.0, 0.0, 0.0, 5.0],
        ]
    )
    assert _inverse_cdf(scores, [0.3, 0.3, 0.3, 0.5]).tolist() == [1, 2, 0, 4]
    logits = torch.tensor([[30.0, 29.0, -5.0, 10.0]])
    for temperature in (1e-37, 1e-40, 1e-45):
        chooser = sampler(SamplingParams(temperature=temperature, seed=1), vocab=4)
        assert [sample_many([chooser], logits)[0] for _ in range(5)] == [0] * 5, temperature


def test_temperature_shapes_the_draws_and_unseeded_samplers_differ() -> None:
    """Temperature 0.25 turns probabilities 0.8 / 0.2 into 0.8^4 / 0.2^4 (normalised);
    two samplers without a seed draw differently."""
    logits = torch.log(torch.tensor([[0.8, 0.2]]))
    chooser = sampler(SamplingParams(temperature=0.25, seed=1), vocab=2)
    share = sum(sample_many([chooser], logits)[0] for _ in range(4000)) / 4000
    assert abs(share - 0.2**4 / (0.8**4 + 0.2**4)) < 0.01
    flat = torch.zeros(1, 1000)
    first, second = (sampler(SamplingParams(temperature=1.0), vocab=1000) for _ in range(2))
    assert [sample_many([first], flat) for _ in range(5)] != [
        sample_many([second], flat) for _ in range(5)
    ]


def test_repetition_penalty_covers_the_prompt_and_the_output() -> None:
    logits = torch.zeros(VOCAB)
    logits[:3] = torch.tensor([2.0, 1.9, 1.8])
    params = SamplingParams(repetition_penalty=1.2)
    chooser = sampler(params, prompt_ids=[0])
    assert [chooser.sample(logits) for _ in range(3)] == [1, 2, 0]


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

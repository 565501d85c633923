"""Prefill and batched decode: sequences of different lengths joining and leaving mid-way
get exactly the tokens they get alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sluice.errors import ConfigError, InvalidInputError
from sluice.generation import kv_cache
from sluice.generation.causal_lm import CausalLM
from sluice.generation.kv_cache import attention
from tests.generation.random_models import CONFIGS, write_random_model

PROMPTS = [[5, 9, 2], list(range(20, 31)), [7] * 6, list(range(40, 98)), [1, 2, 3, 4, 5, 6, 7, 8]]
"""The fourth prompt's sequence outgrows the cache's first capacity (64) mid-way."""
JOIN_AT_STEP = [0, 0, 2, 3, 5]
NEW_TOKENS = [9, 3, 12, 8, 1]
PAUSED = {4: 0, 6: 2}
"""Step -> a sequence left out of that step (its rows are gathered, not viewed)."""


def greedy_alone(lm: CausalLM, prompt: list[int], count: int) -> list[int]:
    logits, cache = lm.prefill(prompt)
    tokens = [int(logits.argmax())]
    while len(tokens) < count:
        tokens.append(int(lm.decode([(tokens[-1], cache)])[0].argmax()))
    cache.release()
    return tokens


def greedy_batched(lm: CausalLM) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    caches = {}
    step = 0
    while any(len(out) < count for out, count in zip(outputs, NEW_TOKENS, strict=True)):
        for i in (i for i, at in enumerate(JOIN_AT_STEP) if at == step):
            logits, caches[i] = lm.prefill(PROMPTS[i])
            outputs[i].append(int(logits.argmax()))
        running = [i for i in caches if len(outputs[i]) < NEW_TOKENS[i] and PAUSED.get(step) != i]
        if step % 2:
            running.reverse()  # the caller's order need not be the cache's row order
        if running:
            logits = lm.decode([(outputs[i][-1], caches[i]) for i in running])
            for row, i in enumerate(running):
                outputs[i].append(int(logits[row].argmax()))
        for i in [i for i in caches if len(outputs[i]) == NEW_TOKENS[i]]:
            caches.pop(i).release()  # leaves at once, mid-way through the others
        step += 1
    return outputs


def test_batched_decode_reproduces_each_sequence_alone(random_lm: CausalLM) -> None:
    alone = [greedy_alone(random_lm, p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
    assert greedy_batched(random_lm) == alone
    assert random_lm.live_sequences == 0
    assert random_lm.cache_bytes == 0


def test_batched_logits_match_single_sequence_logits(random_lm: CausalLM) -> None:
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], list(range(30, 45))]
    single = []
    for prompt in prompts:
        _, cache = random_lm.prefill(prompt)
        single.append(random_lm.decode([(7, cache)])[0])
        cache.release()
    caches = [random_lm.prefill(prompt)[1] for prompt in prompts]
    batched = random_lm.decode([(7, cache) for cache in caches])
    torch.testing.assert_close(batched, torch.stack(single), atol=1e-5, rtol=0)
    assert [cache.length for cache in caches] == [len(p) + 1 for p in prompts]


def test_context_is_enforced(random_lm: CausalLM) -> None:
    with pytest.raises(InvalidInputError, match="context"):
        random_lm.prefill([1] * (random_lm.max_context + 1))
    assert random_lm.live_sequences == 0
    _, cache = random_lm.prefill([1] * random_lm.max_context)
    with pytest.raises(InvalidInputError, match="context"):
        random_lm.decode([(1, cache)])
    cache.release()


def test_invalid_steps_are_refused(random_lm: CausalLM) -> None:
    with pytest.raises(InvalidInputError, match="no tokens"):
        random_lm.prefill([])
    with pytest.raises(InvalidInputError, match="token ids"):
        random_lm.prefill([random_lm.config.vocab_size])
    _, cache = random_lm.prefill([1, 2])
    with pytest.raises(ValueError, match="twice"):
        random_lm.decode([(1, cache), (2, cache)])
    cache.release()
    cache.release()  # twice is harmless
    assert cache.released
    with pytest.raises(ValueError, match="released"):
        random_lm.decode([(1, cache)])


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path: Path) -> None:
    single = write_random_model(tmp_path / "single", CONFIGS["llama"])
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    tensors = load_file(single / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, sharded / shard)
        weight_map |= dict.fromkeys(shard_names, shard)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((single / "config.json").read_text())
    expected, _ = CausalLM.load(single).prefill([1, 2, 3])
    actual, _ = CausalLM.load(sharded).prefill([1, 2, 3])
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_checkpoint_that_does_not_match_the_config_is_refused(tmp_path: Path) -> None:
    model_dir = write_random_model(tmp_path, CONFIGS["llama"])
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ConfigError, match=r"missing model\.norm\.weight"):
        CausalLM.load(model_dir)
    tensors["model.norm.weight"] = torch.ones(64)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ConfigError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape"):
        CausalLM.load(model_dir)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no model\.safetensors"):
        CausalLM.load(model_dir)


def test_prefill_many_pads_without_changing_any_prompts_logits(random_lm: CausalLM) -> None:
    vocab = random_lm.config.vocab_size
    prompts = [[1, 2, 3], [(4 + k) % vocab for k in range(11)], [10]]
    together, caches = random_lm.prefill_many(prompts)
    assert [cache.length for cache in caches] == [3, 11, 1]
    next_together = random_lm.decode([(5, cache) for cache in caches])
    for cache in caches:
        cache.release()
    for index, prompt in enumerate(prompts):
        alone, cache = random_lm.prefill(prompt)
        next_alone = random_lm.decode([(5, cache)])[0]
        cache.release()
        torch.testing.assert_close(together[index], alone, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(next_together[index], next_alone, rtol=1e-4, atol=1e-4)
    assert random_lm.live_sequences == 0


def test_one_step_decodes_the_running_and_prefills_the_joining_as_separate_passes_do(
    random_lm: CausalLM,
) -> None:
    vocab = random_lm.config.vocab_size
    running_prompts = [[(7 * k) % vocab for k in range(9)], [2, 4]]
    joining = [[1, 2, 3], [(4 + k) % vocab for k in range(11)], [10]]

    def run(together: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        running = [random_lm.prefill(prompt)[1] for prompt in running_prompts]
        decodes = [(5, running[1]), (6, running[0])]  # not the cache's row order
        if together:
            decoded, prefilled, caches = random_lm.step(decodes, joining)
        else:
            decoded = random_lm.decode(decodes)
            prefilled, caches = random_lm.prefill_many(joining)
        following = random_lm.decode([(8, cache) for cache in [*caches, *running]])
        lengths = [cache.length for cache in [*caches, *running]]
        for cache in [*caches, *running]:
            cache.release()
        return decoded, prefilled, following, lengths

    apart, together = run(together=False), run(together=True)
    for one, other in zip(together[:3], apart[:3], strict=True):
        torch.testing.assert_close(one, other, rtol=1e-4, atol=1e-4)
    assert together[3] == apart[3] == [4, 12, 2, 11, 4]
    assert random_lm.live_sequences == 0


def test_a_step_that_fails_gives_back_the_joining_sequences_rows(random_lm: CausalLM) -> None:
    _, cache = random_lm.prefill([1, 2])
    with pytest.raises(InvalidInputError, match="token ids"):
        random_lm.step([(1, cache)], [[3], [random_lm.config.vocab_size]])
    assert random_lm.live_sequences == 1
    with pytest.raises(InvalidInputError, match="at least one token"):
        random_lm.step([(1, cache)], [[3], []])
    with pytest.raises(InvalidInputError, match="at least one token"):
        random_lm.step([], [])
    decoded, prefilled, caches = random_lm.step([(1, cache)], [])
    assert decoded.shape == (1, random_lm.config.vocab_size)
    assert prefilled.shape == (0, random_lm.config.vocab_size)
    assert caches == []
    cache.release()
    assert random_lm.live_sequences == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("total", [40, 600], ids=["small", "large"])
def test_half_type_decode_attention_matches_a_float64_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, total: int
) -> None:
    # A decode step's attention in a half type, below and above the size from which it
    # takes its own two products (``attention``), with query heads sharing key/value heads,
    # rows of different lengths (row i sees its first ``lengths[i]`` positions; the rest is
    # whatever a row holds past its end), and keys and values read as the cache holds them
    # (a slice of its rows and positions, not contiguous).
    batch, head_dim = 3, 16
    products = batch * total * heads * head_dim
    assert (products >= kv_cache.HALF_DECODE_PRODUCTS_MIN) == (total == 600)
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(batch, 1, heads, head_dim, generator=generator).transpose(1, 2)
    cache = torch.randn(2, batch + 2, kv_heads, total + 64, head_dim, generator=generator)
    keys, values = cache[0, 1 : batch + 1, :, :total], cache[1, 1 : batch + 1, :, :total]
    lengths = torch.tensor([total, 7, total // 2])
    seen = torch.arange(total)[None, None, None, :] < lengths[:, None, None, None]
    bias = torch.zeros(batch, 1, 1, total).masked_fill_(~seen, -math.inf)

    got = attention(q.to(dtype), keys.to(dtype), values.to(dtype), bias.to(dtype))

    share = heads // kv_heads
    k64, v64 = (x.double().repeat_interleave(share, dim=1) for x in (keys, values))
    scores = q.double() @ k64.transpose(-1, -2) / math.sqrt(head_dim) + bias.double()
    expected = torch.softmax(scores, dim=-1) @ v64
    assert got.dtype == dtype and got.shape == (batch, heads, 1, head_dim)
    tolerance = 0.03 if dtype == torch.bfloat16 else 0.004
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=0)


@pytest.fixture(params=["sdpa", "products"])
def half_attention(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Half-type decode steps of the small random models on either attention path."""
    if request.param == "products":
        monkeypatch.setattr(kv_cache, "HALF_DECODE_PRODUCTS_MIN", 0)
    return str(request.param)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_type_model_gives_the_logits_of_its_float32_twin(
    random_model_dir: Path, dtype: torch.dtype, half_attention: str
) -> None:
    # ``generation.dtype`` bfloat16 / float16: the same weights, rounded, give the float32
    # model's logits to within the type's precision: sequences of different lengths
    # decoding together step after step, then a step where two of them decode while two
    # new prompts join (decode tokens and prompts packed in one pass).
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], list(range(30, 45))]
    joining = [[8, 8, 1], list(range(50, 60))]
    results = {}
    for kind in (torch.float32, dtype):
        lm = CausalLM.load(random_model_dir, dtype=kind)
        caches = [lm.prefill(prompt)[1] for prompt in prompts]
        steps = [lm.decode([(7, cache) for cache in caches]) for _ in range(6)]
        decoded, prefilled, joined = lm.step([(2, caches[2]), (4, caches[0])], joining)
        steps += [decoded, prefilled]
        for cache in [*caches, *joined]:
            cache.release()
        results[kind] = torch.cat(steps)
    reference = results[torch.float32]
    scale = float(reference.abs().max())
    tolerance = (0.05 if dtype == torch.bfloat16 else 0.01) * scale
    torch.testing.assert_close(results[dtype].float(), reference, atol=tolerance, rtol=0)

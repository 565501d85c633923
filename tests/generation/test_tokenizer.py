"""Exact encoding, streaming detokenization of multi-byte text, end-of-sequence tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sluice.app import EXAMPLE_REPOSITORY
from sluice.errors import ConfigError
from sluice.generation.tokenizer import OFF_LOOP_CHARS, Tokenizer

TINY_LLAMA = EXAMPLE_REPOSITORY / "tiny_llama" / "1"
TEXT = "Café crème, naïve. 中文字符测试 and emoji 😀🎉 — déjà vu! 日本語 👍🏽 end."
EOS = "<|end|>"


@pytest.fixture(scope="module")
def multilingual_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE whose merges cut multi-byte characters at every possible byte."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT, "中文 中 文字 😀 😀🎉 é è"] * 3, trainer=trainer)
    directory = tmp_path_factory.mktemp("multilingual")
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS}}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    return directory


@pytest.fixture(params=["bundled", "multilingual"])
def tokenizer(request: pytest.FixtureRequest, multilingual_dir: Path) -> Tokenizer:
    return Tokenizer.load(TINY_LLAMA if request.param == "bundled" else multilingual_dir)


def test_streamed_text_equals_decoding_everything(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    assert tokenizer.count(TEXT) == len(ids)
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.push(token) for token in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens end inside a character: their text waited


def test_generated_text_after_a_prompt(tokenizer: Tokenizer) -> None:
    prompt, generated = tokenizer.encode("Le café "), tokenizer.encode("中文 😀 fin")
    detokenizer = tokenizer.detokenizer(prompt)
    text = "".join(detokenizer.push(token) for token in generated) + detokenizer.flush()
    assert text == tokenizer.decode(generated)


def test_an_incomplete_character_is_flushed_at_the_end(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀")
    if len(ids) == 1:
        pytest.skip("the emoji is one token in this vocabulary")
    detokenizer = tokenizer.detokenizer()
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.flush() == tokenizer.decode(ids[:1])


def test_end_of_sequence_ids(multilingual_dir: Path) -> None:
    tokenizer = Tokenizer.load(multilingual_dir)
    assert tokenizer.eos_token_ids == {7, 8, tokenizer.token_id(EOS)}
    bundled = Tokenizer.load(TINY_LLAMA)
    assert bundled.eos_token_ids == {bundled.token_id("<|endoftext|>")}


def test_end_of_sequence_from_config_json_without_generation_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text((TINY_LLAMA / "tokenizer.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert Tokenizer.load(tmp_path).eos_token_ids == {3}
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "three"}))
    with pytest.raises(ConfigError, match=r"config\.json: field 'eos_token_id'"):
        Tokenizer.load(tmp_path)


def test_missing_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.json: not a loadable tokenizer"):
        Tokenizer.load(tmp_path)


async def test_long_texts_encode_off_the_loop_to_the_same_ids() -> None:
    tokenizer = Tokenizer.load(TINY_LLAMA)
    short = "Once upon a time"
    long = " ".join([short] * 400)
    assert len(long) >= OFF_LOOP_CHARS
    assert await tokenizer.encode_off_loop(short) == tokenizer.encode(short)
    assert await tokenizer.encode_off_loop(long) == tokenizer.encode(long)


@pytest.mark.parametrize(
    "text",
    [
        TEXT * 50,
        "中文字符测试" * 300,
        "😀🎉👍🏽" * 300,
        f"{EOS} " * 200,
        "a" * 5000,
        "\x00\x01\x7f" * 500,
    ],
    ids=["mixed", "cjk", "emoji", "special tokens", "one long word", "control bytes"],
)
def test_the_bytes_per_token_bound_never_undercounts(tokenizer: Tokenizer, text: str) -> None:
    """A prompt longer than ``max_prompt_bytes(n)`` cannot fit in ``n`` tokens: checked
    against the exact token count for texts with the fewest tokens per byte."""
    tokens = len(tokenizer.encode(text))
    assert len(text.encode("utf-8")) <= tokenizer.max_prompt_bytes(tokens)

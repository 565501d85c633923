"""A model folder's ``tokenizer.json`` (the ``tokenizers`` library), its end-of-sequence
tokens, and a detokenizer for streaming.

End-of-sequence tokens are the union of what ``generation_config.json`` (or, without it,
``config.json``) lists as ``eos_token_id`` and the ``eos_token`` of
``tokenizer_config.json``: stopping on any of them is what the model's authors meant.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from sluice.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"

REPLACEMENT_CHARACTER = "\ufffd"
"""What decoding yields for bytes that do not (yet) form a whole UTF-8 character."""

OFF_LOOP_CHARS = 64
"""Texts at least this long are encoded in a worker thread, where the tokenizer runs
without the GIL. Shorter ones are encoded on the event loop: about 40 us (median, CJK or
ASCII). Byte-pair merging is quadratic in a word's length, so even a 1,000-character text
without spaces can take tens of milliseconds: nothing longer runs on the loop."""

NORMALIZER_SHRINK = 4
"""Bytes a normalizer may turn into one (e.g. a combining sequence into one character): a
tokenizer with a normalizer may take up to this many times its longest token's bytes per
token, so the prompt-size bound stays an upper bound."""

CONTEXT_TOKENS = 5
"""Prompt tokens a detokenizer decodes with the first generated ones, so that tokenizers
whose pieces depend on their neighbours (leading spaces) get them right."""


class Tokenizer:
    """Encodes prompts (the token count is exact: what the model will see) and decodes ids."""

    def __init__(self, backend: BackendTokenizer, *, eos_token_ids: frozenset[int]) -> None:
        self._backend = backend
        self.eos_token_ids = eos_token_ids
        #: The most prompt bytes one token can stand for (an upper bound).
        self.max_bytes_per_token = _max_bytes_per_token(backend)

    @classmethod
    def load(cls, model_dir: Path) -> Tokenizer:
        path = model_dir / TOKENIZER_FILE
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exception for every problem
            raise ConfigError(f"{path}: not a loadable tokenizer: {exc}") from exc
        return cls(backend, eos_token_ids=_eos_token_ids(model_dir, backend))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``, with the special tokens (e.g. BOS) the tokenizer's
        post-processor adds unless ``add_special_tokens`` is false."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    async def encode_off_loop(self, text: str) -> list[int]:
        """``encode`` for callers on the event loop: a long text is encoded in a worker
        thread with the GIL released (the library's batch call releases it; its single
        call does not), so a big prompt never stalls every other call."""
        if len(text) < OFF_LOOP_CHARS:
            return self.encode(text)
        return await asyncio.to_thread(self._encode_without_gil, text)

    def _encode_without_gil(self, text: str) -> list[int]:
        (encoding,) = self._backend.encode_batch([text], add_special_tokens=True)
        return list(encoding.ids)

    def max_prompt_bytes(self, tokens: int) -> int:
        """The most bytes a text of ``tokens`` tokens can have: a longer one cannot fit."""
        return tokens * self.max_bytes_per_token

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text for ``token_ids``, special tokens left out."""
        return self._backend.decode(list(token_ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A detokenizer for the tokens generated after ``prompt_ids``."""
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas as they come, for streaming.

    Only complete UTF-8 text comes out: while the newest tokens decode to a partial
    multi-byte character (a trailing U+FFFD), their text is held back. Each step decodes a
    short window (from the last emitted boundary), not the whole sequence. The deltas
    joined, then ``flush()``, equal ``decode`` of the generated ids.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (often empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, complete or not (the sequence has ended)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        complete = not text.endswith(REPLACEMENT_CHARACTER)
        if len(text) <= len(prefix) or not (complete or final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]


def _max_bytes_per_token(backend: BackendTokenizer) -> int:
    """An upper bound on the text bytes one token covers: its vocabulary entry's UTF-8 size
    (byte-level and byte-fallback vocabularies spell a byte with one to six bytes, so this
    never undercounts), times ``NORMALIZER_SHRINK`` when a normalizer may shrink the text."""
    longest = max((len(token.encode("utf-8")) for token in backend.get_vocab()), default=1)
    return max(1, longest) * (NORMALIZER_SHRINK if backend.normalizer is not None else 1)


def _eos_token_ids(model_dir: Path, backend: BackendTokenizer) -> frozenset[int]:
    source = model_dir / GENERATION_CONFIG_FILE
    if not source.is_file():
        source = model_dir / MODEL_CONFIG_FILE
    ids = (_read_json(source) or {}).get("eos_token_id")
    listed = ids if isinstance(ids, list) else [] if ids is None else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        raise ConfigError(f"{source}: field 'eos_token_id': expected token ids, got {ids!r}")
    eos = set(listed)
    token = (_read_json(model_dir / TOKENIZER_CONFIG_FILE) or {}).get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and (token_id := backend.token_to_id(token)) is not None:
        eos.add(token_id)
    return frozenset(eos)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw
